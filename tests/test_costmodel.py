"""The cost model of method="auto": graph sizes, the fit, and a deterministic choice."""

import json

import pytest
import torch

import torchderiv
from torchderiv import _costmodel
from torchderiv._cache import captured


def _mlp(din, width, depth, dout):
    layers, w = [], din
    for _ in range(depth - 1):
        layers += [torch.nn.Linear(w, width), torch.nn.Tanh()]
        w = width
    return torch.nn.Sequential(*layers, torch.nn.Linear(w, dout))


def test_graph_cost_counts_the_multiply_adds_of_an_mlp():
    net, x = _mlp(3, 20, 4, 2), torch.rand(7, 3)
    cost = _costmodel.graph_cost(captured(net, x, True, "test").gm, 7)
    assert cost.flops == 3 * 20 + 20 * 20 + 20 * 20 + 20 * 2
    assert cost.ops >= 7  # 4 linear layers and 3 tanh at least
    assert cost.elems >= 3 * 20  # the tanh outputs, per sample


def test_units_of_each_method():
    assert _costmodel.reverse_units("jacobian", m=3, n=10) == 7
    assert _costmodel.reverse_units("hessian", m=2, n=5) == 41
    # first partials (prefix ()) and u_xx, u_yy (prefixes (0,), (1,)): 3 reverse passes per output, the two
    # second ones through a graph twice the forward's size
    assert _costmodel.autograd_units([(0,), (1,), (0, 0), (1, 1)], m=2) == 1 + 2 * 2 * (1 + 2 + 2)


def test_fit_recovers_constants_of_synthetic_timings():
    g = torch.Generator().manual_seed(0)
    true = {"forward": [1e-4, 2e-7, 3e-10, 0.0], "reverse": [5e-4, 0.0, 9e-10, 1e-9]}
    rows = []
    for method, c in true.items():
        for grad in (False, True):
            for _ in range(30):
                u, ops, fl, el, b = (float(v) for v in torch.randint(1, 200, (5,), generator=g))
                t = c[0] + u * (c[1] * ops + c[2] * b * fl * 100 + c[3] * b * el)
                rows.append({"method": method, "grad": grad, "units": u, "ops": ops, "flops": fl * 100,
                             "elems": el, "batch": b, "seconds": t})
    fitted = _costmodel.fit(rows)
    for method, c in true.items():
        for mode in ("grad", "nograd"):
            torch.testing.assert_close(torch.tensor(fitted[method][mode]), torch.tensor(c), rtol=1e-6, atol=1e-12)


def test_choice_is_deterministic_and_follows_the_table(monkeypatch):
    net, x = _mlp(100, 32, 3, 1), torch.rand(64, 100)
    with torch.no_grad():
        picks = {torchderiv.choose_method("jacobian", net, x) for _ in range(3)}
    assert len(picks) == 1 and picks <= {"reverse", "autograd"}  # 101 forward streams against one reverse pass
    # a table that makes reverse passes expensive flips the choice, and nothing else does
    slow_reverse = json.loads(json.dumps(_costmodel.table()))
    slow_reverse["reverse"] = {"grad": [10.0, 0, 0, 0], "nograd": [10.0, 0, 0, 0]}
    slow_reverse["autograd"] = {"grad": [10.0, 0, 0, 0], "nograd": [10.0, 0, 0, 0]}  # admissible here too
    monkeypatch.setattr(_costmodel, "table", lambda: slow_reverse)
    with torch.no_grad():
        assert torchderiv.choose_method("jacobian", net, x) == "forward"


def test_operator_passed_as_function_and_bad_op():
    net, x = _mlp(2, 8, 2, 1), torch.rand(4, 2)
    # Taylor mode or nested autograd: laplacian has no reverse-mode form the model could pick
    assert torchderiv.choose_method(torchderiv.laplacian, net, x) in ("forward", "autograd")
    with pytest.raises(ValueError, match="choose_method: op must name"):
        torchderiv.choose_method("gradient", net, x)


def test_shipped_table_is_well_formed():
    t = _costmodel.table()
    for method in ("forward", "reverse"):
        for mode in ("grad", "nograd"):
            c = t[method][mode]
            assert len(c) == 4 and all(v >= 0 for v in c)
    assert set(_costmodel.margins()) <= {"forward", "reverse", "autograd"}
    assert all(1.0 <= v <= 1.5 for v in _costmodel.margins().values())


def test_a_decision_margin_weighs_a_method_in_the_choice():
    times = {"forward": 1.1, "autograd": 1.0}
    assert _costmodel.cheapest(times, {}) == "autograd"
    assert _costmodel.cheapest(times, {"autograd": 1.15}) == "forward"
    assert _costmodel.cheapest({"forward": 1.2, "autograd": 1.0}, {"autograd": 1.15}) == "autograd"


def test_fit_margins_takes_the_middle_of_the_best_interval():
    """Synthetic points where the model over-rates nested autograd by 8 %: autograd measured 8 % slower than
    predicted, so every margin from 1.10 on chooses right at the points within 8 % and the middle of the best
    margins (1.10 .. 1.50) is picked."""
    from torchderiv.bench._calibrate import evaluate, fit_margins

    consts = {m: {"grad": [0.0, 0.0, 0.0, 1e-9], "nograd": [0.0, 0.0, 0.0, 1e-9]}
              for m in ("forward", "autograd")}
    rows = []
    for i, (uf, ua) in enumerate([(10, 9.5), (10, 9.8), (10, 5), (10, 12)]):
        point = {"i": i}
        for m, u, t in (("forward", uf, uf), ("autograd", ua, ua * 1.08)):
            rows.append({"method": m, "grad": True, "units": u, "ops": 1, "flops": 0, "elems": 1, "batch": 1e9,
                         "seconds": t, "point": point})
    assert evaluate(rows, consts, {})["picked_fastest"] == 2
    assert evaluate(rows, consts, {"autograd": 1.1})["picked_fastest"] == 4
    assert fit_margins(rows, consts) == {"autograd": 1.3}

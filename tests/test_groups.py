"""Independent groups of directions propagated side by side in one generated graph (torchderiv._taylor.
direction_groups, torchderiv._build.build with several plans): which requests split, that the shared primal
computation runs once, and that values and parameter gradients (first and second order) equal those of the
unsplit graph and of nested autograd, in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchderiv as td
from _harness import nested_partial
from torchderiv import _cache, _taylor
from torchderiv._taylor import direction_groups, normalized


def _groups(spec, combos=()):
    return direction_groups(*normalized(spec, combos))


@pytest.mark.parametrize("spec, combos, expected", [
    # u, u_t, u_xx (Allen-Cahn): t alone, x alone
    ([(), (0,), (1, 1)], (), [([1], []), ([2], [])]),
    # u_t, u_xx, u_yy, u_zz (heat): t alone; x, y, z alike, one stacked group
    ([(3,), (0, 0), (1, 1), (2, 2)], (), [([0], []), ([1, 2, 3], [])]),
    # Burgers: u_t, u_x, u_xx
    ([(), (0,), (1,), (1, 1)], (), [([1], []), ([2, 3], [])]),
    # u_xx, u_yy: alike, kept whole
    ([(0, 0), (1, 1)], (), None),
    # Kovasznay: u_x, u_y, u_xx, u_yy: alike, kept whole
    ([(), (0,), (1,), (0, 0), (1, 1)], (), None),
    # a mixed partial joins its coordinates
    ([(0,), (1, 1), (0, 1)], (), None),
    # a Laplacian (one combination over both coordinates) next to a first partial of one of them
    ([(0,)], ((((0, 0), 1.0), ((1, 1), 1.0)),), None),
    # a combination of one coordinate and an item of another
    ([(1,)], ((((0, 0), 1.0), ((0, 0, 0), 2.0)),), [([0], []), ([], [0])]),
    # more groups than MAX_GROUPS: kept whole
    ([(0,), (1, 1), (2, 2, 2), (3, 3, 3, 3), (4, 4, 4, 4, 4)], (), None),
])
def test_which_requests_split(spec, combos, expected):
    assert _groups(spec, combos) == expected


def _mlp(act=nn.Tanh, sizes=(3, 16, 16, 2)):
    torch.manual_seed(0)
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), act()]
    return nn.Sequential(*layers[:-1]).double()


def _nested(f, x, spec):
    """Every partial of ``spec`` by nested torch.autograd.grad, kept differentiable."""
    return {key: nested_partial(f, x, key) for key in spec}


def _whole(monkeypatch):
    monkeypatch.setattr(_taylor, "MAX_GROUPS", 1)


@pytest.mark.parametrize("act", [nn.Tanh, nn.SiLU, nn.GELU, nn.Softplus])
def test_values_and_parameter_gradients_equal_the_unsplit_graph_and_nested_autograd(act, monkeypatch):
    f = _mlp(act)
    x = torch.rand(7, 3, dtype=torch.float64)
    spec = [(), (2,), (0, 0), (1, 1, 1)]
    assert _groups(spec) is not None

    def loss_and_grads(parts):
        loss = sum((v ** 2).mean() for v in parts.values())
        g = torch.autograd.grad(loss, list(f.parameters()), create_graph=True)
        # a Hessian-vector product w.r.t. the parameters: the result is twice differentiable
        hv = torch.autograd.grad(sum((gi * gi.detach()).sum() for gi in g), list(f.parameters()))
        return loss, g, hv

    split = loss_and_grads(td.partials(f, x, spec))
    ref = loss_and_grads(_nested(f, x, spec))
    _whole(monkeypatch)
    g2 = nn.Sequential(*f)  # another module (its own cache slot), the same parameters
    whole = loss_and_grads(td.partials(g2, x, spec))
    for other in (ref, whole):
        torch.testing.assert_close(split[0], other[0], rtol=1e-10, atol=1e-12)
        for a, b in zip(split[1] + split[2], other[1] + other[2]):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def _graph(f, x, spec):
    td.partials(f, x, spec)
    return [e.gm for k, e in _cache._slot(f).items() if k[0] != "capture" and getattr(e, "gm", None) is not None]


def test_the_primal_computation_runs_once_per_call():
    f = _mlp(sizes=(3, 16, 16, 16, 1))
    x = torch.rand(5, 3, dtype=torch.float64)
    (gm,) = _graph(f, x, [(), (0,), (1, 1), (2, 2, 2)])  # three groups
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.aten.tanh.default) == 3
    assert targets.count(torch.ops.aten.addmm.default) == 4  # the value's layers; coefficients take mm


class _Counting(nn.Module):
    """A net that counts its calls in a buffer, in place (as spectral_norm's power iteration writes its
    vectors): interpreting it once per group would count twice."""

    def __init__(self):
        super().__init__()
        self.net = _mlp()
        self.register_buffer("calls", torch.zeros((), dtype=torch.float64))

    def forward(self, x):
        self.calls.add_(1)
        return self.net(x)


def test_a_graph_that_writes_in_place_is_never_split():
    f = _Counting()
    x = torch.rand(4, 3, dtype=torch.float64)
    spec = [(), (0,), (1, 1)]
    cap = _cache.captured(f, x, True, "partials")
    assert not _taylor._repeatable(cap)
    before = float(f.calls)
    got = td.partials(f, x, spec)
    ref = _nested(f.net, x, spec)
    for k in spec:
        torch.testing.assert_close(got[k], ref[k])
    td.partials(f, x, spec)
    assert float(f.calls) - before == 2  # once per call


def test_dropout_in_training_mode_is_never_split():
    f = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 1)).train()
    cap = _cache.captured(f, torch.rand(4, 3), True, "partials")
    assert not _taylor._repeatable(cap)
    assert _taylor._repeatable(_cache.captured(f.eval(), torch.rand(4, 3), True, "partials"))


class _Transposed(nn.Module):
    """Its output is a transposed view (non-contiguous): each group's one-row coefficients are read out
    of such tensors."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 6).double()

    def forward(self, x):
        return torch.tanh(self.lin(x)).view(-1, 2, 3).transpose(1, 2)


def test_grouped_partials_of_a_non_contiguous_output():
    f = _Transposed()
    x = torch.rand(4, 2, dtype=torch.float64)
    spec = [(), (0,), (1, 1)]
    assert _groups(spec) is not None
    got = td.partials(f, x, spec)
    one = lambda xi: f(xi[None])[0]  # noqa: E731
    J = torch.func.vmap(torch.func.jacrev(one))(x)
    H = torch.func.vmap(torch.func.hessian(one))(x)
    torch.testing.assert_close(got[()], f(x))
    torch.testing.assert_close(got[(0,)], J[..., 0])
    torch.testing.assert_close(got[(1, 1)], H[..., 1, 1])

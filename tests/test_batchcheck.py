"""The batch-independence check as a property: every graph it accepts keeps the rows of a batch apart.

For a graph the check accepts, a tangent in row ``r`` of ``x`` alone must leave every other row of the
output tangent exactly zero (``torch.func.jvp`` of the whole batched ``f``; plain reverse-mode autograd where
torch has no forward-mode formula for an op, checking the same statement from the other side). This runs over
every model of the test suite's zoos and rule cases, and over small random compositions of per-sample and
row-mixing steps (hypothesis): the compositions built from per-sample steps only must be accepted, those with
a row-mixing step refused. The registry itself is checked for consistency with the op kinds of ``_rules``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import conftest
import test_batch_check_more as more
import test_errors as errs
import test_fft_complex as fftc
import test_neural_fields as fields
import test_rules as rules
import test_zoo_families as families
import test_zoo_unseen as unseen
from torchderiv import BatchMixingError, _batchcheck
from torchderiv._capture import TraceError, capture, check_batch_independence
from torchderiv._rules import CONSTANT, ELEMENTWISE, KINDS, RULES, kind_of

aten = torch.ops.aten
DT = torch.float64


# ----------------------------------------------------------------------------- the property


def leak(f, x: torch.Tensor, seed: int = 0) -> float:
    """Largest |entry| of the derivative of an output row ``b != r`` along a direction in input row ``r`` alone,
    over every row ``r``: 0.0 exactly when no row of x reaches another row of f(x)."""
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for r in range(x.shape[0]):
        t = torch.zeros_like(x)
        t[r] = torch.randn(x.shape[1:], dtype=x.dtype, generator=g)
        try:
            _, dy = torch.func.jvp(f, (x,), (t,))
            others = torch.cat([dy[:r], dy[r + 1 :]])
        except (RuntimeError, NotImplementedError):  # an op without a forward-mode formula: ask reverse mode
            xr = x.detach().requires_grad_(True)
            y = f(xr)
            cot = torch.randn(y.shape, dtype=y.dtype, generator=g)
            cot[r] = 0  # every output row but r ...
            others = torch.autograd.grad(y, xr, cot)[0][r]  # ... seen from input row r
        worst = max(worst, others.abs().max().item() if others.numel() else 0.0)
    return worst


def accepted(f, x: torch.Tensor) -> bool:
    try:
        check_batch_independence(capture(f, x), "jacobian")
    except BatchMixingError:
        return False
    return True


# models whose capture fails (torch's functionalization asserts): no graph to check, the engine falls back
UNTRACEABLE = {"unseen-lstm_cell_unrolled"}


# ----------------------------------------------------------------------------- every model of the suite


def _at_least_two_rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.shape[0] >= 2 else torch.cat([x, 0.9 * x])


def _corpus() -> list:
    """(name, f, x, per_sample) for every model of the test suite that takes a batch."""
    out = []
    for c in conftest.ZOO:
        model, _, x = c.build()
        out.append((f"zoo-{c.name}", model, x, True))
    for c in unseen.CASES:
        model, _, x = c.build()
        out.append((f"unseen-{c.name}", model, x, True))
    for fam in families.FAMS:
        model, _, x = fam.build()
        out.append((f"family-{fam.name}", model, x, True))
    for c in more.CASES:
        model, _, x = more.build(c)
        out.append((f"more-{c.name}", model, x, True))
    for name in fields.MODELS:
        x = torch.rand(4, 3 if name.startswith("volume") else 2, dtype=DT,
                       generator=torch.Generator().manual_seed(2)) * 1.6 - 0.8
        out.append((f"field-{name}", fields.MODELS[name](), x, True))
    for name in fftc.MODELS:
        net, x = fftc.build(name, batch=3)
        out.append((f"fft-{name}", net, x, True))
    for c in rules.CASES:
        if c.batched:
            out.append((f"rule-{c.name}", c.fn, c.x(), True))
    g = torch.Generator().manual_seed(7)
    for name, (f, shape, _) in more.MIXERS.items():
        out.append((f"mixer-{name}", f, torch.randn(4, *shape, dtype=DT, generator=g), False))
    for name, (f, _) in errs.MIXERS.items():
        out.append((f"mixer-{name}", f, torch.randn(4, 3, dtype=DT, generator=g), False))
    return [(n, f, _at_least_two_rows(x), ok) for n, f, x, ok in out]


CORPUS = _corpus()


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # generic-fallback warnings: not what is checked here
        yield


def _param(case):
    """The zoo and the row-mixing models always; the rest of the corpus (every rule case, the other zoos: a few
    minutes of tracing) with the slow tests."""
    fast = case[0].startswith(("zoo-", "mixer-"))
    return pytest.param(*case, id=case[0], marks=() if fast else pytest.mark.slow)


@pytest.mark.parametrize(("name", "f", "x", "per_sample"), [_param(c) for c in CORPUS])
def test_accepted_graphs_keep_rows_apart(name, f, x, per_sample):
    """Per-sample models are accepted and, being accepted, keep rows apart exactly; row-mixing ones refused."""
    if name in UNTRACEABLE:
        with pytest.raises(TraceError):
            capture(f, x)
        return
    ok = accepted(f, x)
    assert ok == per_sample, f"{name}: the check {'accepts' if ok else 'refuses'} it"
    if ok:
        assert leak(f, x) == 0.0, f"{name}: accepted, but a tangent in one row reaches another row"


def test_the_property_can_fail():
    """``leak`` sees row mixing where there is some: it is not a check that passes whatever the graph."""
    x = torch.randn(4, 3, dtype=DT, generator=torch.Generator().manual_seed(3))
    for name in ("minus_batch_mean", "gram", "cumsum_over_batch", "row_shift", "softmax_over_batch"):
        assert leak(errs.MIXERS[name][0], x) > 1e-3, name
    assert leak(torch.tanh, x) == 0.0


def test_corpus_is_broad():
    n_ok = sum(1 for c in CORPUS if c[3])
    n_mix = sum(1 for c in CORPUS if not c[3])
    assert n_ok >= 150 and n_mix >= 30, (n_ok, n_mix)


# ----------------------------------------------------------------------------- random compositions

_W = torch.randn(4, 4, dtype=DT, generator=torch.Generator().manual_seed(11))
_K = torch.randn(1, 1, 3, dtype=DT, generator=torch.Generator().manual_seed(12))
_PERM = torch.tensor([2, 0, 3, 1])

PER_SAMPLE = {  # [B, 4] -> [B, 4], row b from row b alone
    "tanh": torch.tanh,
    "poly": lambda h: h * h + 0.5 * h,
    "linear": lambda h: h @ _W,
    "softmax": lambda h: torch.softmax(h, -1),
    "cumsum": lambda h: h.cumsum(-1),
    "sort": lambda h: h.sort(-1).values,
    "flip": lambda h: h.flip(-1),
    "roll": lambda h: h.roll(1, -1),
    "perm_cols": lambda h: h[:, _PERM],
    "gather_ranks": lambda h: h.gather(1, h.argsort(1)) * h,
    "pairs": lambda h: (h.view(-1, 2, 2).transpose(1, 2) * h.view(-1, 2, 2)).reshape(h.shape[0], 4),
    "heads_bmm": lambda h: (h.view(-1, 2, 2) @ h.view(-1, 2, 2).transpose(1, 2)).reshape(-1, 4),
    "fold_rows": lambda h: torch.sin(h.reshape(-1, 2)).reshape(-1, 4),
    "norm": lambda h: h * h.norm(dim=-1, keepdim=True),
    "layer_norm": lambda h: F.layer_norm(h, (4,)),
    "cat_slices": lambda h: torch.cat([h[:, 2:], torch.sin(h[:, :2])], 1),
    "max": lambda h: h * h.max(-1, keepdim=True).values,
    "where": lambda h: torch.where(h > 0, h, 0.1 * h),
    "pad_crop": lambda h: 2 * F.pad(h, (1, 1))[:, 1:-1],
    "conv": lambda h: F.conv1d(h.unsqueeze(1), _K, padding=1).squeeze(1),
    "outer_trace": lambda h: (h.unsqueeze(2) * h.unsqueeze(1)).diagonal(dim1=1, dim2=2),
}
MIXING = {  # [B, 4] -> [B, 4], rows interact
    "minus_mean0": lambda h: h - h.mean(0),
    "roll0": lambda h: h.roll(1, 0),
    "flip0": lambda h: h.flip(0),
    "cumsum0": lambda h: h.cumsum(0),
    "softmax0": lambda h: torch.softmax(h, 0),
    "gram": lambda h: h @ (h.T @ h) / 4,
    "scramble_view": lambda h: h.reshape(4, -1).t().reshape(h.shape),
    "rows_reversed": lambda h: h[torch.arange(h.shape[0] - 1, -1, -1)],
    "as_strided": lambda h: torch.tanh(h.as_strided(h.shape, (0, 1))),
    "batch_norm_train": lambda h: F.batch_norm(h, None, None, training=True),
    "sort0": lambda h: h.sort(0).values,
    "layer_norm_weight_from_rows": lambda h: F.layer_norm(h, (4,), weight=h[:, 0]),  # B == 4 here
}


def _compose(names):
    steps = [PER_SAMPLE.get(n) or MIXING[n] for n in names]

    def f(x):
        for s in steps:
            x = s(x)
        return x

    return f


@settings(max_examples=40, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate])
@given(st.lists(st.sampled_from(sorted(PER_SAMPLE) + sorted(MIXING)), min_size=1, max_size=4),
       st.integers(0, 2**16))
def test_random_compositions(names, seed):
    x = torch.randn(4, 4, dtype=DT, generator=torch.Generator().manual_seed(seed))
    f = _compose(names)
    ok = accepted(f, x)
    mixes = any(n in MIXING for n in names)
    assert ok != mixes, f"{names}: {'accepted' if ok else 'refused'}"
    if ok:
        assert leak(f, x, seed) == 0.0, names


@pytest.mark.parametrize("name", sorted(MIXING))
def test_each_mixing_step_is_refused(name):
    x = torch.randn(4, 4, dtype=DT, generator=torch.Generator().manual_seed(5))
    f = _compose(["tanh", name, "linear"])
    assert not accepted(f, x)


# ----------------------------------------------------------------------------- the registry


def test_as_strided_reading_another_row_is_refused():
    """Regression: the old checker let any unknown same-shape op through (as_strided reading row 0 for every
    row was accepted, and the per-sample Jacobian was silently wrong)."""
    x = torch.randn(3, 3, dtype=DT, generator=torch.Generator().manual_seed(0))

    def f(x):
        return torch.tanh(x.as_strided(x.shape, (0, 1)))

    assert leak(f, x) > 0
    with pytest.raises(BatchMixingError, match="as_strided"):
        check_batch_independence(capture(f, x), "jacobian")


def test_layer_norm_weight_from_other_rows_is_refused():
    """Regression: layer_norm's weight may carry the batch (features == B): every row reads every sample."""
    x = torch.randn(4, 4, dtype=DT, generator=torch.Generator().manual_seed(0))

    def f(x):
        return F.layer_norm(x, (4,), weight=x[:, 0])

    assert leak(f, x) > 0
    with pytest.raises(BatchMixingError, match="layer_norm"):
        check_batch_independence(capture(f, x), "jacobian")


def test_an_op_nobody_declared_is_refused():
    """An op with neither a batch rule nor a declared elementwise / constant kind counts as mixing rows, even a
    same-shape one (bucketize against constant boundaries: in fact per sample, but nobody told the check)."""
    x = torch.randn(3, 4, dtype=DT, generator=torch.Generator().manual_seed(0))
    bounds = torch.tensor([-0.5, 0.0, 0.5], dtype=DT)
    assert kind_of(aten.bucketize.Tensor) is None and aten.bucketize not in _batchcheck.BATCH_RULES
    with pytest.raises(BatchMixingError, match="bucketize.*does not know"):
        check_batch_independence(capture(lambda x: torch.bucketize(x, bounds) * x, x), "jacobian")


def test_every_rule_has_a_kind_and_kinds_do_not_shadow_rules():
    """Every Taylor rule states its kind; an op declared elementwise or constant has no batch rule of its own
    (the declaration is the batch rule), and every batch rule is registered for an op torch has."""
    assert set(RULES) <= set(KINDS)
    for op, kind in KINDS.items():
        packet = getattr(op, "overloadpacket", op)
        if kind in (ELEMENTWISE, CONSTANT):
            assert packet not in _batchcheck.BATCH_RULES, op
    assert len(_batchcheck.BATCH_RULES) >= 100
    assert kind_of(aten.i0.default) == ELEMENTWISE  # ATen's pointwise tag, without a declaration
    assert kind_of(aten.max.dim) != ELEMENTWISE and kind_of(aten.max.default) != ELEMENTWISE


def test_arguments_are_read_by_name_with_defaults():
    x = torch.randn(3, 4, dtype=DT)
    cap = capture(lambda x: x.sum(1) + torch.sort(x).values.amax(-1), x)
    nodes = {n.target: n for n in cap.gm.graph.nodes if n.op == "call_function"}
    a = _batchcheck._arguments(nodes[aten.sort.default])
    assert a["dim"] == -1 and a["descending"] is False and "input" in a
    assert _batchcheck._arguments(nodes[aten.sum.dim_IntList])["dim"] == [1]

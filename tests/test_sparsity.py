"""Sparsity detection, colorings and the colored (compressed) derivative paths.

Patterns are checked against the true support of float64 torch.func Jacobians / Hessians on random inputs
(and random parameters): contained always, equal on the structured nets. Compressed results are checked
against the same references.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchderiv as td
from _harness import sampled
from conftest import ZOO, ZOO_IDS, assert_close, ref_hessian, ref_jacobian
from torchderiv import _compressed
from torchderiv._coloring import (
    color_columns,
    color_diagonal,
    columns_valid,
    diagonal_valid,
    hessian_valid,
)
from torchderiv._sparsity import detect

DT = torch.float64


# ----------------------------------------------------------------------------- structured nets


class Conv1(nn.Module):
    """Two width-5 convolutions over positions: a banded Jacobian of bandwidth 9."""

    def __init__(self, c=3):
        super().__init__()
        self.c1 = nn.Conv1d(1, c, 5, padding=2)
        self.c2 = nn.Conv1d(c, 1, 5, padding=2)

    def forward(self, x):
        return self.c2(torch.tanh(self.c1(x.unsqueeze(1)))).squeeze(1)


class Grid(nn.Module):
    """Two 3x3 convolutions on a 5 x 5 grid."""

    def __init__(self, c=2):
        super().__init__()
        self.c1 = nn.Conv2d(1, c, 3, padding=1)
        self.c2 = nn.Conv2d(c, 1, 3, padding=1)

    def forward(self, x):
        return self.c2(torch.nn.functional.silu(self.c1(x.unsqueeze(1)))).squeeze(1)


class Tokens(nn.Module):
    """The same MLP on each of 4 tokens of 3 features: a block-diagonal Jacobian."""

    def __init__(self):
        super().__init__()
        self.m = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))

    def forward(self, x):
        return self.m(x.unflatten(-1, (4, 3))).flatten(-2)


class Attn(nn.Module):
    """Softmax self-attention over 3 tokens then LayerNorm: dense."""

    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(4, 4), nn.Linear(4, 4)
        self.ln = nn.LayerNorm(4)

    def forward(self, x):
        h = x.unflatten(-1, (3, 4))
        a = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2) / 2, -1)
        return self.ln(a @ h).flatten(-2)


IDX = torch.tensor([3, 0, 0, 5, 1])


def gather_map(x):
    return x[:, IDX] * x[:, [1, 2, 3, 4, 0]].exp() + x[:, 5:6] ** 2


def pointwise(x):
    return torch.tanh(x) * x**2 + torch.sin(x)


def separable(x):
    """A sum of one-coordinate terms plus a product: dense Jacobian row, diagonal-plus-one Hessian."""
    return torch.sin(x).sum(-1, keepdim=True) + x[:, :1] * x[:, 1:2]


def grouped_softmax(x):
    return torch.softmax(x.unflatten(-1, (2, 3)), -1).flatten(-2)


def rolled(x):
    """A square map whose Jacobian diagonal is zero beyond the first two coordinates."""
    return torch.cat([x[:, :2].exp(), torch.roll(x[:, 2:], 1, -1).tanh()], 1)


STRUCTURED = {  # name -> (factory, per-sample input size)
    "pointwise": (lambda: pointwise, 7),
    "conv1d": (lambda: Conv1(), 14),
    "grid_conv": (lambda: Grid(), (5, 5)),
    "tokens": (lambda: Tokens(), 12),
    "attention": (lambda: Attn(), 12),
    "gather": (lambda: gather_map, 6),
    "separable": (lambda: separable, 5),
    "grouped_softmax": (lambda: grouped_softmax, 6),
    "rolled": (lambda: rolled, 6),
}
structured = pytest.mark.parametrize("name", list(STRUCTURED))


def build(name, seed=0, batch=3):
    torch.manual_seed(100 + seed)
    fac, n = STRUCTURED[name]
    f = fac()
    if isinstance(f, nn.Module):
        f = f.to(DT).eval()
    shape = n if isinstance(n, tuple) else (n,)
    g = torch.Generator().manual_seed(200 + seed)
    return f, torch.randn(batch, *shape, dtype=DT, generator=g)


def true_J(f, x):
    J = ref_jacobian(f, x)
    return J.reshape(x.shape[0], -1, x[0].numel()).ne(0).any(0)


def true_H(f, x):
    H = ref_hessian(f, x)
    n = x[0].numel()
    return H.reshape(x.shape[0], -1, n, n).ne(0).any(0)


def dense_H(P):
    return P.to_dense()


# ----------------------------------------------------------------------------- detection


@pytest.mark.parametrize("case", ZOO, ids=ZOO_IDS)
def test_zoo_patterns_contain_every_nonzero(case):
    model, ref, x = case.build()
    P1 = td.sparsity(model, x).to_dense()
    P2 = td.sparsity(model, x, order=2).to_dense()
    for seed in (0, 1):
        _, ref_s, xs = case.build(seed)
        T1, T2 = true_J(ref_s, xs), true_H(ref_s, xs)
        assert not (T1 & ~P1).any(), f"{case.name}: order-1 pattern misses a nonzero"
        assert not (T2 & ~P2).any(), f"{case.name}: order-2 pattern misses a nonzero"


@structured
def test_structured_patterns_are_exact(name):
    f, x = build(name)
    P1 = td.sparsity(f, x)
    P2 = td.sparsity(f, x, order=2)
    assert P1.dtype == torch.bool and P1.is_coalesced() and P2.is_coalesced()
    T1, T2 = true_J(f, x), true_H(f, x)
    assert P1.shape == T1.shape and P2.shape == T2.shape
    assert torch.equal(P1.to_dense(), T1), name
    assert torch.equal(P2.to_dense(), T2), name


def test_known_patterns():
    """The supports stated by hand: banded, pointwise, block-diagonal, bilinear."""
    f, x = build("conv1d")
    P = td.sparsity(f, x).to_dense()
    i = torch.arange(14)
    assert torch.equal(P, (i[:, None] - i[None, :]).abs() <= 4)
    f, x = build("tokens")
    P = td.sparsity(f, x).to_dense()
    assert torch.equal(P, torch.block_diag(*[torch.ones(2, 3, dtype=torch.bool)] * 4))
    P = td.sparsity(lambda x: x[:, :1] * x[:, 1:2], torch.zeros(2, 2), order=2).to_dense()
    assert P[0].tolist() == [[False, True], [True, False]]


def test_parameter_values_are_never_read():
    """A weight that is zero now may not be after the next step: the pattern must not shrink."""
    f, x = build("conv1d")
    before = td.sparsity(f, x).to_dense()
    with torch.no_grad():
        f.c1.weight[:, :, 0] = 0  # one tap of the kernel is zero
        f.c2.weight.zero_()
    td.clear_cache()
    assert torch.equal(td.sparsity(f, x).to_dense(), before)


def test_indices_computed_from_x_are_conservative():
    def f(x):
        return torch.gather(x, 1, x.argsort(1)) * 2  # a sort by hand: which entry lands where depends on x

    x = torch.randn(3, 5, dtype=DT)
    P = td.sparsity(f, x).to_dense()
    assert P.all()
    assert not (true_J(f, x) & ~P).any()


def test_unbatched_and_shapes():
    f, x = build("conv1d")
    P = td.sparsity(lambda z: f(z.unsqueeze(0)).squeeze(0), x[0], batched=False)
    assert P.shape == (14, 14)
    assert torch.equal(P.to_dense(), td.sparsity(f, x).to_dense())
    y = torch.zeros(2, 2, 3)
    assert td.sparsity(lambda x: x.sum(-1), y).shape == (2, 6)


def test_bad_arguments():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="order must be 1"):
        td.sparsity(torch.sin, x, order=3)
    with pytest.raises(TypeError, match="sparsity must be None"):
        td.jacobian(torch.sin, x, sparsity="yes")
    with pytest.raises(ValueError, match="layout must be"):
        td.jacobian(torch.sin, x, layout=torch.sparse_csr)
    with pytest.raises(ValueError, match="method='reverse'"):
        td.hessian(torch.sin, x, sparsity=True, method="reverse")
    with pytest.raises(td.BatchMixingError):
        td.sparsity(lambda x: x - x.mean(0), torch.zeros(3, 2))


# ----------------------------------------------------------------------------- colorings


@structured
def test_colorings_are_valid(name):
    f, x = build(name)
    pat = detect(f, x, True, 2, "test")
    c = color_columns(pat.J)
    assert columns_valid(pat.J, c)
    if pat.m == pat.n:
        d = color_diagonal(pat.J)
        assert diagonal_valid(pat.J, d)
    h = color_columns(pat.hessian_rows())
    assert hessian_valid(pat.H, h)


def test_color_counts():
    f, x = build("conv1d")
    pat = detect(f, x, True, 1, "test")
    assert int(color_columns(pat.J).max()) + 1 == 9  # bandwidth 9
    assert int(color_diagonal(pat.J).max()) + 1 == 5  # |i - k| <= 4 conflicts
    f, x = build("pointwise")
    pat = detect(f, x, True, 2, "test")
    assert int(color_diagonal(pat.J).max()) + 1 == 1
    assert int(color_columns(pat.hessian_rows()).max()) + 1 == 1


def test_validity_checks_can_fail():
    f, x = build("conv1d")
    pat = detect(f, x, True, 2, "test")
    one = torch.zeros(pat.n, dtype=torch.long)
    assert not columns_valid(pat.J, one)
    assert not diagonal_valid(pat.J, one)
    assert not hessian_valid(pat.H, one)
    # a distance-1 coloring of the Jacobian alone is not enough for the Hessian of a scalar sum
    T = torch.tensor([[0, 0], [0, 1], [0, 1]])  # H_0 = diag(1, 1): one block (0, 0) would hold both
    assert not hessian_valid(T, torch.tensor([0, 0]))
    assert hessian_valid(T, torch.tensor([0, 1]))


# ----------------------------------------------------------------------------- compressed results


@structured
def test_compressed_jacobians_equal_dense(name):
    f, x = build(name)
    ref = ref_jacobian(f, x)
    assert_close(td.jacobian(f, x, sparsity=True), ref, msg=f"{name} jacobian")
    one = td.jacobian(lambda z: f(z.unsqueeze(0)).squeeze(0), x[0], batched=False, sparsity=True)
    assert_close(one, ref[0], msg=f"{name} unbatched")
    if ref.shape[1 : 1 + x.dim() - 1] == x.shape[1:]:
        n = x[0].numel()
        diag = ref.reshape(x.shape[0], n, n).diagonal(dim1=-2, dim2=-1).reshape(x.shape)
        assert_close(td.jacobian_diagonal(f, x, sparsity=True), diag, msg=f"{name} diagonal")
        assert_close(td.divergence(f, x, sparsity=True), diag.flatten(1).sum(-1), msg=f"{name} divergence")


@structured
def test_compressed_hessians_equal_dense(name):
    f, x = build(name)
    ref = ref_hessian(f, x)
    assert_close(td.hessian(f, x, sparsity=True), ref, msg=f"{name} hessian")
    n = x[0].numel()
    lead = ref.shape[: ref.dim() - 2 * (x.dim() - 1)]
    diag = ref.reshape(*lead, n, n).diagonal(dim1=-2, dim2=-1).reshape(*lead, *x.shape[1:])
    assert_close(td.hessian_diagonal(f, x, sparsity=True), diag, msg=f"{name} hessian_diagonal")


@pytest.mark.parametrize("case", [c for c in ZOO if c.name in ("conv1d", "attention", "residual_layernorm",
                                                               "pointwise", "multi_output")],
                         ids=lambda c: c.name)
def test_compressed_zoo_equal_dense(case):
    model, ref, x = case.build()
    assert_close(td.jacobian(model, x, sparsity=True), ref_jacobian(ref, x), msg=case.name)
    assert_close(td.hessian(model, x, sparsity=True), ref_hessian(ref, x), msg=case.name)


def test_chunked_compressed_jacobian():
    f, x = build("conv1d")
    assert_close(td.jacobian(f, x, sparsity=True, chunk_size=4), ref_jacobian(f, x))


# ----------------------------------------------------------------------------- sparse layouts


@pytest.mark.parametrize("name", ["conv1d", "grid_conv", "tokens"])
def test_sparse_layout_round_trips_and_is_differentiable(name):
    f, x = build(name)
    J = td.jacobian(f, x, layout=torch.sparse_coo)
    assert J.layout == torch.sparse_coo and J.is_coalesced()
    dense = td.jacobian(f, x, sparsity=False)
    assert J.shape == dense.shape
    assert_close(J.to_dense(), dense.detach(), msg=name)
    assert J._nnz() == x.shape[0] * int(td.sparsity(f, x)._nnz())
    H = td.hessian(f, x, layout=torch.sparse_coo)
    assert H.layout == torch.sparse_coo and H.is_coalesced()
    assert_close(H.to_dense(), td.hessian(f, x, sparsity=False).detach(), msg=f"{name} hessian")
    # gradients w.r.t. the parameters through the sparse values equal those through the dense result
    params = [p for p in f.parameters()]
    opts = dict(allow_unused=True, materialize_grads=True)  # the last bias does not enter the Jacobian
    gs = torch.autograd.grad(torch.sparse.sum(J * J), params, **opts)
    gd = torch.autograd.grad((dense * dense).sum(), params, **opts)
    assert any(bool(a.abs().sum() > 0) for a in gs)
    for a, b in zip(gs, gd):
        assert_close(a, b, msg=f"{name} parameter gradient")


# ----------------------------------------------------------------------------- cost model


def _count_compressed(monkeypatch):
    """Spy on the request preparation: the operators for which the colored work was chosen."""
    calls = []
    orig = _compressed.work

    def spy(req, f, x, dense):
        w = orig(req, f, x, dense)
        if w.directions is not None:
            calls.append(req.op)
        return w

    monkeypatch.setattr(_compressed, "work", spy)
    return calls


def test_cost_model_leaves_dense_maps_dense(monkeypatch):
    calls = _count_compressed(monkeypatch)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16)).to(DT)
    x = torch.randn(4, 16, dtype=DT)
    J = td.jacobian(mlp, x, method="forward")
    td.jacobian_diagonal(mlp, x)
    td.hessian(mlp, x, method="forward")
    f, xa = build("attention")
    td.jacobian(f, xa, method="forward")
    assert calls == []
    assert_close(J, ref_jacobian(mlp, x))


def test_cost_model_takes_sparse_maps(monkeypatch):
    calls = _count_compressed(monkeypatch)
    f, x = build("conv1d")
    td.jacobian(f, x, method="forward")
    td.jacobian_diagonal(f, x)
    td.hessian_diagonal(f, x)
    assert calls == ["jacobian", "jacobian_diagonal", "hessian_diagonal"]
    calls.clear()
    td.jacobian(f, x, sparsity=False, method="forward")
    td.jacobian(f, x[:, :4], method="forward")  # n = 4: too small to pay for a detection
    assert calls == []


def test_options_are_part_of_the_cache_key():
    """Repeated calls replay the registered path; sparsity= and layout= select different paths."""
    f, x = build("conv1d")
    ref = ref_jacobian(f, x)
    for _ in range(2):
        assert_close(td.jacobian(f, x, sparsity=True), ref)
        J = td.jacobian(f, x, sparsity=True, layout=torch.sparse_coo)
        assert J.layout == torch.sparse_coo
        assert_close(J.to_dense(), ref.detach())
        assert td.jacobian(f, x, sparsity=False).layout == torch.strided
    x2 = x + 1  # the replayed path computes at the new point
    assert_close(td.jacobian(f, x2, sparsity=True), ref_jacobian(f, x2))


def test_dense_result_in_sparse_layout_without_colors():
    """sparsity=False with layout=torch.sparse_coo: the dense result, converted."""
    f, x = build("attention")
    J = td.jacobian(f, x, sparsity=False, layout=torch.sparse_coo)
    assert J.layout == torch.sparse_coo
    assert_close(J.to_dense(), ref_jacobian(f, x).detach())


FAMILY_CASES = ["moe_top2_gather", "gnn_scatter_add", "gnn_index_add_", "unet1d_pool_convtranspose",
                "pointnet_max_dim", "mamba_scan_cumsum", "pixel_shuffle", "conv2d_groups", "conv1d_circular_reflect",
                "causal_attention_where_heads", "sdpa_causal", "std_var_logsumexp_cumsum", "max_clamp_relu"]


@pytest.mark.parametrize("name", sampled(FAMILY_CASES, 2))  # fast tier: every other family
def test_family_patterns_contain_every_nonzero(name):
    """Scatter/gather, pooling, transposed convolutions, scans, attention with masks: the detected pattern
    contains the support of the dense derivatives (the dense path, itself checked against torch.func in
    test_zoo_unseen.py / test_zoo_families.py)."""
    from test_zoo_families import FAMS
    from test_zoo_unseen import CASES

    case = {c.name: c for c in [*CASES, *FAMS]}[name]
    built = case.build()
    model, x = built[0], built[-1]
    n = x[0].numel()
    P1 = td.sparsity(model, x).to_dense()
    T1 = td.jacobian(model, x, sparsity=False).reshape(x.shape[0], -1, n).ne(0).any(0)
    assert not (T1 & ~P1).any(), name
    if getattr(case, "smooth", True):
        P2 = td.sparsity(model, x, order=2).to_dense()
        T2 = td.hessian(model, x, sparsity=False).reshape(x.shape[0], -1, n, n).ne(0).any(0)
        assert not (T2 & ~P2).any(), name


class Pool(nn.Module):
    def __init__(self, pool):
        super().__init__()
        self.c = nn.Conv2d(1, 2, 3, padding=1)
        self.pool = pool

    def forward(self, x):
        return self.pool(torch.tanh(self.c(x.unflatten(-1, (1, 6, 6)))), 2).flatten(1)


def test_max_pool_reads_its_whole_window():
    """Which entry of a window is the maximum depends on x: the pattern is the window's (an average pool's)."""
    torch.manual_seed(0)
    fmax = Pool(nn.functional.max_pool2d).to(DT)
    favg = Pool(nn.functional.avg_pool2d).to(DT)
    x = torch.randn(3, 36, dtype=DT)
    P = td.sparsity(fmax, x).to_dense()
    assert torch.equal(P, td.sparsity(favg, x).to_dense())
    assert torch.equal(P, true_J(favg, x))
    assert not (true_J(fmax, x) & ~P).any()
    assert detect(fmax, x, True, 1, "test").coarse == ()

"""Per-sample models the batch-independence check used to refuse, and their row-mixing twins.

Recurrent layers, instance norm, scatter / index_add, sliding windows (``Tensor.unfold``), top-k and sort,
bicubic and bilinear interpolation, ``nn.Bilinear``, det / solve / inv / slogdet and ``torch.cdist`` keep the
samples of a batch apart: ``batched=True`` must follow them and give the per-sample derivatives (float64),
against independent references: ``vmap`` over the batch of nested ``jacrev`` where torch.func can run the
model, else a loop over the samples of ``torch.autograd.functional`` (``nn.RNN`` and friends, which vmap
cannot run). Ops that have no Taylor rule beyond order 1 (the generic fallback) are checked at order 1 on the
forward path; the reverse path (torch.func) is checked at order 2 everywhere.

``jacrev`` through ``torch.cdist`` is wrong in this torch (its backward under vmap), so the cdist models carry
a hand-written twin (distances from elementwise ops) for the reference; a loop of plain autograd, which does
not use vmap, cross-checks the twins.

Every op family also has variants that really mix rows (the op along the batch dim, matrices or point sets
built across the batch ...): those must raise BatchMixingError naming the op.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import jacobian as ag_jacobian

import torchderiv as td
from _harness import sampled
from conftest import assert_close, ref_hessian, ref_jacobian
from torchderiv import BatchMixingError
from torchderiv._capture import capture, check_batch_independence

DT = torch.float64


# ----------------------------------------------------------------------------- references


def loop_jacobian(f: Callable, x: torch.Tensor) -> torch.Tensor:
    """``[B, *out, *in]`` by plain autograd, one sample at a time (no vmap)."""
    return torch.stack([ag_jacobian(lambda xi: f(xi.unsqueeze(0)).squeeze(0), xb) for xb in x])


def loop_hessian(f: Callable, x: torch.Tensor) -> torch.Tensor:
    """``[B, *out, *in, *in]`` by plain autograd (a Jacobian of the Jacobian), one sample at a time."""

    def g(xi):
        return f(xi.unsqueeze(0)).squeeze(0)

    return torch.stack([ag_jacobian(lambda xi: ag_jacobian(g, xi, create_graph=True), xb) for xb in x])


# ----------------------------------------------------------------------------- models


class RecurrentHead(nn.Module):
    """A recurrent layer over x [B, T, F] and a linear head on its last (or time-averaged) output."""

    def __init__(self, rnn: nn.Module, time_major: bool = False, average: bool = False):
        super().__init__()
        self.rnn = rnn
        self.time_major = time_major  # the layer is batch_first=False: f transposes x to [T, B, F] and back
        self.average = average
        width = rnn.proj_size or rnn.hidden_size
        self.head = nn.Linear(width * (2 if rnn.bidirectional else 1), 2)

    def forward(self, x):
        y, _ = self.rnn(x.transpose(0, 1) if self.time_major else x)
        if self.time_major:
            y = y.transpose(0, 1)
        return self.head(y.mean(1) if self.average else y[:, -1])


def _randomize_affine(norm: nn.Module) -> nn.Module:
    with torch.no_grad():
        if norm.weight is not None:
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
        if norm.running_mean is not None:
            norm.running_mean.uniform_(-0.5, 0.5)
            norm.running_var.uniform_(0.5, 2.0)
    return norm


class InstanceNormNet(nn.Module):
    def __init__(self, norm: nn.Module, pre: nn.Module | None = None):
        super().__init__()
        self.pre = pre if pre is not None else nn.Identity()
        self.norm = _randomize_affine(norm)

    def forward(self, x):
        return torch.tanh(self.norm(self.pre(x))).flatten(1)


def instance_norm_channels_last(x):  # x [B, L, C]: normalized per sample and channel over L
    return torch.sin(F.instance_norm(x.transpose(1, 2), eps=1e-3))


_IDX = torch.tensor([[0, 2, 1], [3, 0, 0]])


def scatter_add_constant_index(x):  # [B, 2, 3] -> [B, 2, 4]
    idx = _IDX.expand(x.shape[0], 2, 3)
    return torch.zeros(x.shape[0], 2, 4, dtype=x.dtype).scatter_add(2, idx, torch.sin(x) * x)


def scatter_src_per_sample_index(x):  # [B, 4]: out[b, argsort(x[b])[j]] = tanh(x[b, j]) * (j + 1)
    src = torch.tanh(x) * torch.arange(1, x.shape[1] + 1, dtype=x.dtype)
    return torch.zeros_like(x).scatter(1, x.argsort(1), src) + x * x


def scatter_value_into_input(x):  # [B, 2, 3]: x with constant entries written, then squared
    return x.scatter(2, _IDX[:, :2].expand(x.shape[0], 2, 2).remainder(3), 0.5) ** 2


def scatter_reduce_amax(x):  # [B, 2, 3]
    idx = _IDX.expand(x.shape[0], 2, 3)
    return torch.zeros(x.shape[0], 2, 4, dtype=x.dtype).scatter_reduce(2, idx, x * x, "amax", include_self=False)


def index_add_constant_index(x):  # [B, 2, 3] -> [B, 2, 4]
    return torch.zeros(x.shape[0], 2, 4, dtype=x.dtype).index_add(2, torch.tensor([0, 3, 3]), torch.sin(x) * x)


_WIN = torch.tensor([0.5, -1.0, 2.0], dtype=DT)


def unfold_windows(x):  # [B, 6] -> windows of 3, step 1 -> [B, 4]
    return torch.tanh((torch.sin(x).unfold(1, 3, 1) * _WIN).sum(-1)) * x[:, :4]


def unfold_patches(x):  # [B, 2, 5, 5] -> 3x3 patches, step 2 -> [B, 2, 2, 2]
    p = torch.tanh(x).unfold(2, 3, 2).unfold(3, 3, 2)  # [B, 2, 2, 2, 3, 3]
    return (p * p).sum((-2, -1))


def topk_last_dim(x):  # [B, 5] -> [B, 2]
    v, _ = torch.topk(x, 2, dim=-1)
    return torch.sin(v) * v


def topk_smallest_dim1(x):  # [B, 4, 3] -> [B, 2, 3]
    v, _ = torch.topk(torch.tanh(x), 2, dim=1, largest=False)
    return v * x[:, :2]


def sort_descending(x):  # [B, 5]
    v, _ = torch.sort(x, dim=-1, descending=True)
    return torch.sin(v) * torch.arange(1, 6, dtype=x.dtype)


def argsort_gather(x):  # [B, 2, 4]: per-row ranks used as gather indices
    return torch.exp(x.gather(-1, x.argsort(-1, descending=True))[..., :3]) * x[..., :3]


def along_dim_ops(x):  # [B, 2, 4]: cumulative extrema and product, k-th value, median along non-batch dims
    a = torch.cummax(x, -1)[0] * torch.cummin(x, 1)[0]
    b = torch.kthvalue(x, 2, -1, keepdim=True)[0] + torch.median(x, 1)[0].unsqueeze(1)
    return a + b * torch.cumprod(torch.tanh(x), -1)


def _interp(mode, **kw):
    def f(x):  # [B, C, H, W]
        return torch.tanh(F.interpolate(x, mode=mode, **kw))

    return f


class BilinearForm(nn.Module):
    def __init__(self):
        super().__init__()
        self.b = nn.Bilinear(2, 3, 3)

    def forward(self, x):  # [B, 5]: x[:, :2] and tanh(x[:, 2:]) -> [B, 3]
        return self.b(x[:, :2], torch.tanh(x[:, 2:]))


def det(x):  # [B, 3, 3] -> [B]
    return torch.linalg.det(x)


def slogdet(x):  # [B, 3, 3] -> [B, 2]
    sign, logabs = torch.linalg.slogdet(x)
    return torch.stack([sign * logabs, logabs], -1)


def solve_vector_rhs(x):  # [B, 3, 3] -> [B, 3]
    return torch.linalg.solve(x, torch.sin(x[..., 0]))


def solve_matrix_rhs(x):  # [B, 3, 3] -> [B, 3, 2]
    return torch.linalg.solve(x, torch.tanh(x[..., :2]))


_A = torch.tensor([[3.0, 0.5, -0.2], [0.1, 2.0, 0.3], [-0.4, 0.2, 2.5]], dtype=DT)


def solve_constant_matrix(x):  # [B, 3]: A z = x per sample
    return torch.linalg.solve(_A, torch.sin(x).unsqueeze(-1)).squeeze(-1)


def inv(x):  # [B, 3, 3]
    return torch.linalg.inv(x) * x


class CDist(nn.Module):
    """``torch.cdist`` of a per-sample point set [B, N, d] (x reshaped) against a second set: derived from x
    (``other="derived"``), a constant [M, d] (``"constant"``) or the set itself (``"self"``: zero diagonal,
    inside an RBF kernel). ``reference`` is its twin with distances from elementwise ops."""

    def __init__(self, n: int, d: int, other: str, p: float = 2.0, kernel: bool = False, m: int = 4):
        super().__init__()
        self.n, self.d, self.other, self.p, self.kernel = n, d, other, p, kernel
        self.register_buffer("c", torch.randn(m, d, dtype=DT))

    def _sets(self, x):
        a = x.reshape(x.shape[0], self.n, self.d)
        if self.other == "derived":
            return a, torch.tanh(2 * a[:, : self.n - 1]) + 0.3
        return a, (self.c if self.other == "constant" else a)

    def _out(self, dist):
        return torch.exp(-dist * dist) if self.kernel else dist

    def forward(self, x):
        return self._out(torch.cdist(*self._sets(x), p=self.p))

    def reference(self, x):
        a, b = self._sets(x)
        diff = a.unsqueeze(-2) - b.unsqueeze(-3)
        if self.kernel:  # exp(-|a_i - b_j|^2): smooth, also where a_i = b_j
            return torch.exp(-(diff * diff).sum(-1))
        return diff.abs().pow(self.p).sum(-1).pow(1.0 / self.p)


# ----------------------------------------------------------------------------- cases


@dataclass
class Case:
    name: str
    factory: Callable[[], Callable]
    in_shape: tuple[int, ...]
    order: int = 2  # highest order checked on the forward path (1: an op with the generic fallback only)
    ref: str = "vmap"  # "vmap": nested jacrev per sample; "loop": plain autograd per sample (no vmap)
    diag: float = 0.0  # added to the diagonal of [n, n] samples (well-conditioned matrices)
    batch: int = 3


CASES = [
    Case("rnn_tanh_batch_first", lambda: RecurrentHead(nn.RNN(3, 4, batch_first=True)), (4, 3), ref="loop"),
    Case("gru_batch_first", lambda: RecurrentHead(nn.GRU(3, 4, batch_first=True)), (4, 3), ref="loop"),
    Case("lstm_batch_first", lambda: RecurrentHead(nn.LSTM(3, 4, batch_first=True)), (4, 3), ref="loop"),
    Case("lstm_time_major", lambda: RecurrentHead(nn.LSTM(3, 4), time_major=True), (4, 3), ref="loop"),
    Case("gru_2layer_bidirectional", lambda: RecurrentHead(nn.GRU(3, 3, num_layers=2, bidirectional=True,
                                                                   batch_first=True), average=True),
         (3, 3), ref="loop"),
    Case("lstm_proj_size", lambda: RecurrentHead(nn.LSTM(3, 4, batch_first=True, proj_size=2), average=True),
         (3, 3), ref="loop"),
    Case("instance_norm1d_affine", lambda: InstanceNormNet(nn.InstanceNorm1d(2, affine=True)), (2, 5)),
    Case("instance_norm2d_after_conv", lambda: InstanceNormNet(nn.InstanceNorm2d(3, affine=True),
                                                               nn.Conv2d(2, 3, 2)), (2, 3, 3)),
    Case("instance_norm1d_running_stats_eval",
         lambda: InstanceNormNet(nn.InstanceNorm1d(2, affine=True, track_running_stats=True)), (2, 4)),
    Case("instance_norm_channels_last", lambda: instance_norm_channels_last, (5, 2)),
    Case("scatter_add_constant_index", lambda: scatter_add_constant_index, (2, 3), order=2),
    Case("scatter_src_per_sample_index", lambda: scatter_src_per_sample_index, (4,), order=2),
    Case("scatter_value_into_input", lambda: scatter_value_into_input, (2, 3), order=2),
    Case("scatter_reduce_amax", lambda: scatter_reduce_amax, (2, 3), order=2),
    Case("index_add_constant_index", lambda: index_add_constant_index, (2, 3)),
    Case("unfold_windows", lambda: unfold_windows, (6,), order=2),
    Case("unfold_patches_2d", lambda: unfold_patches, (2, 5, 5), order=2),
    Case("topk_last_dim", lambda: topk_last_dim, (5,), order=2),
    Case("topk_smallest_dim1", lambda: topk_smallest_dim1, (4, 3), order=2),
    Case("sort_descending", lambda: sort_descending, (5,), order=2),
    Case("argsort_gather", lambda: argsort_gather, (2, 4), order=2),
    Case("cummax_kthvalue_median_rows", lambda: along_dim_ops, (2, 4), order=2),
    Case("bicubic_scale2", lambda: _interp("bicubic", scale_factor=2, align_corners=False), (2, 3, 3), order=2),
    Case("bicubic_align_corners", lambda: _interp("bicubic", size=(5, 4), align_corners=True), (2, 3, 3),
         order=2),
    Case("bilinear_scale2", lambda: _interp("bilinear", scale_factor=2, align_corners=False), (2, 3, 3)),
    Case("bilinear_align_corners", lambda: _interp("bilinear", size=(5, 4), align_corners=True), (2, 3, 3)),
    Case("nn_bilinear", BilinearForm, (5,), order=2),
    Case("det", lambda: det, (3, 3), order=2, diag=2.0),
    Case("slogdet", lambda: slogdet, (3, 3), order=2, diag=2.0),
    Case("solve_vector_rhs", lambda: solve_vector_rhs, (3, 3), order=2, diag=3.0),
    Case("solve_matrix_rhs", lambda: solve_matrix_rhs, (3, 3), order=2, diag=3.0),
    # ref="loop": vmap(jacrev) itself fails on linalg.solve with an unbatched A in this torch
    Case("solve_constant_matrix", lambda: solve_constant_matrix, (3,), order=2, ref="loop"),
    Case("inv", lambda: inv, (3, 3), diag=3.0),
    Case("cdist_per_sample_sets", lambda: CDist(3, 2, "derived"), (6,)),
    Case("cdist_constant_set", lambda: CDist(3, 2, "constant"), (6,)),
    Case("cdist_self_rbf_zero_diagonal", lambda: CDist(3, 2, "self", kernel=True), (6,)),
    Case("cdist_p3", lambda: CDist(3, 2, "constant", p=3.0), (6,)),
    Case("cdist_p1", lambda: CDist(3, 2, "derived", p=1.0), (6,), order=1),
    Case("cdist_many_points_mm_path", lambda: CDist(26, 2, "constant", m=3), (52,), batch=2),
]

_BUILT: dict = {}


def build(case: Case):
    """(model, reference callable, x), once per case."""
    if case.name not in _BUILT:
        torch.manual_seed(5000 + sum(map(ord, case.name)))
        model = case.factory()
        if isinstance(model, nn.Module):
            model = model.to(DT).eval()
        g = torch.Generator().manual_seed(6000 + len(case.name))
        x = 0.8 * torch.randn(case.batch, *case.in_shape, dtype=DT, generator=g)
        if case.diag:
            x = x + case.diag * torch.eye(case.in_shape[-1], dtype=DT)
        _BUILT[case.name] = (model, getattr(model, "reference", model), x)
    return _BUILT[case.name]


_REFS: dict = {}


def reference(case: Case, k: int) -> torch.Tensor:
    key = (case.name, k)
    if key not in _REFS:
        model, ref, x = build(case)
        if case.ref == "loop":
            _REFS[key] = (loop_jacobian if k == 1 else loop_hessian)(ref, x).detach()
        else:
            _REFS[key] = (ref_jacobian if k == 1 else ref_hessian)(ref, x).detach()
    return _REFS[key]


cases = pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
methods = pytest.mark.parametrize("method", ["forward", "reverse"])
LAPLACIAN = ("gru_batch_first", "instance_norm2d_after_conv", "index_add_constant_index", "bilinear_scale2", "inv",
             "cdist_per_sample_sets", "cdist_self_rbf_zero_diagonal")
# the fast tier: every third (case, method), so both methods and every kind of model; make test: all of them
JACOBIAN_PARAMS = sampled([pytest.param(c, m, id=f"{m}-{c.name}") for c in CASES for m in ("forward", "reverse")], 3)
# (and a forward Hessian over more than 20 inputs, 1378 directions for cdist_many_points_mm_path, in make test only)
HESSIAN_PARAMS = sampled([pytest.param(c, m, id=f"{c.name}-{m}",
                                       marks=[pytest.mark.slow] * (m == "forward" and math.prod(c.in_shape) > 20))
                          for c in CASES for m in ("forward", "reverse") if m == "reverse" or c.order >= 2], 3)


# ----------------------------------------------------------------------------- per-sample models pass


@pytest.mark.parametrize("case", sampled(CASES, 2), ids=lambda c: c.name)  # fast tier: every other case
def test_batch_check_follows_the_model(case):
    """The check accepts the model (it raises BatchMixingError on a graph that mixes rows), and rightly so: a
    change of row 0 of x changes row 0 of the output and no other row."""
    model, _, x = build(case)
    check_batch_independence(capture(model, x), "jacobian")
    x2 = x.clone()
    x2[0] = x2[0] + 0.1 * torch.linspace(1.0, 2.0, x2[0].numel(), dtype=DT).reshape(x2[0].shape)
    with torch.no_grad():
        y, y2 = model(x), model(x2)
    assert (y[0] - y2[0]).abs().max() > 1e-6, f"{case.name}: row 0 of the output ignores row 0 of x"
    torch.testing.assert_close(y2[1:], y[1:], atol=1e-13, rtol=0, msg=f"{case.name}: other rows changed")


@pytest.mark.parametrize(("case", "method"), JACOBIAN_PARAMS)
def test_jacobian(case, method):
    model, _, x = build(case)
    assert_close(td.jacobian(model, x, method=method), reference(case, 1), msg=f"{case.name} jacobian {method}")


@pytest.mark.parametrize(("case", "method"), HESSIAN_PARAMS)
def test_hessian(case, method):
    model, _, x = build(case)
    assert_close(td.hessian(model, x, method=method), reference(case, 2), msg=f"{case.name} hessian {method}")


@pytest.mark.parametrize("case", [c for c in CASES if c.name in LAPLACIAN], ids=lambda c: c.name)
def test_laplacian(case):
    model, _, x = build(case)
    n = math.prod(case.in_shape)
    H = reference(case, 2).reshape(*reference(case, 2).shape[: -2 * len(case.in_shape)], n, n)
    assert_close(td.laplacian(model, x), H.diagonal(dim1=-2, dim2=-1).sum(-1), msg=f"{case.name} laplacian")


def test_twins_match_their_models_and_plain_autograd():
    """The cdist twins compute the model's values, and their vmap references equal a loop of plain autograd
    through torch.cdist itself (which does not go through vmap)."""
    for case in CASES:
        model, ref, x = build(case)
        if ref is model:
            continue
        with torch.no_grad():
            assert_close(ref(x), model(x), msg=f"{case.name} twin value")
        assert_close(reference(case, 1), loop_jacobian(model, x), msg=f"{case.name} twin jacobian")


def test_cdist_zero_distance_has_zero_derivative():
    """cdist of a set with itself: zero distances on the diagonal get derivative 0 (as torch's backward does),
    never NaN, at every order the forward path computes."""
    model = CDist(3, 2, "self").to(DT)
    x = torch.randn(2, 6, dtype=DT)
    for H in (td.jacobian(model, x), td.hessian(model, x)):
        assert torch.isfinite(H).all()
        assert (H[:, range(3), range(3)] == 0).all()


# ----------------------------------------------------------------------------- row-mixing variants raise


def _time_major_rnn_fed_batch_major():
    torch.manual_seed(0)
    rnn = nn.GRU(3, 4).to(DT)  # batch_first=False: dim 0 of x is taken for time

    def f(x):  # [B, T, F]
        return rnn(x)[0].flatten(1)

    return f


def _instance_norm_over_batch(x):  # [B, C]: channels of x.T normalized over the batch
    return torch.tanh(F.instance_norm(x.T.unsqueeze(0)))


def _instance_norm_folded_over_batch(x):  # [B, C, L] -> [1, C, B * L]: each channel normalized over B and L
    return F.instance_norm(x.transpose(0, 1).reshape(1, x.shape[1], -1)).reshape(x.shape[1], x.shape[0], -1)


def _bicubic_over_batch(x):  # [B, C, W] -> [1, C, B, W]: the batch becomes a spatial dim
    return F.interpolate(x.transpose(0, 1).unsqueeze(0), scale_factor=2, mode="bicubic")[0, :, ::2].transpose(0, 1)


def _bilinear_over_batch(x):
    return F.interpolate(x.transpose(0, 1).unsqueeze(0), scale_factor=2, mode="bilinear")[0, :, ::2].transpose(0, 1)


_BIL = nn.Bilinear(4, 4, 2).to(DT)


def _conv_with_weights_from_input(x):  # [B, 2, 5]: the kernel is built from the samples
    return F.conv1d(x, torch.tanh(x[:, :, :3]))


MIXERS = {
    "rnn_time_major_fed_batch_major": (_time_major_rnn_fed_batch_major(), (4, 3), "unbind|select|slice"),
    "instance_norm_over_batch": (_instance_norm_over_batch, (2,), "batch_norm"),
    "instance_norm_folded_over_batch": (_instance_norm_folded_over_batch, (2, 3), "batch_norm"),
    "scatter_add_along_batch": (lambda x: torch.zeros(5, 4, dtype=x.dtype).scatter_add(
        0, torch.tensor([[0, 1, 2, 3], [1, 0, 0, 2], [4, 4, 1, 0], [2, 3, 4, 1]]), x)[:4], (4,), "scatter_add"),
    "scatter_along_batch": (lambda x: x.scatter(0, torch.tensor([[1, 0, 2], [0, 1, 3], [3, 2, 1], [2, 3, 0]]),
                                                torch.sin(x)), (3,), "scatter"),
    "index_add_along_batch": (lambda x: torch.zeros_like(x).index_add(0, torch.tensor([1, 2, 3, 0]), x * x),
                              (3,), "index_put|index_add"),
    "unfold_along_batch": (lambda x: x.unfold(0, 2, 1).sum(-1).repeat(2, 1)[:4], (3,), "unfold"),
    "topk_over_batch": (lambda x: torch.topk(x, 4, dim=0)[0], (3,), "topk"),
    "sort_over_batch": (lambda x: torch.sort(x, dim=0)[0], (3,), "sort"),
    "argsort_over_batch": (lambda x: x * torch.argsort(x, dim=0), (3,), "sort"),
    "cumprod_over_batch": (lambda x: torch.cumprod(x, 0), (3,), "cumprod"),
    "cummax_over_batch": (lambda x: torch.cummax(x, 0)[0], (3,), "cummax"),
    "logcumsumexp_over_batch": (lambda x: torch.logcumsumexp(x, 0), (3,), "logcumsumexp"),
    "kthvalue_over_batch": (lambda x: torch.kthvalue(x, 2, 0)[0] * x, (3,), "kthvalue"),
    "median_of_everything": (lambda x: torch.median(x) * x, (3,), "median"),
    "masked_scatter_of_rows": (lambda x: torch.zeros_like(x).masked_scatter(
        torch.tensor([[True, True, True], [False, True, False], [False, False, False], [True, False, True]]), x),
                               (3,), "masked_scatter"),
    "bicubic_over_batch": (_bicubic_over_batch, (2, 3), "upsample_bicubic2d"),
    "bilinear_interp_over_batch": (_bilinear_over_batch, (2, 3), "upsample_bilinear2d"),
    "nn_bilinear_over_batch": (lambda x: _BIL(x.T, torch.tanh(x.T)).T, (4,), "trilinear"),
    "det_of_matrix_across_batch": (lambda x: torch.linalg.det(x.unsqueeze(0)).expand(4), (4,), "det"),
    "det_of_transposed_batch": (lambda x: torch.linalg.det(x.transpose(0, 1)), (4, 4), "det"),
    "inv_of_matrix_across_batch": (lambda x: torch.linalg.inv(x.unsqueeze(0))[0], (4,), "inv"),
    "matrix_exp_across_batch": (lambda x: torch.linalg.matrix_exp(x.unsqueeze(0))[0], (4,), "matrix_exp"),
    "solve_mixing_rows": (lambda x: torch.linalg.solve(torch.eye(4, dtype=x.dtype) + 0.1, x), (3,), "solve"),
    "cdist_between_samples": (lambda x: torch.cdist(x.unsqueeze(0), x.unsqueeze(0))[0], (2,), "cdist|sub"),
    "conv_weights_from_input": (_conv_with_weights_from_input, (2, 5), "convolution"),
}


@pytest.mark.parametrize("mixer", list(MIXERS))
@methods
def test_row_mixing_raises(mixer, method):
    f, in_shape, opname = MIXERS[mixer]
    x = torch.randn(4, *in_shape, dtype=DT)
    with pytest.raises(BatchMixingError, match=rf"`aten\.\w*({opname})\w*\.\w+`.*batched=False"):
        td.jacobian(f, x, method=method)


def test_row_mixing_raises_for_hessian():
    f, in_shape, _ = MIXERS["topk_over_batch"]
    with pytest.raises(BatchMixingError, match="topk"):
        td.hessian(f, torch.randn(4, *in_shape, dtype=DT))


class _TokenAttention(nn.Module):
    """Self-attention over 4 tokens of each sample, written so that the batch folds into bmm's batch
    dim; the conservative check refuses such a bmm only when it cannot follow it."""

    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True)

    def forward(self, x):
        return self.layer(x.view(-1, 4, 4)).reshape(x.shape[0], -1)


@pytest.mark.parametrize("method", ["forward", "reverse"])
def test_a_single_row_is_never_refused(method):
    """B = 1: nothing to mix with, so no BatchMixingError even for graphs that mix rows at B > 1
    (x - x.mean(0) is identically 0 at B = 1, so its Jacobian is 0); the derivative is that of f."""
    torch.manual_seed(0)
    x = torch.randn(1, 16, dtype=torch.float64)
    net = _TokenAttention().to(torch.float64).eval()
    assert_close(td.jacobian(net, x, method=method), ref_jacobian(net, x))

    def centered(z):
        return torch.tanh(z - z.mean(0, keepdim=True))

    assert_close(td.jacobian(centered, x, method=method), torch.zeros(1, 16, 16, dtype=torch.float64))
    with pytest.raises(BatchMixingError):
        td.jacobian(centered, torch.randn(2, 16, dtype=torch.float64), method=method)

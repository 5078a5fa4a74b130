"""Architectures outside the main zoo, against independent per-sample references (float64, tests/_harness.py).

References: ``vmap`` over the batch of nested ``jacrev`` of the model's primitive twin (never forward over
forward), restricted to the input coordinates a check needs, computed once per (case, order, coordinates) and
shared by the tests. Piecewise-linear nets are checked at order 1 only.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchderiv as td
from _harness import Case, close, fd_partial, params, partials, sampled, sym_weights, value

DT = torch.float64


# ----------------------------------------------------------------------------- the unseen zoo


def rms_norm(h, weight=None, eps=1e-6):
    out = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return out if weight is None else out * weight


class ResRMSGelu(nn.Module):
    """Residual MLP with a hand-written RMSNorm and GELU(tanh)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 6)
        self.mid = nn.Linear(6, 6)
        self.mid2 = nn.Linear(6, 6)
        self.out = nn.Linear(6, 2)
        self.g1 = nn.Parameter(1 + 0.3 * torch.randn(6))
        self.g2 = nn.Parameter(1 + 0.3 * torch.randn(6))
        self.act = nn.GELU(approximate="tanh")

    def forward(self, x):
        h = self.inp(x)
        h = h + self.mid(self.act(rms_norm(h, self.g1)))
        h = h + self.mid2(self.act(rms_norm(h, self.g2)))
        return self.out(rms_norm(h))


class MixedActs(nn.Module):
    """ELU / SELU / Mish / Hardswish / CELU / GLU."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3, self.l4 = nn.Linear(3, 6), nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 8)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        h = F.elu(self.l1(x), alpha=0.7)
        h = F.selu(self.l2(h)) + F.mish(h)
        h = F.hardswish(self.l3(h)) + F.celu(h, alpha=1.3)
        return self.out(F.glu(self.l4(h), dim=-1))


class SmoothActs2(nn.Module):
    """LogSigmoid / Softsign / Tanhshrink / Softmin / SiLU products."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.out = nn.Linear(2, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.l1(x)
        h = F.logsigmoid(h) + F.softsign(2 * h) + F.tanhshrink(h)
        h = self.l2(h)
        return self.out(F.softmin(h, dim=-1) * F.silu(h))


class CausalAttention(nn.Module):
    """Per-sample causal self-attention over tokens with einsum, masked_fill(-inf) and bmm: [B, T, d] -> [B, T, d]."""

    def __init__(self, T=3, d=2, dh=4):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, dh), nn.Linear(d, dh), nn.Linear(d, dh)
        self.o = nn.Linear(dh, d)
        self.register_buffer("mask", torch.ones(T, T, dtype=torch.bool).triu(1))
        self.scale = 1 / math.sqrt(dh)

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        s = torch.einsum("btd,bsd->bts", q, k) * self.scale
        a = torch.softmax(s.masked_fill(self.mask, float("-inf")), dim=-1)
        return x + self.o(torch.tanh(torch.bmm(a, v)))


class CausalAttentionWhere(nn.Module):
    """Two heads via view / permute / matmul, causal mask with torch.where, mean over tokens: [B, T, d] -> [B, 2]."""

    def __init__(self, T=3, d=2, heads=2, dh=2):
        super().__init__()
        self.heads, self.dh = heads, dh
        self.qkv = nn.Linear(d, 3 * heads * dh)
        self.o = nn.Linear(heads * dh, 2)
        self.register_buffer("keep", torch.ones(T, T, dtype=torch.bool).tril())

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, self.dh).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, T, dh]
        s = q @ k.transpose(-2, -1) / math.sqrt(self.dh)
        s = torch.where(self.keep, s, torch.full_like(s, -1e9))
        y = (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(B, T, -1)
        return self.o(F.gelu(y)).mean(1)


class Conv1dStride(nn.Module):
    """Conv1d with padding 2 and stride 2, then flatten + Linear: [B, 2, 5] -> [B, 2]."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv1d(2, 3, 3, padding=2, stride=2)
        self.fc = nn.Linear(12, 2)

    def forward(self, x):
        return self.fc(torch.tanh(self.c(x)).flatten(1))


class Conv1dCircular(nn.Module):
    """Conv1d with circular padding, then one with reflect padding and dilation: [B, 2, 4] -> [B, 2, 4]."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 3, 3, padding=1, padding_mode="circular")
        self.c2 = nn.Conv1d(3, 2, 3, padding=2, dilation=2, padding_mode="reflect")

    def forward(self, x):
        return self.c2(torch.sin(self.c1(x))) * x


class Conv2dGroups(nn.Module):
    """Conv2d with groups=2, a 1x1 conv and flatten: [B, 2, 2, 2] -> [B, 2]."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1, groups=2)
        self.c2 = nn.Conv2d(4, 2, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(torch.sin(self.c2(F.softplus(self.c1(x)))).flatten(1))


class LayerNormNoAffine(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 6)
        self.ln = nn.LayerNorm(6, elementwise_affine=False)
        self.out = nn.Linear(6, 2)

    def _body(self, x, norm):
        h = self.a(x)
        return self.out(torch.tanh(norm(torch.sin(h) + h)))

    def forward(self, x):
        return self._body(x, self.ln)

    def reference(self, x):
        def manual(h):
            c = h - h.mean(-1, keepdim=True)
            return c * torch.rsqrt((c * c).mean(-1, keepdim=True) + self.ln.eps)

        return self._body(x, manual)


class SoftmaxTemperature(nn.Module):
    def __init__(self, temp=0.7):
        super().__init__()
        self.a = nn.Linear(3, 5)
        self.out = nn.Linear(5, 2)
        self.temp = temp

    def forward(self, x):
        p = F.softmax(self.a(x) / self.temp, dim=-1)
        return self.out(p) + p[:, :2] * x[:, 1:]


class LogSoftmaxHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 4))

    def forward(self, x):
        return F.log_softmax(self.net(x), dim=-1)


class Elementary(nn.Module):
    """x.pow(3), exp, log(1 + x^2), atan and a division by (1 + x^2)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 5)
        self.out = nn.Linear(10, 2)

    def forward(self, x):
        h = self.a(x)
        u = h.pow(3) * 0.3 + torch.exp(-h) + torch.log(1 + h**2)
        w = torch.atan(h) / (1 + h**2)
        return self.out(torch.cat([u, w], -1)) + x[:, :1].pow(3) / (1 + x[:, 1:2] ** 2)


class FourierIndex(nn.Module):
    """Fourier features cat([sin, cos]) of the columns x[:, [0, 2]], slicing and a linear head."""

    def __init__(self):
        super().__init__()
        self.register_buffer("Bm", 1.3 * torch.randn(2, 3))
        self.fc = nn.Linear(6 + 1, 2)

    def forward(self, x):
        z = x[:, [0, 2]] @ self.Bm
        feats = torch.cat([torch.sin(z), torch.cos(z), x[:, 1:2] * x[:, -1:]], dim=-1)
        return torch.tanh(self.fc(feats))


class MultiOut23(nn.Module):
    """[B, 3] -> [B, 2, 3] with a softmax over the last axis of the output."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 6)
        self.b = nn.Linear(6, 6)

    def forward(self, x):
        y = self.b(torch.sin(self.a(x))).view(-1, 2, 3)
        return torch.softmax(y, -1) + y.pow(2) * x.unsqueeze(1)


class MatrixInput(nn.Module):
    """[B, 2, 2] -> [B, 2, 2]: per-sample matrix products, transposes and row sums."""

    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.randn(2, 2))

    def forward(self, x):
        g = torch.tanh(x @ x.transpose(-1, -2)) @ self.W
        return g + torch.exp(0.5 * x) * x.sum(-1, keepdim=True) + torch.matmul(x, x)


class Normalize(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x):
        return self.out(torch.sin(F.normalize(self.a(x), dim=-1) * 2.0))


class PNorm(nn.Module):
    """A 3-norm and a 2-norm over features (torch.linalg.vector_norm / Tensor.norm)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 5)

    def forward(self, x):
        h = self.a(x)
        return torch.cat([torch.linalg.vector_norm(h, ord=3, dim=-1, keepdim=True), h.norm(dim=-1, keepdim=True)], -1)


class StatsNet(nn.Module):
    """std / var / logsumexp / cumsum over features, with keepdim broadcasting."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x):
        h = torch.sin(self.a(x))
        z = (h - h.mean(-1, keepdim=True)) / h.std(-1, keepdim=True) + torch.logsumexp(h, -1, keepdim=True)
        return self.out(torch.cumsum(z, -1)) * h.var(-1, unbiased=False, keepdim=True)


class MaxClamp(nn.Module):
    """Piecewise linear: max over features, clamp, relu, maximum (order 1 only)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 6)
        self.b = nn.Linear(6, 6)
        self.out = nn.Linear(7, 2)

    def forward(self, x):
        h = torch.clamp(self.a(x), -0.5, 0.6)
        g = torch.relu(self.b(h))
        m = torch.max(g * x.sum(-1, keepdim=True), dim=-1, keepdim=True).values
        return self.out(torch.cat([torch.maximum(g, h), m], -1)).clamp(min=-0.3)


class SDPACausal(nn.Module):
    """F.scaled_dot_product_attention(is_causal=True) over the tokens of each sample: [B, T, d] -> [B, T, d]."""

    def __init__(self, d=2, dh=4):
        super().__init__()
        self.q, self.k, self.v, self.o = nn.Linear(d, dh), nn.Linear(d, dh), nn.Linear(d, dh), nn.Linear(dh, d)

    def forward(self, x):
        y = F.scaled_dot_product_attention(self.q(x), self.k(x), torch.tanh(self.v(x)), is_causal=True)
        return self.o(y) * x


class TorchMHA(nn.Module):
    """nn.MultiheadAttention(batch_first=True) with a causal float mask, residual: [B, T, d] -> [B, T, d].

    The reference twin writes the same attention out by hand with the module's own weights (nested jacrev cannot
    differentiate torch's fused CPU attention kernel twice)."""

    def __init__(self, T=2, d=4, heads=2):
        super().__init__()
        self.mha = nn.MultiheadAttention(d, heads, batch_first=True)
        self.register_buffer("mask", torch.zeros(T, T).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1),
                                                                    float("-inf")))
        with torch.no_grad():
            self.mha.in_proj_bias.copy_(0.2 * torch.randn(3 * d))

    def forward(self, x):
        return x + self.mha(x, x, x, attn_mask=self.mask, need_weights=False)[0]

    def reference(self, x):
        m = self.mha
        B, T, d = x.shape
        H, dh = m.num_heads, d // m.num_heads
        q, k, v = F.linear(x, m.in_proj_weight, m.in_proj_bias).chunk(3, -1)
        q, k, v = (t.reshape(B, T, H, dh).transpose(1, 2) for t in (q, k, v))
        a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(dh) + self.mask, -1)
        y = (a @ v).transpose(1, 2).reshape(B, T, d)
        return x + m.out_proj(y)


class LSTMCellUnrolled(nn.Module):
    """nn.LSTMCell over the 2 tokens of each sample from a learned initial state: [B, 2, 2] -> [B, 3].

    The reference twin writes the gates out by hand with the cell's own weights."""

    def __init__(self, d=2, hidden=3):
        super().__init__()
        self.cell = nn.LSTMCell(d, hidden)
        self.h0 = nn.Parameter(0.3 * torch.randn(1, hidden))
        self.c0 = nn.Parameter(0.3 * torch.randn(1, hidden))

    def _run(self, x, cell):
        B = x.shape[0]
        h, c = self.h0.expand(B, -1), self.c0.expand(B, -1)
        for t in range(x.shape[1]):
            h, c = cell(x[:, t], (h, c))
        return h

    def forward(self, x):
        return self._run(x, self.cell)

    def reference(self, x):
        w = self.cell

        def manual(xt, hc):
            h, c = hc
            i, f, g, o = (F.linear(xt, w.weight_ih, w.bias_ih) + F.linear(h, w.weight_hh, w.bias_hh)).chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return torch.sigmoid(o) * torch.tanh(c), c

        return self._run(x, manual)


class PerSampleTensorOps(nn.Module):
    """Per-sample tensor ops: x.repeat over features, torch.diagonal of a per-sample outer product, torch.hypot."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 3)

    def forward(self, x):
        r = torch.sin(self.a(x.repeat(1, 2)))
        dg = torch.diagonal(torch.tanh(torch.einsum("bi,bj->bij", x, r)), dim1=-2, dim2=-1)
        return dg + torch.hypot(x, r + 1.0)


class RBFNet(nn.Module):
    """Gaussian radial basis functions around learned centres (broadcast [B, 1, d] - [K, d])."""

    def __init__(self, d=3, K=5):
        super().__init__()
        self.c = nn.Parameter(torch.randn(K, d))
        self.log_w = nn.Parameter(0.2 * torch.randn(K))
        self.out = nn.Linear(K, 2)

    def forward(self, x):
        r2 = ((x.unsqueeze(1) - self.c) ** 2).sum(-1)
        return self.out(torch.exp(-r2 * torch.exp(self.log_w)))


CASES: list[Case] = [
    Case("res_rmsnorm_gelu_tanh", ResRMSGelu, (3,)),
    Case("silu_softplus_beta2", lambda: nn.Sequential(nn.Linear(3, 6), nn.SiLU(), nn.Linear(6, 6),
                                                      nn.Softplus(beta=2.0), nn.Linear(6, 2)), (3,), batch=4),
    Case("elu_selu_mish_hardswish", MixedActs, (3,)),
    Case("logsigmoid_softsign_softmin", SmoothActs2, (2,)),
    Case("causal_attention_einsum_bmm", CausalAttention, (3, 2), dims=[1, 4], pair=(1, 4)),
    Case("causal_attention_where_heads", CausalAttentionWhere, (3, 2), dims=[0, 5], pair=(0, 5)),
    Case("conv1d_stride_padding", Conv1dStride, (2, 5), dims=[0, 4, 7], pair=(2, 7)),
    Case("conv1d_circular_reflect", Conv1dCircular, (2, 4), dims=[0, 3, 6], pair=(0, 7)),
    Case("conv2d_groups", Conv2dGroups, (2, 2, 2), dims=[0, 3, 5], pair=(1, 6)),
    Case("layernorm_no_affine", LayerNormNoAffine, (3,)),
    Case("softmax_temperature_batch1", SoftmaxTemperature, (3,), batch=1),
    Case("log_softmax_head", LogSoftmaxHead, (3,), batch=4),
    Case("elementary_pow_exp_log_atan_div_noncontig_x", Elementary, (3,), noncontiguous=True),
    Case("fourier_cat_index", FourierIndex, (3,), pair=(0, 2)),
    Case("multi_output_2x3", MultiOut23, (3,)),
    Case("matrix_input_2x2", MatrixInput, (2, 2), pair=(0, 3)),
    Case("normalize", Normalize, (3,)),
    Case("pnorm_3_and_2", PNorm, (3,)),
    Case("std_var_logsumexp_cumsum", StatsNet, (3,)),
    Case("max_clamp_relu", MaxClamp, (3,), smooth=False),
    Case("sdpa_causal", SDPACausal, (3, 2), dims=[2, 3], pair=(2, 3)),
    Case("torch_multihead_attention", TorchMHA, (2, 4), dims=[1, 6], pair=(1, 6)),
    # known gap: the capture of nn.LSTMCell fails inside torch's functionalization (an internal assert), so every
    # call goes through the torch.func fallback, which must say so
    Case("lstm_cell_unrolled", LSTMCellUnrolled, (2, 2), pair=(0, 3), fallback="could not be traced"),
    Case("per_sample_repeat_diagonal_hypot", PerSampleTensorOps, (3,)),
    Case("rbf_gaussian", RBFNet, (3,)),
]
SMOOTH = [c for c in CASES if c.smooth]
# orders 1-2: every other architecture in the fast tier (both methods), all of them in make test
all_cases = pytest.mark.parametrize("case", sampled(params(CASES), 2))
smooth_cases = pytest.mark.parametrize("case", sampled(params(SMOOTH), 2))
methods = pytest.mark.parametrize("method", ["forward", "reverse"])


# ----------------------------------------------------------------------------- the tests


@all_cases
@methods
def test_jacobian(case, method):
    model, _, x = case.build()
    with case.expect_fallback():
        J = td.jacobian(model, x, method=method)
    assert J.shape == (x.shape[0], *case.out_shape(), *x.shape[1:])
    close(J, case.jacobian(), f"{case.name} jacobian {method}")


@pytest.mark.parametrize("case", params([c for c in CASES if c.square()]))
@methods
def test_divergence_square_maps(case, method):
    model, _, x = case.build()
    diag = case.jacobian_diagonal()
    with case.expect_fallback():
        jd, div = td.jacobian_diagonal(model, x, method=method), td.divergence(model, x, method=method)
    close(jd, diag, f"{case.name} jacobian_diagonal")
    close(div, diag.flatten(1).sum(-1), f"{case.name} divergence")


@smooth_cases
@methods
def test_hessian(case, method):
    model, _, x = case.build()
    with case.expect_fallback():
        H = td.hessian(model, x, method=method)
    close(H, case.hessian(), f"{case.name} hessian {method}")


@smooth_cases
@methods
def test_hessian_diagonal(case, method):
    model, _, x = case.build()
    with case.expect_fallback():
        hd = td.hessian_diagonal(model, x, method=method)
    close(hd, case.hessian_diagonal(), f"{case.name} hessian_diagonal {method}")


@smooth_cases
@methods
def test_laplacian(case, method):
    model, _, x = case.build()
    with case.expect_fallback():
        lap = td.laplacian(model, x, method=method)
    close(lap, case.laplacian(), f"{case.name} laplacian {method}")


@smooth_cases
@methods
def test_laplacian_weighted(case, method):
    """sum_ij C_ij d2f/dx_i dx_j with a dense symmetric C over every coordinate, dims given in reversed order."""
    model, _, x = case.build()
    dims = list(range(case.n))[::-1]
    C = sym_weights(case.n)
    with case.expect_fallback():
        lap = td.laplacian(model, x, dims=dims, weights=C, method=method)
    close(lap, case.laplacian(dims, C), f"{case.name} weighted laplacian dims={dims} {method}")


@pytest.mark.slow  # orders 3-4 of 24 architectures (fast tier: test_zoo.py and test_rules.py)
@smooth_cases
def test_partials_mixed_spec(case):
    """Orders 0..4 in one request: (0, 0, 1) and (0, 0, 1, 1), and unsorted multi-indices over the case's pair."""
    model, _, x = case.build()
    a, b = case.pair
    spec = [(), (b,), (b, a), (a, a), (0, 0, 1), (0, 0, 1, 1), (b, a, a), (b, b, b), (a, b, a, b), (b, b, b, b)]
    spec = list(dict.fromkeys(spec))
    with case.expect_fallback():
        got = td.partials(model, x, spec)
    assert list(got) == spec
    for key in spec:
        close(got[key], case.partial(key), f"{case.name} partial {key}")


@pytest.mark.slow
@smooth_cases
def test_biharmonic(case):
    model, _, x = case.build()
    with case.expect_fallback():
        bh = td.biharmonic(model, x, dims=case.dims)
    close(bh, case.biharmonic(case.dims), f"{case.name} biharmonic {case.dims}")


@pytest.mark.slow  # checks the references, not torchderiv
@pytest.mark.parametrize("name", ["layernorm_no_affine", "causal_attention_einsum_bmm", "conv1d_circular_reflect",
                                  "normalize", "elu_selu_mish_hardswish", "torch_multihead_attention",
                                  "lstm_cell_unrolled"])
def test_references_agree_with_finite_differences(name):
    """The nested-jacrev references themselves, against nested central differences at orders 1-3."""
    case = next(c for c in CASES if c.name == name)
    _, ref, x = case.build()
    a, b = case.pair
    for key, tol in [((a,), 1e-6), ((a, b), 1e-4), ((a, a, b), 1e-3)]:
        torch.testing.assert_close(partials(ref, x, [key])[key], fd_partial(ref, x, key), atol=tol, rtol=tol)


def test_twins_match_their_modules():
    """The hand-written reference twins compute the same values as the modules they stand in for."""
    for case in CASES:
        model, ref, x = case.build()
        if ref is not model:
            close(value(ref, x), value(model, x), f"{case.name} twin value")


def test_op_without_rule_raises_above_order_one():
    """An op with no Taylor rule (here torch.special.i0) is differentiated by the generic fallback at order 1 (which
    says so); higher orders must raise, naming the op, never return a silently wrong number."""
    model = lambda x: torch.special.i0(x).sum(-1, keepdim=True)  # noqa: E731
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with pytest.warns(td.FallbackWarning, match="i0"):
        J = td.jacobian(model, x, method="forward")
    ref = torch.func.vmap(torch.func.jacrev(lambda v: torch.special.i0(v).sum(-1, keepdim=True)))(x)
    torch.testing.assert_close(J, ref)
    for _ in range(2):  # the second time from the remembered failed build
        with pytest.raises(NotImplementedError, match="i0"):
            td.hessian(model, x, method="forward")
    with pytest.raises(NotImplementedError, match="i0"):
        td.partials(model, x, [(0, 0, 1)], method="forward")

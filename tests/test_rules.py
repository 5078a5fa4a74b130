"""Every rule of the registry, one op at a time, at orders 1..4 in float64 against torch.func / autograd.

Each case is a small function of ``x`` ``[B, *in]`` in which the op under test acts on an input-dependent
tensor (``h = x @ W`` mixes the coordinates, so mixed partials are non-trivial). The test checks that the
op really appears in the captured ATen graph (so the rule is the code path exercised), then compares
``torchderiv.partials`` of orders 0..4 with the reference. Shape / linear ops are tested both on a tensor
whose Taylor coefficients are still batch-broadcast (right after ``x @ W``) and after a nonlinearity.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchderiv as td
from _harness import sampled
from conftest import assert_close, ref_partials
from torchderiv._capture import capture
from torchderiv._rules import RULES

aten = torch.ops.aten
DT = torch.float64
B = 3

_PARAMS = torch.Generator().manual_seed(1234)  # the fixed parameters below, drawn once, in order, at import
_IMPORTED = False


def rnd(*shape, lo=-1.0, hi=1.0, seed: int | None = None):
    """Uniform on [lo, hi): module parameters at import (``seed=None``), inputs of a test from its own ``seed``
    (so that a test's x does not depend on which tests ran before it)."""
    if seed is None:
        assert not _IMPORTED, "a test draws its inputs from its own seed: rnd(..., seed=N)"
        g = _PARAMS
    else:
        g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(*shape, dtype=DT, generator=g)


# fixed parameters shared by the cases (n = 3 inputs -> width 6)
W = rnd(3, 6)  # mixing
W2 = rnd(3, 6)
WP = rnd(3, 6, lo=0.2, hi=0.6)  # positive (with x > 0: h > 0)
M = rnd(6, 4)
M3 = rnd(3, 4)


def h(x):  # general-purpose input-dependent tensor [B, 6], values about [-2, 2]
    return x @ W


def h2(x):
    return x @ W2


def hpos(x):  # positive for x in [0.5, 1.5]: about [0.3, 3.6]
    return x @ WP + 0.3


def hsmall(x):  # |h| < 0.85 for x in [-1, 1]
    return 0.25 * (x @ W)


@dataclass
class Case:
    name: str
    fn: Callable
    ops: tuple  # ATen ops that must appear in the captured graph
    in_shape: tuple = (3,)
    lo: float = -1.0
    hi: float = 1.0
    ref: Callable | None = None  # reference twin (manual decomposition) where torch's own AD is unreliable
    batched: bool = True
    max_order: int = 4
    atol: float = 1e-8
    rtol: float = 1e-6

    def x(self):
        g = torch.Generator().manual_seed(zlib.crc32(self.name.encode()))  # stable across processes
        shape = (B, *self.in_shape) if self.batched else self.in_shape
        return self.lo + (self.hi - self.lo) * torch.rand(*shape, dtype=DT, generator=g)


CASES: list[Case] = []


def _then(*fs):
    """Composition ``fs[-1](...fs[0](x))`` as a one-argument function (make_fx traces every parameter of f,
    so no default-argument lambdas here)."""

    def f(x):
        for g in fs:
            x = g(x)
        return x

    return f


def _times(f, g):
    return lambda x: f(x) * g(x)


def case(name, fn, ops, **kw):
    CASES.append(Case(name, fn, tuple(ops) if isinstance(ops, (list, tuple)) else (ops,), **kw))


# ============================================================================ elementwise functions

POS = {"lo": 0.5, "hi": 1.5}
general = [
    ("tanh", torch.tanh, aten.tanh.default),
    ("sigmoid", torch.sigmoid, aten.sigmoid.default),
    ("exp", torch.exp, aten.exp.default),
    ("expm1", torch.expm1, aten.expm1.default),
    ("sin", torch.sin, aten.sin.default),
    ("cos", torch.cos, aten.cos.default),
    ("sinh", torch.sinh, aten.sinh.default),
    ("cosh", torch.cosh, aten.cosh.default),
    ("erf", torch.erf, aten.erf.default),
    ("erfc", torch.erfc, aten.erfc.default),
    ("atan", torch.atan, aten.atan.default),
    ("asinh", torch.asinh, aten.asinh.default),
    ("exp2", torch.exp2, aten.exp2.default),
    ("silu", F.silu, aten.silu.default),
    ("gelu_none", lambda t: F.gelu(t, approximate="none"), aten.gelu.default),
    ("gelu_tanh", lambda t: F.gelu(t, approximate="tanh"), aten.gelu.default),
    ("softplus", F.softplus, aten.softplus.default),
    ("softplus_beta", lambda t: F.softplus(t, beta=2.5, threshold=8.0), aten.softplus.default),
    ("elu", lambda t: F.elu(t, alpha=0.7), aten.elu.default),
    ("selu", torch.selu, aten.elu.default),
    ("pow_int", lambda t: t**3, aten.pow.Tensor_Scalar),
    ("pow_square", torch.square, aten.pow.Tensor_Scalar),
    ("pow_scalar_base", lambda t: 2.0**t, aten.pow.Scalar),
    ("pow_scalar_base_frac", lambda t: 0.5**t, aten.pow.Scalar),
    ("erfcx", torch.special.erfcx, aten.special_erfcx.default),
    ("log_ndtr", torch.special.log_ndtr, aten.special_log_ndtr.default),
]
for name, g, op in general:
    case(name, _then(h, g), op)

positive = [
    ("log", torch.log, aten.log.default),
    ("log1p", torch.log1p, aten.log1p.default),
    ("log2", torch.log2, aten.log2.default),
    ("log10", torch.log10, aten.log10.default),
    ("sqrt", torch.sqrt, aten.sqrt.default),
    ("rsqrt", torch.rsqrt, aten.rsqrt.default),
    ("reciprocal", torch.reciprocal, aten.reciprocal.default),
    ("lgamma", torch.lgamma, aten.lgamma.default),
    ("digamma", torch.digamma, aten.digamma.default),
    ("pow_frac", lambda t: t**2.5, aten.pow.Tensor_Scalar),
    ("pow_neg_frac", lambda t: t**-1.5, aten.pow.Tensor_Scalar),
    ("pow_half", lambda t: t**0.5, aten.pow.Tensor_Scalar),
    ("acosh", lambda t: torch.acosh(1 + t), aten.acosh.default),
]
for name, g, op in positive:
    case(name, _then(hpos, g), op, **POS)

small = [
    ("tan", torch.tan, aten.tan.default),
    ("asin", torch.asin, aten.asin.default),
    ("acos", torch.acos, aten.acos.default),
    ("atanh", torch.atanh, aten.atanh.default),
    ("erfinv", torch.erfinv, aten.erfinv.default),
]
for name, g, op in small:
    case(name, _then(hsmall, g), op)

# log_ndtr far in its lower tail (Phi(h) down to 1e-20: the derivatives use the ratio phi / Phi, never Phi alone)
case("log_ndtr_tail", _then(h, lambda t: torch.special.log_ndtr(2 * t - 7)), aten.special_log_ndtr.default)

# softplus beyond its threshold: beta * h > threshold on part of the entries -> exactly linear there
case("softplus_beyond_threshold", lambda x: F.softplus(3 * h(x), beta=2.0, threshold=1.0), aten.softplus.default,
     lo=-1.5, hi=1.5)

# piecewise-linear functions: times an input-dependent factor so that products of their (constant) slopes
# reach every order; random points are almost surely away from the kinks
piecewise = [
    ("relu", torch.relu, aten.relu.default),
    ("abs", torch.abs, aten.abs.default),
    ("leaky_relu", lambda t: F.leaky_relu(t, 0.1), aten.leaky_relu.default),
    ("hardtanh", lambda t: F.hardtanh(t, -0.5, 0.7), aten.hardtanh.default),
    ("relu6", F.relu6, aten.hardtanh.default),
    ("clamp", lambda t: torch.clamp(t, -0.4, 0.6), aten.clamp.default),
    ("clamp_min", lambda t: torch.clamp(t, min=0.1), aten.clamp.default),
    ("clamp_max", lambda t: torch.clamp(t, max=0.2), aten.clamp.default),
]
for name, g, op in piecewise:
    case(name, _times(_then(h, g), lambda x: torch.sin(h2(x))), op)
    case(name + "_alone", _then(h, g), op, max_order=2)

# ============================================================================ arithmetic

case("add_tensor", lambda x: torch.sin(h(x)) + torch.cos(h2(x)) * h(x), [aten.add.Tensor])
case("add_alpha", lambda x: torch.add(torch.sin(h(x)), torch.exp(h2(x)), alpha=-0.7), [aten.add.Tensor])
case("add_scalar", lambda x: torch.sin(aten.add.Scalar(torch.sin(h(x)), 0.3)), [aten.add.Scalar])
case("sub_tensor", lambda x: torch.sin(h(x)) - torch.exp(h2(x)), [aten.sub.Tensor])
case("sub_scalar", lambda x: torch.exp(aten.sub.Scalar(torch.sin(h(x)), 0.3)), [aten.sub.Scalar])
case("rsub_scalar", lambda x: torch.exp(1 - torch.sin(h(x))), [aten.rsub.Scalar])
case("rsub_tensor", lambda x: aten.rsub.Tensor(torch.sin(h(x)), torch.cos(h2(x)), alpha=2.0), [aten.rsub.Tensor])
case("neg", lambda x: torch.exp(-torch.sin(h(x))), [aten.neg.default])
case("mul_two_inputs", lambda x: (x @ M3) * torch.sin(x @ M3[:, [2, 0, 1, 3]]), [aten.mul.Tensor])
case("mul_product_of_linears", lambda x: h(x) * h2(x) * h(x), [aten.mul.Tensor])
case("mul_scalar", lambda x: torch.sin(aten.mul.Scalar(torch.sin(h(x)), 1.7)), [aten.mul.Scalar])
case("mul_constant_tensor", lambda x: torch.sin(h(x)) * torch.linspace(-1, 2, 6, dtype=DT), [aten.mul.Tensor])
case("div_input_denominator", lambda x: torch.sin(h(x)) / hpos(x), [aten.div.Tensor], **POS)
case("div_both", lambda x: hpos(x) / (1.0 + torch.sin(h(x)) ** 2), [aten.div.Tensor], **POS)
case("div_constant", lambda x: torch.sin(h(x)) / torch.linspace(1, 2, 6, dtype=DT), [aten.div.Tensor])
case("div_scalar", lambda x: torch.exp(aten.div.Scalar(torch.sin(h(x)), 3.0)), [aten.div.Scalar])
case("pow_tensor_tensor", lambda x: hpos(x) ** torch.sin(h(x)), [aten.pow.Tensor_Tensor], **POS)
case("pow_tensor_tensor_const_base", lambda x: torch.full((6,), 1.7, dtype=DT) ** torch.sin(h(x)),
     [aten.pow.Tensor_Tensor])
case("where", lambda x: torch.where(h(x) > 0, torch.sin(h2(x)) * h(x), torch.exp(h2(x))), [aten.where.self])
case("where_constant_branch", lambda x: torch.where(h(x) > 0.2, torch.sin(h2(x)), 0.5), [aten.where.self])
case("hypot", lambda x: torch.hypot(torch.sin(h(x)) + 1.5, torch.cos(h2(x))), [aten.hypot.default])
case("hypot_constant", lambda x: torch.hypot(h(x), torch.full((6,), 0.7, dtype=DT)), [aten.hypot.default])
case("maximum", lambda x: torch.maximum(torch.sin(h(x)), torch.cos(h2(x))) * h(x), [aten.maximum.default])
case("minimum", lambda x: torch.minimum(torch.sin(h(x)), torch.cos(h2(x))) * h(x), [aten.minimum.default])
case("maximum_constant", lambda x: torch.maximum(torch.sin(h(x)), torch.zeros(6, dtype=DT)) * torch.exp(h2(x)),
     [aten.maximum.default])



# clamp with tensor bounds (aten.clamp.Tensor / clamp_min.Tensor / clamp_max.Tensor): the coefficients are taken
# from whichever of x, lo, hi is selected, all three input-dependent here
def _lo(x):
    return 0.5 * torch.cos(h2(x)) - 0.4


def _hi(x):
    return 0.3 + 0.4 * torch.sin(h2(x) * h(x))


CLAMP_LO = torch.linspace(-0.5, 0.2, 6, dtype=DT)
case("clamp_tensor", lambda x: torch.clamp(torch.sin(h(x)), _lo(x), _hi(x)) * torch.exp(h2(x)), [aten.clamp.Tensor])
case("clamp_tensor_min", lambda x: torch.clamp(torch.sin(h(x)), min=_lo(x)) * h(x), [aten.clamp.Tensor])
case("clamp_tensor_max", lambda x: torch.clamp(torch.sin(h(x)), max=_hi(x)) * h(x), [aten.clamp.Tensor])
case("clamp_tensor_constant_bounds", lambda x: torch.clamp(torch.sin(h(x)), CLAMP_LO, CLAMP_LO + 0.6) * h2(x),
     [aten.clamp.Tensor])
case("clamp_min_tensor", lambda x: aten.clamp_min.Tensor(torch.sin(h(x)), CLAMP_LO) * torch.exp(h2(x)),
     [aten.clamp_min.Tensor])
case("clamp_max_tensor", lambda x: aten.clamp_max.Tensor(torch.sin(h(x)), CLAMP_LO + 0.3) * torch.exp(h2(x)),
     [aten.clamp_max.Tensor])
# input-dependent bounds through the (rarer) clamp_min / clamp_max overloads: on one point, as the batch check
# does not follow these two-input ops
case("clamp_min_tensor_input_bound", lambda x: aten.clamp_min.Tensor(torch.sin(x @ W), _lo(x)) * (x @ W),
     [aten.clamp_min.Tensor], batched=False)
case("clamp_max_tensor_input_bound", lambda x: aten.clamp_max.Tensor(torch.sin(x @ W), _hi(x)) * (x @ W),
     [aten.clamp_max.Tensor], batched=False)
# cosine_similarity traces to 2-norms, clamp_min.Tensor against a constant eps, div, mul, sum
case("cosine_similarity", lambda x: F.cosine_similarity(torch.sin(h(x)), torch.cos(h2(x)) * h(x), dim=-1),
     [aten.clamp_min.Tensor, aten.linalg_vector_norm.default])
# atan2 over all four quadrants (both branches: |a| <= |b| and |a| > |b|), and with a constant operand
case("atan2", lambda x: torch.atan2(torch.sin(h(x)), torch.cos(h2(x))), [aten.atan2.default], lo=-2.0, hi=2.0)
case("atan2_linear_operands", lambda x: torch.atan2(h(x), h2(x)), [aten.atan2.default])
case("atan2_constant_denominator", lambda x: torch.atan2(torch.sin(h(x)), CLAMP_LO), [aten.atan2.default])
case("atan2_constant_numerator", lambda x: torch.atan2(CLAMP_LO, torch.sin(h(x))), [aten.atan2.default])

# ============================================================================ linear algebra

A2 = rnd(6, 6)
case("mm", lambda x: torch.sin(h(x)) @ A2, [aten.mm.default])
case("mm_then_nonlinear", lambda x: torch.tanh(torch.sin(h(x)) @ A2) @ A2, [aten.mm.default])
lin = nn.Linear(6, 4).to(DT)
case("addmm_linear", lambda x: torch.tanh(lin(torch.sin(h(x)))), [aten.addmm.default, aten.t.default])
case("addmm_input_bias", lambda x: torch.addmm(torch.sin(h(x)), torch.cos(h2(x)), A2, beta=0.5, alpha=2.0),
     [aten.addmm.default])
case("products_of_linear_maps", lambda x: (x @ M3) * (x @ M3.flip(-1)) * (x @ M3[[1, 2, 0]]), [aten.mm.default])


def _bmm_two_inputs(x):
    a = torch.sin(h(x)).unflatten(-1, (2, 3))  # [B, 2, 3]
    b = torch.cos(h2(x)).unflatten(-1, (3, 2))  # [B, 3, 2]
    return torch.bmm(a, b)


case("bmm_two_inputs", _bmm_two_inputs, [aten.bmm.default])
case("bmm_linear_operands", lambda x: torch.bmm(h(x).unflatten(-1, (2, 3)), h2(x).unflatten(-1, (3, 2))),
     [aten.bmm.default])
case("matmul_3d", lambda x: torch.sin(h(x)).unflatten(-1, (2, 3)) @ torch.cos(h2(x)).unflatten(-1, (3, 2)),
     [aten.bmm.default])
case("baddbmm", lambda x: torch.baddbmm(torch.sin(h(x)).unflatten(-1, (2, 3))[:, :, :2], torch.sin(h(x)).unflatten(
    -1, (2, 3)), torch.cos(h2(x)).unflatten(-1, (3, 2)), beta=0.7, alpha=1.3), [aten.baddbmm.default])
case("unsafe_view_matmul", lambda x: torch.sin(h(x)).unflatten(-1, (2, 3)) @ M[:3], [aten._unsafe_view.default])
W9 = rnd(3, 9)
EYE3 = torch.eye(3, dtype=DT)
case("linalg_inv", lambda x: torch.linalg.inv(torch.sin(x @ W9).unflatten(-1, (3, 3)) + 2 * EYE3).flatten(1),
     [aten.linalg_inv_ex.default])
case("linalg_inv_pre", lambda x: torch.sin(torch.linalg.inv((x @ W9).unflatten(-1, (3, 3)) + 2.5 * EYE3)).flatten(1),
     [aten.linalg_inv_ex.default])
case("linalg_inv_unbatched", lambda x: torch.linalg.inv(torch.tanh(x[:, None] * x[None] * 3.0) + EYE3) @ x,
     [aten.linalg_inv_ex.default], batched=False)
case("t_unbatched", lambda x: torch.sin((x @ W).unflatten(0, (2, 3)).t()) @ M[:2], [aten.t.default],
     batched=False)

conv1 = nn.Conv1d(2, 3, 3, padding=1).to(DT)
conv1s = nn.Conv1d(2, 4, 2, stride=2, dilation=1, groups=2).to(DT)
conv1t = nn.ConvTranspose1d(2, 2, 3, stride=2).to(DT)
conv2 = nn.Conv2d(1, 2, 2).to(DT)
conv2g = nn.Conv2d(2, 2, 3, padding=1, groups=2, bias=False).to(DT)
CONV = {"in_shape": (2, 4)}
case("conv1d_on_input", lambda x: torch.tanh(conv1(x)), [aten.convolution.default], **CONV)
case("conv1d_after_nonlinear", lambda x: conv1(torch.sin(x) * x), [aten.convolution.default], **CONV)
case("conv1d_stride_groups", lambda x: torch.tanh(conv1s(torch.sin(x) * x)), [aten.convolution.default], **CONV)
case("conv_transpose1d", lambda x: conv1t(torch.tanh(x)) * x.sum(-1, keepdim=True), [aten.convolution.default], **CONV)
case("conv2d", lambda x: torch.tanh(conv2(torch.sin(x))), [aten.convolution.default], in_shape=(1, 3, 3))
case("conv2d_groups", lambda x: conv2g(torch.sin(x) * x), [aten.convolution.default], in_shape=(2, 2, 2))

# ============================================================================ shape ops
# each applied (pre) right after x @ W, where the Taylor coefficients are still batch-broadcast, then a
# nonlinearity, and (post) to a nonlinear tensor with full coefficients

CONST2 = rnd(2)
ONES6 = torch.ones(6, dtype=DT)
IDX = torch.tensor([4, 0, 0, 5, 2])
shape_ops = [
    ("view", lambda t: t.unflatten(-1, (2, 3)), [aten.view.default]),
    ("permute", lambda t: t.unflatten(-1, (2, 3)).permute(0, 2, 1), [aten.permute.default]),
    ("transpose", lambda t: t.unflatten(-1, (2, 3)).transpose(1, 2), [aten.transpose.int]),
    ("expand", lambda t: t[:, :, None].expand(-1, 6, 2), [aten.expand.default, aten.unsqueeze.default]),
    ("unsqueeze", lambda t: t.unsqueeze(1) * t.unsqueeze(2), [aten.unsqueeze.default]),
    ("squeeze_dim", lambda t: t[:, None].squeeze(1), [aten.squeeze.dim]),
    ("squeeze_dims", lambda t: t[:, None, :, None].squeeze((1, 3)), [aten.squeeze.dims]),
    ("squeeze_default", lambda t: t[:, None, :, None].squeeze(), [aten.squeeze.default]),
    ("cat", lambda t: torch.cat([t, t[:, :2] * 2.0], -1), [aten.cat.default]),
    ("cat_with_constant", lambda t: torch.cat([CONST2.expand(t.shape[0], 2), t, CONST2.expand(t.shape[0], 2)], -1),
     [aten.cat.default]),
    ("stack", lambda t: torch.stack([t, 2 * t], 1), [aten.stack.default]),
    ("stack_last_with_constant", lambda t: torch.stack([t, ONES6.expand(t.shape[0], 6)], -1), [aten.stack.default]),
    ("slice", lambda t: t[:, 1:6:2], [aten.slice.Tensor]),
    ("slice_inner", lambda t: t.unflatten(-1, (2, 3))[:, :, 1:], [aten.slice.Tensor]),
    ("select", lambda t: t.unflatten(-1, (2, 3))[:, 1], [aten.select.int]),
    ("select_last", lambda t: t.unflatten(-1, (2, 3))[..., 2], [aten.select.int]),
    ("split", lambda t: torch.cat(t.split(4, -1)[::-1], -1), [aten.split.Tensor]),
    ("chunk", lambda t: torch.cat(t.chunk(3, -1)[::-1], -1), [aten.split.Tensor]),
    ("split_with_sizes", lambda t: torch.cat(t.split([1, 5], -1)[::-1], -1), [aten.split_with_sizes.default]),
    ("unbind", lambda t: torch.stack(t.unflatten(-1, (2, 3)).unbind(1)[::-1], 1), [aten.unbind.int]),
    ("index_select", lambda t: t.index_select(1, IDX), [aten.index_select.default]),
    ("index_tensor", lambda t: t[:, IDX], [aten.index.Tensor]),
    ("gather", lambda t: t.gather(1, IDX[None].expand(t.shape[0], 5)), [aten.gather.default]),
    ("constant_pad_nd", lambda t: F.pad(t, (1, 2), value=0.5), [aten.constant_pad_nd.default]),
    ("flip", lambda t: t.flip(-1), [aten.flip.default]),
    ("cumsum", lambda t: t.cumsum(-1), [aten.cumsum.default]),
    ("alias", lambda t: aten.alias.default(t), [aten.alias.default]),
    ("clone", lambda t: t.clone(), [aten.clone.default]),
    ("contiguous_after_transpose", lambda t: t.unflatten(-1, (2, 3)).transpose(1, 2).contiguous(),
     [aten.clone.default]),
    ("to_copy", lambda t: t.to(DT, copy=True), [aten._to_copy.default]),
    ("repeat", lambda t: t.repeat(1, 2), [aten.repeat.default]),
    ("repeat_new_leading_dim", lambda t: t.repeat(2, 1, 1).sum(0), [aten.repeat.default]),
    ("diagonal", lambda t: t.unflatten(-1, (2, 3)).unflatten(-1, (3, 1)).expand(-1, 2, 3, 3)
     .diagonal(0, -2, -1).flatten(1), [aten.diagonal.default]),
    ("diagonal_offset", lambda t: t.unflatten(-1, (2, 3)).diagonal(1, 1, 2), [aten.diagonal.default]),
]
for name, s, ops in shape_ops:
    # linear ops act on every coefficient alike: orders up to 3 exercise the products after them
    case(name + "_pre", _then(h, s, torch.sin), ops, max_order=3)
    case(name + "_post", _then(_times(lambda x: torch.sin(h(x)), h2), s), ops, max_order=3)

case("detach", lambda x: torch.sin(h(x)) * torch.cos(h2(x)).detach(), [aten.detach.default])
case("lift_fresh_copy", lambda x: torch.sin(h(x)) * torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], dtype=DT),
     [aten.lift_fresh_copy.default])

# ============================================================================ reductions & normalization

case("sum_dim", lambda x: torch.sin(h(x)).sum(-1), [aten.sum.dim_IntList])
case("sum_dim_keepdim", lambda x: torch.sin(h(x)).unflatten(-1, (2, 3)).sum(1, keepdim=True),
     [aten.sum.dim_IntList])
case("sum_pre", lambda x: torch.sin(h(x).sum(-1)), [aten.sum.dim_IntList])
case("sum_default_unbatched", lambda x: torch.sin(x @ W).sum(), [aten.sum.default], batched=False)
case("mean_dim", lambda x: torch.sin(h(x)).mean(-1), [aten.mean.dim])
case("mean_pre", lambda x: torch.exp(h(x).unflatten(-1, (2, 3)).mean((1, 2))), [aten.mean.dim])
case("mean_default_unbatched", lambda x: torch.sin(x @ W).mean(), [aten.mean.default], batched=False)
case("var", lambda x: torch.sin(h(x)).var(-1), [aten.var.correction])
case("var_no_correction", lambda x: torch.sin(h(x)).var(-1, correction=0, keepdim=True), [aten.var.correction])
case("var_pre", lambda x: h(x).var(-1), [aten.var.correction])
case("std", lambda x: torch.sin(h(x)).std(-1), [aten.var.correction, aten.sqrt.default])
case("var_mean", lambda x: torch.var_mean(torch.sin(h(x)) * h2(x), -1)[0] * torch.var_mean(torch.sin(h(x)), -1)[1],
     [aten.var_mean.correction])
case("std_mean_keepdim", lambda x: torch.stack(torch.std_mean(torch.sin(h(x)).unflatten(-1, (2, 3)), -1,
                                                               keepdim=True, correction=0), -1),
     [aten.var_mean.correction, aten.sqrt.default])
case("var_mean_unbatched", lambda x: torch.stack(torch.var_mean(torch.sin(x @ W))), [aten.var_mean.correction],
     batched=False)
case("prod", lambda x: torch.sin(h(x)).prod(-1), [aten.prod.dim_int])  # 6 -> 3 -> (1 pair + 1 left over)
case("prod_keepdim_pre", lambda x: torch.sin(h(x).unflatten(-1, (2, 3)).prod(-1, keepdim=True)), [aten.prod.dim_int])
case("prod_odd_inner_dim", lambda x: torch.exp(torch.sin(h(x)).unflatten(-1, (3, 2)).prod(1)), [aten.prod.dim_int])
case("prod_all_unbatched", lambda x: (1.5 * torch.sin(x @ W)).prod(), [aten.prod.default], batched=False)
case("cumprod", lambda x: torch.sin(h(x)).cumprod(-1), [aten.cumprod.default])
case("cumprod_pre", lambda x: torch.sin(h(x).unflatten(-1, (2, 3)).cumprod(1)), [aten.cumprod.default])


def _logcumsumexp_twin(t, dim):
    """logcumsumexp as a logsumexp per prefix (torch's own third derivative of logcumsumexp is nan in 2.13)."""
    t = t.movedim(dim, -1)
    return torch.stack([torch.logsumexp(t[..., : i + 1], -1) for i in range(t.shape[-1])], -1).movedim(-1, dim)


SPREAD = torch.linspace(-900, 0, 6, dtype=DT)
case("logcumsumexp", lambda x: torch.logcumsumexp(torch.sin(h(x)) * 2, -1), [aten.logcumsumexp.default],
     ref=lambda x: _logcumsumexp_twin(torch.sin(h(x)) * 2, -1))
case("logcumsumexp_pre", lambda x: torch.sin(torch.logcumsumexp(h(x).unflatten(-1, (2, 3)), 1)),
     [aten.logcumsumexp.default], ref=lambda x: torch.sin(_logcumsumexp_twin(h(x).unflatten(-1, (2, 3)), 1)))
# entries 180 apart: exp(x_0 - x_5) underflows, so a shift by the largest entry would lose the first prefixes
case("logcumsumexp_spread", lambda x: torch.logcumsumexp(h(x) * 2 + SPREAD, -1), [aten.logcumsumexp.default],
     ref=lambda x: _logcumsumexp_twin(h(x) * 2 + SPREAD, -1))
case("logsumexp", lambda x: torch.logsumexp(torch.sin(h(x)) * 2, -1), [aten.logsumexp.default])
case("logsumexp_keepdim_pre", lambda x: torch.logsumexp(h(x).unflatten(-1, (2, 3)), (1, 2), keepdim=True),
     [aten.logsumexp.default])
case("softmax", lambda x: torch.softmax(torch.sin(h(x)) * 2, -1), [aten._softmax.default])
case("softmax_pre", lambda x: torch.softmax(h(x).unflatten(-1, (2, 3)), 1), [aten._softmax.default])
case("log_softmax", lambda x: torch.log_softmax(torch.sin(h(x)) * 2, -1), [aten._log_softmax.default])
case("log_softmax_pre", lambda x: torch.log_softmax(h(x), -1), [aten._log_softmax.default])
case("amax", lambda x: torch.sin(h(x)).amax(-1) * h(x)[:, 0], [aten.amax.default])
case("amin", lambda x: torch.sin(h(x)).unflatten(-1, (2, 3)).amin(-1) * torch.exp(h2(x)[:, :2]),
     [aten.amin.default])
case("vector_norm", lambda x: torch.linalg.vector_norm(torch.sin(h(x)), dim=-1), [aten.linalg_vector_norm.default])
case("vector_norm_pre", lambda x: torch.sin(h(x).norm(dim=-1, keepdim=True)), [aten.linalg_vector_norm.default])

def _p_norm(p):
    return lambda x: torch.linalg.vector_norm(torch.sin(h(x)), ord=p, dim=-1) * h2(x)[:, 0]


for name, p in [("3", 3), ("1", 1), ("2_5", 2.5), ("neg1", -1), ("inf", math.inf), ("neginf", -math.inf)]:
    case("vector_norm_ord_" + name, _p_norm(p), [aten.linalg_vector_norm.default])
case("vector_norm_ord_3_pre", lambda x: torch.sin(h(x).unflatten(-1, (2, 3)).norm(p=3, dim=-1, keepdim=True)),
     [aten.linalg_vector_norm.default])
case("vector_norm_ord_0", lambda x: torch.linalg.vector_norm(h(x), ord=0, dim=-1) * torch.sin(h2(x)[:, 0]),
     [aten.linalg_vector_norm.default])
case("vector_norm_ord_4_all_unbatched", lambda x: torch.linalg.vector_norm(torch.sin(x @ W), ord=4),
     [aten.linalg_vector_norm.default], batched=False)

ln = nn.LayerNorm(6).to(DT)
with torch.no_grad():
    ln.weight.copy_(1 + 0.3 * rnd(6))
    ln.bias.copy_(0.2 * rnd(6))


def manual_ln(t, weight=None, bias=None, eps=1e-5, dims=(-1,)):
    m = t.mean(dims, keepdim=True)
    c = t - m
    v = (c * c).mean(dims, keepdim=True)
    out = c * torch.rsqrt(v + eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


case("layer_norm", lambda x: ln(torch.sin(h(x)) * h2(x)), [aten.native_layer_norm.default],
     ref=lambda x: manual_ln(torch.sin(h(x)) * h2(x), ln.weight, ln.bias))
case("layer_norm_pre", lambda x: ln(h(x)), [aten.native_layer_norm.default],
     ref=lambda x: manual_ln(h(x), ln.weight, ln.bias))
case("layer_norm_2d_no_affine", lambda x: F.layer_norm(torch.sin(h(x)).unflatten(-1, (2, 3)), (2, 3)),
     [aten.native_layer_norm.default],
     ref=lambda x: manual_ln(torch.sin(h(x)).unflatten(-1, (2, 3)), dims=(-2, -1)))

gn = nn.GroupNorm(2, 4).to(DT)
with torch.no_grad():
    gn.weight.copy_(1 + 0.3 * rnd(4))
    gn.bias.copy_(0.2 * rnd(4))


def manual_gn(t):
    g = t.unflatten(1, (2, 2))  # [B, G, C/G, L]
    out = manual_ln(g, dims=(2, 3)).flatten(1, 2)
    return out * gn.weight[:, None] + gn.bias[:, None]


case("group_norm", lambda x: gn(torch.sin(x @ M3).unsqueeze(-1) * x[:, None, :]), [aten.native_group_norm.default],
     ref=lambda x: manual_gn(torch.sin(x @ M3).unsqueeze(-1) * x[:, None, :]))

bn = nn.BatchNorm1d(6).to(DT)
with torch.no_grad():
    bn.running_mean.copy_(0.3 * rnd(6))
    bn.running_var.copy_(rnd(6, lo=0.5, hi=2.0))
    bn.weight.copy_(1 + 0.3 * rnd(6))
    bn.bias.copy_(0.2 * rnd(6))
bn.eval()


def manual_bn(t):
    return (t - bn.running_mean) * torch.rsqrt(bn.running_var + bn.eps) * bn.weight + bn.bias


case("batch_norm_eval", lambda x: torch.tanh(bn(torch.sin(h(x)) * h2(x))), [aten.native_batch_norm.default],
     ref=lambda x: torch.tanh(manual_bn(torch.sin(h(x)) * h2(x))))
case("batch_norm_legit_no_training", lambda x: torch.tanh(aten._native_batch_norm_legit_no_training.default(
    torch.sin(h(x)), bn.weight, bn.bias, bn.running_mean, bn.running_var, 0.1, bn.eps)[0]),
    [aten._native_batch_norm_legit_no_training.default], ref=lambda x: torch.tanh(manual_bn(torch.sin(h(x)))))

# ============================================================================ pooling & upsampling (per-sample linear)

IMG = {"in_shape": (1, 4, 4)}
case("avg_pool2d", lambda x: F.avg_pool2d(torch.sin(x) * x, 2), [aten.avg_pool2d.default], **IMG)
case("avg_pool2d_pre", lambda x: torch.sin(F.avg_pool2d(x, 2, stride=1)), [aten.avg_pool2d.default], **IMG)
case("adaptive_avg_pool2d", lambda x: F.adaptive_avg_pool2d(torch.sin(x) * x, 2), [aten._adaptive_avg_pool2d.default],
     **IMG)
case("max_pool2d", lambda x: F.max_pool2d(torch.sin(x) * x, 2), [aten.max_pool2d_with_indices.default], **IMG)
case("upsample_nearest2d", lambda x: F.interpolate(torch.sin(x) * x, scale_factor=2, mode="nearest"),
     [aten.upsample_nearest2d.default], in_shape=(1, 2, 2))
case("upsample_bilinear2d", lambda x: torch.sin(F.interpolate(torch.sin(x) * x, scale_factor=2, mode="bilinear",
                                                             align_corners=False)),
     [aten.upsample_bilinear2d.default], in_shape=(1, 2, 2))
case("avg_pool3d", lambda x: F.avg_pool3d(torch.sin(x) * x, 2), [aten.avg_pool3d.default], in_shape=(1, 2, 2, 2))
case("adaptive_avg_pool3d", lambda x: F.adaptive_avg_pool3d(torch.sin(x) * x, (1, 2, 2)),
     [aten._adaptive_avg_pool3d.default], in_shape=(1, 2, 4, 4))

# ============================================================================ scatters, windows, selections
IDX6 = torch.tensor([[2, 0, 1, 0, 2, 1]])  # scatter positions for a [B, 6] src into [B, 3]
IDX3 = torch.tensor([[2, 0, 1]])


def _idx(t, idx):
    return idx.expand(t.shape[0], idx.shape[1])


case("scatter_src", lambda x: torch.sin(h(x))[:, :3].scatter(1, _idx(x, IDX3), torch.cos(h2(x))[:, :3] * h(x)[:, :3]),
     [aten.scatter.src])
case("scatter_into_constant", lambda x: torch.tanh(torch.zeros(x.shape[0], 4, dtype=DT).scatter(
    1, _idx(x, IDX3), torch.sin(h(x))[:, :3])), [aten.scatter.src])
case("scatter_value", lambda x: torch.sin(h(x))[:, :3].scatter(1, _idx(x, IDX3)[:, :2], 0.5) * h2(x)[:, :3],
     [aten.scatter.value])
case("scatter_add", lambda x: torch.sin(h(x))[:, :3].scatter_add(1, _idx(x, IDX6), torch.cos(h2(x)) * h(x)),
     [aten.scatter_add.default])
case("scatter_reduce_sum", lambda x: torch.sin(h(x))[:, :3].scatter_reduce(1, _idx(x, IDX6), torch.cos(h2(x)),
                                                                             "sum"), [aten.scatter_reduce.two])
case("scatter_reduce_mean", lambda x: torch.tanh(torch.sin(h(x))[:, :3].scatter_reduce(
    1, _idx(x, IDX6), h2(x) ** 2, "mean", include_self=False)), [aten.scatter_reduce.two])
for red in ("amax", "amin"):
    for inc in (True, False):
        case(f"scatter_reduce_{red}_{'self' if inc else 'noself'}",
             _then(lambda x, r=red, i=inc: torch.sin(h(x))[:, :4].scatter_reduce(
                 1, _idx(x, IDX6)[:, :4], torch.cos(h2(x))[:, :4], r, include_self=i), torch.tanh),
             [aten.scatter_reduce.two])
case("unfold", lambda x: torch.sin(h(x)).unfold(1, 3, 2) * h2(x)[:, :2, None], [aten.unfold.default])
case("unfold_broadcast", lambda x: torch.tanh(h(x).unfold(-1, 2, 1)), [aten.unfold.default])
case("sort", lambda x: torch.tanh(torch.sort(torch.sin(h(x)) * h2(x), 1, descending=True)[0] * h(x)),
     [aten.sort.default])
case("sort_stable", lambda x: torch.sin(torch.sort(h(x) * h2(x), stable=True)[0]), [aten.sort.stable])
case("topk", lambda x: torch.tanh(torch.topk(torch.sin(h(x)) * h2(x), 3, largest=False)[0]), [aten.topk.default])
case("kthvalue", lambda x: torch.sin(torch.kthvalue(torch.sin(h(x)) * h2(x), 2, 1)[0]), [aten.kthvalue.default])
case("kthvalue_keepdim", lambda x: torch.kthvalue(torch.sin(h(x)) * h2(x), 4, -1, True)[0] * h(x),
     [aten.kthvalue.default])
case("median_dim", lambda x: torch.sin(torch.median(torch.sin(h(x)) * h2(x), 1)[0]) * h(x)[:, 0],
     [aten.median.dim])
case("max_dim", lambda x: torch.sin(torch.max(torch.sin(h(x)) * h2(x), 1)[0]) * h(x)[:, 0], [aten.max.dim])
case("min_dim_keepdim", lambda x: torch.min(torch.sin(h(x)) * h2(x), -1, keepdim=True)[0] * h(x), [aten.min.dim])
case("max_default_unbatched", lambda x: torch.sin(x @ W).max() * torch.cos(x @ W2), [aten.max.default],
     batched=False)
case("min_default_unbatched", lambda x: torch.exp(torch.sin(x @ W).min()) * x, [aten.min.default], batched=False)
case("nanmedian_dim", lambda x: torch.nanmedian(torch.sin(h(x)) * h2(x), 1, keepdim=True)[0] * h(x),
     [aten.nanmedian.dim])
case("mode_dim", lambda x: torch.mode(torch.round(h(x)) + 0.0 * h2(x), -1)[0] * x[:, 0], [aten.mode.default])
case("remainder_scalar", lambda x: torch.sin(torch.remainder(h(x), 1.3)) * h2(x), [aten.remainder.Scalar])
case("remainder_tensor", lambda x: torch.remainder(torch.sin(h(x)) + 2.0, torch.cos(h2(x)) + 1.5) ** 2,
     [aten.remainder.Tensor])
case("fmod_scalar", lambda x: torch.fmod(h(x), 0.9) * torch.cos(h2(x)), [aten.fmod.Scalar])
case("fmod_tensor", lambda x: torch.tanh(torch.fmod(h(x) * 2.0, torch.exp(h2(x) * 0.3) + 0.5)),
     [aten.fmod.Tensor])
case("pow_tensor_const_exponent", lambda x: (hpos(x).unsqueeze(-1) ** torch.tensor([0.0, 1.0, 2.0, 2.5], dtype=DT))
     .flatten(1), [aten.pow.Tensor_Tensor], **POS)
case("cummax", lambda x: torch.sin(torch.cummax(torch.sin(h(x)) * h2(x), 1)[0]), [aten.cummax.default])
case("cummin", lambda x: torch.cummin(torch.sin(h(x)) * h2(x), -1)[0] * h(x), [aten.cummin.default])
case("upsample_bicubic2d", lambda x: torch.sin(F.interpolate(torch.sin(x) * x, scale_factor=2, mode="bicubic",
                                                            align_corners=False)),
     [aten.upsample_bicubic2d.default], in_shape=(1, 2, 2))
bil = nn.Bilinear(6, 4, 3).to(DT)
case("trilinear_nn_bilinear", lambda x: torch.tanh(bil(torch.sin(h(x)), torch.cos(x @ M3))),
     [aten._trilinear.default])
case("trilinear_same_input", lambda x: bil(h(x), h(x)[:, :4]), [aten._trilinear.default])

# ============================================================================ determinants and solves
DIAG = {"in_shape": (3, 3)}


def _mat(x):  # [B, 3, 3] well-conditioned, input-dependent
    return torch.sin(x) + 2.5 * EYE3


case("linalg_det", lambda x: torch.linalg.det(_mat(x)), [aten._linalg_det.default], **DIAG)
case("linalg_det_negative", lambda x: torch.tanh(torch.linalg.det(torch.sin(x) @ M3[:, :3].T - 2.0 * EYE3)),
     [aten._linalg_det.default], **DIAG)
case("linalg_slogdet", lambda x: torch.stack(torch.linalg.slogdet(_mat(x) - 5.0 * EYE3), -1),
     [aten._linalg_slogdet.default], **DIAG)
case("linalg_solve_vector", lambda x: torch.linalg.solve(_mat(x), torch.cos(x[:, 0]) * x[:, 1]),
     [aten._linalg_solve_ex.default], **DIAG)
case("linalg_solve_matrix", lambda x: torch.sin(torch.linalg.solve(_mat(x), torch.cos(x) @ M3[:, :2])),
     [aten._linalg_solve_ex.default], **DIAG)
case("linalg_solve_constant_matrix", lambda x: torch.linalg.solve(EYE3 * 2.0 + M3[:, :3], torch.sin(h(x))[:, :3, None]),
     [aten._linalg_solve_ex.default],  # torch.func's solve backward fails for a broadcast A: inverse as reference
     ref=lambda x: torch.linalg.inv(EYE3 * 2.0 + M3[:, :3]) @ torch.sin(h(x))[:, :3, None])
case("linalg_solve_constant_rhs", lambda x: torch.linalg.solve(_mat(x), M3[:, :2]), [aten._linalg_solve_ex.default],
     ref=lambda x: torch.linalg.inv(_mat(x)) @ M3[:, :2], **DIAG)  # vmap's solve with an unbatched B: wrong shape
case("linalg_solve_left_false", lambda x: torch.linalg.solve(_mat(x), torch.cos(x)[:, :2] * x[:, 1:], left=False),
     [aten._linalg_solve_ex.default], **DIAG)

# ============================================================================ value-independent results (constants)


def _fill1(t):
    return t.fill_(1.0)


constant_results = [
    ("ones_like", lambda t: torch.ones_like(t), aten.ones_like.default),
    ("zeros_like", lambda t: torch.zeros_like(t), aten.zeros_like.default),
    ("full_like", lambda t: torch.full_like(t, 2.5), aten.full_like.default),
    ("new_zeros", lambda t: t.new_zeros(t.shape), aten.new_zeros.default),
    ("sign", torch.sign, aten.sign.default),
    ("floor", lambda t: torch.floor(3 * t), aten.floor.default),
    ("ceil", lambda t: torch.ceil(3 * t), aten.ceil.default),
    ("round", lambda t: torch.round(3 * t), aten.round.default),
    ("trunc", lambda t: torch.trunc(3 * t), aten.trunc.default),
]
for name, g, op in constant_results:
    # applied to an input-dependent tensor: the result is a constant, so only the other factor is differentiated
    case("const_" + name, _times(lambda x: torch.sin(h(x)), _then(h2, g, lambda c: 1.0 + c)), op)

# random constructors: the reference cannot call them under vmap, it uses the value they contribute (zero)
for name, g, op in [("rand_like", torch.rand_like, aten.rand_like.default),
                    ("randn_like", torch.randn_like, aten.randn_like.default)]:
    case("const_" + name, _times(lambda x: torch.sin(h(x)), _then(h2, g, lambda c: 1.0 + 0.0 * c)), op,
         ref=lambda x: torch.sin(h(x)))

# constructors whose result has no batch dimension, or is filled in place: on one point (batched=False); the
# batched forms are in test_inplace_and_constructors_batched below
for name, g, op in [("empty_like", lambda t: _fill1(torch.empty_like(t)), aten.empty_like.default),
                    ("new_empty", lambda t: _fill1(t.new_empty(t.shape)), aten.new_empty.default),
                    ("new_ones", lambda t: t.new_ones(6), aten.new_ones.default),
                    ("new_full", lambda t: t.new_full((6,), 0.5), aten.new_full.default)]:
    case("const_" + name, _times(lambda x: torch.sin(h(x)), _then(h2, g, lambda c: 1.0 + c)), op, batched=False)



# writes into parts of a tensor: functionalized to *_scatter / index_put / copy
def _write_slice(x):
    y = torch.sin(h(x)) * 1.0
    y[..., 1:3] = torch.tanh(h2(x)[..., :2])
    return y


def _write_select(x):
    y = torch.sin(h(x)) * 1.0
    y[..., 2] = torch.cos(h(x)[..., 0]) * h2(x)[..., 1]
    return y


def _write_index(x):
    y = torch.sin(h(x)) * 1.0
    y[..., torch.tensor([4, 1])] = h2(x)[..., :2] ** 3
    return y


case("slice_scatter", _write_slice, [aten.slice_scatter.default, aten.copy.default],
     ref=lambda x: torch.cat([torch.sin(h(x))[..., :1], torch.tanh(h2(x)[..., :2]), torch.sin(h(x))[..., 3:]], -1))
case("select_scatter", _write_select, [aten.select_scatter.default],
     ref=lambda x: torch.cat([torch.sin(h(x))[..., :2], (torch.cos(h(x)[..., 0]) * h2(x)[..., 1]).unsqueeze(-1),
                              torch.sin(h(x))[..., 3:]], -1))
case("index_put", _write_index, [aten.index_put.default],
     ref=lambda x: torch.cat([torch.sin(h(x))[..., :1], h2(x)[..., 1:2] ** 3, torch.sin(h(x))[..., 2:4],
                              h2(x)[..., :1] ** 3, torch.sin(h(x))[..., 5:]], -1))
case("fill_zero", lambda x: torch.sin(h(x)) * torch.empty_like(h(x)).fill_(2.0) + torch.cos(h2(x)).clone().zero_(),
     [aten.fill.Scalar, aten.zero.default], ref=lambda x: 2.0 * torch.sin(h(x)))


def _manual_bn_train(t):
    m = t.mean(0, keepdim=True)
    return (t - m) / torch.sqrt(((t - m) ** 2).mean(0, keepdim=True) + 1e-5)


# batch statistics couple the rows: one point (batched=False); torch's own third derivative of
# native_batch_norm is wrong in 2.13, so the reference is the written-out normalization
case("batch_norm_train", lambda x: torch.tanh(F.batch_norm(torch.sin(h(x)) * h2(x), None, None, training=True)),
     [aten.native_batch_norm.default], batched=False, in_shape=(4, 3),
     ref=lambda x: torch.tanh(_manual_bn_train(torch.sin(h(x)) * h2(x))))

# rules that no captured graph can contain: make_fx always decomposes these CompositeImplicitAutograd ops
# ---------------------------------------------------------------------------- Fourier transforms, complex values
CW = torch.complex(rnd(4), rnd(4))  # a complex filter on the 4 modes of a length-6 real FFT
CW6 = torch.complex(rnd(6), rnd(6))
case("fft_r2c_c2r", lambda x: torch.fft.irfft(torch.fft.rfft(torch.tanh(h(x)), dim=-1) * CW, n=6, dim=-1),
     [aten._fft_r2c.default, aten._fft_c2r.default])
case("fft_c2c_complex", lambda x: torch.view_as_real(torch.fft.fft(torch.complex(h(x), torch.sin(h(x))))).flatten(1),
     [aten._fft_c2c.default, aten.complex.default, aten.view_as_real.default])
case("view_as_complex_conj_physical",
     lambda x: torch.view_as_real(torch.conj_physical(
         torch.view_as_complex(torch.stack([h(x), torch.tanh(h(x))], -1)) * CW6)).flatten(1),
     [aten.view_as_complex.default, aten._conj_physical.default])
case("conj_holomorphic",
     lambda x: torch.view_as_real(torch.exp(torch.complex(h(x), 0.5 * h(x)).conj().resolve_conj() * CW6)).flatten(1),
     [aten._conj.default, aten.exp.default],
     # vmap has no batching rule for conj's lazy negation: the twin conjugates by hand
     ref=lambda x: torch.view_as_real(torch.exp(torch.complex(h(x), -0.5 * h(x)) * CW6)).flatten(1))


UNREACHABLE = {aten.reshape.default, aten.contiguous.default}


# ============================================================================ the tests


def spec_for(n: int, max_order: int) -> list[tuple[int, ...]]:
    a, b, c = 0, n // 2, n - 1
    spec = [(), (a,), (c,), (a, b), (b, b), (a, c), (a, b, c), (c, c, a), (b, b, b), (a, a, b, b), (a, b, c, c),
            (c, c, c, c)]
    out = []
    for s in spec:
        if len(s) <= max_order and s not in out:
            out.append(s)
    return out


def _graph_ops(f, x):
    gm = capture(f, x).gm
    return {n.target for n in gm.graph.nodes if n.op == "call_function"}


def _reference(c: Case, x, spec):
    f = c.ref or c.fn
    if c.batched:
        return ref_partials(f, x, spec)
    r = ref_partials(lambda xb: f(xb[0]).unsqueeze(0), x.unsqueeze(0), spec)
    return {k: v[0] for k, v in r.items()}


# the fast tier: every fifth case (spread over every section of the registry); make test: all of them
@pytest.mark.parametrize("c", sampled(CASES, 5, ids=lambda c: c.name))
def test_rule(c: Case):
    x = c.x()
    ops = _graph_ops(c.fn, x if c.batched else x)
    missing = [str(op) for op in c.ops if op not in ops]
    assert not missing, f"{c.name}: {missing} not in the captured graph {sorted(map(str, ops))}"
    n = math.prod(c.in_shape)
    spec = spec_for(n, c.max_order)
    got = td.partials(c.fn, x, spec, batched=c.batched)  # a FallbackWarning is an error: the rule itself is used
    expected = _reference(c, x, spec)
    for key in spec:
        assert_close(got[key], expected[key], atol=c.atol, rtol=c.rtol, msg=f"{c.name} partial {key}")


def test_every_rule_has_a_case():
    covered = {op for c in CASES for op in c.ops}
    missing = sorted(str(op) for op in set(RULES) - covered - UNREACHABLE)
    assert not missing, f"rules without a test case in test_rules.py: {missing}"


def test_unreachable_rules_are_really_unreachable():
    """reshape / contiguous never reach a rule: make_fx lowers them to view / clone."""
    x = torch.randn(B, 6, dtype=DT)
    ops = _graph_ops(lambda t: aten.reshape.default(t.transpose(0, 1).contiguous(), [6, B]).transpose(0, 1) * t, x)
    assert not ops & UNREACHABLE


def test_softplus_threshold_region_is_linear():
    """Where beta * h > threshold PyTorch returns h itself: slope 1 and no curvature, as torchderiv gives."""
    f = lambda x: F.softplus(x, beta=2.0, threshold=1.0)  # noqa: E731
    x = torch.tensor([[2.0], [-0.3]], dtype=DT)
    d = td.partials(f, x, [(0,), (0, 0), (0, 0, 0)])
    assert d[(0,)][0, 0] == 1.0 and d[(0, 0)][0, 0] == 0.0 and d[(0, 0, 0)][0, 0] == 0.0
    assert_close(d[(0, 0)][1], (2.0 * torch.sigmoid(2.0 * x[1]) * (1 - torch.sigmoid(2.0 * x[1]))))


def _with_zeros(x, zeros):
    """[B, 6] whose first ``zeros`` entries are exactly 0 (``x - x.detach()``) with nonzero derivatives."""
    return torch.cat([((x - x.detach()) @ W)[:, :zeros], torch.sin(h(x))[:, zeros:]], -1)


def _chain_cumprod(t):
    """Running products along the last dim as a chain of multiplications: the reference, with no prod and no
    division."""
    outs = [t[..., 0]]
    for i in range(1, t.shape[-1]):
        outs.append(outs[-1] * t[..., i])
    return torch.stack(outs, -1)


def _partials_without_fallback(f, ref, x):
    """All partials of orders 0..4 of ``f`` (no generic-fallback warning allowed) and of ``ref`` by nested
    reverse mode."""
    spec = spec_for(3, 4)
    got = td.partials(f, x, spec)  # a FallbackWarning is an error in this suite
    return got, ref_partials(ref, x, spec)


@pytest.mark.parametrize("zeros", [1, 2, 3])
@pytest.mark.parametrize("op", ["prod", "cumprod"])
def test_products_at_zero_entries(op, zeros):
    """prod / cumprod where entries are exactly 0: the rules multiply jets (no log, no division), so every
    order is finite and right, including the derivatives that only the zero entries' own terms reach."""
    if op == "prod":
        f, ref = (lambda x: _with_zeros(x, zeros).prod(-1)), (lambda x: _chain_cumprod(_with_zeros(x, zeros))[:, -1])
    else:
        f, ref = (lambda x: _with_zeros(x, zeros).cumprod(-1)), (lambda x: _chain_cumprod(_with_zeros(x, zeros)))
    got, expected = _partials_without_fallback(f, ref, rnd(B, 3, seed=10 * zeros + (op == "prod")))
    assert (got[()] == 0).all()
    assert any(v.abs().max() > 1e-3 for key, v in expected.items() if len(key) == zeros)  # a nontrivial check
    for key in got:
        assert_close(got[key], expected[key], msg=f"{op} with {zeros} zeros, partial {key}")


@pytest.mark.parametrize("name,fn,lo,hi", [
    ("mish", F.mish, -1.0, 1.0),
    ("celu", lambda t: F.celu(t, alpha=0.8), -1.0, 1.0),
    ("logit", lambda t: torch.logit(torch.sigmoid(t) * 0.8 + 0.1), -1.0, 1.0),
    ("hardswish_middle", lambda t: F.hardswish(t) * t, -1.0, 1.0),
    ("xlogy", lambda t: torch.xlogy(t, t + 2.0), 0.5, 1.5),
    ("sinc", lambda t: torch.sinc(t + 2.5), 0.5, 1.5),
    ("square_via_mul_self", lambda t: torch.tanh(t).mul(torch.tanh(t)), -1.0, 1.0),
], ids=lambda v: v if isinstance(v, str) else "")
def test_decomposed_ops_all_orders(name, fn, lo, hi):
    """Ops without a rule but with a core-ATen decomposition are exact at every order (no warning)."""
    g = torch.Generator().manual_seed(5)
    x = lo + (hi - lo) * torch.rand(B, 3, dtype=DT, generator=g)
    f = lambda x: fn(x @ WP if lo > 0 else h(x))  # noqa: E731
    got, expected = _partials_without_fallback(f, f, x)
    for key in got:
        assert_close(got[key], expected[key], msg=f"{name} partial {key}")


# an op with neither a rule nor a core-ATen decomposition (torch.special.i0: aten.i0)
NO_RULE_OP = aten.i0.default


def test_op_without_rule_is_really_uncovered():
    from torch._decomp import core_aten_decompositions

    assert NO_RULE_OP not in RULES
    assert NO_RULE_OP not in core_aten_decompositions()


def test_decomposition_table_made_once_and_again_after_a_new_op():
    """The capture's decomposition table (core ATen plus torchderiv's own) is made once per process, not on every
    capture, and made again when a library registers a CompositeImplicitAutograd op (which torch's core table
    then holds)."""
    from torch._decomp import core_aten_decompositions

    from torchderiv import _capture

    first = _capture._decomposition_table()
    assert _capture._decomposition_table() is first
    assert set(first) == set(core_aten_decompositions()) | set(_capture._extra_decompositions())
    lib = torch.library.Library("torchderiv_test_table", "DEF")
    lib.define("twice(Tensor x) -> Tensor")
    lib.impl("twice", lambda t: 2 * t, "CompositeImplicitAutograd")
    again = _capture._decomposition_table()
    assert again is not first and torch.ops.torchderiv_test_table.twice.default in again
    assert set(again) == set(core_aten_decompositions()) | set(_capture._extra_decompositions())


def test_fallback_order_1_warns_and_is_correct():
    f = lambda x: torch.special.i0(h(x)) * torch.sin(h2(x))  # noqa: E731
    x = rnd(B, 3, seed=1)
    with pytest.warns(td.FallbackWarning, match=r"aten\.i0\.default"):
        J = td.jacobian(f, x, method="forward")
    expected = torch.func.vmap(torch.func.jacrev(lambda xi: f(xi[None])[0]))(x)
    assert_close(J, expected)
    d = td.partials(f, x, [(), (1,)])
    assert_close(d[(1,)], expected[..., 1])


@pytest.mark.parametrize("call,order", [
    (lambda f, x: td.hessian(f, x, method="forward"), 2),
    (lambda f, x: td.laplacian(f, x, method="forward"), 2),
    (lambda f, x: td.partials(f, x, [(0, 1, 2)], method="forward"), 3),
    (lambda f, x: td.biharmonic(f, x, method="forward"), 4),
])
def test_fallback_higher_order_raises(call, order):
    f = lambda x: torch.special.i0(h(x))  # noqa: E731
    # no FallbackWarning: the generic rule refuses orders above 1 before it would run
    with pytest.raises(NotImplementedError, match=rf"aten\.i0\.default.*order {order}"):
        call(f, rnd(B, 3, seed=2))


def test_fallback_higher_order_auto_takes_reverse_and_says_so():
    """laplacian(method="auto") of the same f: forward cannot (order 2 through an op without a rule), so auto takes
    reverse mode, with a FallbackWarning, and the value is right."""
    f = lambda x: torch.special.i0(h(x))  # noqa: E731
    x = rnd(B, 3, seed=2)
    with pytest.warns(td.FallbackWarning, match="reverse"):
        lap = td.laplacian(f, x)
    expected = ref_partials(f, x, [(0, 0), (1, 1), (2, 2)])
    assert_close(lap, sum(expected.values()))


def test_fallback_higher_order_auto_takes_autograd_where_no_reverse_form():
    """partials and biharmonic have no reverse form: auto goes on to nested autograd, says so, and is right."""
    f = lambda x: torch.special.i0(h(x))  # noqa: E731
    x = rnd(B, 3, seed=2)
    with pytest.warns(td.FallbackWarning, match="autograd"):
        d = td.partials(f, x, [(0, 1, 2)])
    assert_close(d[(0, 1, 2)], ref_partials(f, x, [(0, 1, 2)])[(0, 1, 2)])
    td.reset_fallback_warnings()
    with pytest.warns(td.FallbackWarning, match="autograd"):
        bih = td.biharmonic(f, x)
    idx = [(i, i, j, j) for i in range(3) for j in range(3)]
    ref = ref_partials(f, x, sorted(set(tuple(sorted(a)) for a in idx)))
    assert_close(bih, sum(ref[tuple(sorted(a))] for a in idx))



# ============================================================================ in-place ops, views, constructors
# Each f is written as users write it (in-place updates, in-place ops on slices, slice assignment,
# constructors without a batch dimension); its out-of-place twin is the reference. These are ordinary
# per-sample functions, so the results must be right (torch.func handles all of them; functionalizing the
# captured graph would too), never a BatchMixingError and never a silently wrong value.


def _relu_inplace(x):
    y = h(x) * 2.0
    F.relu(y, inplace=True)
    return y * torch.sin(h2(x))


def _mul_inplace(x):
    y = torch.sin(h(x))
    y.mul_(h2(x))
    y += h(x) ** 2
    return y


def _slice_tanh_inplace(x):
    y = torch.sin(h(x)) * 2.0
    y[..., :2].tanh_()
    return y


def _slice_mul_inplace(x):
    y = torch.sin(h(x))
    y[..., 1].mul_(3.0)
    return y


def _slice_assign(x):
    y = torch.zeros_like(h(x))
    y[..., 0] = torch.sin(h(x)[..., 0]) * h2(x)[..., 1]
    y[..., 3:] = h(x)[..., :3] ** 2
    return y


def _index_put(x):
    y = torch.sin(h(x)).clone()
    y[..., torch.tensor([1, 4])] = h2(x)[..., :2] ** 3
    return y


def _empty_like_fill(x):
    return torch.sin(h(x)) * torch.empty_like(h(x)).fill_(2.0)


def _new_ones_no_batch(x):
    return torch.sin(h(x)) * h(x).new_ones(6) + h(x).new_full((6,), 0.5)


def _new_zeros_assign(x):
    y = h(x).new_zeros(*h(x).shape[:-1], 8)
    y[..., 1:7] = torch.tanh(h(x))
    return y * 1.5


def _twin_slice_tanh(x):
    y = torch.sin(h(x)) * 2.0
    return torch.cat([torch.tanh(y[..., :2]), y[..., 2:]], -1)


def _twin_slice_mul(x):
    y = torch.sin(h(x))
    return torch.cat([y[..., :1], 3.0 * y[..., 1:2], y[..., 2:]], -1)


def _twin_slice_assign(x):
    z = torch.zeros_like(h(x)[..., :1])
    a = (torch.sin(h(x)[..., 0]) * h2(x)[..., 1]).unsqueeze(-1)
    return torch.cat([a, z, z, h(x)[..., :3] ** 2], -1)


def _twin_index_put(x):
    y = torch.sin(h(x))
    v = h2(x)[..., :2] ** 3
    return torch.cat([y[..., :1], v[..., :1], y[..., 2:4], v[..., 1:], y[..., 5:]], -1)


def _twin_new_zeros_assign(x):
    z = torch.zeros_like(h(x)[..., :1])
    return torch.cat([z, torch.tanh(h(x)), z], -1) * 1.5


INPLACE = {
    "relu_inplace": (_relu_inplace, lambda x: F.relu(h(x) * 2.0) * torch.sin(h2(x))),
    "mul_and_iadd": (_mul_inplace, lambda x: torch.sin(h(x)) * h2(x) + h(x) ** 2),
    "slice_tanh_inplace": (_slice_tanh_inplace, _twin_slice_tanh),
    "slice_mul_inplace": (_slice_mul_inplace, _twin_slice_mul),
    "slice_assign": (_slice_assign, _twin_slice_assign),
    "index_put": (_index_put, _twin_index_put),
    "empty_like_fill": (_empty_like_fill, lambda x: 2.0 * torch.sin(h(x))),
    "new_ones_no_batch": (_new_ones_no_batch, lambda x: torch.sin(h(x)) + 0.5),
    "new_zeros_assign": (_new_zeros_assign, _twin_new_zeros_assign),
}


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "one_point"])
@pytest.mark.parametrize("name", list(INPLACE))
def test_inplace_and_constructors(name, batched):
    f, twin = INPLACE[name]
    x = rnd(B, 3, seed=3) if batched else rnd(3, seed=3)
    spec = spec_for(3, 3)
    got = td.partials(f, x, spec, batched=batched)  # no FallbackWarning: in-place ops are captured
    if batched:
        expected = ref_partials(twin, x, spec)
    else:
        r = ref_partials(lambda xb: twin(xb[0]).unsqueeze(0), x.unsqueeze(0), spec)
        expected = {k: v[0] for k, v in r.items()}
    assert_close(twin(x), f(x), msg="twin")
    for key in spec:
        assert_close(got[key], expected[key], msg=f"{name} partial {key}")


_IMPORTED = True  # from here on, rnd() needs a seed

"""The rule registry: one Taylor propagation rule per ATen op, grouped by kind.

A rule receives the op's arguments with every input-dependent tensor replaced by a
:class:`~torchderiv._jet.Jet` and returns a Jet (or a tuple/list of them). Rules are orders-agnostic:
they are built from the combinators of :mod:`torchderiv._jet`, so each supports every order the plan
asks for. A rule may raise :class:`Unsupported` (for instance when an argument it treats as a constant
depends on the input); the engine then uses the generic fallback.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from . import _derivs as D
from ._jet import Ctx, Jet, add, align, as_jet, compose, constant, full, is_full, linear, product, scale

aten = torch.ops.aten

RULES: dict = {}

# ---------------------------------------------------------------------------- kinds
# The kind of an op is stated once, where its rule is registered; the batch-independence check
# (:mod:`torchderiv._batchcheck`) and the coverage table (:mod:`torchderiv._coverage`) read it from here.
ELEMENTWISE = "elementwise"  # entry i of the result from entry i of each (broadcast) argument only
CONSTANT = "constant"  # the values of the result do not depend on the values of any argument
LINEAR = "linear"  # linear maps: matrix products, convolution, Fourier transforms, multilinear forms
LINALG = "linear algebra"  # functions of matrices: determinant, inverse, solve
SHAPE = "shape"  # views, slices, concatenation, padding, copies: values moved, never combined
INDEXING = "indexing"  # gather, scatter, index, index_put: values moved by index tensors
REDUCTION = "reduction"  # sums, means, norms, extrema and scans along dims
SELECTION = "selection along a dim"  # sort, top-k, median, running extrema: values picked by comparison
NORMALIZATION = "normalization / softmax"
SPATIAL = "spatial"  # pooling and upsampling of [N, C, *spatial]

KINDS: dict = {}  # op -> kind; an OpOverloadPacket key stands for every overload of the packet


class Unsupported(Exception):
    """Raised by a rule that cannot handle these arguments; the engine falls back."""


def register(op, fn, kind: str) -> None:
    """``fn`` is the Taylor rule of ``op``, an op of the given kind."""
    RULES[op] = fn
    KINDS[op] = kind


def rule(*ops, kind: str):
    """Decorator: the Taylor rule of ``ops``, all of one kind."""

    def deco(fn):
        for op in ops:
            register(op, fn, kind)
        return fn

    return deco


def declare(kind: str, *ops) -> None:
    """The kind of ops that have no Taylor rule of their own (decomposed before the transform, or left to the
    generic fallback); a packet (``aten.eq``) declares every overload."""
    for op in ops:
        KINDS[op] = kind


def kind_of(op) -> str | None:
    """The declared kind of ``op`` (an ``OpOverload``): its own, its packet's, else :data:`ELEMENTWISE` where
    ATen tags it pointwise; ``None`` for an op nobody declared."""
    kind = KINDS.get(op)
    if kind is None and isinstance(op, torch._ops.OpOverload):
        kind = KINDS.get(op.overloadpacket)
        if kind is None and torch.Tag.pointwise in op.tags:
            kind = ELEMENTWISE
    return kind


def P(a):
    return a.p if isinstance(a, Jet) else a


def _require_constant(*args):
    for a in args:
        if isinstance(a, Jet):
            raise Unsupported("an argument treated as constant depends on the input")


def _dim(d: int, ndim: int) -> int:
    return d % ndim if ndim else 0


# ============================================================================ elementwise functions

_UNARY: dict = {
    aten.tanh.default: lambda *a, **k: D.tanh_derivs,
    aten.sigmoid.default: lambda *a, **k: D.sigmoid_derivs,
    aten.exp.default: lambda *a, **k: D.exp_derivs,
    aten.expm1.default: lambda *a, **k: D.expm1_derivs,
    aten.log.default: lambda *a, **k: D.log_derivs_shift(0.0),
    aten.log1p.default: lambda *a, **k: D.log_derivs_shift(1.0),
    aten.sin.default: lambda *a, **k: D.sin_derivs,
    aten.cos.default: lambda *a, **k: D.cos_derivs,
    aten.sinh.default: lambda *a, **k: D.sinh_derivs,
    aten.cosh.default: lambda *a, **k: D.cosh_derivs,
    aten.sqrt.default: lambda *a, **k: D.sqrt_derivs,
    aten.rsqrt.default: lambda *a, **k: D.rsqrt_derivs,
    aten.reciprocal.default: lambda *a, **k: D.reciprocal_derivs,
    aten.erf.default: lambda *a, **k: D.erf_derivs,
    aten.atan.default: lambda *a, **k: D.atan_derivs,
    aten.tan.default: lambda *a, **k: D.tan_derivs,
    aten.asin.default: lambda *a, **k: D.asin_derivs,
    aten.acos.default: lambda *a, **k: D.acos_derivs,
    aten.asinh.default: lambda *a, **k: D.asinh_derivs,
    aten.acosh.default: lambda *a, **k: D.acosh_derivs,
    aten.atanh.default: lambda *a, **k: D.atanh_derivs,
    aten.exp2.default: lambda *a, **k: D.exp2_derivs,
    aten.log2.default: lambda *a, **k: D.log_base_derivs(2.0),
    aten.log10.default: lambda *a, **k: D.log_base_derivs(10.0),
    aten.erfc.default: lambda *a, **k: D.erfc_derivs,
    aten.lgamma.default: lambda *a, **k: D.lgamma_derivs,
    aten.digamma.default: lambda *a, **k: D.digamma_derivs,
    aten.erfinv.default: lambda *a, **k: D.erfinv_derivs,
    aten.special_erfcx.default: lambda *a, **k: D.erfcx_derivs,
    aten.special_log_ndtr.default: lambda *a, **k: D.log_ndtr_derivs,
    aten.silu.default: lambda *a, **k: D.silu_derivs,
    aten.relu.default: lambda *a, **k: D.piecewise_linear(lambda x: (x > 0).to(x.dtype)),
    aten.abs.default: lambda *a, **k: D.piecewise_linear(torch.sign),
    aten.pow.Tensor_Scalar: lambda x, p: D.pow_derivs(float(p)),
    aten.softplus.default: lambda x, beta=1, threshold=20: D.softplus_derivs(float(beta), float(threshold)),
    aten.leaky_relu.default: lambda x, slope=0.01: D.piecewise_linear(
        lambda t: torch.where(t > 0, torch.ones_like(t), torch.full_like(t, slope))
    ),
    aten.hardtanh.default: lambda x, lo=-1.0, hi=1.0: D.piecewise_linear(
        lambda t: ((t > lo) & (t < hi)).to(t.dtype)
    ),
    aten.elu.default: lambda x, alpha=1.0, scale=1.0, input_scale=1.0: D.elu_derivs(
        float(alpha), float(scale), float(input_scale)
    ),
}


def _clamp_derivs(x, lo=None, hi=None):
    def mask(t):
        m = torch.ones_like(t, dtype=torch.bool)
        if lo is not None:
            m = m & (t > lo)
        if hi is not None:
            m = m & (t < hi)
        return m.to(t.dtype)

    return D.piecewise_linear(mask)


_UNARY[aten.clamp.default] = _clamp_derivs


def _gelu_rule(ctx: Ctx, x, approximate: str = "none"):
    if approximate == "none":
        return _unary_apply(ctx, x, aten.gelu.default(x.p), D.gelu_derivs)
    # tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    c = math.sqrt(2.0 / math.pi)
    x3 = _pow(ctx, x, 3.0)
    u = add(ctx, x, x3, x.p + 0.044715 * x3.p, alpha=0.044715)
    u = scale(ctx, u, c, c * u.p)
    t = _unary_apply(ctx, u, torch.tanh(u.p), D.tanh_derivs)
    half = scale(ctx, Jet(t.p + 1, t.c), 0.5, 0.5 * (t.p + 1))
    return product(ctx, x, half, torch.mul)


register(aten.gelu.default, _gelu_rule, ELEMENTWISE)


def _unary_apply(ctx: Ctx, x: Jet, y: Tensor, derivs) -> Jet:
    second = getattr(derivs, "second", None)  # a cheaper form of g'' for the order-2 coefficient
    return compose(ctx, x, y, derivs(x.p, y, ctx.K), second(x.p, y) if second is not None else None)


# functions whose Taylor rule is a real-variable formula: wrong for complex arguments (not holomorphic)
_REAL_ONLY = {aten.abs.default, aten.sgn.default, aten.sign.default}


def _unary(op, factory):
    def r(ctx: Ctx, x, *args, **kwargs):
        _require_constant(*args, *kwargs.values())
        if x.p.is_complex() and (op in _REAL_ONLY or not _holomorphic(op)):
            raise Unsupported(f"{op} of a complex tensor is not holomorphic")  # -> order-1 fallback or error
        y = op(x.p, *args, **kwargs)
        return _unary_apply(ctx, x, y, factory(x.p, *args, **kwargs))

    return r


for _op, _factory in list(_UNARY.items()):
    register(_op, _unary(_op, _factory), ELEMENTWISE)


def _holomorphic(op) -> bool:
    """Elementwise functions whose derivative formulas hold for complex arguments (complex-analytic)."""
    return op.__name__.split(".")[0] in {"exp", "expm1", "log", "log1p", "sin", "cos", "tan", "sinh", "cosh",
                                          "tanh", "sigmoid", "sqrt", "rsqrt", "reciprocal", "pow", "asin",
                                          "acos", "atan", "asinh", "acosh", "atanh", "exp2", "log2", "log10"}


def _pow(ctx: Ctx, x: Jet, p: float) -> Jet:
    return _unary_apply(ctx, x, torch.pow(x.p, p), D.pow_derivs(p))


def _reciprocal(ctx: Ctx, x: Jet) -> Jet:
    return _unary_apply(ctx, x, torch.reciprocal(x.p), D.reciprocal_derivs)


@rule(aten.pow.Tensor_Tensor, kind=ELEMENTWISE)
def _pow_tt(ctx, a, b):
    if constant(b):  # a constant exponent tensor: x^p entrywise
        y = torch.pow(a.p, b)
        if tuple(a.p.shape) != tuple(y.shape):
            a = _expand(ctx, a, y.shape)
        return _unary_apply(ctx, a, y, D.pow_tensor_derivs(b))
    # a^b = exp(b log a)
    la = _unary_apply(ctx, a, torch.log(P(a)), D.log_derivs_shift(0.0)) if isinstance(a, Jet) else torch.log(a)
    e = product(ctx, b, la, torch.mul)
    return _unary_apply(ctx, e, torch.exp(e.p), D.exp_derivs)


def _remainder_rule(op, rounding):
    """``a - q * b`` with the piecewise-constant quotient ``q`` (floor for remainder, trunc for fmod): the
    coefficients of ``a`` minus ``q`` times those of ``b``, exact away from the jumps (as torch's)."""

    def r(ctx, a, b):
        y = op(P(a), P(b))
        if constant(b):
            return add(ctx, a, b, y)
        q = torch.div(P(a), P(b), rounding_mode=rounding)
        return add(ctx, a, scale(ctx, b, q, q * P(b)), y, -1)

    return r


for _op, _rounding in ((aten.remainder.Tensor, "floor"), (aten.remainder.Scalar, "floor"),
                       (aten.fmod.Tensor, "trunc"), (aten.fmod.Scalar, "trunc")):
    register(_op, _remainder_rule(_op, _rounding), ELEMENTWISE)


@rule(aten.pow.Scalar, kind=ELEMENTWISE)
def _pow_scalar_base(ctx, s, x):
    e = scale(ctx, x, math.log(s), x.p * math.log(s))
    return _unary_apply(ctx, e, torch.exp(e.p), D.exp_derivs)


# ============================================================================ arithmetic


@rule(aten.add.Tensor, kind=ELEMENTWISE)
def _add(ctx, a, b, alpha=1):
    return add(ctx, a, b, torch.add(P(a), P(b), alpha=alpha), alpha)


@rule(aten.sub.Tensor, kind=ELEMENTWISE)
def _sub(ctx, a, b, alpha=1):
    return add(ctx, a, b, torch.sub(P(a), P(b), alpha=alpha), -alpha)


@rule(aten.rsub.Scalar, aten.rsub.Tensor, kind=ELEMENTWISE)
def _rsub(ctx, a, b, alpha=1):
    # b - alpha * a
    return add(ctx, b, a, torch.rsub(P(a), P(b), alpha=alpha), -alpha)


@rule(aten.add.Scalar, kind=ELEMENTWISE)
def _add_scalar(ctx, a, b, alpha=1):
    return Jet(a.p + b * alpha, list(a.c))


@rule(aten.sub.Scalar, kind=ELEMENTWISE)
def _sub_scalar(ctx, a, b, alpha=1):
    return Jet(a.p - b * alpha, list(a.c))


@rule(aten.neg.default, kind=ELEMENTWISE)
def _neg(ctx, a):
    return scale(ctx, a, -1.0, -a.p)


@rule(aten.mul.Tensor, aten.mul.Scalar, kind=ELEMENTWISE)
def _mul(ctx, a, b):
    if not isinstance(P(a), Tensor) or (isinstance(b, Jet) and not isinstance(a, Jet)):
        a, b = b, a
    if constant(b):
        return scale(ctx, a, b, a.p * b)
    return product(ctx, a, b, torch.mul)


@rule(aten.div.Tensor, aten.div.Scalar, kind=ELEMENTWISE)
def _div(ctx, a, b):
    if constant(b):
        return scale(ctx, a, 1 / b if not isinstance(b, Tensor) else torch.reciprocal(b), P(a) / b)
    rb = _reciprocal(ctx, b)
    return product(ctx, a, rb, torch.mul, y=P(a) / b.p)


@rule(aten.where.self, kind=ELEMENTWISE)
def _where(ctx, cond, a, b):
    _require_constant(cond)
    y = torch.where(cond, P(a), P(b))
    nd = y.dim()
    al = lambda X: X if X.dim() == 0 else align(X, nd)  # noqa: E731 - a 0-d zero stands in for a constant
    return Jet(y, _combine_coefs(ctx, a, b, lambda A, B: torch.where(cond, al(A), al(B)),
                                 lambda X: X.new_zeros(())))


def _combine_coefs(ctx, a, b, combine: Callable, zero: Callable) -> list:
    """``combine(A, B)`` for the order-k coefficients of two operands (either may be a constant), with
    ``zero(other)`` standing in for a missing one; ``None`` where both are missing."""
    out = []
    for k in range(ctx.K):
        A = a.c[k] if isinstance(a, Jet) else None
        B = b.c[k] if isinstance(b, Jet) else None
        if A is None and B is None:
            out.append(None)
            continue
        out.append(combine(A if A is not None else zero(B), B if B is not None else zero(A)))
    return out


def _select_rule(pick_a: Callable):
    def r(ctx, a, b):
        c = pick_a(P(a), P(b))
        return _where(ctx, c, a, b)

    return r


register(aten.maximum.default, _select_rule(lambda a, b: a >= b), ELEMENTWISE)
register(aten.minimum.default, _select_rule(lambda a, b: a <= b), ELEMENTWISE)


@rule(aten.clamp.Tensor, kind=ELEMENTWISE)
def _clamp_tensor(ctx, x, lo=None, hi=None):
    """``min(max(x, lo), hi)`` with tensor bounds, any of which may depend on the input: each coefficient is
    the selected operand's (ties go to ``x``, as PyTorch's gradient does)."""
    y = aten.clamp.Tensor(P(x), P(lo), P(hi))
    out = x
    if lo is not None:
        out = _where(ctx, P(out) >= P(lo), out, lo)
    if hi is not None:
        out = _where(ctx, P(out) <= P(hi), out, hi)
    return Jet(y, out.c) if isinstance(out, Jet) else y


@rule(aten.clamp_min.Tensor, kind=ELEMENTWISE)
def _clamp_min_tensor(ctx, x, lo):
    return _clamp_tensor(ctx, x, lo, None)


@rule(aten.clamp_max.Tensor, kind=ELEMENTWISE)
def _clamp_max_tensor(ctx, x, hi):
    return _clamp_tensor(ctx, x, None, hi)


@rule(aten.atan2.default, kind=ELEMENTWISE)
def _atan2(ctx, a, b):
    """``atan2(a, b)`` differs by a locally constant angle from ``atan(a / b)`` (used where ``|b| >= |a|``)
    and from ``-atan(b / a)`` (elsewhere), so its coefficients are those of the better-conditioned branch.
    The other branch's denominator is replaced by 1: no division by zero, not even in unselected entries."""
    pa, pb = P(a), P(b)
    y = torch.atan2(pa, pb)
    use_ab = pb.abs() >= pa.abs()
    one = torch.ones((), dtype=y.dtype, device=y.device)
    branches = []
    for num, den, keep in ((a, b, use_ab), (b, a, ~use_ab)):
        safe_den = _where(ctx, keep, den, one) if isinstance(den, Jet) else torch.where(keep, den, one)
        q = as_jet(ctx, _div(ctx, num, safe_den))
        branches.append(_unary_apply(ctx, q, torch.atan(q.p), D.atan_derivs))
    t1, t2 = branches
    out = _where(ctx, use_ab, t1, scale(ctx, t2, -1.0, -t2.p))
    return Jet(y, out.c)


# ============================================================================ linear algebra


@rule(aten.mm.default, aten.bmm.default, kind=LINEAR)
def _mm(ctx, a, b):
    return product(ctx, a, b, torch.matmul, elementwise=False)


def _addmm_like(op):
    def r(ctx, bias, a, b, beta=1, alpha=1):
        y = op(P(bias), P(a), P(b), beta=beta, alpha=alpha)
        m = y if constant(a) and constant(b) else product(ctx, a, b, torch.matmul, y=y, elementwise=False)
        if isinstance(m, Jet) and alpha != 1:
            m = scale(ctx, m, alpha, y)
        if isinstance(bias, Jet):
            bias = scale(ctx, bias, beta, y) if beta != 1 else bias
            return add(ctx, m, bias, y)
        return m

    return r


register(aten.addmm.default, _addmm_like(torch.addmm), LINEAR)
register(aten.baddbmm.default, _addmm_like(torch.baddbmm), LINEAR)


@rule(aten.linalg_inv_ex.default, kind=LINALG)
def _linalg_inv(ctx, A, check_errors=False):
    """``Y = A^-1`` (batched over leading dims). With ``dA`` the jet of ``A`` less its primal, ``A Y = I`` is the
    fixed point ``Y = Y0 + L Y``, ``L = -Y0 dA`` (``d(A^-1) = -A^-1 dA A^-1`` to first order). ``L`` has a zero
    primal, so each pass ``Y <- Y0 + L Y`` makes one more order exact: ``K`` passes from the constant ``Y0``
    give every coefficient (the Neumann series of ``(I - L)^-1 Y0``, truncated where it is exact)."""
    Y0, info = aten.linalg_inv_ex.default(A.p, check_errors=check_errors)
    nd = A.p.dim()
    L = Jet(torch.zeros_like(A.p), [None if X is None else -torch.matmul(Y0, align(X, nd)) for X in A.c])
    Y = Jet(Y0, [None] * ctx.K)
    for _ in range(ctx.K):
        LY = product(ctx, L, Y, torch.matmul, y=torch.zeros_like(Y0), elementwise=False)
        Y = Jet(Y0, LY.c)  # Y0 + L Y: the product's primal is zero
    return Y, info


@rule(aten.convolution.default, kind=LINEAR)
def _conv(ctx, x, w, bias, stride, padding, dilation, transposed, output_padding, groups):
    _require_constant(w, bias)
    y = aten.convolution.default(x.p, w, bias, stride, padding, dilation, transposed, output_padding, groups)

    def fc(X):
        if X.dim() - 1 != x.p.dim():
            X = align(X, x.p.dim())
        if tuple(X.shape[2:]) != tuple(x.p.shape[1:]):
            X = X.expand(X.shape[0], X.shape[1], *x.p.shape[1:])
        n, b = X.shape[0], X.shape[1]
        out = aten.convolution.default(
            X.reshape(n * b, *X.shape[2:]), w, None, stride, padding, dilation, transposed, output_padding, groups
        )
        return out.reshape(n, b, *out.shape[1:])

    return Jet(y, [None if X is None else fc(X) for X in x.c])


# ============================================================================ shape ops


@rule(aten.t.default, kind=SHAPE)
def _t(ctx, x):
    if x.p.dim() < 2:
        return Jet(x.p, list(x.c))
    return linear(ctx, x, torch.t, lambda X: align(X, 2).transpose(1, 2))


@rule(aten.transpose.int, kind=SHAPE)
def _transpose(ctx, x, d0, d1):
    n = x.p.dim()
    return linear(ctx, x, lambda p: p.transpose(d0, d1),
                  lambda X: align(X, n).transpose(_dim(d0, n) + 1, _dim(d1, n) + 1))


@rule(aten.permute.default, kind=SHAPE)
def _permute(ctx, x, dims):
    n = x.p.dim()
    return linear(ctx, x, lambda p: p.permute(dims),
                  lambda X: align(X, n).permute(0, *[_dim(d, n) + 1 for d in dims]))


@rule(aten.repeat.default, kind=SHAPE)
def _repeat(ctx, x, reps):
    reps = list(reps)
    n = x.p.dim()

    def coef(X):
        X = full(X, x.p.shape)
        if len(reps) > n:  # repeat adds leading dims: after the stream dim
            X = X.reshape(X.shape[0], *([1] * (len(reps) - n)), *X.shape[1:])
        return X.repeat(1, *reps)

    return linear(ctx, x, lambda p: p.repeat(reps), coef)


@rule(aten.diagonal.default, kind=SHAPE)
def _diagonal(ctx, x, offset=0, dim1=0, dim2=1):
    n = x.p.dim()
    d1, d2 = _dim(dim1, n), _dim(dim2, n)
    return linear(ctx, x, lambda p: p.diagonal(offset, d1, d2),
                  lambda X: full(X, x.p.shape).diagonal(offset, d1 + 1, d2 + 1))


@rule(aten.hypot.default, kind=ELEMENTWISE)
def _hypot(ctx, a, b):
    """``sqrt(a^2 + b^2)`` through the mul, add and sqrt rules (not differentiable where a = b = 0)."""
    sq = [_mul(ctx, u, u) if isinstance(u, Jet) else u * u for u in (a, b)]
    return RULES[aten.sqrt.default](ctx, _add(ctx, *sq))


def _fft_rule(op):
    def r(ctx, x, dim, *args):
        """The discrete Fourier transforms (``torch.fft.*`` trace to these) are linear: each coefficient is
        transformed along the same dims, shifted past the stream dim."""
        return linear(ctx, x, lambda p: op(p, dim, *args),
                      lambda X: op(full(X, x.p.shape), [_dim(d, x.p.dim()) + 1 for d in dim], *args))

    return r


for _op in (aten._fft_r2c.default, aten._fft_c2r.default, aten._fft_c2c.default):
    register(_op, _fft_rule(_op), LINEAR)


@rule(aten.complex.default, kind=ELEMENTWISE)
def _complex(ctx, re, im):
    """``re + i im`` is real-linear in both parts: coefficients combine the same way (a zero for a constant)."""
    y = torch.complex(P(re), P(im))
    if constant(re) and constant(im):
        return y
    return Jet(y, _combine_coefs(ctx, re, im, lambda A, B: torch.complex(full(A, y.shape), full(B, y.shape)),
                                 lambda X: torch.zeros_like(full(X, y.shape))))


def _real_linear(op):
    def r(ctx, x):
        """Real-linear maps between complex tensors and their real views, and conjugation: applied to every
        coefficient, since the Taylor variable is real (``x.real`` / ``x.imag`` trace to view_as_real)."""
        return linear(ctx, x, op, lambda X: op(full(X, x.p.shape).contiguous()))

    return r


for _op, _kind in ((aten.view_as_real.default, SHAPE), (aten.view_as_complex.default, SHAPE),
                  (aten._conj.default, ELEMENTWISE), (aten._conj_physical.default, ELEMENTWISE)):
    register(_op, _real_linear(_op), _kind)


def _view_coef(X: Tensor, pin: Tensor, shape) -> Tensor:
    X = align(X, pin.dim())
    n = X.shape[0]
    if is_full(X, pin.shape):
        return X.reshape(n, *shape)
    # batch-broadcast coefficient: keep dim 0 broadcast when the view keeps the leading dim
    if (
        pin.dim() >= 1 and len(shape) >= 1 and X.shape[1] == 1 and shape[0] == pin.shape[0]
        and tuple(X.shape[2:]) == tuple(pin.shape[1:])
    ):
        return X.reshape(n, 1, *shape[1:])
    return full(X, pin.shape).reshape(n, *shape)


@rule(aten.view.default, aten._unsafe_view.default, aten.reshape.default, kind=SHAPE)
def _view(ctx, x, shape):
    y = x.p.reshape(shape)
    return Jet(y, [None if X is None else _view_coef(X, x.p, y.shape) for X in x.c])


@rule(aten.expand.default, kind=SHAPE)
def _expand(ctx, x, size, implicit=False):
    y = x.p.expand(size)
    return Jet(y, [None if X is None else align(X, y.dim()) for X in x.c])


@rule(aten.unsqueeze.default, kind=SHAPE)
def _unsqueeze(ctx, x, d):
    y = x.p.unsqueeze(d)
    dd = _dim(d, y.dim())
    return Jet(y, [None if X is None else align(X, x.p.dim()).unsqueeze(dd + 1) for X in x.c])


@rule(aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, kind=SHAPE)
def _squeeze(ctx, x, dims=None):
    n = x.p.dim()
    if dims is None:
        dims = [i for i in range(n) if x.p.shape[i] == 1]
    elif isinstance(dims, int):
        dims = [dims]
    dims = [_dim(d, n) for d in dims if x.p.shape[_dim(d, n)] == 1]
    y = x.p.squeeze(tuple(dims)) if dims else x.p
    return Jet(y, [None if X is None else (align(X, n).squeeze(tuple(d + 1 for d in dims)) if dims else X)
                   for X in x.c])


@rule(aten.clone.default, aten.alias.default, aten.contiguous.default, aten.lift_fresh_copy.default, kind=SHAPE)
def _identity(ctx, x, **kwargs):
    return Jet(x.p.clone() if kwargs else x.p, list(x.c))


@rule(aten._to_copy.default, kind=SHAPE)
def _to_copy(ctx, x, **kwargs):
    y = aten._to_copy.default(x.p, **kwargs)
    if not (y.is_floating_point() or y.is_complex()):  # integer or bool: no derivative
        return y
    return Jet(y, [None if X is None else X.to(dtype=y.dtype, device=y.device) for X in x.c])


@rule(aten.detach.default, kind=SHAPE)
def _detach(ctx, x):
    return x.p.detach()


@rule(aten.slice.Tensor, kind=SHAPE)
def _slice(ctx, x, dim=0, start=None, end=None, step=1):
    n = x.p.dim()
    d = _dim(dim, n)
    y = aten.slice.Tensor(x.p, d, start, end, step)

    def fc(X):
        X = align(X, n)
        if X.shape[d + 1] == 1 and x.p.shape[d] != 1:
            return X  # broadcast along d: every slice is the same
        return aten.slice.Tensor(X, d + 1, start, end, step)

    return Jet(y, [None if X is None else fc(X) for X in x.c])


@rule(aten.select.int, kind=SHAPE)
def _select(ctx, x, dim, index):
    n = x.p.dim()
    d = _dim(dim, n)
    y = x.p.select(d, index)

    def fc(X):
        X = align(X, n)
        return X.select(d + 1, 0 if (X.shape[d + 1] == 1 and x.p.shape[d] != 1) else index)

    return Jet(y, [None if X is None else fc(X) for X in x.c])


@rule(aten.index_select.default, kind=INDEXING)
def _index_select(ctx, x, dim, index):
    _require_constant(index)
    n = x.p.dim()
    d = _dim(dim, n)
    y = x.p.index_select(d, index)
    return Jet(y, [None if X is None else full(X, x.p.shape).index_select(d + 1, index) for X in x.c])


def _scatter_like(ctx, inp, src, y, write):
    """Jet of a functional write of ``src`` into part of ``inp`` (``write(into, values)`` on any tensor
    with the stream dim in front): each coefficient is the write of the coefficients."""
    out = []
    for k in range(ctx.K):
        ci = inp.c[k] if isinstance(inp, Jet) else None
        cs = src.c[k] if isinstance(src, Jet) else None
        if ci is None and cs is None:
            out.append(None)
            continue
        rows = ctx.plan.orders[k].nrows
        ci = full(ci, P(inp).shape) if ci is not None else P(inp).new_zeros((rows, *P(inp).shape))
        cs = full(cs, P(src).shape) if cs is not None else P(src).new_zeros((rows, *P(src).shape))
        out.append(write(ci, cs))
    return Jet(y, out)


def _on_real_view(op):
    """``op(a, b, *args)`` for complex ``a, b`` through their real views (one trailing dim of 2): autograd has
    no complex formula for slice_scatter / select_scatter, but has one for view_as_real / view_as_complex."""

    def call(a, b, *args):
        if not a.is_complex():
            return op(a, b, *args)
        ra, rb = (torch.view_as_real(t.resolve_conj()) for t in (a, b))
        return torch.view_as_complex(op(ra, rb, *args))

    return call


_slice_scatter_op = _on_real_view(aten.slice_scatter.default)
_select_scatter_op = _on_real_view(aten.select_scatter.default)


@rule(aten.slice_scatter.default, kind=INDEXING)
def _slice_scatter(ctx, inp, src, dim=0, start=None, end=None, step=1):
    d = _dim(dim, P(inp).dim())
    y = _slice_scatter_op(P(inp), P(src), d, start, end, step)
    return _scatter_like(ctx, inp, src, y, lambda a, b: _slice_scatter_op(a, b, d + 1, start, end, step))


@rule(aten.select_scatter.default, kind=INDEXING)
def _select_scatter(ctx, inp, src, dim, index):
    d = _dim(dim, P(inp).dim())
    y = _select_scatter_op(P(inp), P(src), d, index)
    return _scatter_like(ctx, inp, src, y, lambda a, b: _select_scatter_op(a, b, d + 1, index))


@rule(aten.index_put.default, kind=INDEXING)
def _index_put(ctx, inp, indices, values, accumulate=False):
    idx = list(indices)
    _require_constant(*[i for i in idx if i is not None])
    pos = [i for i, t in enumerate(idx) if t is not None]
    if not pos or pos != list(range(pos[0], pos[-1] + 1)):
        raise Unsupported("non-adjacent advanced indices")
    pi, pv = P(inp), P(values)
    y = aten.index_put.default(pi, idx, pv, accumulate)
    target = aten.index.Tensor(pi, idx).shape  # what values broadcast to

    def write(a, b):
        b = b.reshape(b.shape[0], *([1] * (len(target) - pv.dim())), *pv.shape).expand(b.shape[0], *target)
        return aten.index_put.default(a, [None] + idx, b, accumulate)

    return _scatter_like(ctx, inp, values, y, write)


def copy_out_of_place(self, src, non_blocking=False):
    """``aten.copy`` (what functionalization makes of ``dst.copy_(src)``) in differentiable ops: autograd has
    no formula for the functional copy, so parameter gradients through a slice write would fail."""
    return src.to(dtype=self.dtype, device=self.device).expand(self.shape).clone()


@rule(aten.copy.default, kind=SHAPE)
def _copy(ctx, dst, src, non_blocking=False):
    y = copy_out_of_place(P(dst), P(src))
    if not isinstance(src, Jet):
        return y
    return Jet(y, [None if X is None else full(X.to(y.dtype), y.shape) for X in src.c])


@rule(aten.constant_pad_nd.default, kind=SHAPE)
def _pad(ctx, x, pad, value=0):
    y = aten.constant_pad_nd.default(x.p, pad, value)
    return Jet(y, [None if X is None else aten.constant_pad_nd.default(full(X, x.p.shape), pad, 0.0)
                   for X in x.c])


def _coef_list(ctx, xs, k):
    """Full-shape order-k coefficients of a list of jets/tensors (zeros where absent), or None."""
    if all(not isinstance(a, Jet) or a.c[k] is None for a in xs):
        return None
    rows = ctx.plan.orders[k].nrows
    out = []
    for a in xs:
        p = P(a)
        if isinstance(a, Jet) and a.c[k] is not None:
            out.append(full(a.c[k], p.shape))
        else:
            out.append(p.new_zeros((rows, *p.shape)))
    return out


@rule(aten.cat.default, kind=SHAPE)
def _cat(ctx, xs, dim=0):
    ps = [P(a) for a in xs]
    y = torch.cat(ps, dim)
    d = _dim(dim, y.dim())
    out = []
    for k in range(ctx.K):
        cs = _coef_list(ctx, [a for a, p in zip(xs, ps) if p.numel() > 0 or p.dim() == y.dim()], k)
        out.append(None if cs is None else torch.cat(cs, d + 1))
    return Jet(y, out)


@rule(aten.stack.default, kind=SHAPE)
def _stack(ctx, xs, dim=0):
    y = torch.stack([P(a) for a in xs], dim)
    d = _dim(dim, y.dim())
    out = []
    for k in range(ctx.K):
        cs = _coef_list(ctx, xs, k)
        out.append(None if cs is None else torch.stack(cs, d + 1))
    return Jet(y, out)


def _split_like(ctx, x, parts: list[Tensor], fc_split):
    coefs = [None if X is None else fc_split(full(X, x.p.shape)) for X in x.c]
    return [Jet(p, [None if c is None else c[i] for c in coefs]) for i, p in enumerate(parts)]


@rule(aten.split.Tensor, kind=SHAPE)
def _split(ctx, x, size, dim=0):
    d = _dim(dim, x.p.dim())
    return _split_like(ctx, x, list(torch.split(x.p, size, d)), lambda X: torch.split(X, size, d + 1))


@rule(aten.split_with_sizes.default, kind=SHAPE)
def _split_sizes(ctx, x, sizes, dim=0):
    d = _dim(dim, x.p.dim())
    return _split_like(ctx, x, list(torch.split(x.p, sizes, d)), lambda X: torch.split(X, sizes, d + 1))


@rule(aten.unbind.int, kind=SHAPE)
def _unbind(ctx, x, dim=0):
    d = _dim(dim, x.p.dim())
    return _split_like(ctx, x, list(torch.unbind(x.p, d)), lambda X: torch.unbind(X, d + 1))


# ============================================================================ reductions


def _reduce_dims(x: Jet, dims) -> list[int]:
    n = x.p.dim()
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return list(range(n))
    if isinstance(dims, int):
        dims = [dims]
    return sorted({_dim(d, n) for d in dims})


def _sum_coef(X: Tensor, x: Jet, dims: list[int], keepdim: bool) -> Tensor:
    X = align(X, x.p.dim())
    if any(X.shape[d + 1] != x.p.shape[d] for d in dims):
        X = full(X, x.p.shape)
    if not dims:
        return X
    return X.sum([d + 1 for d in dims], keepdim=keepdim)


@rule(aten.sum.dim_IntList, aten.sum.default, kind=REDUCTION)
def _sum(ctx, x, dims=None, keepdim=False, dtype=None):
    ds = _reduce_dims(x, dims)
    y = x.p.sum(ds, keepdim=keepdim, dtype=dtype) if ds else x.p.sum(dtype=dtype)
    return Jet(y, [None if X is None else _sum_coef(X, x, ds, keepdim) for X in x.c])


@rule(aten.mean.dim, aten.mean.default, kind=REDUCTION)
def _mean(ctx, x, dims=None, keepdim=False, dtype=None):
    ds = _reduce_dims(x, dims)
    count = 1
    for d in ds:
        count *= x.p.shape[d]
    s = _sum(ctx, x, ds, keepdim, dtype)
    return scale(ctx, s, 1.0 / count, s.p / count)


def _real_only(x, what: str) -> None:
    """Rules written with ``x * x`` for ``|x|^2``: a complex ``x`` goes to the order-1 fallback (or an error)."""
    if isinstance(x, Jet) and x.p.is_complex():
        raise Unsupported(f"{what} of a complex tensor")


@rule(aten.var.correction, kind=REDUCTION)
def _var(ctx, x, dims=None, correction=None, keepdim=False):
    _real_only(x, "var")
    ds = _reduce_dims(x, dims)
    count = 1
    for d in ds:
        count *= x.p.shape[d]
    corr = 1 if correction is None else correction
    m = _mean(ctx, x, ds, True)
    xc = add(ctx, x, m, x.p - m.p, -1)
    sq = product(ctx, xc, xc, torch.mul)
    s = _sum(ctx, sq, ds, keepdim)
    return scale(ctx, s, 1.0 / max(count - corr, 0), s.p / max(count - corr, 0))


@rule(aten.var_mean.correction, kind=REDUCTION)
def _var_mean(ctx, x, dims=None, correction=None, keepdim=False):
    """``(var, mean)``, as ``torch.var_mean`` and ``torch.std_mean`` (``sqrt`` of the first) trace to."""
    return _var(ctx, x, dims, correction, keepdim), _mean(ctx, x, dims, keepdim)


# ============================================================================ normalization & softmax


@rule(aten.native_layer_norm.default, kind=NORMALIZATION)
def _layer_norm(ctx, x, normalized_shape, weight, bias, eps):
    _require_constant(weight, bias)
    x = as_jet(ctx, x)
    ds = list(range(x.p.dim() - len(normalized_shape), x.p.dim()))
    m = _mean(ctx, x, ds, True)
    xc = add(ctx, x, m, x.p - m.p, -1)
    v = _mean(ctx, product(ctx, xc, xc, torch.mul), ds, True)
    ve = Jet(v.p + eps, v.c)
    rstd = _unary_apply(ctx, ve, torch.rsqrt(ve.p), D.rsqrt_derivs)
    out = product(ctx, xc, rstd, torch.mul)
    if weight is not None:
        out = scale(ctx, out, weight, out.p * weight)
    if bias is not None:
        out = Jet(out.p + bias, out.c)
    return out, m, rstd


@rule(aten._softmax.default, kind=NORMALIZATION)
def _softmax(ctx, x, dim, half_to_float=False):
    d = _dim(dim, x.p.dim())
    shift = x.p.amax(d, keepdim=True).detach()
    e = _unary_apply(ctx, Jet(x.p - shift, x.c), torch.exp(x.p - shift), D.exp_derivs)
    s = _sum(ctx, e, [d], True)
    return product(ctx, e, _reciprocal(ctx, s), torch.mul)


@rule(aten._log_softmax.default, kind=NORMALIZATION)
def _log_softmax(ctx, x, dim, half_to_float=False):
    d = _dim(dim, x.p.dim())
    shift = x.p.amax(d, keepdim=True).detach()
    e = _unary_apply(ctx, Jet(x.p - shift, x.c), torch.exp(x.p - shift), D.exp_derivs)
    s = _sum(ctx, e, [d], True)
    ls = _unary_apply(ctx, s, torch.log(s.p), D.log_derivs_shift(0.0))
    return add(ctx, Jet(x.p - shift, x.c), ls, x.p - shift - ls.p, -1)


@rule(aten.logsumexp.default, kind=REDUCTION)
def _logsumexp(ctx, x, dims, keepdim=False):
    ds = _reduce_dims(x, dims)
    shift = x.p.amax(ds, keepdim=True).detach()
    e = _unary_apply(ctx, Jet(x.p - shift, x.c), torch.exp(x.p - shift), D.exp_derivs)
    s = _sum(ctx, e, ds, True)
    ls = _unary_apply(ctx, s, torch.log(s.p), D.log_derivs_shift(0.0))
    out = Jet(ls.p + shift, ls.c)
    if not keepdim:
        out = _squeeze(ctx, out, ds)
    return out


@rule(aten.native_batch_norm.default, kind=NORMALIZATION)
def _bn(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps):
    if not training and running_mean is not None:
        return _bn_eval(ctx, x, weight, bias, running_mean, running_var, momentum, eps)
    # batch statistics (one point, batched=False): the primal op as f runs it (running statistics
    # updated alike), the coefficients through the normalization over every dim but the channels
    _require_constant(weight, bias, running_mean, running_var)
    y, save_mean, save_invstd = aten.native_batch_norm.default(x.p, weight, bias, running_mean, running_var,
                                                               training, momentum, eps)
    dims = [0] + list(range(2, x.p.dim()))
    m = _mean(ctx, x, dims, True)
    xc = add(ctx, x, m, x.p - m.p, -1)
    v = _mean(ctx, product(ctx, xc, xc, torch.mul), dims, True)
    ve = Jet(v.p + eps, v.c)
    rstd = _unary_apply(ctx, ve, torch.rsqrt(ve.p), D.rsqrt_derivs)
    out = product(ctx, xc, rstd, torch.mul)
    if weight is not None:
        w = weight.reshape([1, -1] + [1] * (x.p.dim() - 2))
        out = scale(ctx, out, w, out.p * w)
    return Jet(y, out.c), save_mean, save_invstd


@rule(aten._native_batch_norm_legit_no_training.default, kind=NORMALIZATION)
def _bn_eval(ctx, x, weight, bias, running_mean, running_var, momentum, eps):
    _require_constant(weight, bias, running_mean, running_var)
    shape = [1, -1] + [1] * (x.p.dim() - 2)
    s = torch.rsqrt(running_var + eps)
    if weight is not None:
        s = s * weight
    s = s.reshape(shape)
    y = (x.p - running_mean.reshape(shape)) * s
    if bias is not None:
        y = y + bias.reshape(shape)
    empty = x.p.new_zeros((0,))
    return scale(ctx, x, s, y), empty, empty


# ============================================================================ per-sample linear ops & selections


def _batch_leading(op):
    """Linear ops acting independently on dim 0 (pooling, upsampling): fold streams into dim 0."""

    def r(ctx, x, *args, **kwargs):
        _require_constant(*args, *kwargs.values())
        y = op(x.p, *args, **kwargs)

        def fc(X):
            X = align(X, x.p.dim())
            if tuple(X.shape[2:]) != tuple(x.p.shape[1:]):
                X = X.expand(X.shape[0], X.shape[1], *x.p.shape[1:])
            n, b = X.shape[0], X.shape[1]
            out = op(X.reshape(n * b, *X.shape[2:]), *args, **kwargs)
            return out.reshape(n, b, *out.shape[1:])

        return Jet(y, [None if X is None else fc(X) for X in x.c])

    return r


for _op in (aten.avg_pool2d.default, aten.avg_pool3d.default, aten._adaptive_avg_pool2d.default,
            aten._adaptive_avg_pool3d.default, aten.upsample_nearest2d.default, aten.upsample_bilinear2d.default):
    register(_op, _batch_leading(_op), SPATIAL)


@rule(aten.max_pool2d_with_indices.default, kind=SPATIAL)
def _max_pool2d(ctx, x, *args):
    y, idx = aten.max_pool2d_with_indices.default(x.p, *args)

    def fc(X):
        X = full(X, x.p.shape).flatten(-2)
        i = idx.flatten(-2).unsqueeze(0).expand(X.shape[0], *idx.flatten(-2).shape)
        return X.gather(-1, i).reshape(X.shape[0], *y.shape)

    return Jet(y, [None if X is None else fc(X) for X in x.c]), idx


def _extremum(which):
    def r(ctx, x, dims=(), keepdim=False):
        ds = _reduce_dims(x, dims)
        f = torch.amax if which == "max" else torch.amin
        yk = f(x.p, ds, keepdim=True)
        m = (x.p == yk).to(x.p.dtype)
        w = m / m.sum(ds, keepdim=True)  # ties share the derivative, as in PyTorch
        y = yk if keepdim else yk.squeeze(ds) if ds else yk
        out = []
        for X in x.c:
            if X is None:
                out.append(None)
                continue
            s = (full(X, x.p.shape) * w).sum([d + 1 for d in ds], keepdim=keepdim)
            out.append(s)
        return Jet(y, out)

    return r


register(aten.amax.default, _extremum("max"), REDUCTION)
register(aten.amin.default, _extremum("min"), REDUCTION)
register(aten.max.default, _extremum("max"), REDUCTION)  # torch.max(x) over every entry: amax with ties shared
register(aten.min.default, _extremum("min"), REDUCTION)


@rule(aten.cumsum.default, kind=REDUCTION)
def _cumsum(ctx, x, dim, dtype=None):
    d = _dim(dim, x.p.dim())
    y = torch.cumsum(x.p, d, dtype=dtype)
    return Jet(y, [None if X is None else torch.cumsum(full(X, x.p.shape), d + 1) for X in x.c])


def _as_dtype(ctx, x: Jet, dtype):
    """``x`` converted to the ``dtype`` argument of a reduction (a plain tensor if not floating)."""
    if dtype is None or dtype == x.p.dtype:
        return x
    return _to_copy(ctx, x, dtype=dtype)


def _prod_along(ctx, x: Jet, d: int) -> Jet:
    """Product over dim ``d`` (kept with size 1) as a pairwise tree of products of slices: exact where
    entries are zero or negative, unlike ``exp(sum(log x))``; ``log2(n)`` jet products."""
    while x.p.shape[d] > 1:
        n = x.p.shape[d]
        m = n // 2
        pairs = product(ctx, _slice(ctx, x, d, 0, 2 * m, 2), _slice(ctx, x, d, 1, 2 * m, 2), torch.mul)
        x = _cat(ctx, [pairs, _slice(ctx, x, d, 2 * m, n)], d) if n % 2 else pairs
    return x


@rule(aten.prod.dim_int, aten.prod.default, kind=REDUCTION)
def _prod(ctx, x, dim=None, keepdim=False, dtype=None):
    """Product over one dim, or over all of them (flattened first), by :func:`_prod_along`."""
    x = _as_dtype(ctx, x, dtype)
    if not isinstance(x, Jet):
        return x.prod() if dim is None else x.prod(dim, keepdim)
    y = x.p.prod() if dim is None else x.p.prod(dim, keepdim)
    if x.p.numel() == 0:
        return y  # the empty product: 1
    if dim is None or x.p.dim() == 0:
        out = _prod_along(ctx, _view(ctx, x, [-1]), 0)
        return Jet(y, _view(ctx, out, list(y.shape)).c)
    d = _dim(dim, x.p.dim())
    out = _prod_along(ctx, x, d)
    return Jet(y, (out if keepdim else _squeeze(ctx, out, [d])).c)


@rule(aten.cumprod.default, kind=REDUCTION)
def _cumprod(ctx, x, dim, dtype=None):
    """Inclusive product scan (Hillis-Steele): after the pass with offset ``s`` entry ``i`` holds the product
    of entries ``max(0, i - 2s + 1) .. i``; ``log2(n)`` jet products, exact at zeros (no division)."""
    x = _as_dtype(ctx, x, dtype)
    if not isinstance(x, Jet):
        return torch.cumprod(x, dim)
    y = torch.cumprod(x.p, dim)
    if x.p.dim() == 0:
        return Jet(y, list(x.c))
    d = _dim(dim, x.p.dim())
    n = x.p.shape[d]
    s = 1
    while s < n:
        tail = product(ctx, _slice(ctx, x, d, s, n), _slice(ctx, x, d, 0, n - s), torch.mul)
        x = _cat(ctx, [_slice(ctx, x, d, 0, s), tail], d)
        s *= 2
    return Jet(y, x.c)


@rule(aten.logcumsumexp.default, kind=REDUCTION)
def _logcumsumexp(ctx, x, dim):
    """``y_i = log sum_(j<=i) exp(x_j) = y_i + log N_i`` with ``N_i = sum_(j<=i) W_ij exp(x_j - x_j(0))`` and the
    weights ``W_ij = exp(x_j(0) - y_i(0)) <= 1`` (zero for ``j > i``): ``N`` has primal 1, no entry under- or
    overflows however far apart the ``x_j`` are, and ``log`` has the derivatives ``(-1)^(k-1) (k-1)!`` at 1."""
    y = torch.logcumsumexp(x.p, dim)
    if x.p.dim() == 0:
        return Jet(y, list(x.c))
    d = _dim(dim, x.p.dim())
    xl, yl = x.p.movedim(d, -1), y.movedim(d, -1)
    n = xl.shape[-1]
    lower = torch.ones(n, n, dtype=torch.bool, device=y.device).tril()
    # masked before exp: the entries above the diagonal are exp(-inf) = 0, never inf (nor nan gradients)
    W = torch.exp(torch.where(lower, xl.unsqueeze(-2) - yl.unsqueeze(-1), -math.inf))  # [..., i, j]
    E = compose(ctx, Jet(torch.zeros_like(x.p), x.c), torch.ones_like(x.p), [1.0] * ctx.K)  # exp(x - x(0))

    def weigh(X):
        X = full(X, x.p.shape).movedim(d + 1, -1)
        return torch.matmul(W, X.unsqueeze(-1)).squeeze(-1).movedim(-1, d + 1)

    N = Jet(torch.ones_like(y), [None if X is None else weigh(X) for X in E.c])
    return compose(ctx, N, y, [(-1.0) ** (k - 1) * math.factorial(k - 1) for k in range(1, ctx.K + 1)])


@rule(aten.flip.default, kind=SHAPE)
def _flip(ctx, x, dims):
    n = x.p.dim()
    y = torch.flip(x.p, dims)
    return Jet(y, [None if X is None else torch.flip(full(X, x.p.shape), [_dim(d, n) + 1 for d in dims])
                   for X in x.c])


@rule(aten.index.Tensor, kind=INDEXING)
def _index(ctx, x, indices):
    idx = list(indices)
    _require_constant(*[i for i in idx if i is not None])
    pos = [i for i, t in enumerate(idx) if t is not None]
    if not pos or pos != list(range(pos[0], pos[-1] + 1)) or any(t.dtype == torch.bool for t in idx if t is not None):
        raise Unsupported("non-adjacent or boolean advanced indexing")
    y = aten.index.Tensor(x.p, idx)
    return Jet(y, [None if X is None else aten.index.Tensor(full(X, x.p.shape), [None] + idx) for X in x.c])


def _scatter_index(index: Tensor, rows: int) -> Tensor:
    """``index`` repeated (a view) for every row of a coefficient: its dims shift past the stream dim."""
    return index.unsqueeze(0).expand(rows, *index.shape)


def _gather_coefs(x: Jet, d: int, index: Tensor) -> list:
    """Every coefficient of ``x`` gathered at the primal's ``index`` along dim ``d``."""
    return [None if X is None else torch.gather(full(X, x.p.shape), d + 1, _scatter_index(index, X.shape[0]))
            for X in x.c]


@rule(aten.gather.default, kind=INDEXING)
def _gather(ctx, x, dim, index, sparse_grad=False):
    _require_constant(index)
    d = _dim(dim, x.p.dim())
    return Jet(torch.gather(x.p, d, index), _gather_coefs(x, d, index))


@rule(aten.native_group_norm.default, kind=NORMALIZATION)
def _group_norm(ctx, x, weight, bias, N, C, HxW, group, eps):
    _require_constant(weight, bias)
    shape = x.p.shape
    xg = _view(ctx, x, [N, group, -1])
    m = _mean(ctx, xg, [2], True)
    xc = add(ctx, xg, m, xg.p - m.p, -1)
    v = _mean(ctx, product(ctx, xc, xc, torch.mul), [2], True)
    ve = Jet(v.p + eps, v.c)
    rstd = _unary_apply(ctx, ve, torch.rsqrt(ve.p), D.rsqrt_derivs)
    out = _view(ctx, product(ctx, xc, rstd, torch.mul), list(shape))
    aff = [1, C] + [1] * (len(shape) - 2)
    if weight is not None:
        out = scale(ctx, out, weight.reshape(aff), out.p * weight.reshape(aff))
    if bias is not None:
        out = Jet(out.p + bias.reshape(aff), out.c)
    return out, _squeeze(ctx, m, [2]), _squeeze(ctx, rstd, [2])


@rule(aten.linalg_vector_norm.default, kind=REDUCTION)
def _vector_norm(ctx, x, ord=2, dim=None, keepdim=False, dtype=None):
    """``(sum |x|^p)^(1/p)`` (``p = 2``: ``sqrt(sum x^2)``, no absolute value); ``p = +-inf``: the largest /
    smallest ``|x|`` (ties share the derivative); ``p = 0``, the count of nonzeros, is a constant."""
    _real_only(x, "vector_norm")
    x = _as_dtype(ctx, x, dtype)
    if not isinstance(x, Jet):
        return aten.linalg_vector_norm.default(x, ord, dim, keepdim)
    ds = _reduce_dims(x, dim)
    p = float(ord)
    if p == 2:
        sq = product(ctx, x, x, torch.mul)
        s = _sum(ctx, sq, ds, keepdim)
        return _unary_apply(ctx, s, torch.sqrt(s.p), D.sqrt_derivs)
    y = aten.linalg_vector_norm.default(x.p, ord, dim, keepdim)
    if p == 0:
        return y
    ax = _unary_apply(ctx, x, torch.abs(x.p), D.piecewise_linear(torch.sign))
    if math.isinf(p):
        out = _extremum("max" if p > 0 else "min")(ctx, ax, ds, keepdim)
    elif p == 1:
        out = _sum(ctx, ax, ds, keepdim)
    else:
        s = _sum(ctx, _pow(ctx, ax, p), ds, keepdim)
        out = _pow(ctx, s, 1.0 / p)
    return Jet(y, out.c)


# ============================================================================ value-independent results


def _constant_result(op):
    """Ops whose result does not depend on the input's values (constructors, rounding, sign): no jet."""

    def r(ctx, *args, **kwargs):
        args, kwargs = pytree.tree_map(lambda a: a.p if isinstance(a, Jet) else a, (args, kwargs))
        return op(*args, **kwargs)

    return r


for _op in (aten.full_like.default, aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default,
            aten.rand_like.default, aten.randn_like.default, aten.new_zeros.default, aten.new_ones.default,
            aten.new_full.default, aten.new_empty.default, aten.fill.Scalar, aten.zero.default):
    register(_op, _constant_result(_op), CONSTANT)
for _op in (aten.sign.default, aten.floor.default, aten.ceil.default, aten.round.default, aten.trunc.default):
    register(_op, _constant_result(_op), ELEMENTWISE)  # piecewise constant: derivatives 0, values per entry


# ============================================================================ scatters, windows, selections


def _scatter_rule(op, reduce_pos=None):
    """``scatter`` / ``scatter_add`` / ``scatter_reduce`` ("sum", "mean"): for a fixed index the result is linear
    in ``(self, src)``, so each coefficient is the same scatter of the coefficients (scatter dim + 1)."""

    def r(ctx, inp, dim, index, src, *args, **kwargs):
        _require_constant(index)
        reduce = args[reduce_pos] if reduce_pos is not None else None
        if reduce in ("amax", "amin"):
            return _scatter_extremum(ctx, inp, dim, index, src, reduce, *args[1:], **kwargs)
        if reduce not in (None, "sum", "mean"):
            raise Unsupported(f"scatter_reduce with reduce={reduce!r}")
        d = _dim(dim, P(inp).dim())
        y = op(P(inp), d, index, P(src), *args, **kwargs)
        if not isinstance(inp, Jet) and not isinstance(src, Jet):
            return y
        if not isinstance(src, Jet):  # scatter.value or a constant src: its written entries get zero coefficients
            src = P(src)
            if not isinstance(src, Tensor):
                src = torch.full(index.shape, float(src), dtype=y.dtype, device=y.device)
            src = Jet(src, [None] * ctx.K)
        wop = aten.scatter.src if op is aten.scatter.value else op
        return _scatter_like(ctx, inp, src, y,
                             lambda a, b: wop(a, d + 1, _scatter_index(index, a.shape[0]), b, *args, **kwargs))

    return r


def _scatter_extremum(ctx, inp, dim, index, src, reduce, include_self=True):
    """``scatter_reduce`` "amax" / "amin": every output entry is one of its candidates (``self`` if included,
    the ``src`` entries scattered there), so its coefficients are the winners' (ties share them equally)."""
    pi, ps = P(inp), P(src)
    d = _dim(dim, pi.dim())
    y = aten.scatter_reduce.two(pi, d, index, ps, reduce, include_self=include_self)
    ws = (ps == y.gather(d, index)).to(y.dtype)
    if include_self:
        wi = (pi == y).to(y.dtype)
    else:  # entries no src reaches keep self
        wi = (torch.zeros_like(y).scatter_add(d, index, torch.ones_like(ps)) == 0).to(y.dtype)
    count = wi.scatter_add(d, index, ws)
    ws, wi = ws / count.gather(d, index), wi / count
    return _scatter_like(ctx, inp, src, y, lambda a, b: (a * wi).scatter_add(
        d + 1, _scatter_index(index, a.shape[0]), b * ws))


register(aten.scatter.src, _scatter_rule(aten.scatter.src), INDEXING)
register(aten.scatter.value, _scatter_rule(aten.scatter.value), INDEXING)
register(aten.scatter_add.default, _scatter_rule(aten.scatter_add.default), INDEXING)
register(aten.scatter_reduce.two, _scatter_rule(aten.scatter_reduce.two, reduce_pos=0), INDEXING)


@rule(aten.unfold.default, kind=SHAPE)
def _unfold(ctx, x, dim, size, step):
    """Sliding windows along ``dim`` (a view): the same windows of each coefficient."""
    d = _dim(dim, x.p.dim())
    return linear(ctx, x, lambda p: p.unfold(d, size, step), lambda X: full(X, x.p.shape).unfold(d + 1, size, step))


def _take_along(ctx, x: Jet, values: Tensor, idx: Tensor, d: int, keepdim: bool = True) -> Jet:
    """The jet of ``values = x`` taken at ``idx`` along ``d`` (the primal's own sort / top-k / scan winners):
    each coefficient gathered at the same indices."""
    if x.p.dim() == 0:
        return Jet(values, list(x.c))
    cs = _gather_coefs(x, d, idx if keepdim else idx.unsqueeze(d))
    return Jet(values, cs if keepdim else [None if X is None else X.squeeze(d + 1) for X in cs])


def _values_rule(op, dim_pos, keepdim_pos=None):
    """Ops returning ``(values, indices)`` of entries of ``x`` along a dim: values by :func:`_take_along`."""

    def r(ctx, x, *args, **kwargs):
        values, idx = op(x.p, *args, **kwargs)
        dim = kwargs.get("dim", args[dim_pos] if dim_pos is not None and len(args) > dim_pos else -1)
        keepdim = True
        if keepdim_pos is not None:
            keepdim = kwargs.get("keepdim", args[keepdim_pos] if len(args) > keepdim_pos else False)
        return _take_along(ctx, x, values, idx, _dim(dim, x.p.dim()), keepdim), idx

    return r


register(aten.sort.default, _values_rule(aten.sort.default, 0), SELECTION)
register(aten.sort.stable, _values_rule(aten.sort.stable, None), SELECTION)  # dim is keyword-only
register(aten.topk.default, _values_rule(aten.topk.default, 1), SELECTION)
register(aten.kthvalue.default, _values_rule(aten.kthvalue.default, 1, 2), SELECTION)
register(aten.median.dim, _values_rule(aten.median.dim, 0, 1), SELECTION)
register(aten.nanmedian.dim, _values_rule(aten.nanmedian.dim, 0, 1), SELECTION)
register(aten.mode.default, _values_rule(aten.mode.default, 0, 1), SELECTION)
register(aten.max.dim, _values_rule(aten.max.dim, 0, 1), SELECTION)  # torch.max(x, dim): the winner's coefficients
register(aten.min.dim, _values_rule(aten.min.dim, 0, 1), SELECTION)
register(aten.cummax.default, _values_rule(aten.cummax.default, 0), SELECTION)
register(aten.cummin.default, _values_rule(aten.cummin.default, 0), SELECTION)
register(aten.upsample_bicubic2d.default, _batch_leading(aten.upsample_bicubic2d.default), SPATIAL)


@rule(aten._trilinear.default, kind=LINEAR)
def _trilinear(ctx, i1, i2, i3, expand1, expand2, expand3, sumdim, unroll_dim=1):
    """``sum_sumdim(u1 * u2 * u3)``, ``u_j`` = input ``j`` unsqueezed at ``expand_j``: two elementwise jet products."""
    us = []
    for t, ex in ((i1, expand1), (i2, expand2), (i3, expand3)):
        for e in sorted(ex):
            t = _unsqueeze(ctx, t, e) if isinstance(t, Jet) else t.unsqueeze(e)
        us.append(t)
    y = aten._trilinear.default(P(i1), P(i2), P(i3), expand1, expand2, expand3, sumdim, unroll_dim)
    out = product(ctx, product(ctx, us[0], us[1], torch.mul), us[2], torch.mul)
    if not isinstance(out, Jet):
        return y
    if sumdim:
        out = _sum(ctx, out, list(sumdim), False)
    return Jet(y, [None if X is None else align(X, y.dim()) for X in out.c])


# ============================================================================ determinants and solves


def _lead(ctx, A: Jet, Y0: Tensor) -> Jet:
    """``M = Y0 dA`` (``Y0 = A(0)^-1``, ``dA`` the jet of ``A`` less its primal): zero primal."""
    nd = A.p.dim()
    return Jet(torch.zeros_like(A.p), [None if X is None else torch.matmul(Y0, align(X, nd)) for X in A.c])


def _logdet_increment(ctx, A: Jet, Y0: Tensor) -> Jet:
    """``log det(A) - log det(A(0)) = log det(I + M) = sum_j (-1)^(j+1) tr(M^j) / j`` with ``M = A(0)^-1 dA``. ``M``
    has a zero primal, so ``M^j`` starts at order ``j``: the sum up to ``j = K`` is exact at every order ``<= K``."""
    M = _lead(ctx, A, Y0)
    nd = A.p.dim()
    zero = torch.zeros(A.p.shape[:-2], dtype=A.p.dtype, device=A.p.device)
    S = Jet(zero, [None] * ctx.K)
    Mj = M
    for j in range(1, ctx.K + 1):
        if j > 1:
            Mj = product(ctx, M, Mj, torch.matmul, y=M.p, elementwise=False)
        tr = linear(ctx, Mj, lambda p: zero, lambda X: align(X, nd).diagonal(0, -2, -1).sum(-1))
        S = add(ctx, S, tr, zero, alpha=(-1.0) ** (j + 1) / j)
    return S


@rule(aten._linalg_slogdet.default, kind=LINALG)
def _linalg_slogdet(ctx, A):
    """``log|det A| = log|det A(0)| + log det(I + A(0)^-1 dA)`` (:func:`_logdet_increment`); the sign is constant."""
    sign, logabs, LU, pivots = aten._linalg_slogdet.default(A.p)
    S = _logdet_increment(ctx, A, torch.linalg.inv(A.p))
    return sign, Jet(logabs, S.c), LU, pivots


@rule(aten._linalg_det.default, kind=LINALG)
def _linalg_det(ctx, A):
    """``det A = det A(0) exp(log det(I + A(0)^-1 dA))``: ``exp`` composed at 0 (every derivative 1)."""
    det, LU, pivots = aten._linalg_det.default(A.p)
    S = _logdet_increment(ctx, A, torch.linalg.inv(A.p))
    E = compose(ctx, S, torch.ones_like(S.p), [1.0] * ctx.K)
    return scale(ctx, E, det, det), LU, pivots


@rule(aten._linalg_solve_ex.default, kind=LINALG)
def _linalg_solve(ctx, A, B, left=True, check_errors=False):
    """``X = A^-1 B``: ``A(0) X = B - dA X`` is the fixed point ``X = X0 + Y0 dB + L X``, ``L = -Y0 dA`` (zero
    primal), ``Y0 = A(0)^-1``; as for :func:`_linalg_inv`, ``K`` passes make every order exact. ``left=False``
    (``X A = B``) solves the transposed system. A stack of vectors ``B`` is solved as one-column matrices."""
    pa, pb = P(A), P(B)
    X0, LU, pivots, info = aten._linalg_solve_ex.default(pa, pb, left=left, check_errors=check_errors)
    vector = pb.dim() == 1 or (pb.dim() == pa.dim() - 1 and pb.shape == pa.shape[:-1])
    if not left:  # X A = B  <=>  A^T X^T = B^T
        A = _transpose(ctx, A, -2, -1) if isinstance(A, Jet) else pa.transpose(-2, -1)
        if not vector:
            B = _transpose(ctx, B, -2, -1) if isinstance(B, Jet) else pb.transpose(-2, -1)
    if vector:
        B = _unsqueeze(ctx, B, -1) if isinstance(B, Jet) else pb.unsqueeze(-1)
    pa, pb = P(A), P(B)
    Y0 = torch.linalg.inv(pa)
    Xp = torch.matmul(Y0, pb)
    nd = Xp.dim()
    G = [None if not isinstance(B, Jet) or X is None else align(torch.matmul(Y0, align(X, pb.dim())), nd)
         for X in B.c] if isinstance(B, Jet) else [None] * ctx.K
    X = Jet(Xp, G)
    if isinstance(A, Jet):
        L = Jet(torch.zeros_like(pa), [None if X_ is None else -torch.matmul(Y0, align(X_, pa.dim())) for X_ in A.c])
        for _ in range(ctx.K):
            LX = product(ctx, L, X, torch.matmul, y=torch.zeros_like(Xp), elementwise=False)
            X = add(ctx, Jet(Xp, G), LX, Xp)
    if vector:
        X = _squeeze(ctx, X, [-1])
    elif not left:
        X = _transpose(ctx, X, -2, -1)
    return Jet(X0, [None if c is None else align(c, X0.dim()) for c in X.c]), LU, pivots, info


# ============================================================================ kinds of ops without a rule of their own

# Pointwise families: every overload (Scalar variants, the ones without a rule, the ones ATen does not tag
# pointwise) computes entry i from entry i of its broadcast arguments. The batch check reads this.
declare(ELEMENTWISE, *(getattr(aten, _name) for _name in (
    "add", "sub", "rsub", "mul", "div", "neg", "pow", "where", "maximum", "minimum", "clamp", "clamp_min",
    "clamp_max", "complex", "atan2", "hypot", "fmod", "remainder", "copysign", "xlogy", "logaddexp", "fmax", "fmin",
    "floor_divide", "heaviside", "lerp", "addcmul", "addcdiv", "masked_fill", "sign", "sgn", "floor", "ceil", "round",
    "trunc", "eq", "ne", "gt", "ge", "lt", "le", "logical_and", "logical_or", "logical_xor", "logical_not",
    "bitwise_and", "bitwise_or", "bitwise_xor", "bitwise_not", "bitwise_left_shift", "bitwise_right_shift",
    "__lshift__", "__rshift__", "tanh", "sigmoid", "exp", "expm1", "log", "log1p", "sin", "cos", "sinh", "cosh",
    "sqrt", "rsqrt", "reciprocal", "erf", "erfc", "atan", "tan", "asin", "acos", "asinh", "acosh", "atanh", "log2",
    "log10", "exp2", "square", "silu", "relu", "abs", "softplus", "leaky_relu", "hardtanh", "elu", "celu", "selu",
    "gelu", "mish", "hardswish", "hardsigmoid", "logit",
)))

# results whose values do not depend on the values of the arguments (their shapes, dtypes and devices only)
declare(CONSTANT, *(getattr(aten, _name) for _name in (
    "new_zeros", "new_ones", "new_full", "new_empty", "new_empty_strided", "zeros_like", "ones_like", "full_like",
    "empty_like", "rand_like", "randn_like", "randint_like", "zero", "sym_size", "sym_numel", "sym_stride",
    "_local_scalar_dense",
)))
declare(CONSTANT, aten.fill.Scalar)
declare(ELEMENTWISE, aten.fill.Tensor)  # a 0-dim value broadcast to the argument's shape

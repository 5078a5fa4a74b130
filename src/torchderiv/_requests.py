"""Requests: what one call of a public operator asks for, and what each operator needs computed.

A :class:`Request` holds every argument that changes the answer (the operator, ``batched``, ``method``,
``chunk_size`` and the operator's own options); the fast-path cache key is derived from it in one place,
:meth:`Request.key`, so no option can be left out of the key. :func:`prepare` turns a request into
:class:`Work`: the partials and collapsed sums to propagate, how to assemble the result from them, and the
operator's reverse-mode form where it has one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import combinations_with_replacement
from typing import Any

import torch
from torch import Tensor

from . import _compressed
from ._fallback import probe_output
from ._reverse import hessian_reverse, jacobian_reverse

_MISSING = object()


@dataclass(frozen=True)
class Request:
    """One call of a public operator. ``options`` holds the operator's own arguments as ``(name, value)``
    pairs in signature order (``dims``, ``weights``, ``spec``, ``coords``, ...)."""

    op: str
    batched: bool = True
    method: str = "auto"
    chunk_size: int | None = None
    options: tuple[tuple[str, Any], ...] = ()

    def opt(self, name: str, default=None):
        for k, v in self.options:
            if k == name:
                return v
        return default

    def key(self, x) -> tuple | None:
        """The fast-path key of this request at ``x``: the whole request plus ``x``'s shape, dtype and
        device. ``None`` (no fast path) when an option has no stable value to compare: a tensor (it could
        change in place) or anything unhashable."""
        if not isinstance(x, Tensor):
            return None
        opts = _frozen(self.options)
        if opts is _MISSING:
            return None
        # "auto" may choose differently with and without a backward to the parameters ahead
        grad = torch.is_grad_enabled() if self.method == "auto" else None
        return (self.op, x.shape, x.dtype, x.device, self.batched, self.method, self.chunk_size, opts, grad)


def _frozen(v):
    """A hashable snapshot of an option value, or ``_MISSING`` when it has none."""
    if isinstance(v, Tensor):
        return _MISSING
    if isinstance(v, (list, tuple, range)):
        out = tuple(_frozen(a) for a in v)
        return _MISSING if any(a is _MISSING for a in out) else (type(v).__name__, out)
    try:
        hash(v)
    except TypeError:
        return _MISSING
    return v


@dataclass
class Work:
    """What a request needs computed. ``items`` are multi-indices of flattened input coordinates (``()`` is
    the value), ``combos`` weighted sums of them, collapsed into one stream each; with ``directions`` the
    multi-indices index those sparse direction vectors instead, and ``reference_combos`` states the combos in
    coordinates. ``assemble(y, parts, sums)`` builds the operator's result. ``kind`` and the sizes feed the
    cost model; ``reverse`` computes the whole result in reverse mode where the operator has such a form;
    ``direct`` is a result that needs no derivative at all (an all-zero operator)."""

    kind: str
    n_in: int
    items: list = field(default_factory=list)
    combos: list = field(default_factory=list)
    assemble: Callable = lambda *r: r
    stacked: bool = True
    directions: tuple | None = None
    reference_combos: list | None = None
    reverse: Callable[[], Any] | None = None
    direct: Callable[[], Any] | None = None


def in_shape(x: Tensor, batched: bool) -> tuple[int, ...]:
    return tuple(x.shape[1:]) if batched else tuple(x.shape)


# ----------------------------------------------------------------------------- per operator


def _jacobian(req: Request, f, x: Tensor) -> Work:
    ins = in_shape(x, req.batched)
    n = math.prod(ins)
    return Work("jacobian", n, items=[(i,) for i in range(n)],
                assemble=lambda y, parts, _: parts.movedim(0, -1).reshape((*y.shape, *ins)),
                reverse=lambda: jacobian_reverse(req.op, f, x, req.batched, req.chunk_size))


def _diagonal_of(req: Request, x: Tensor, J: Tensor) -> Tensor:
    """The diagonal ``[B, *in]`` of per-sample Jacobians ``J: [B, *out, *in]`` (``out`` must equal ``in``)."""
    ins = in_shape(x, req.batched)
    n = math.prod(ins)
    outs = tuple(J.shape[(1 if req.batched else 0) : J.dim() - len(ins)])
    if outs != ins:
        raise ValueError(
            f"{req.op}: needs a map whose per-sample output shape equals its input shape, but f maps "
            f"{ins} to {outs}; use torchderiv.jacobian for the full per-sample Jacobian"
        )
    lead = (x.shape[0],) if req.batched else ()
    d = J.reshape((*lead, n, n)).diagonal(dim1=-2, dim2=-1).reshape((*lead, *ins))
    if req.op == "divergence":
        return d.reshape(d.shape[0], -1).sum(-1) if req.batched else d.sum()
    return d


def _jacobian_diagonal(req: Request, f, x: Tensor) -> Work:
    w = _jacobian(req, f, x)
    full_J, full_rev = w.assemble, w.reverse
    w.assemble = lambda y, parts, sums: _diagonal_of(req, x, full_J(y, parts, sums))
    w.reverse = lambda: _diagonal_of(req, x, full_rev())
    return w


def _hessian(req: Request, f, x: Tensor) -> Work:
    ins = in_shape(x, req.batched)
    n = math.prod(ins)
    pairs = list(combinations_with_replacement(range(n), 2))
    pos = {p: r for r, p in enumerate(pairs)}
    idx = torch.tensor([pos[(min(i, j), max(i, j))] for i in range(n) for j in range(n)], device=x.device)

    def assemble(y, parts, _):
        H = parts.index_select(0, idx).movedim(0, -1)  # [*y, n*n]
        if not ins:  # a scalar input: the single entry
            return H.squeeze(-1)
        return H.unflatten(-1, (*ins, *ins))  # a view: no strided copy

    return Work("hessian", n, items=pairs, assemble=assemble,
                reverse=lambda: hessian_reverse(req.op, f, x, req.batched, req.chunk_size))


def _hessian_diagonal(req: Request, f, x: Tensor) -> Work:
    ins = in_shape(x, req.batched)
    n = math.prod(ins)

    def reverse():
        H = hessian_reverse(req.op, f, x, req.batched, req.chunk_size)
        lead = H.shape[: H.dim() - 2 * len(ins)]
        return H.reshape((*lead, n, n)).diagonal(dim1=-2, dim2=-1).reshape((*lead, *ins))

    return Work("taylor", n, items=[(i, i) for i in range(n)],
                assemble=lambda y, parts, _: parts.movedim(0, -1).reshape((*y.shape, *ins)), reverse=reverse)


def check_dims(fname: str, dims, n: int) -> list[int]:
    if dims is None:
        return list(range(n))
    if isinstance(dims, (str, bytes)) or not isinstance(dims, (Sequence, range)):
        raise TypeError(f"{fname}: dims must be a sequence of input coordinates such as [0, 2], got "
                        f"{dims!r}; for one coordinate write dims=[{dims!r}]")
    dims = list(dims)
    for d in dims:
        if not isinstance(d, int) or isinstance(d, bool) or not 0 <= d < n:
            raise ValueError(f"{fname}: dims must hold input coordinates in [0, {n}), got {dims}")
    if len(set(dims)) != len(dims):
        raise ValueError(f"{fname}: dims has duplicates: {dims}")
    return dims


def check_weights(fname: str, weights, k: int) -> Tensor:
    """``weights`` as a symmetric float64 ``[k, k]`` matrix on the CPU (one row per coordinate in dims)."""
    C = torch.as_tensor(weights, dtype=torch.float64).cpu()
    if C.shape != (k, k):
        raise ValueError(f"{fname}: weights must be a [{k}, {k}] matrix (one row per "
                         f"coordinate in dims), got shape {tuple(C.shape)}")
    if not torch.allclose(C, C.T):
        raise ValueError(f"{fname}: weights must be symmetric; pass (C + C.T) / 2 for the same operator")
    return C


def _laplace_combo(fname: str, n: int, dims, weights) -> list:
    dims = check_dims(fname, dims, n)
    if weights is None:
        return [((d, d), 1.0) for d in dims]
    C = check_weights(fname, weights, len(dims))
    combo = []
    for a in range(len(dims)):
        for b in range(a, len(dims)):
            w = float(C[a, b]) * (1 if a == b else 2)
            if w != 0:
                combo.append(((dims[a], dims[b]), w))
    return combo


def _laplacian(req: Request, f, x: Tensor) -> Work:
    ins = in_shape(x, req.batched)
    n = math.prod(ins)
    combo = _laplace_combo(req.op, n, req.opt("dims"), req.opt("weights"))

    def reverse():
        H = hessian_reverse(req.op, f, x, req.batched, req.chunk_size)
        lead = H.shape[: H.dim() - 2 * len(ins)]
        H = H.reshape((*lead, n, n))
        return sum(w * H[..., a, b] for (a, b), w in combo)

    w = Work("taylor", n, combos=[combo], stacked=False, assemble=lambda y, _, sums: sums[0], reverse=reverse)
    if not combo:  # all-zero weights: the zero operator
        w.direct = lambda: torch.zeros_like(probe_output(req.op, f, x, req.batched))
    return w


def _divergence(req: Request, f, x: Tensor) -> Work:
    return _jacobian_diagonal(req, f, x)


def biharmonic_directions(dims: list[int]):
    """Directions and weights with sum_ij d4/dx_i^2 dx_j^2 = sum_r w_r D^4_(v_r).

    From (a + b)^4 + (a - b)^4 = 2 (a^4 + 6 a^2 b^2 + b^4): with v = e_i +- e_j,
    d_i^2 d_j^2 = (D^4_(e_i+e_j) + D^4_(e_i-e_j) - 2 D^4_(e_i) - 2 D^4_(e_j)) / 12, so the biharmonic is
    sum_i (1 - (d-1)/3) D^4_(e_i) + (1/6) sum_(i<j) (D^4_(e_i+e_j) + D^4_(e_i-e_j)): d^2 directions of pure
    fourth-order Taylor coefficients (univariate Taylor mode with interpolation, Griewank, Utke & Walther
    2000), the fourth order collapsed into one stream. Measured faster than multivariate coefficients over
    the mixed third-order partials (docs/design.md).
    """
    d = len(dims)
    directions, weights = [], []
    for i in dims:
        directions.append(((i, 1.0),))
        weights.append(1.0 - (d - 1) / 3.0)
    for a, i in enumerate(dims):
        for j in dims[a + 1 :]:
            directions.append(((i, 1.0), (j, 1.0)))
            weights.append(1.0 / 6.0)
            directions.append(((i, 1.0), (j, -1.0)))
            weights.append(1.0 / 6.0)
    combo = [((r, r, r, r), w) for r, w in enumerate(weights) if w != 0.0]
    return tuple(directions), combo


def _biharmonic(req: Request, f, x: Tensor) -> Work:
    n = math.prod(in_shape(x, req.batched))
    dd = check_dims(req.op, req.opt("dims"), n)
    directions, combo = biharmonic_directions(dd)
    ref = [((i, i, i, i), 1.0) for i in dd] + [((i, i, j, j), 2.0) for a, i in enumerate(dd) for j in dd[a + 1 :]]
    return Work("taylor", n, combos=[combo], stacked=False, assemble=lambda y, _, sums: sums[0],
                directions=directions, reference_combos=[ref])


def parse_spec(fname: str, spec, coords, n: int) -> list[tuple[object, tuple[int, ...]]]:
    if isinstance(spec, (str, tuple)) or not isinstance(spec, Sequence):
        raise TypeError(f"{fname}: spec must be a list of multi-indices such as [(), (0,), (1, 1)] "
                        f"or, with coords='txy', strings such as ['', 't', 'xx'], got {spec!r}")
    if coords is not None:
        if not isinstance(coords, (str, Sequence)) or len(coords) != n:
            raise ValueError(f"{fname}: coords must name each of the {n} input coordinates once "
                             f"(e.g. coords={'txyz'[:n]!r}), got {coords!r} of length "
                             f"{len(coords) if hasattr(coords, '__len__') else '?'}")
        names = list(coords)
        if len(set(names)) != len(names):
            raise ValueError(f"{fname}: coords has duplicate names: {coords!r}")
        cpos = {c: i for i, c in enumerate(names)}
    out, seen = [], set()
    for key in spec:
        if isinstance(key, str):
            if coords is None:
                raise ValueError(f"{fname}: spec entry {key!r} is a string; pass coords= to name the "
                                 f"input coordinates (e.g. coords='txy')")
            bad = [c for c in key if c not in cpos]
            if bad:
                raise ValueError(f"{fname}: spec entry {key!r} uses unknown coordinate name(s) {bad}; "
                                 f"known names are {names}")
            alpha = tuple(cpos[c] for c in key)
        elif isinstance(key, tuple) and all(isinstance(i, int) and not isinstance(i, bool) for i in key):
            bad = [i for i in key if not 0 <= i < n]
            if bad:
                raise ValueError(f"{fname}: spec entry {key!r} has index out of range {bad}; input "
                                 f"coordinates are 0..{n - 1}")
            alpha = key
        else:
            raise TypeError(f"{fname}: malformed spec entry {key!r}: use a tuple of ints such as (0, 1) "
                            f"or a string of coordinate names")
        if key in seen:
            raise ValueError(f"{fname}: duplicate spec entry {key!r}")
        seen.add(key)
        out.append((key, tuple(sorted(alpha))))
    return out


def _partials(req: Request, f, x: Tensor) -> Work:
    n = math.prod(in_shape(x, req.batched))
    entries = parse_spec(req.op, req.opt("spec"), req.opt("coords"), n)
    keys = [k for k, _ in entries]
    w = Work("taylor", n, items=[a for _, a in entries], stacked=False,
             assemble=lambda y, parts, _: dict(zip(keys, parts)))
    if not entries:
        w.direct = dict
    return w


PREPARE: dict[str, Callable[[Request, Any, Tensor], Work]] = {
    "jacobian": _jacobian,
    "jacobian_diagonal": _jacobian_diagonal,
    "hessian": _hessian,
    "hessian_diagonal": _hessian_diagonal,
    "laplacian": _laplacian,
    "divergence": _divergence,
    "biharmonic": _biharmonic,
    "partials": _partials,
}

# the methods each operator accepts ("auto" picks among the others)
METHODS: dict[str, tuple[str, ...]] = {
    "jacobian": ("auto", "forward", "reverse", "autograd"),
    "jacobian_diagonal": ("auto", "forward", "reverse", "autograd"),
    "hessian": ("auto", "forward", "reverse", "autograd"),
    "hessian_diagonal": ("auto", "forward", "reverse", "autograd"),
    "laplacian": ("auto", "forward", "reverse", "autograd"),
    "divergence": ("auto", "forward", "reverse", "autograd"),
    "biharmonic": ("auto", "forward", "autograd"),
    "partials": ("auto", "forward", "autograd"),
}


def prepare(req: Request, f, x: Tensor) -> Work:
    if req.op in _compressed.OPS:  # sparsity= / layout=: the colored work where it pays (docs/sparsity.md)
        return _compressed.work(req, f, x, PREPARE[req.op])
    return PREPARE[req.op](req, f, x)

"""Compressed (colored) derivatives: one forward Taylor stream per color instead of one per input coordinate.

The pattern comes from :mod:`torchderiv._sparsity`, the coloring from :mod:`torchderiv._coloring`. A color is
the direction ``s_c = sum of its one-hot columns``, passed to the Taylor engine as a sparse direction vector
shared by the whole batch; the compressed result is scattered back ("decompressed") with one gather, which
keeps the result differentiable w.r.t. the parameters of ``f``.

:func:`work` is called by :func:`torchderiv._requests.prepare` for the operators that take ``sparsity=``:
it returns the colored :class:`~torchderiv._requests.Work` (its directions are the colors, so that the
dispatcher's forward/reverse choice prices the colored streams; ``n_in`` stays the input size, which
prices reverse mode), or
``None`` when the dense path should run (``sparsity=False``, nothing to gain by the cost model, ``f``
cannot be traced).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ._cache import captured
from ._capture import TraceError
from ._coloring import color_columns, color_diagonal
from ._sparsity import Pattern, _max_numel, detect

# below this many input coordinates a detection cannot pay (sparsity=None)
MIN_N = 8
# the colored path must propagate at most this fraction of the dense path's streams (sparsity=None)
RATIO = 0.8
# sparsity=None skips detection when its one-time cost (pattern elements propagated) is beyond this
MAX_DETECT = 1 << 31

LAYOUTS = (None, torch.strided, torch.sparse_coo)


def check_args(fname: str, sparsity, layout, method: str) -> None:
    if sparsity is not None and not isinstance(sparsity, bool):
        raise TypeError(f"{fname}: sparsity must be None (cost model), True or False, got {sparsity!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"{fname}: layout must be torch.strided (dense, the default) or torch.sparse_coo, "
                         f"got {layout!r}")
    if sparsity is True and method == "reverse":
        raise ValueError(f"{fname}: sparsity=True colors the forward (Taylor) streams; it cannot be combined "
                         f"with method='reverse'. Pass method='forward' or 'auto'")


@dataclass
class _Colored:
    colors: Tensor  # [n] color of each input coordinate
    p: int

    @property
    def directions(self) -> tuple:
        cols = [[] for _ in range(self.p)]
        for i, c in enumerate(self.colors.tolist()):
            cols[c].append((i, 1.0))
        return tuple(tuple(c) for c in cols)


def _colored(colors: Tensor) -> _Colored:
    return _Colored(colors, int(colors.max()) + 1 if colors.numel() else 0)


def _pattern(fname, f, x, batched, order, sparsity, method, layout) -> Pattern | None:
    """The detected pattern, or None where the dense path should run without detecting."""
    if sparsity is False or method == "reverse":
        return None
    n = math.prod(x.shape[1:] if batched else x.shape)
    forced = sparsity is True or layout is torch.sparse_coo
    if not forced and n < MIN_N:
        return None
    try:
        if not forced:
            cap = captured(f, x, batched, fname)
            if n * _max_numel(cap.gm) // max(1, x.shape[0] if batched else 1) * order > MAX_DETECT:
                return None
        return detect(f, x, batched, order, fname)
    except TraceError:
        return None


def _cache(pat: Pattern, key, make):
    d = pat.__dict__.setdefault("_colorings", {})
    if key not in d:
        d[key] = make()
    return d[key]


def _gather(parts: Tensor, rows: int, m: int, src: Tensor, o: Tensor) -> Tensor:
    """``vals[b, k] = parts[src[k], b, o[k]]`` as a contiguous ``[B, nnz]`` (``B = 1`` unbatched): one
    ``index_select`` over the streams laid side by side."""
    flat = parts.reshape(rows, -1, m).transpose(0, 1).reshape(-1, rows * m)
    return flat.index_select(1, (src * m + o).to(flat.device))


def _scatter(vals: Tensor, lin: Tensor, size: int, lead: tuple, shape: tuple, layout, nd_idx) -> Tensor:
    """Values ``[B, nnz]`` at flat positions ``lin`` of a ``[*lead, size]`` result shaped ``[*lead, *shape]``;
    sparse COO when asked (``nd_idx``: the multi-indices ``[len(shape), nnz]`` of ``lin``)."""
    if layout is torch.sparse_coo:
        nnz = lin.numel()
        if lead:
            B = lead[0]
            b = torch.arange(B, device=vals.device).repeat_interleave(nnz)
            idx = torch.cat([b[None], nd_idx.to(vals.device).repeat(1, B)])
        else:
            idx = nd_idx.to(vals.device)
        return torch.sparse_coo_tensor(idx, vals.reshape(-1), (*lead, *shape), is_coalesced=True,
                                       check_invariants=False)
    out = vals.new_zeros((vals.shape[0], size)).index_copy_(1, lin.to(vals.device), vals)
    return out.reshape((*lead, *shape))


def _unravel(lin: Tensor, shape: tuple) -> Tensor:
    out = []
    for s in reversed(shape):
        out.append(lin % s)
        lin = lin // s
    return torch.stack(out[::-1]) if out else lin.new_zeros(0, lin.numel())


def _dense_cost(kind: str, method: str, n: int, m: int) -> float:
    fwd = {"jacobian": n, "jacobian_diagonal": n, "hessian": n + n * (n + 1) / 2, "hessian_diagonal": 2 * n}[kind]
    if method == "auto" and kind in ("jacobian", "jacobian_diagonal"):
        return min(fwd, 3 * m)
    if method == "auto" and kind in ("hessian", "hessian_diagonal"):
        return min(fwd, 3 * m * (1 + n))
    return fwd


def _pays(kind, method, sparsity, layout, n, m, streams) -> bool:
    if sparsity is True or layout is torch.sparse_coo:
        return True
    return 1 + streams <= RATIO * (1 + _dense_cost(kind, method, n, m))


# ----------------------------------------------------------------------------- operators


def _work(kind, n, directions, items, assemble):
    from ._requests import Work

    return Work(kind, n, items=items, directions=directions, assemble=assemble)


def jacobian(fname, f, x, batched, method, sparsity, layout):
    pat = _pattern(fname, f, x, batched, 1, sparsity, method, layout)
    if pat is None:
        return None
    m, n = pat.m, pat.n
    if not _pays("jacobian", method, sparsity, layout, n, m, int(pat.J.sum(1).max()) if m else 0):
        return None  # a lower bound on the colors already says no
    col = _cache(pat, "jacobian", lambda: _colored(color_columns(pat.J)))
    if col.p == 0 or not _pays("jacobian", method, sparsity, layout, n, m, col.p):
        return None
    o, i = pat.J.nonzero().unbind(1)
    src, lin = col.colors[i], o * n + i
    ins = tuple(x.shape[1:] if batched else x.shape)

    def assemble(y, parts, _):
        lead = tuple(y.shape[:1]) if batched else ()
        out = tuple(y.shape[1:]) if batched else tuple(y.shape)
        vals = _gather(parts, col.p, m, src, o)
        nd_idx = torch.cat([_unravel(o, out), _unravel(i, ins)]) if layout is torch.sparse_coo else None
        return _scatter(vals, lin, m * n, lead, (*out, *ins), layout, nd_idx)

    return _work("jacobian", n, col.directions, [(c,) for c in range(col.p)], assemble)


def jacobian_diagonal(fname, f, x, batched, method, sparsity, reduce=False):
    """The diagonal ``[B, *in]`` (``reduce``: its per-sample sum, the divergence)."""
    pat = _pattern(fname, f, x, batched, 1, sparsity, method, None)
    if pat is None or pat.m != pat.n:
        return None
    n = pat.n
    col = _cache(pat, "diagonal", lambda: _colored(color_diagonal(pat.J)))
    if col.p == 0 or not _pays("jacobian_diagonal", method, sparsity, None, n, n, col.p):
        return None
    nonzero = pat.J.diagonal()
    full = bool(nonzero.all())
    ins = tuple(x.shape[1:] if batched else x.shape)

    def assemble(y, parts, _):
        outs = tuple(y.shape[1:]) if batched else tuple(y.shape)
        if outs != ins:
            raise ValueError(
                f"{fname}: needs a map whose per-sample output shape equals its input shape, but f maps "
                f"{ins} to {outs}; use torchderiv.jacobian for the full per-sample Jacobian")
        lead = tuple(y.shape[:1]) if batched else ()
        P = parts.reshape(col.p, -1, n)  # [p, B (or 1), n]
        if col.p == 1:
            d = P[0]
        else:  # d[b, i] = P[color(i), b, i]: one gather
            d = P.gather(0, col.colors.to(P.device).expand(1, P.shape[1], n))[0]
        if not full:  # entries the pattern rules out are exact zeros
            d = d * nonzero.to(device=d.device, dtype=d.dtype)
        d = d.reshape((*lead, *ins))
        if reduce:
            return d.reshape(d.shape[0], -1).sum(-1) if batched else d.sum()
        return d

    return _work("jacobian", n, col.directions, [(c,) for c in range(col.p)], assemble)


def hessian(fname, f, x, batched, method, sparsity, layout, diagonal=False):
    """The per-sample Hessians ``[B, *out, *in, *in]`` (``diagonal``: ``[B, *out, *in]``)."""
    pat = _pattern(fname, f, x, batched, 2, sparsity, method, layout)
    if pat is None:
        return None
    m, n = pat.m, pat.n
    kind = "hessian_diagonal" if diagonal else "hessian"
    col = _cache(pat, "hessian", lambda: _colored(color_columns(pat.hessian_rows())))
    o, i, j = pat.H
    if diagonal:
        keep = i == j
        o, i, j = o[keep], i[keep], j[keep]
    ci, cj = col.colors[i], col.colors[j]
    a, b = torch.minimum(ci, cj), torch.maximum(ci, cj)
    pk = a * max(col.p, 1) + b
    used, src = torch.unique(pk, return_inverse=True)
    items = [(int(u) // col.p, int(u) % col.p) for u in used]
    if not items:
        return None
    if not _pays(kind, method, sparsity, layout, n, m, col.p + len(items)):
        return None
    ins = tuple(x.shape[1:] if batched else x.shape)
    lin = (o * n + i) if diagonal else ((o * n + i) * n + j)

    def assemble(y, parts, _):
        lead = tuple(y.shape[:1]) if batched else ()
        out = tuple(y.shape[1:]) if batched else tuple(y.shape)
        vals = _gather(parts, len(items), m, src, o)
        if diagonal:
            return _scatter(vals, lin, m * n, lead, (*out, *ins), None, None)
        nd_idx = (torch.cat([_unravel(o, out), _unravel(i, ins), _unravel(j, ins)])
                  if layout is torch.sparse_coo else None)
        return _scatter(vals, lin, m * n * n, lead, (*out, *ins, *ins), layout, nd_idx)

    return _work("taylor" if diagonal else "hessian", n, col.directions, items, assemble)


OPS = ("jacobian", "jacobian_diagonal", "hessian", "hessian_diagonal", "divergence")


def work(req, f, x, dense):
    """The colored work of ``req`` (see the module docstring), else the dense one (``dense(req, f, x)``),
    converted to a sparse COO result when ``layout=torch.sparse_coo`` asks for it."""
    sparsity, layout = req.opt("sparsity"), req.opt("layout")
    check_args(req.op, sparsity, layout, req.method)
    if req.op == "jacobian":
        w = jacobian(req.op, f, x, req.batched, req.method, sparsity, layout)
    elif req.op in ("jacobian_diagonal", "divergence"):
        w = jacobian_diagonal(req.op, f, x, req.batched, req.method, sparsity, req.op == "divergence")
    else:
        w = hessian(req.op, f, x, req.batched, req.method, sparsity, layout, req.op == "hessian_diagonal")
    if w is not None:
        # reverse mode (method="auto" where the outputs are few): the dense operator's own reverse form
        w.reverse = lambda: _as_layout(dense(req, f, x).reverse(), layout)
        return w
    w = dense(req, f, x)
    if layout is torch.sparse_coo:
        a, r = w.assemble, w.reverse
        w.assemble = lambda *res: a(*res).to_sparse()
        w.reverse = None if r is None else (lambda: r().to_sparse())
    return w


def _as_layout(t: Tensor, layout) -> Tensor:
    return t.to_sparse() if layout is torch.sparse_coo else t

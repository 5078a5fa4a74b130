"""Sparsity detection: which input entries each per-sample output entry can depend on, read off the traced graph.

The captured ATen graph of ``f`` at ONE sample (rows do not interact: the per-sample pattern is the pattern of
``f`` at a batch of one) is interpreted with *pattern values* instead of numbers. An input-dependent tensor of
shape ``s`` carries

* ``J``: ``[L, *s]``, nonnegative; ``J[k, e] > 0`` when entry ``e`` can depend on input coordinate ``k``
  (order 1; ``L`` input coordinates, possibly a chunk of them),
* ``H``: ``[P, *s]``, for a list of coordinate pairs ``(i_p, j_p)``: ``H[p, e] > 0`` when ``d2 e / dx_i dx_j``
  can be nonzero (order 2).

Every op is described by a *dependency surrogate*: a linear map ``Lin`` over patterns that says which input
entries an output entry reads, plus its kind:

* linear in the input-dependent arguments (views, ``cat``, slices, ``index`` with constant indices, ``mm`` /
  ``conv`` with a constant operand, sums, pooling): ``J' = Lin(J)``, ``H' = Lin(H)``. ``Lin`` is the op's own
  forward-mode derivative at a surrogate point where every floating-point constant is ONES (the values of
  parameters are never read: a weight that is zero now need not be after the next step), applied to the
  pattern times fixed random positive weights, in absolute value (so mixed-sign coefficients cannot cancel);
* bilinear (``mul``, ``mm``, ``bmm``, ``conv`` with two input-dependent operands): ``H`` also gains the
  symmetrized ``op(J_a[i], J_b[j])`` (``d2(a b) = da db + db da`` besides the linear parts);
* nonlinear (``tanh``, ``softmax``, ``layer_norm``, ``amax``, ...): ``J' = Lin(J)``, ``H' = Lin(H) + J'[i] J'[j]``
  (an entry that reads the set ``S`` has its Hessian inside ``S x S``): exact for elementwise maps and
  row-wise maps, conservative for products inside one op;
* unknown ops, and indices computed from ``x``: every output entry depends on every input-dependent entry
  of the sample (conservative, never misses a nonzero).

Integer tensors built from constants (index buffers, ``arange``) are evaluated for real; floating-point
constants are shapes only.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
from torch import Tensor, fx
from torch.utils import _pytree as pytree

aten = torch.ops.aten

# patterns of at most this many elements per value are propagated at once (chunks of coordinates / pairs)
_BUDGET = 1 << 24
# an order-2 detection propagating more candidate pairs than this falls back to the bound S x S per output
_MAX_PAIRS = 1 << 18


@dataclass
class _Dep:
    """An input-dependent floating-point tensor: its patterns (see the module docstring)."""

    J: Tensor
    H: Tensor | None
    meta: Tensor  # the fake value: shape, dtype, device


@dataclass
class _Opaque:
    """A tensor whose values are not known (floating-point constants; integers computed from ``x`` or from
    floating-point constants). ``meta`` is its fake value (shape, dtype)."""

    meta: Tensor


def _is_float(t) -> bool:
    return isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex())


# ----------------------------------------------------------------------------- op kinds

_LINEAR_POINTWISE = {"add", "sub", "rsub", "neg", "clone", "_to_copy", "alias", "lift_fresh_copy", "where",
                     "masked_fill", "copy", "detach", "positive", "contiguous", "fill", "expand_copy"}
_BILINEAR_ADDITIVE = {"addmm": (0,), "baddbmm": (0,), "convolution": (2,), "_convolution": (2,),
                      "addmv": (0,), "linear": (2,)}
_BILINEAR = {"mm", "bmm", "mul", "matmul", "dot", "mv", "einsum", "vdot", *_BILINEAR_ADDITIVE}
# linear in their input-dependent arguments given constant indices / shapes / weights
_LINEAR = {
    "view", "_unsafe_view", "reshape", "_reshape_alias", "permute", "expand", "cat", "stack", "slice", "select",
    "index", "_unsafe_index", "gather", "index_select", "scatter", "scatter_add", "index_add", "index_put",
    "_index_put_impl", "slice_scatter", "select_scatter", "diagonal_scatter", "constant_pad_nd", "squeeze",
    "unsqueeze", "transpose", "t", "flip", "roll", "repeat", "diagonal", "unfold", "as_strided", "split",
    "split_with_sizes", "unbind", "narrow", "movedim", "sum", "mean", "nansum", "cumsum", "avg_pool1d",
    "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "_adaptive_avg_pool2d",
    "adaptive_avg_pool3d", "_adaptive_avg_pool3d", "upsample_nearest1d", "upsample_nearest2d",
    "upsample_nearest3d", "upsample_linear1d", "upsample_bilinear2d", "upsample_bicubic2d",
    "upsample_trilinear3d", "_upsample_nearest_exact1d", "_upsample_nearest_exact2d", "reflection_pad1d",
    "reflection_pad2d", "reflection_pad3d", "replication_pad1d", "replication_pad2d", "replication_pad3d",
    "im2col", "col2im", "embedding", "tril", "triu", "trace", "diag_embed", "pixel_shuffle", "pixel_unshuffle",
    "channel_shuffle", "view_as", "expand_as", "_native_batch_norm_legit_no_training",
    "split_copy", "view_copy", "permute_copy", "slice_copy", "select_copy", "transpose_copy", "unsqueeze_copy",
    "squeeze_copy", "alias_copy", "diagonal_copy", "unbind_copy", "_to_copy", "clone",
    *_BILINEAR,
}
_NOT_FLOAT_VALUED = {"zeros_like", "ones_like", "empty_like", "full_like", "new_zeros", "new_ones", "new_empty",
                     "new_full", "rand_like", "randn_like", "empty_strided", "scalar_tensor"}


def _name(target) -> str:
    n = getattr(target, "__name__", None) or str(target)
    return n.split(".")[0]


# ----------------------------------------------------------------------------- surrogates of nonlinear ops


def _reduce_dims(P: Tensor, dims, keepdim: bool, out_shape) -> Tensor:
    """Union over ``dims`` of a pattern ``[L, *s]`` (all dims when ``dims`` is empty or None)."""
    nd = P.dim() - 1
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        dims = list(range(nd))
    elif isinstance(dims, int):
        dims = [dims]
    dims = sorted({d % nd for d in dims}) if nd else []
    S = P.sum([d + 1 for d in dims], keepdim=True) if dims else P
    if not keepdim and dims:
        S = S.squeeze([d + 1 for d in dims])
    return _fit(S, out_shape)


def _along(P: Tensor, dim: int, out_shape) -> Tensor:
    """Every output entry reads the whole input slice along ``dim`` (softmax, sort, topk)."""
    nd = P.dim() - 1
    if nd == 0:
        return _fit(P, out_shape)
    return _fit(P.sum(dim % nd + 1, keepdim=True), out_shape)


def _fit(P: Tensor, out_shape) -> Tensor:
    """Broadcast a pattern ``[L, *s]`` to ``[L, *out_shape]`` (right-aligned, as pointwise ops do); where the
    shapes are not broadcast-compatible, every output entry reads the union of all entries."""
    out_shape = tuple(out_shape)
    s = tuple(P.shape[1:])
    if len(s) <= len(out_shape) and all(a in (1, b) for a, b in zip(s[::-1], out_shape[::-1])):
        return P.reshape(P.shape[0], *([1] * (len(out_shape) - len(s))), *s).expand(P.shape[0], *out_shape)
    return _all(P, out_shape)


def _all(P: Tensor, out_shape) -> Tensor:
    t = P.reshape(P.shape[0], -1).sum(1)
    return t.reshape(t.shape[0], *([1] * len(out_shape))).expand(t.shape[0], *out_shape)


def _arg(n: fx.Node, i: int, name: str, default=None):
    if len(n.args) > i:
        return n.args[i]
    return n.kwargs.get(name, default)


def _nonlinear_surrogate(n: fx.Node, name: str, metas):
    """``Lin`` for known nonlinear ops: ``(dep leaf positions, patterns) -> output pattern tree``, or None."""
    m0 = metas[0]
    if name in ("_softmax", "_log_softmax", "softmax", "log_softmax"):
        dim = _arg(n, 1, "dim")
        return lambda P: _along(P[0], dim, m0.shape), 0
    if name in ("amax", "amin", "logsumexp", "prod", "var", "std", "norm", "linalg_vector_norm", "nanmean",
                "max", "min", "median", "nanmedian", "mode", "var_mean", "std_mean", "aminmax", "kthvalue"):
        if name == "linalg_vector_norm":
            dims, keep = _arg(n, 2, "dim"), _arg(n, 3, "keepdim", False)
        elif name == "norm":
            dims, keep = _arg(n, 2, "dim"), _arg(n, 3, "keepdim", False)
        elif name in ("var", "std", "var_mean", "std_mean"):
            dims, keep = _arg(n, 1, "dim"), n.kwargs.get("keepdim", _arg(n, 3, "keepdim", False))
            if isinstance(keep, (int, float)) and not isinstance(keep, bool):  # (x, dim, correction, keepdim)
                keep = _arg(n, 3, "keepdim", False)
        elif name == "kthvalue":
            dims, keep = _arg(n, 2, "dim", -1), _arg(n, 3, "keepdim", False)
        else:
            dims, keep = _arg(n, 1, "dim"), _arg(n, 2, "keepdim", False)
        if not isinstance(keep, bool):
            keep = False
        if isinstance(dims, bool):
            dims = None

        def lin(P):
            outs = []
            for m in metas:
                outs.append(_reduce_dims(P[0], dims, keep, m.shape) if _is_float(m) else None)
            return outs[0] if len(metas) == 1 else tuple(outs)

        return lin, 0
    if name in ("sort", "topk", "cummax", "cummin", "cumprod", "logcumsumexp", "msort", "argsort"):
        dim = {"sort": _arg(n, 1, "dim", -1), "topk": _arg(n, 2, "dim", -1)}.get(name, _arg(n, 1, "dim", -1))
        if name == "msort":
            dim = 0

        def lin(P):
            outs = [(_along(P[0], dim, m.shape) if _is_float(m) else None) for m in metas]
            return outs[0] if len(metas) == 1 else tuple(outs)

        return lin, 0
    if name in ("max_pool2d_with_indices", "max_pool3d_with_indices"):
        d = 2 if name.startswith("max_pool2d") else 3
        k = _arg(n, 1, "kernel_size")
        stride = _arg(n, 2, "stride") or k
        pad = _arg(n, 3, "padding", 0)
        dil = _arg(n, 4, "dilation", 1)
        ceil = _arg(n, 5, "ceil_mode", False)
        if any(v != 1 for v in (dil if isinstance(dil, (list, tuple)) else [dil])):
            return None
        pool = torch.nn.functional.avg_pool2d if d == 2 else torch.nn.functional.avg_pool3d

        def lin(P):  # the window a maximum is taken over: an average pool with the same geometry
            X = P[0]
            Y = pool(X.reshape(-1, *X.shape[X.dim() - d - 1 :]), k, stride, pad, ceil_mode=ceil,
                     count_include_pad=True)
            return (Y.reshape(X.shape[0], *m0.shape), None)

        return lin, 0
    if name == "native_layer_norm":
        k = len(_arg(n, 1, "normalized_shape"))

        def lin(P):
            x = P.get(0)
            total = None
            if x is not None:
                nd = x.dim() - 1
                total = x.sum(list(range(nd - k + 1, nd + 1)), keepdim=True)
            for i in (2, 3):  # weight, bias: elementwise over the normalized dims
                if P.get(i) is not None:
                    w = _fit(P[i], m0.shape)
                    total = w if total is None else _fit(total, m0.shape) + w
            return tuple(_fit(total, m.shape) if _is_float(m) else None for m in metas)

        return lin, None
    if name == "native_group_norm":
        N, C, G = _arg(n, 3, "N"), _arg(n, 4, "C"), _arg(n, 6, "group")

        def lin(P):
            x = P.get(0)
            out = []
            if x is not None:
                L = x.shape[0]
                g = x.reshape(L, N, G, -1).sum(-1, keepdim=True)  # [L, N, G, 1]
                y = g.expand(L, N, G, (x[0].numel() // (N * G))).reshape(x.shape)
                stats = g.reshape(L, N, G)
            else:
                y = stats = None
            for i in (1, 2):  # weight, bias: per channel
                if P.get(i) is not None:
                    w = P[i].reshape(P[i].shape[0], 1, C, *([1] * (len(m0.shape) - 2)))
                    w = _fit(w, m0.shape)
                    y = w if y is None else y + w
                    s = _all(P[i], metas[1].shape)
                    stats = s if stats is None else stats + s
            out = [y, stats if stats is not None else None, stats]
            return tuple(_fit(o, m.shape) if (o is not None and _is_float(m)) else None for o, m in zip(out, metas))

        return lin, None
    return None


# ----------------------------------------------------------------------------- linear ops via forward mode


def _surrogate(v):
    """The primal a linear op sees: ones for every floating-point value (constant or input-dependent), the
    value itself for known tensors."""
    if isinstance(v, (_Dep, _Opaque)):
        return torch.ones(v.meta.shape, dtype=v.meta.dtype, device=v.meta.device)
    return v


def _linear_eval(op, flat, spec, dep_pos, P: dict, gen: torch.Generator, zero_pos=()):
    """``sum_k |d op / d arg_k (P_k * w_k)|`` at the surrogate point, vmapped over the pattern axis: the
    random positive weights ``w_k`` (one per input entry) keep mixed-sign coefficients from cancelling."""
    total = None
    base = [torch.zeros(a.meta.shape, dtype=a.meta.dtype, device=a.meta.device)
            if (i in zero_pos and isinstance(a, (_Dep, _Opaque))) else _surrogate(a) for i, a in enumerate(flat)]
    for k in dep_pos:
        if P.get(k) is None:
            continue
        Pk = P[k]
        w = (torch.rand(Pk.shape[1:], generator=gen, dtype=torch.float64) + 0.5).to(Pk.dtype).to(Pk.device)
        prim = list(base)
        prim[k] = _surrogate(flat[k])

        def g(t, k=k, prim=prim):
            vals = list(prim)
            vals[k] = t
            a, kw = pytree.tree_unflatten(vals, spec)
            return op(*a, **kw)

        def tangent(t, k=k, prim=prim, g=g):
            return torch.func.jvp(g, (prim[k],), (t,))[1]

        out = torch.func.vmap(tangent)(Pk * w)
        out = pytree.tree_map(lambda t: t.abs() if _is_float(t) else None, out)
        total = out if total is None else pytree.tree_map(_plus, total, out, is_leaf=lambda t: t is None)
    return total


def _plus(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def _bilinear_eval(op, flat, spec, ka, kb, A: Tensor, Bt: Tensor, zero_pos=()):
    """``op`` with argument ``ka`` := ``A[p]`` and ``kb`` := ``B[p]`` (vmapped over p), other floating-point
    arguments ones and additive ones zero: the bilinear term ``d2 op / da db`` applied to patterns."""
    prim = [torch.zeros(a.meta.shape, dtype=a.meta.dtype, device=a.meta.device)
            if (i in zero_pos and isinstance(a, (_Dep, _Opaque))) else _surrogate(a) for i, a in enumerate(flat)]

    def g(a, b):
        vals = list(prim)
        vals[ka], vals[kb] = a, b
        x, kw = pytree.tree_unflatten(vals, spec)
        return op(*x, **kw)

    return torch.func.vmap(g)(A, Bt).abs()


# ----------------------------------------------------------------------------- the interpreter


class _Detector:
    def __init__(self, gm: fx.GraphModule, constants: list[Tensor], cols: Tensor, pairs: Tensor | None,
                 n: int):
        self.gm = gm
        self.constants = constants
        self.cols = cols  # [L] input coordinates carried in J
        self.pairs = pairs  # [P, 2] positions into cols, or None (order 1)
        self.n = n
        self.gen = torch.Generator().manual_seed(0)
        self.coarse: set[str] = set()  # ops that got the conservative rule (reported by Pattern.coarse)

    def run(self):
        nodes = list(self.gm.graph.nodes)
        last_use: dict = {}
        for i, nd in enumerate(nodes):
            for a in nd.all_input_nodes:
                last_use[a] = i
        env: dict = {}
        consts = iter(self.constants)
        first = True
        for i, nd in enumerate(nodes):
            if nd.op == "placeholder":
                if first:
                    first = False
                    meta = nd.meta["val"]
                    L = self.cols.numel()
                    J = torch.zeros(L, self.n, dtype=_pdtype(meta), device=meta.device)
                    J[torch.arange(L), self.cols.to(meta.device)] = 1
                    J = J.reshape(L, *meta.shape)
                    H = None
                    if self.pairs is not None:
                        H = torch.zeros(self.pairs.shape[0], *meta.shape, dtype=_pdtype(meta), device=meta.device)
                    env[nd] = _Dep(J, H, meta)
                else:
                    c = next(consts)
                    env[nd] = _Opaque(nd.meta["val"]) if _is_float(c) else c
            elif nd.op == "call_function":
                env[nd] = self.node(nd, env)
            elif nd.op == "output":
                return pytree.tree_map(lambda a: env[a] if isinstance(a, fx.Node) else a, nd.args[0])
            for a in nd.all_input_nodes:
                if last_use.get(a) == i:
                    env.pop(a, None)
        raise RuntimeError("torchderiv.sparsity: graph without output")  # pragma: no cover

    # one node -------------------------------------------------------------------------------------------
    def node(self, nd: fx.Node, env):
        args = pytree.tree_map(lambda a: env[a] if isinstance(a, fx.Node) else a, nd.args)
        kwargs = pytree.tree_map(lambda a: env[a] if isinstance(a, fx.Node) else a, nd.kwargs)
        if nd.target is operator.getitem:
            src = args[0]
            return src[args[1]] if isinstance(src, (tuple, list)) else _Opaque(nd.meta["val"])
        flat, spec = pytree.tree_flatten((args, kwargs), is_leaf=lambda a: isinstance(a, (_Dep, _Opaque)))
        dep_pos = [i for i, a in enumerate(flat) if isinstance(a, _Dep)]
        meta = nd.meta.get("val")
        metas = list(meta) if isinstance(meta, (tuple, list)) else [meta]
        name = _name(nd.target)
        if not dep_pos:
            if any(isinstance(a, _Opaque) for a in flat) or name in ("rand", "randn", "rand_like", "randn_like",
                                                                      "bernoulli", "normal", "randint"):
                return self._opaque(meta)
            try:
                return nd.target(*args, **kwargs)
            except Exception:  # noqa: BLE001 - a value we cannot compute: its shape is enough
                return self._opaque(meta)
        if not any(_is_float(m) for m in metas):
            return self._opaque(meta)  # comparisons, argmax, integer index math on x: no derivative flows
        if name in _NOT_FLOAT_VALUED:
            return self._opaque(meta)
        return self._rule(nd, name, flat, spec, dep_pos, meta, metas)

    def _opaque(self, meta):
        if isinstance(meta, (tuple, list)):
            return type(meta)(_Opaque(m) if isinstance(m, Tensor) else m for m in meta)
        return _Opaque(meta) if isinstance(meta, Tensor) else meta

    def _rule(self, nd, name, flat, spec, dep_pos, meta, metas):
        op = nd.target
        index_from_x = any(isinstance(a, _Opaque) and not _is_float(a.meta) for a in flat)
        complex_ = any(isinstance(m, Tensor) and m.is_complex() for m in metas) or any(
            isinstance(a, (_Dep, _Opaque)) and a.meta.is_complex() for a in flat)
        pointwise = isinstance(op, torch._ops.OpOverload) and torch.Tag.pointwise in op.tags
        bil = None
        if complex_:
            lin, nonlinear = self._conservative(metas), True
            self.coarse.add(name)
        elif pointwise or name in _LINEAR_POINTWISE:
            pos = dep_pos
            if name in ("where",):
                pos = [k for k in dep_pos if k != 0]
            if name == "copy":
                pos = [k for k in dep_pos if k != 0] or dep_pos
            m0 = metas[0]

            def lin(P, pos=pos, m0=m0):
                return _sum_fit([P[k] for k in pos if k in P], m0.shape)

            linear = name in _LINEAR_POINTWISE or (name in ("mul", "div") and len(dep_pos) == 1 and
                                                    (name == "mul" or dep_pos == [0]))
            if name == "mul" and len(dep_pos) == 2:
                ka, kb = dep_pos
                bil = (ka, kb, lambda A, B: _fit(A, m0.shape) * _fit(B, m0.shape))
                linear = True
            nonlinear = not linear
        elif name in _LINEAR and not index_from_x:
            zero = _BILINEAR_ADDITIVE.get(name, ())

            def lin(P, zero=zero):
                return _linear_eval(op, flat, spec, dep_pos, P, self.gen, zero)

            nonlinear = False
            mult = [k for k in dep_pos if k not in zero]
            if name in _BILINEAR and len(mult) >= 2:
                if len(mult) > 2:
                    nonlinear = True
                else:
                    ka, kb = mult
                    bil = (ka, kb, lambda A, B: _bilinear_eval(op, flat, spec, ka, kb, A, B, zero))
        else:
            sur = None if index_from_x else _nonlinear_surrogate(nd, name, metas)
            if sur is None:
                lin, nonlinear = self._conservative(metas), True
                self.coarse.add(name)
            else:
                f, first = sur
                pos = {0: first} if first is not None else _arg_positions(nd.args, nd.kwargs)
                cons = self._conservative(metas)

                def lin(P, f=f, pos=pos, cons=cons):
                    Q = {a: P[p] for a, p in pos.items() if p in P}
                    return f(Q) if Q and len(Q) == len(P) else cons(P)

                nonlinear = True
        try:
            return self._apply(flat, dep_pos, lin, nonlinear, bil, meta, metas)
        except Exception:  # noqa: BLE001 - a surrogate that cannot run here: never wrong, only coarser
            self.coarse.add(name)
            return self._apply(flat, dep_pos, self._conservative(metas), True, None, meta, metas)

    def _conservative(self, metas):
        def lin(P):
            tot = None
            for v in P.values():
                t = v.reshape(v.shape[0], -1).sum(1)
                tot = t if tot is None else tot + t
            outs = [(tot.reshape(-1, *([1] * len(m.shape))).expand(tot.shape[0], *m.shape).to(_pdtype(m))
                     if _is_float(m) else None) for m in metas]
            return outs[0] if len(metas) == 1 else tuple(outs)

        return lin

    def _apply(self, flat, dep_pos, lin, nonlinear, bil, meta, metas):
        PJ = {k: flat[k].J for k in dep_pos}
        J = lin(PJ)
        H = None
        if self.pairs is not None:
            PH = {k: flat[k].H for k in dep_pos}
            H = lin(PH)
            I, K = self.pairs[:, 0], self.pairs[:, 1]
            if bil is not None:
                ka, kb, fn = bil
                Ja, Jb = flat[ka].J, flat[kb].J
                extra = fn(Ja[I], Jb[K]) + fn(Ja[K], Jb[I])
                H = pytree.tree_map(lambda h: h + extra.to(h.dtype) if h is not None else None, H)
            if nonlinear:
                H = pytree.tree_map(lambda h, j: (h + j[I] * j[K]) if h is not None else None, H, J,
                                    is_leaf=lambda t: t is None)
        Js = J if isinstance(J, (tuple, list)) else [J]
        Hs = H if isinstance(H, (tuple, list)) else [H] * len(Js) if H is None else [H]
        outs = []
        for j, h, m in zip(Js, Hs, metas):
            if j is None or not _is_float(m):
                outs.append(_Opaque(m) if isinstance(m, Tensor) else m)
                continue
            j = _clean(j, m)
            h = _clean(h, m) if h is not None else None
            outs.append(_Dep(j, h, m))
        return type(meta)(outs) if isinstance(meta, (tuple, list)) else outs[0]


def _arg_positions(args, kwargs) -> dict:
    """Top-level positional argument index -> its position among the flattened leaves of ``(args, kwargs)``."""
    pos, off = {}, 0
    for i, a in enumerate(args):
        pos[i] = off
        off += len(pytree.tree_leaves(a)) if isinstance(a, (list, tuple)) else 1
    return pos


def _clean(P: Tensor, meta: Tensor) -> Tensor:
    P = (P > 0).to(_pdtype(meta))
    if tuple(P.shape[1:]) != tuple(meta.shape):
        P = _fit(P, meta.shape)
    return P.contiguous()


def _sum_fit(Ps: list, shape) -> Tensor:
    tot = None
    for p in Ps:
        p = _fit(p, shape)
        tot = p if tot is None else tot + p
    return tot


def _pdtype(meta) -> torch.dtype:
    if isinstance(meta, Tensor) and meta.is_floating_point():
        return meta.dtype
    return torch.float32


# ----------------------------------------------------------------------------- drivers


def _max_numel(gm: fx.GraphModule) -> int:
    best = 1
    for nd in gm.graph.nodes:
        for v in pytree.tree_leaves(nd.meta.get("val")):
            if isinstance(v, Tensor):
                best = max(best, v.numel())
    return best


def _output(res) -> Tensor | None:
    """The pattern tensor of the graph's single output, or None where it does not depend on x."""
    return res if isinstance(res, _Dep) else None


def jacobian_pattern(gm: fx.GraphModule, constants: list[Tensor], n: int, m: int, coarse: set | None = None
                     ) -> Tensor:
    """Order-1 pattern ``[m, n]`` (bool, dense) of the one-sample graph ``gm``; the names of the ops that got
    the conservative rule are added to ``coarse``."""
    chunk = max(1, min(n, _BUDGET // _max_numel(gm)))
    out = torch.zeros(m, n, dtype=torch.bool)
    for s in range(0, n, chunk):
        cols = torch.arange(s, min(n, s + chunk))
        with torch.no_grad():
            det = _Detector(gm, constants, cols, None, n)
            r = _output(det.run())
            if coarse is not None:
                coarse |= det.coarse
        if r is not None:
            out[:, cols] = (r.J.reshape(cols.numel(), m) > 0).T.cpu()
    return out


def hessian_pattern(gm: fx.GraphModule, constants: list[Tensor], n: int, m: int,
                    J: Tensor | None = None) -> Tensor:
    """Order-2 pattern as index triples ``[3, nnz]`` (output, i, j), both triangles, sorted.

    Candidate pairs are those ``(i, j)`` that some output entry depends on jointly (``d2 y / dx_i dx_j`` can
    only be nonzero where ``y`` depends on both); they are propagated in chunks. Beyond ``_MAX_PAIRS``
    candidates the bound itself is returned (conservative)."""
    if J is None:
        J = jacobian_pattern(gm, constants, n, m)
    Jf = J.to(torch.float32)
    cand = torch.triu((Jf.T @ Jf) > 0).nonzero()  # [C, 2], i <= j
    if cand.shape[0] > _MAX_PAIRS:
        return _bound_triples(J)
    numel = _max_numel(gm)
    chunk = max(1, _BUDGET // numel // 3)
    trip = []
    for s in range(0, cand.shape[0], chunk):
        pc = cand[s : s + chunk]
        cols, local = torch.unique(pc.reshape(-1), return_inverse=True)
        local = local.reshape(-1, 2)
        with torch.no_grad():
            r = _output(_Detector(gm, constants, cols, local, n).run())
        if r is None or r.H is None:
            continue
        nz = (r.H.reshape(pc.shape[0], m) > 0).nonzero().cpu()  # (pair, o)
        p, o = nz[:, 0], nz[:, 1]
        i, j = pc[p, 0], pc[p, 1]
        trip.append(torch.stack([o, i, j]))
        off = i != j
        trip.append(torch.stack([o[off], j[off], i[off]]))
    if not trip:
        return torch.zeros(3, 0, dtype=torch.long)
    T = torch.cat(trip, 1)
    return _sorted_unique(T, (m, n, n))


def _bound_triples(J: Tensor) -> Tensor:
    m, n = J.shape
    out = []
    for o in range(m):
        s = J[o].nonzero().squeeze(1)
        i, j = torch.meshgrid(s, s, indexing="ij")
        out.append(torch.stack([torch.full_like(i.reshape(-1), o), i.reshape(-1), j.reshape(-1)]))
    return torch.cat(out, 1) if out else torch.zeros(3, 0, dtype=torch.long)


def _sorted_unique(T: Tensor, shape) -> Tensor:
    lin = torch.zeros(T.shape[1], dtype=torch.long)
    for d, s in enumerate(shape):
        lin = lin * s + T[d]
    lin = torch.unique(lin)
    out = []
    for s in reversed(shape):
        out.append(lin % s)
        lin = lin // s
    return torch.stack(out[::-1])


def numel(shape) -> int:
    return math.prod(shape)


# ----------------------------------------------------------------------------- cached per (f, shapes)


@dataclass
class Pattern:
    """The detected pattern of one ``(f, input shape)``: ``J`` ``[m, n]`` (bool), and for order 2 the Hessian
    triples ``[3, nnz]`` (output, i, j) sorted, both triangles."""

    m: int
    n: int
    J: Tensor
    H: Tensor | None = None
    coarse: tuple = ()  # ops that got the conservative rule (everything depends on everything in the row)

    def hessian_rows(self) -> Tensor:
        """``R [m, n]``: ``R[o, i]`` when row ``i`` of output ``o``'s Hessian has a nonzero."""
        R = torch.zeros(self.m, self.n, dtype=torch.bool)
        R[self.H[0], self.H[1]] = True
        return R


def detect(f, x: Tensor, batched: bool, order: int, fname: str) -> Pattern:
    """The pattern of ``f`` at inputs shaped like ``x`` (cached with the derivative graphs of ``f``)."""
    from ._cache import Entry, _mode, _slot, _state, captured

    if batched and x.shape[0] > 1:
        captured(f, x, batched, fname)  # checks that rows do not interact, on the real batch
    one = x[:1] if batched else x
    slot = _slot(f)
    key = ("sparsity", tuple(x.shape[1:]) if batched else tuple(x.shape), x.dtype, x.device, batched, _mode(f),
           order)
    e = slot.get(key)
    if e is not None and e[1].fresh(f):
        return e[0]
    cap = captured(f, one, batched, fname)
    ins = tuple(one.shape[1:]) if batched else tuple(one.shape)
    n = numel(ins)
    out = tuple(cap.out_val.shape[1:]) if batched else tuple(cap.out_val.shape)
    m = numel(out)
    consts = [c.detach() for c in cap.constants]
    coarse: set = set()
    J = jacobian_pattern(cap.gm, consts, n, m, coarse)
    H = hessian_pattern(cap.gm, consts, n, m, J) if order == 2 else None
    pat = Pattern(m, n, J, H, tuple(sorted(coarse)))
    slot[key] = (pat, Entry(gm=None, constants=cap.constants, **_state(f, cap)))
    return pat


def sparsity(f, x: Tensor, *, order: int = 1, batched: bool = True) -> Tensor:
    """The per-sample sparsity pattern of the Jacobian (``order=1``) or of the Hessians (``order=2``) of ``f``.

    Detected on the traced graph, never from the values of parameters (docs/sparsity.md): conservative (every
    entry that can be nonzero for some input and some parameter values is in the pattern) and exact for
    pointwise maps, convolutions, per-token layers, gathers with constant indices. The union over the rows of
    ``x``, without the batch dimension.

    Args:
        f: as in :func:`torchderiv.jacobian`.
        x: an input ``[B, *in]`` (``[*in]`` with ``batched=False``); only its shape, dtype and device matter.
        order: 1 or 2.

    Returns:
        a coalesced sparse COO ``torch.bool`` tensor of shape ``(m, n)`` for order 1 or ``(m, n, n)`` (both
        triangles) for order 2, over the flattened per-sample output size ``m`` and input size ``n``.

    Example:
        >>> import torch, torchderiv
        >>> P = torchderiv.sparsity(torch.sin, torch.zeros(4, 3))
        >>> P.to_dense()
        tensor([[ True, False, False],
                [False,  True, False],
                [False, False,  True]])
    """
    from ._capture import TraceError

    fname = "sparsity"
    if not callable(f):
        raise TypeError(f"{fname}: f must be callable (an nn.Module or a function of one tensor), got {type(f)}")
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"{fname}: x must be a floating-point torch.Tensor (only its shape, dtype and device are "
                        f"used), got {type(x).__name__ if not isinstance(x, Tensor) else x.dtype}")
    if batched and x.dim() < 1:
        raise ValueError(f"{fname}: batched=True expects x of shape [B, *in]; pass batched=False for one point")
    if order not in (1, 2) or isinstance(order, bool):
        raise ValueError(f"{fname}: order must be 1 (Jacobian pattern) or 2 (Hessian pattern), got {order!r}")
    try:
        pat = detect(f, x, batched, order, fname)
    except TraceError as e:
        raise TraceError(f"{fname}: f could not be traced to a static graph ({e}); the pattern is read off the "
                         f"traced graph, so f must avoid data-dependent Python control flow") from e
    if order == 1:
        return pat.J.to_sparse().coalesce()
    return torch.sparse_coo_tensor(pat.H, torch.ones(pat.H.shape[1], dtype=torch.bool), (pat.m, pat.n, pat.n),
                                   is_coalesced=True, check_invariants=False)

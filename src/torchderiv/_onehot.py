"""Sparse one-hot input seeds: the first-order coefficient of the input when every direction is one input
coordinate (the ``"coordinates"`` estimator of :mod:`torchderiv._random`, which draws ``K`` coordinates per
sample).

Written out, such seeds are a dense ``[K, B, D]`` tensor, and the first linear layer multiplies it by its
weight: ``K B D h`` multiply-adds (and as many again for the weight gradient in training) to pick ``K B``
rows of the transposed weight. Here the seed stays an index tensor ``[K, B or 1]`` of flat input coordinates
with a factor per direction (:class:`OneHot`) for as long as the ops allow:

* ``addmm`` / ``mm`` with the seeded input on the left (``nn.Linear``) selects rows ``W^T[idx]``: ``K B h``
  work, the weight gradient an ``index_add``;
* ``mul`` / ``div`` by a constant number (an input scaling) scales the factor;
* ``x * x`` (the same seeded input twice) gives a one-hot first-order coefficient with factor ``2 x_i``; its
  second-order products ``e_i * e_j`` are written out as one scatter into the plan's rows (``[rows, B, D]``,
  one row for a collapsed Laplacian), with no ``K`` factor;
* ``sum`` over the coordinates gives the factors themselves (``[K, B, 1]``);
* any other consumer gets the dense seed (written out once per traced graph), as before: correct for every
  op, only not faster.

Only the batched 2-D input ``[B, D]`` is kept sparse; other layouts are written out at their first op.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from numbers import Number

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from ._jet import Ctx, Jet, _add

aten = torch.ops.aten


@dataclass(eq=False)
class OneHot:
    """Rows ``X[k, b] = val[k, b] * e_(idx[k, b])``, written out ``[K, B or 1, *in]`` (``shape``); ``val`` a
    number or a tensor broadcastable to ``idx``."""

    idx: Tensor  # int64 [K, B or 1] (batched) or [K]; flat coordinates of the per-sample input
    shape: tuple[int, ...]  # the written-out coefficient's shape: (*idx.shape, *in)
    val: float | Tensor = 1.0
    _dense: list = field(default_factory=list)  # memo: written out once per traced graph

    def dense(self, dtype: torch.dtype) -> Tensor:
        if not self._dense:
            n = 1
            for s in self.shape[self.idx.dim():]:
                n *= s
            X = torch.zeros((*self.idx.shape, n), dtype=dtype, device=self.idx.device)
            if isinstance(self.val, Tensor):
                X.scatter_(-1, self.idx.unsqueeze(-1), self.val.to(dtype).expand(self.idx.shape).unsqueeze(-1))
            else:
                X.scatter_(-1, self.idx.unsqueeze(-1), self.val)
            self._dense.append(X.reshape(self.shape))
        return self._dense[0]

    def values(self, like: Tensor) -> Tensor:
        """The factors as a tensor of ``idx``'s shape."""
        if isinstance(self.val, Tensor):
            return self.val.expand(self.idx.shape)
        return torch.full(self.idx.shape, self.val, dtype=like.dtype, device=like.device)


def _seeded(a) -> bool:
    return isinstance(a, Jet) and bool(a.c) and isinstance(a.c[0], OneHot)


def _matrix(a) -> bool:
    """A seeded jet kept sparse by the rules here: a ``[B, D]`` input, seeds ``[K, B or 1]``."""
    if not _seeded(a) or a.p.dim() != 2:
        return False
    oh = a.c[0]
    return oh.idx.dim() == 2 and oh.shape == (*oh.idx.shape, a.p.shape[1])


def involved(args, kwargs) -> bool:
    return any(_seeded(a) for a in pytree.tree_leaves((args, kwargs)))


def densify(args, kwargs):
    """The arguments with every one-hot seed written out (the dense layout every rule takes)."""

    def fix(a):
        if _seeded(a):
            return Jet(a.p, [a.c[0].dense(a.p.dtype), *a.c[1:]])
        return a

    return pytree.tree_map(fix, (args, kwargs))


def _number(s) -> bool:
    return isinstance(s, Number) and not isinstance(s, bool)


def sparse_rule(ctx: Ctx, target, args, kwargs) -> Jet | None:
    """The result of ``target`` keeping the seed sparse, or ``None`` when it must be written out."""
    if target in (aten.mul.Tensor, aten.div.Tensor) and len(args) == 2 and not kwargs:
        a, s = args
        if target is aten.mul.Tensor and a is s and _matrix(a) and all(c is None for c in a.c[1:]):
            return _square(ctx, a)
        if target is aten.mul.Tensor and not _seeded(a):
            s, a = a, s
        if _seeded(a) and _number(s):  # a linear map: every coefficient scaled
            oh = a.c[0]
            f = float(s) if target is aten.mul.Tensor else 1.0 / float(s)
            y = target(*(x.p if isinstance(x, Jet) else x for x in args))
            return Jet(y, [OneHot(oh.idx, oh.shape, oh.val * f), *(None if c is None else c * f for c in a.c[1:])])
        return None
    if target is aten.sum.dim_IntList and not kwargs and 2 <= len(args) <= 3 and _matrix(args[0]):
        return _sum(ctx, *args)
    if target is aten.mm.default and len(args) == 2 and not kwargs:
        bias, (a, w), beta, alpha = None, args, 1, 1
    elif target is aten.addmm.default and 3 <= len(args) <= 5 and not set(kwargs) - {"beta", "alpha"}:
        bias, a, w, *rest = args
        beta = kwargs.get("beta", rest[0] if len(rest) > 0 else 1)
        alpha = kwargs.get("alpha", rest[1] if len(rest) > 1 else 1)
        if isinstance(bias, Jet):
            return None
    else:
        return None
    if not (_matrix(a) and isinstance(w, Tensor) and w.dim() == 2 and all(c is None for c in a.c[1:])
            and _number(alpha)):
        return None
    oh = a.c[0]
    y = target(bias, a.p, w, beta=beta, alpha=alpha) if bias is not None else target(a.p, w)
    X = w.index_select(0, oh.idx.reshape(-1)).reshape(*oh.idx.shape, w.shape[1])  # [K, B or 1, h]
    if isinstance(oh.val, Tensor):
        X = X * (oh.val * float(alpha)).unsqueeze(-1)
    elif oh.val * float(alpha) != 1.0:
        X = X * (oh.val * float(alpha))
    return Jet(y, [X, *([None] * (len(a.c) - 1))])


def _square(ctx: Ctx, a: Jet) -> Jet:
    """``x * x`` for a seeded ``x`` (no higher coefficients): ``Y1 = 2 x X1`` (one-hot, factor ``2 x_i``);
    ``Y2`` gets the plan's products ``X1_k * X1_l`` (``e_i * e_j``: nonzero where ``i = j``), every higher
    order nothing (they need ``X2``, ``X3``, ... of the input, which are zero)."""
    p, oh = a.p, a.c[0]
    B, n = p.shape
    K = oh.idx.shape[0]
    idx = oh.idx.expand(K, B)
    val = oh.values(p).expand(K, B)
    xi = p.gather(1, idx.T).T  # [K, B]: x_b at coordinate idx[k, b]
    coefs: list = [OneHot(idx, (K, B, n), 2 * val * xi)]
    rows = torch.arange(B, device=p.device).unsqueeze(0) * n  # flat offset of sample b in [B * n]
    for op in ctx.plan.orders[1:]:
        Y = None
        for group in op.product:
            if group.orders != (1, 1):
                continue  # a factor of order >= 2: zero
            c = group.contraction
            i0, i1 = group.positions
            pos0, pos1 = ctx.index(i0, p.device), ctx.index(i1, p.device)
            t_idx = idx.index_select(0, pos0)  # [T, B]
            t_val = val.index_select(0, pos0) * val.index_select(0, pos1) * (t_idx == idx.index_select(0, pos1))
            if c.dense is not None:
                M = ctx.values(c.dense, p)  # [nrows, T]
            else:
                m = [[0.0] * len(i0) for _ in range(c.nrows)]
                for j, r in enumerate(c.rows):
                    m[r][j] = 1.0 if c.vals is None else c.vals[j]
                M = ctx.values(m, p)
            src = (M.unsqueeze(-1) * t_val.unsqueeze(0)).reshape(c.nrows, -1)  # [nrows, T * B]
            out = p.new_zeros((c.nrows, B * n)).index_add(1, (t_idx + rows).reshape(-1), src)
            Y = _add(Y, out.reshape(c.nrows, B, n))
        coefs.append(Y)
    return Jet(p * p, coefs)


def _sum(ctx: Ctx, a: Jet, dims, keepdim: bool = False) -> Jet | None:
    """``sum`` over the coordinates of a ``[B, D]`` seeded jet: the first-order rows are the factors; the
    higher orders (dense) go through the ordinary rule."""
    from ._rules import RULES

    if sorted(d % 2 for d in dims) != [1]:
        return None
    oh = a.c[0]
    y = aten.sum.dim_IntList(a.p, dims, keepdim)
    Y1 = oh.values(a.p).to(a.p.dtype)
    Y1 = Y1.unsqueeze(-1) if keepdim else Y1
    if all(c is None for c in a.c[1:]):
        return Jet(y, [Y1, *a.c[1:]])
    rest = RULES[aten.sum.dim_IntList](ctx, Jet(a.p, [None, *a.c[1:]]), dims, keepdim)
    return Jet(y, [Y1, *rest.c[1:]])

"""Jets: a primal tensor plus its Taylor coefficients, and the three ways they combine.

A :class:`Jet` holds the primal value ``p`` (shape ``S``) and, for every order ``k = 1..K`` of the
active :class:`~torchderiv._plan.Plan`, a tensor ``c[k-1]`` of shape ``[rows_k, *S]`` (or ``None`` for
an identically zero coefficient: constants, parameters, orders a linear layer cannot create).
Coefficient tensors may be *broadcast* (size 1) along dimensions where they do not vary: the one-hot
input seeds are the same for every sample, so until the first nonlinearity they keep a batch dimension
of size 1 and linear layers act on ``rows_k`` vectors instead of ``rows_k * B``.

Every propagation rule is built from three combinators:

* :func:`linear`: a linear map applied to every coefficient;
* :func:`compose`: an elementwise function ``g`` given its derivatives ``g', g'', ...``
  (multivariate Faa di Bruno);
* :func:`product`: a bilinear map of two jets (``mul``, ``matmul``; general Leibniz rule).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ._plan import Contraction, Plan, TermGroup

Coef = Tensor | None


@dataclass
class Jet:
    p: Tensor
    c: list[Coef]

    @property
    def shape(self) -> torch.Size:
        return self.p.shape


class Ctx:
    """What rules need while a graph is transformed: the plan, and tensor constants cached per trace."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.K = plan.order
        self._const: dict = {}

    def index(self, positions: Sequence[int], device) -> Tensor:
        key = ("i", tuple(positions), device)
        if key not in self._const:
            self._const[key] = torch.tensor(list(positions), dtype=torch.long, device=device)
        return self._const[key]

    def values(self, vals, like: Tensor) -> Tensor:
        key = ("v", tuple(map(tuple, vals)) if vals and isinstance(vals[0], list) else tuple(vals),
               like.dtype, like.device)
        if key not in self._const:
            self._const[key] = torch.tensor(vals, dtype=like.dtype, device=like.device)
        return self._const[key]

    def zeros(self, order: int, p: Tensor) -> Tensor:
        return p.new_zeros((self.plan.orders[order - 1].nrows, *p.shape))


# ----------------------------------------------------------------------------- tensor helpers


def align(X: Tensor, ndim: int) -> Tensor:
    """Left-pad the non-stream dims of a coefficient with size-1 dims up to ``ndim``."""
    missing = ndim - (X.dim() - 1)
    if missing <= 0:
        return X
    return X.reshape(X.shape[0], *([1] * missing), *X.shape[1:])


def full(X: Tensor, shape: Sequence[int]) -> Tensor:
    """Expand a (possibly broadcast) coefficient to the full primal shape (a view, no copy)."""
    X = align(X, len(shape))
    if tuple(X.shape[1:]) == tuple(shape):
        return X
    return X.expand(X.shape[0], *shape)


def lead(t, X: Tensor):
    """A primal-shaped factor ``t`` with size-1 dims prepended up to ``X.dim()`` (a view).

    Coefficients carry a leading row dim that a primal factor lacks; multiplying them as they are makes
    autograd reduce the factor's gradient over that dim with a ``sum`` kernel (a zero-filled output and a
    pass over the data) even where the dim has size 1, on every such product of a backward. Given the dim,
    the reduction runs only where there is something to add (several rows)."""
    if isinstance(t, Tensor) and t.dim() < X.dim():
        return t.reshape((1,) * (X.dim() - t.dim()) + tuple(t.shape))
    return t


def is_full(X: Tensor, shape: Sequence[int]) -> bool:
    return tuple(X.shape[1:]) == tuple(shape)


def gather(ctx: Ctx, X: Tensor, positions: list[int]) -> Tensor:
    if len(positions) == X.shape[0] and positions == list(range(X.shape[0])):
        return X
    if len(set(positions)) == 1:
        return X[positions[0] : positions[0] + 1].expand(len(positions), *X.shape[1:])
    return X.index_select(0, ctx.index(positions, X.device))


def contract(ctx: Ctx, c: Contraction, prod: Tensor) -> Tensor:
    """Map per-term products ``[nterms, ...]`` onto stored rows ``[nrows, ...]``."""
    if c.dense is not None:
        D = ctx.values(c.dense, prod)
        out = D @ prod.reshape(prod.shape[0], -1)
        return out.reshape(c.nrows, *prod.shape[1:])
    if not c.unit:
        prod = prod * ctx.values(c.vals, prod).reshape(-1, *([1] * (prod.dim() - 1)))
    if c.identity:
        return prod
    if c.nrows == 1:
        return prod.sum(0, keepdim=True)
    out = prod.new_zeros((c.nrows, *prod.shape[1:]))
    return out.index_add(0, ctx.index(c.rows, prod.device), prod)


def _add(a: Coef, b: Coef) -> Coef:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def _runs(first: list[int], second: list[int]) -> list[list[int]]:
    """Split pairs ``(first[j], second[j])`` into runs ``[a, b, n]``: ``first`` constant ``a`` while
    ``second`` counts up ``b, b+1, ..., b+n-1``."""
    runs: list[list[int]] = []
    for a, b in zip(first, second):
        if runs and runs[-1][0] == a and runs[-1][1] + runs[-1][2] == b:
            runs[-1][2] += 1
        else:
            runs.append([a, b, 1])
    return runs


_MAX_RUNS = 8


def _pair_products(ctx: Ctx, X: Tensor, first: list[int], second: list[int]) -> Tensor:
    """``X[first] * X[second]`` for pairs of rows of one coefficient tensor.

    Squares need no gather; pairs that come in a few runs (the upper triangle of a Hessian:
    ``(0,0), (0,1), (1,1)``) are products of row slices, views that autograd saves without copies, instead
    of two gathered copies of the coefficient."""
    if first == second:
        G = gather(ctx, X, first)
        return G * G
    runs = _runs(first, second)
    if len(runs) > _MAX_RUNS:
        return gather(ctx, X, first) * gather(ctx, X, second)
    blocks = [X[a : a + 1] * X[b : b + n] for a, b, n in runs]
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks)


def _accumulate(Y: Coef, S: Tensor, g) -> Tensor:
    """``Y + S * g`` as one op (``addcmul`` / ``add`` with ``alpha``); ``g`` is a tensor or a number."""
    if Y is None:
        return S * g
    if isinstance(g, Tensor):
        return torch.addcmul(Y, S, lead(g, S))
    return Y.add(S, alpha=g)


def _group_product(ctx: Ctx, group: TermGroup, coefs: Sequence[Sequence[Coef]], ndim: int,
                   bilinear: Callable | None = None) -> Tensor | None:
    Xs = [coefs[s][order - 1] for s, order in enumerate(group.orders)]
    if any(X is None for X in Xs):
        return None
    if bilinear is None and len(Xs) == 2 and Xs[0] is Xs[1]:
        prod = align(_pair_products(ctx, Xs[0], group.positions[0], group.positions[1]), ndim)
        return contract(ctx, group.contraction, prod)
    factors = [align(gather(ctx, X, group.positions[s]), ndim) for s, X in enumerate(Xs)]
    if bilinear is not None:
        prod = bilinear(factors[0], factors[1])
    else:
        prod = factors[0]
        for f in factors[1:]:
            prod = prod * f
    return contract(ctx, group.contraction, prod)


# ----------------------------------------------------------------------------- combinators


def constant(x) -> bool:
    return not isinstance(x, Jet)


def linear(ctx: Ctx, x: Jet, fp: Callable[[Tensor], Tensor], fc: Callable[[Tensor], Tensor]) -> Jet:
    """Apply a linear map: ``fp`` to the primal, ``fc`` to each coefficient (leading stream dim)."""
    return Jet(fp(x.p), [None if X is None else fc(X) for X in x.c])


def compose(ctx: Ctx, x: Jet, y: Tensor, derivs: Sequence, second: tuple | None = None) -> Jet:
    """Jet of ``y = g(x)`` for an elementwise ``g``; ``derivs[m-1]`` is ``g^(m)(x)``
    (a tensor, a Python number, or ``None`` for zero), for ``m = 1..K``.

    ``second`` (optional) writes ``g''`` with fewer ops for the order-2 coefficient
    ``Y2 = X2 g' + S g''``: ``("ratio", t, c)`` says ``g'' = c t g'`` (tanh: ``-2 y g'``), so that
    ``Y2 = (X2 + c S t) g'`` takes two ops and ``g''`` is never formed; ``("scaled", t, c)`` says
    ``g'' = c t`` (sin: ``-y``), folded into the ``addcmul``. Unused derivatives are removed from the
    generated graph by dead-code elimination."""
    out: list[Coef] = []
    nd = y.dim()
    for k, op in enumerate(ctx.plan.orders, start=1):
        g1 = derivs[0]
        Y = None
        Xk = x.c[k - 1]
        if k == 2 and second is not None and isinstance(g1, Tensor):
            S = None
            for group in op.compose.get(2, []):
                S = _add(S, _group_product(ctx, group, [x.c] * 2, nd))
            if S is not None:  # else no product term: the general formula below is X2 g' alone
                out.append(_second_order(Xk, S, g1, second))
                continue
        if Xk is not None and g1 is not None:
            Y = Xk * lead(g1, Xk)
        for m in range(2, k + 1):
            gm = derivs[m - 1]
            if gm is None or (isinstance(gm, (int, float)) and gm == 0):
                continue
            S = None
            for group in op.compose.get(m, []):
                S = _add(S, _group_product(ctx, group, [x.c] * m, nd))
            if S is not None:
                Y = _accumulate(Y, S, gm)
        out.append(Y)
    return Jet(y, out)


def _second_order(X2: Tensor | None, S: Tensor, g1: Tensor, second: tuple) -> Tensor:
    """``X2 g' + S g''`` from a ``second`` hint of :func:`compose` (``X2`` ``None``: zero, as after the first
    linear layer; the constant goes onto ``S``, which is broadcast over the batch there)."""
    kind, t, c = second
    if X2 is None:
        Y = (S * c) * lead(t, S)
        return Y * lead(g1, Y) if kind == "ratio" else Y
    if kind == "ratio":
        return torch.addcmul(X2, S, lead(t, S), value=c) * lead(g1, X2)
    return torch.addcmul(X2 * lead(g1, X2), S, lead(t, S), value=c)


def product(ctx: Ctx, a, b, bilinear: Callable[[Tensor, Tensor], Tensor], y: Tensor | None = None,
            elementwise: bool = True) -> Jet | Tensor:
    """Jet of ``bilinear(a, b)``; either operand may be a plain tensor (a constant).

    ``elementwise`` operands broadcast against each other (``mul``); otherwise (``mm``, ``bmm``)
    each coefficient keeps its operand's rank and the stream dim acts as an extra batch dim."""
    pa = a.p if isinstance(a, Jet) else a
    pb = b.p if isinstance(b, Jet) else b
    if y is None:
        y = bilinear(pa, pb)
    if constant(a) and constant(b):
        return y
    nd = y.dim()
    na, nb = (nd, nd) if elementwise else (pa.dim(), pb.dim())
    out: list[Coef] = []
    for k, op in enumerate(ctx.plan.orders, start=1):
        Y = None
        if isinstance(b, Jet) and b.c[k - 1] is not None:
            B = align(b.c[k - 1], nb)
            Y = bilinear(lead(pa, B) if elementwise else pa, B)
        if isinstance(a, Jet) and a.c[k - 1] is not None:
            A = align(a.c[k - 1], na)
            Y = _add(Y, bilinear(A, lead(pb, A) if elementwise else pb))
        if isinstance(a, Jet) and isinstance(b, Jet):
            for group in op.product:
                t = _group_product(
                    ctx, group, [a.c, b.c], 0,
                    bilinear=lambda u, v: bilinear(align(u, na), align(v, nb)),
                )
                Y = _add(Y, t)
        out.append(None if Y is None else align(Y, nd))
    return Jet(y, out)


def add(ctx: Ctx, a, b, y: Tensor, alpha=1) -> Jet | Tensor:
    """Jet of ``a + alpha * b`` (broadcasting)."""
    if constant(a) and constant(b):
        return y
    nd = y.dim()
    out: list[Coef] = []
    for k in range(ctx.K):
        A = align(a.c[k], nd) if isinstance(a, Jet) and a.c[k] is not None else None
        B = align(b.c[k], nd) if isinstance(b, Jet) and b.c[k] is not None else None
        if B is not None and alpha != 1:
            B = B * alpha
        out.append(_add(A, B))
    return Jet(y, out)


def scale(ctx: Ctx, x: Jet, s, y: Tensor) -> Jet:
    """Jet of ``x * s`` for a constant ``s`` (tensor or number)."""
    if isinstance(s, Tensor):
        return Jet(y, [None if X is None else _times(align(X, y.dim()), s) for X in x.c])
    return Jet(y, [None if X is None else X * s for X in x.c])


def _times(X: Tensor, s: Tensor) -> Tensor:
    return X * lead(s, X)


def as_jet(ctx: Ctx, x) -> Jet:
    return x if isinstance(x, Jet) else Jet(x, [None] * ctx.K)

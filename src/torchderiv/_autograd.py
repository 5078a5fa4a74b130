"""``method="autograd"``: per-sample partials by nested ``torch.autograd.grad``, as a careful person writes them.

For a batched ``f`` whose rows do not interact, the gradient of ``sum_b y[b, o]`` with respect to ``x`` is,
row by row, the gradient of ``y[b, o]`` with respect to ``x[b]``: one reverse pass gives every first partial
of output component ``o`` for the whole batch. One more reverse pass of a first partial gives a whole row of
second partials, and so on. This module computes the multi-indices (and weighted combinations of them) that
a request needs with as few reverse passes as it can find:

* every multi-index is reached from a shorter one (a *prefix*: one coordinate fewer) by one reverse pass;
  the prefixes are chosen greedily so that one pass serves as many requested entries as possible
  (``u_t, u_x, u_xx``: two passes; a Hessian in ``n`` inputs: ``1 + n``; a Laplacian: ``1 + D``);
* every pass's result is reused across the whole request (the caching idea of DeepXDE's ``dde.grad``,
  inside one call);
* the biharmonic ``sum_ij d_i^2 d_j^2`` is computed as the Laplacian of the Laplacian (``2 + 2 D`` passes);
* ``create_graph`` only where a later pass, or a later backward to the parameters (grad mode on and a
  parameter or ``x`` requiring grad), needs it.

``f`` runs as its traced ATen graph with normalization layers, ``prod`` and ``cumprod`` written out in
elementary operations: torch's own higher derivatives of ``native_layer_norm`` (third order) and of
``prod`` / ``cumprod`` (their backward divides by the input) are wrong or inexact, and this method never
returns those numbers. It cannot run inside ``torch.compile`` (aot_autograd does not support double
backward): a clear error says so.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor, fx

from ._cache import Entry, _mode, _slot, _state, captured, register_fast
from ._capture import TraceError
from ._compile import compiling
from ._reverse import _NORMS, _patch_for_autograd
from ._rules import copy_out_of_place

__all__ = ["autograd_taylor", "admissible", "autograd_available", "AutogradUnavailable", "MAX_UNROLL"]

MAX_UNROLL = 64  # longest prod / cumprod dimension written out as a chain of products


class AutogradUnavailable(ValueError):
    """``method="autograd"`` cannot give exact numbers for this ``f`` (or cannot run here)."""


# ----------------------------------------------------------------------------- the graph autograd runs


def _prod_chain(x: Tensor, dim: int, keepdim: bool = False, dtype=None) -> Tensor:
    if dtype is not None:
        x = x.to(dtype)
    if x.dim() == 0:
        return x.clone()
    dim = dim % x.dim()
    n = x.shape[dim]
    if n > MAX_UNROLL:
        raise AutogradUnavailable(
            f"torchderiv: method='autograd' writes prod/cumprod out as a chain of products (torch's own "
            f"backward of prod divides by the input and is inexact), but f takes a product over {n} > "
            f"{MAX_UNROLL} entries; use method='forward'"
        )
    parts = x.unbind(dim)
    if not parts:
        r = torch.ones(x.shape[:dim] + x.shape[dim + 1 :], dtype=x.dtype, device=x.device)
    else:
        r = parts[0]
        for p in parts[1:]:
            r = r * p
    return r.unsqueeze(dim) if keepdim else r


def _prod(x: Tensor, dtype=None) -> Tensor:
    return _prod_chain(x.reshape(-1), 0, False, dtype)


def _cumprod(x: Tensor, dim: int, dtype=None) -> Tensor:
    if dtype is not None:
        x = x.to(dtype)
    if x.dim() == 0:
        return x.clone()
    dim = dim % x.dim()
    if x.shape[dim] > MAX_UNROLL:
        _prod_chain(x, dim)  # raises the error
    parts = x.unbind(dim)
    if not parts:
        return x.clone()
    acc = [parts[0]]
    for p in parts[1:]:
        acc.append(acc[-1] * p)
    return torch.stack(acc, dim)


@functools.lru_cache(maxsize=1)
def _table() -> dict:
    from torch._decomp import get_decompositions

    aten = torch.ops.aten
    ops = []
    for name in _NORMS:
        packet, overload = name.split(".")
        op = getattr(getattr(aten, packet, None), overload, None)
        if op is not None:
            ops.append(op)
    table = get_decompositions(ops)
    table[aten.copy.default] = copy_out_of_place  # functional copy has no autograd formula
    table[aten.prod.default] = _prod
    table[aten.prod.dim_int] = _prod_chain
    table[aten.cumprod.default] = _cumprod
    return table


# ops whose higher derivatives torch computes wrongly or inexactly and that the written-out graph must not
# contain any more (a check that the decompositions above took effect)
_SUSPECT = ("native_layer_norm", "prod", "cumprod", "native_batch_norm", "_native_batch_norm_legit",
            "_native_batch_norm_legit_no_training", "native_group_norm")


def _suspect_ops(gm: fx.GraphModule) -> list[str]:
    bad = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload):
            if n.target._schema.name.split("::")[-1] in _SUSPECT:
                bad.append(str(n.target))
    return bad


def autograd_function(f, x: Tensor, batched: bool, fname: str) -> Entry:
    """``f``'s traced graph with layer norms, batch norms, prod and cumprod written out in elementary ops
    (exact nested autograd), reading the live parameters; cached like the other graphs."""
    slot = _slot(f)
    key = ("autograd", tuple(x.shape), x.dtype, x.device, batched, _mode(f))
    e = slot.get(key)
    if e is not None and e.fresh(f):
        if e.error is not None:
            raise type(e.error)(*e.error.args)
        return e
    cap = captured(f, x, batched, fname)
    consts = cap.constants
    try:
        from torch.fx.experimental.proxy_tensor import make_fx

        with torch.inference_mode(False), torch.no_grad():
            fake_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            gm = make_fx(cap.gm, decomposition_table=_table(), tracing_mode="fake",
                         _allow_non_fake_inputs=True)(fake_x, *[c.detach() for c in consts])
        bad = _suspect_ops(gm)
        if bad:  # pragma: no cover - the decompositions cover every op listed in _SUSPECT
            raise AutogradUnavailable(
                f"{fname}: method='autograd' would differentiate {sorted(set(bad))} with torch's own nested "
                f"autograd, which is wrong or inexact for them; use method='forward'"
            )
        _patch_for_autograd(gm)
        e = Entry(gm=gm, constants=consts, **_state(f, cap))
    except AutogradUnavailable as err:
        e = Entry(gm=None, constants=consts, error=AutogradUnavailable(f"{fname}: {err}"), **_state(f, cap))
    slot[key] = e
    if e.error is not None:
        raise type(e.error)(*e.error.args)
    return e


def admissible(cap) -> bool:
    """Whether ``method="autograd"`` can give exact numbers for the captured graph ``cap`` here (for
    ``method="auto"``, which must never pick it otherwise): no ``torch.compile`` tracing the call and no
    ``prod`` / ``cumprod`` over more than :data:`MAX_UNROLL` entries (those are written out as products)."""
    if torch.compiler.is_compiling():
        return False
    for n in cap.gm.graph.nodes:
        if n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload):
            continue
        name = n.target._schema.name.split("::")[-1]
        if name not in ("prod", "cumprod"):
            continue
        src = n.args[0].meta.get("val") if isinstance(n.args[0], fx.Node) else None
        if not isinstance(src, Tensor):
            return False
        if len(n.args) > 1 and isinstance(n.args[1], int) and src.dim():
            size = src.shape[n.args[1] % src.dim()]
        else:
            size = src.numel()
        if size > MAX_UNROLL:
            return False
    return True


def autograd_available(f, x: Tensor, batched: bool, fname: str) -> bool:
    """Whether ``method="autograd"`` can run exactly for ``f`` at ``x`` here: ``f`` traces, its rows do not
    interact, nothing in its graph needs more than :data:`MAX_UNROLL` written-out products, and no
    ``torch.compile`` is tracing the call. For ``method="auto"`` (which must never pick it otherwise)."""
    if compiling():
        return False
    try:
        autograd_function(f, x, batched, fname)
    except (TraceError, AutogradUnavailable):
        return False
    return True


# ----------------------------------------------------------------------------- the reverse passes


def _prefixes(targets: set) -> dict:
    """For each order, the prefixes to differentiate: ``{prefix: [child multi-indices]}``, chosen greedily
    (the prefix that yields the most still-missing entries first). Includes the prefixes' own prefixes."""
    need = set(targets)
    plan: dict = {}
    k = max((len(a) for a in need), default=0)
    while k > 0:
        todo = {a for a in need if len(a) == k}
        chosen: dict = {}
        while todo:
            cover: dict = {}
            for a in todo:
                for i in set(a):
                    p = list(a)
                    p.remove(i)
                    cover.setdefault(tuple(p), set()).add(a)
            # prefer a prefix that is needed anyway (an entry of the request), then the largest cover
            best = max(sorted(cover), key=lambda p: (len(cover[p]) + (p in need), ))
            chosen[best] = sorted(cover[best])
            todo -= cover[best]
        plan.update(chosen)
        need |= set(chosen)
        k -= 1
    return plan


def _passes(Y, xx: Tensor, n: int, targets: set, V: Tensor | None, keep: bool) -> dict:
    """``{alpha: [columns]}`` for every multi-index in ``targets`` (and the prefixes on the way): the
    derivatives of the ``m`` output columns ``Y`` (a ``[B, m]`` tensor or a list of ``m`` columns; rows
    independent) w.r.t. ``xx``, one tensor per column (``[B]``, or ``[B, 1]`` when ``m == 1``). ``V``
    ``[n, R]``: directions (``alpha`` then indexes its columns), else coordinates. ``keep``: every result
    keeps its graph.

    Columns stay separate tensors: a pass differentiates one column, and had the columns been stacked, the
    pass would go back through the stack into every other column's graph with zero gradients (m times the
    work: the autograd method at half the hand loop's speed on a three-output net)."""
    plan = _prefixes(targets)
    if isinstance(Y, Tensor):
        m = Y.shape[1]
        Y = [Y[:, o] for o in range(m)] if m > 1 else [Y]
    m = len(Y)
    B = Y[0].shape[0]
    D: dict = {(): Y}
    for p in sorted(plan, key=lambda a: (len(a), a)):
        children = plan[p]
        graph = keep or any(c in plan for c in children)
        cols: list[list[Tensor]] = [[] for _ in children]
        for t in D[p]:
            g = None
            if t.requires_grad:
                g = torch.autograd.grad(t.sum(), xx, create_graph=graph, retain_graph=True,
                                        allow_unused=True)[0]
            if g is None:  # this entry does not depend on x: its derivatives are zero
                g = torch.zeros_like(xx)
            g = g.reshape(B, n)
            if V is not None:
                g = g @ V
            for c, child in enumerate(children):
                extra = list(child)
                for i in p:
                    extra.remove(i)
                j = extra[0]
                cols[c].append(g[:, j] if m > 1 else g[:, j : j + 1])
        for c, child in enumerate(children):
            D[child] = cols[c]
    return D


def _stacked(cols: list) -> Tensor:
    """``[B, m]`` from the columns of :func:`_passes`."""
    return torch.stack(cols, 1) if len(cols) > 1 else cols[0]


def _laplacian_dims(combo) -> list[int] | None:
    """The dims ``D`` if ``combo`` is ``sum_ij d_i^2 d_j^2`` over ``D`` (the biharmonic), else ``None``."""
    if not combo or any(len(a) != 4 for a, _ in combo):
        return None
    dims = sorted({i for a, _ in combo for i in a})
    want: dict = {}
    for i in dims:
        for j in dims:
            a = tuple(sorted((i, i, j, j)))
            want[a] = want.get(a, 0.0) + 1.0
    got: dict = {}
    for a, w in combo:
        a = tuple(sorted(a))
        got[a] = got.get(a, 0.0) + float(w)
    return dims if got == want else None


def _compute(fname, g, consts, x, items, combos, batched, directions):
    grad_on = torch.is_grad_enabled()
    need_graph = grad_on and (x.requires_grad or any(c.requires_grad for c in consts))
    with torch.enable_grad():
        xx = x if (need_graph and x.requires_grad) else x.detach().requires_grad_()
        y = g(xx)
        lead = y.shape[0] if batched else 1
        Y = y.reshape(lead, -1)
        n = xx.numel() // lead
        V = None
        if directions is not None:
            V = torch.zeros(n, len(directions), dtype=x.dtype, device=x.device)
            for r, d in enumerate(directions):
                for c, v in d:
                    V[c, r] = v
        targets = {a for a in items if a}
        nested = []
        for c in combos:
            dims = _laplacian_dims(c) if directions is None else None
            nested.append(dims)
            if dims is None:
                targets |= {a for a, _ in c}
        D = _passes(Y, xx, n, targets, V, need_graph) if targets else {(): [Y]}
        sums = []
        for c, dims in zip(combos, nested):
            if dims is None:
                sums.append(sum(w * _stacked(D[a]) for a, w in c))
                continue
            lap = [(d, d) for d in dims]  # the biharmonic: the Laplacian of the Laplacian
            L1 = _passes(Y, xx, n, set(lap), None, True)
            L = [sum(L1[a][o] for a in lap) for o in range(len(L1[lap[0]]))]  # per column
            L2 = _passes(L, xx, n, set(lap), None, need_graph)
            sums.append(sum(_stacked(L2[a]) for a in lap))
    shape = y.shape

    def out(t):
        t = t.reshape(shape)
        return t if need_graph else t.detach()

    parts = [out(y if not a else _stacked(D[a])) for a in items]
    return out(y), parts, [out(s) for s in sums]


_COMPILING = (
    "{fname}: method='autograd' nests torch.autograd.grad, which torch.compile cannot trace into one graph "
    "(aot_autograd does not support double backward); inside a compiled function use method='forward' "
    "(or method='auto', which never picks autograd there), or call this operator outside the compiled region"
)


def autograd_taylor(fname: str, f, x: Tensor, items: Sequence, combos: Sequence, batched: bool,
                    stacked: bool = True, assemble=None, fast_key=None, directions=None, reference_combos=None):
    """The contract of :func:`torchderiv._core.taylor` (``(y, parts, sums)``, or ``assemble`` of them),
    computed by nested reverse passes (see the module docstring). ``items`` are multi-indices of flattened
    input coordinates, ``combos`` weighted sums of them; with ``directions`` (sparse vectors
    ``((coord, value), ...)``) multi-indices index those directions instead."""
    if compiling():
        raise AutogradUnavailable(_COMPILING.format(fname=fname))
    assemble = assemble or (lambda *r: r)
    items = [tuple(sorted(a)) for a in items]
    combos = [[(tuple(sorted(a)), float(w)) for a, w in c] for c in combos]
    try:
        entry = autograd_function(f, x, batched, fname)
    except TraceError as e:  # untraceable f: per sample, by torch.func (as the forward method does)
        from ._fallback import traced_fallback

        y, parts, sums = traced_fallback(fname, f, x, items, reference_combos or combos, batched, e)
        if not stacked:
            parts = list(parts) if parts is not None else None
            sums = list(sums) if sums is not None else None
        return assemble(y, parts, sums)
    gm, consts = entry.gm, entry.constants

    def g(xx):
        return gm(xx.contiguous(), *consts)  # traced at contiguous strides

    def run(x):
        if compiling():
            raise AutogradUnavailable(_COMPILING.format(fname=fname))
        y, parts, sums = _compute(fname, g, consts, x, items, combos, batched, directions)
        parts = (torch.stack(parts) if stacked else parts) if items else None
        sums = (torch.stack(sums) if stacked else sums) if combos else None
        return y, parts, sums

    res = run(x)
    if fast_key is not None:
        register_fast(f, fast_key, lambda x: assemble(*run(x)), entry)
    return assemble(*res)

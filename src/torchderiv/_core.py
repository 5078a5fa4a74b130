"""Shared machinery of the public functions: validation, requests, chunking, the torch.func paths."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import lru_cache

import torch
from torch import Tensor

from ._capture import TraceError
from ._engine import _check_traced_output, derivative_graph, output_shape, register_fast
from ._jet import full
from ._plan import MultiIndex, Plan
from ._warnings import warn_fallback

METHODS = ("auto", "forward", "reverse")
Combo = list[tuple[MultiIndex, float]]


# ----------------------------------------------------------------------------- validation


def validate(fname: str, f, x, batched: bool, method: str, chunk_size) -> None:
    if not callable(f):
        raise TypeError(f"{fname}: f must be callable (an nn.Module or a function of one tensor), got {type(f)}")
    if not isinstance(x, Tensor):
        raise TypeError(f"{fname}: x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{fname}: x must be a floating-point tensor to be differentiated, got dtype {x.dtype}; "
            f"convert it first, e.g. x.float() or x.double()"
        )
    if batched and x.dim() < 1:
        raise ValueError(
            f"{fname}: batched=True expects x of shape [B, *in] with a leading batch dimension, got a 0-d "
            f"tensor; pass batched=False for a single point"
        )
    if method not in METHODS:
        raise ValueError(f"{fname}: method must be one of {METHODS}, got {method!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool)
                                   or chunk_size < 1):
        raise ValueError(f"{fname}: chunk_size must be None or a positive int, got {chunk_size!r}")


def in_shape(x: Tensor, batched: bool) -> tuple[int, ...]:
    return tuple(x.shape[1:]) if batched else tuple(x.shape)


def numel(shape) -> int:
    return math.prod(shape)


check_output = _check_traced_output


def _probe_output(fname: str, f, x: Tensor, batched: bool):
    with torch.no_grad():
        y = f(x)
    check_output(fname, y, x, batched)
    return y


def traceable(fname: str, f, x: Tensor, batched: bool) -> bool:
    """Trace ``f`` (cached) and check its output and, with ``batched``, that rows do not interact.

    Returns ``False`` when ``f`` cannot be traced; its output is then checked by running it once."""
    try:
        output_shape(f, x, batched, fname)
        return True
    except TraceError as err:
        _probe_output(fname, f, x, batched)
        warn_fallback("untraceable", f"{fname}: f could not be traced to a static graph ({err}); running "
                      f"torch.func on f itself (correct, slower). Avoid data-dependent Python control flow in f "
                      f"to get the fast path.", f)
        return False


def map_samples(g: Callable, x: Tensor) -> Tensor:
    """``vmap(g)(x)``, or a loop over the samples where vmap cannot run ``g`` (data-dependent control flow)."""
    try:
        return torch.func.vmap(g)(x)
    except Exception:  # noqa: BLE001 - any vmap failure: the loop is always correct
        return torch.stack([g(x[b]) for b in range(x.shape[0])])


# ----------------------------------------------------------------------------- forward Taylor path


@lru_cache(maxsize=256)
def _plan_for(items: tuple, combos: tuple, directions: tuple | None = None):
    """Remap input coordinates to direction indices and build the plan (cached: plans are pure).

    With ``directions`` (sparse direction vectors ``((coord, value), ...)``), multi-indices already
    index those directions and are kept as they are."""
    used = sorted({i for a in items for i in a} | {i for c in combos for a, _ in c for i in a})
    pos = {c: r for r, c in enumerate(used)}
    coords = used if directions is None else [directions[r] for r in used]
    ind = [tuple(sorted(pos[i] for i in a)) for a in items]
    cmb = [[(tuple(sorted(pos[i] for i in a)), w) for a, w in c] for c in combos]
    plan = Plan(len(coords), [a for a in ind if a], cmb)
    # where each requested item / combo lives in the graph outputs: (order, row)
    where_items = [(len(a), plan.position(a) if a else 0) for a in ind]
    where_combos = []
    for combo in cmb:
        k = len(combo[0][0])
        op = plan.orders[k - 1]
        where_combos.append((k, len(op.individual) + op.combos.index(combo)))
    # fast path: the items are exactly the stored rows of one order, in order
    whole = None
    orders = {k for k, _ in where_items}
    if len(orders) == 1 and 0 not in orders:
        k = orders.pop()
        if [r for _, r in where_items] == list(range(len(plan.orders[k - 1].individual))):
            whole = k
    return coords, plan, where_items, where_combos, whole


def taylor(fname: str, f: Callable, x: Tensor, items: Sequence[MultiIndex], combos: Sequence[Combo],
           batched: bool, chunk_size: int | None = None, stacked: bool = True, assemble=None, fast_key=None,
           directions=None, reference_combos=None):
    """Run the forward Taylor path.

    Returns ``(y, parts, sums)``: ``parts[i]`` is the partial derivative for ``items[i]`` (multi-indices
    of input coordinates; ``()`` is the value itself), ``sums[c]`` the collapsed combination ``combos[c]``.
    With ``stacked`` they are tensors ``[len, *y.shape]``, otherwise lists of ``y``-shaped tensors.

    ``directions`` replaces the one-hot coordinate directions by the given sparse vectors (univariate
    Taylor along chosen directions); ``reference_combos`` then gives the same combos in coordinates
    for the torch.func fallback.

    With ``assemble``, returns ``assemble(y, parts, sums)`` instead, and when the result came from one
    generated graph, registers that whole call path under ``fast_key`` so that later identical calls
    skip validation, planning and cache lookups (see :func:`fast_call`).
    """
    assemble = assemble or (lambda *r: r)
    items = tuple(tuple(sorted(a)) for a in items)
    combos = tuple(tuple((tuple(a), float(w)) for a, w in c) for c in combos)
    if chunk_size is not None and (len(items) > chunk_size or any(len(c) > chunk_size for c in combos)):
        return assemble(*_chunked(fname, f, x, items, combos, batched, chunk_size, stacked, directions,
                                  reference_combos))
    coords, plan, where_items, where_combos, whole = _plan_for(items, combos, directions)
    outputs = tuple(sorted({k for k, _ in where_items if k} | {k for k, _ in where_combos}))
    try:
        entry = derivative_graph(f, x, plan, coords, batched, fname, outputs)
    except TraceError as e:
        y, parts, sums = _traced_fallback(fname, f, x, items, reference_combos or combos, batched, e)
        if not stacked:
            parts = list(parts) if parts is not None else None
            sums = list(sums) if sums is not None else None
        return assemble(y, parts, sums)
    gm, consts = entry.gm, entry.constants

    def extract(x):
        out = gm(x.contiguous(), *consts)  # graphs are traced and cached at contiguous strides
        y = out[0]
        parts = None
        if items:
            if whole is not None and stacked:
                parts = full(out[whole], y.shape)
            else:
                parts = [y if k == 0 else _row(out[k], r, y) for k, r in where_items]
                if stacked:
                    parts = torch.stack(parts)
        sums = None
        if combos:
            sums = [_row(out[k], r, y) for k, r in where_combos]
            if stacked:
                sums = torch.stack(sums)
        return y, parts, sums

    res = extract(x)
    check_output(fname, res[0], x, batched)
    if fast_key is not None:
        register_fast(f, fast_key, lambda x: assemble(*extract(x)), entry)
    return assemble(*res)


def _row(X: Tensor, r: int, y: Tensor) -> Tensor:
    return full(X[r : r + 1], y.shape)[0]


def _chunked(fname, f, x, items, combos, batched, chunk_size, stacked, directions=None, reference_combos=None):
    y = None
    parts = []
    for s in range(0, len(items), chunk_size):
        y, p, _ = taylor(fname, f, x, items[s : s + chunk_size], [], batched, None, stacked=False)
        parts.extend(p)
    sums = []
    for combo in combos:
        acc = None
        for s in range(0, len(combo), chunk_size):
            y, _, c = taylor(fname, f, x, [], [combo[s : s + chunk_size]], batched, None, stacked=False,
                             directions=directions, reference_combos=reference_combos)
            acc = c[0] if acc is None else acc + c[0]
        sums.append(acc)
    if stacked:
        return y, torch.stack(parts) if parts else None, torch.stack(sums) if sums else None
    return y, parts or None, sums or None


# ----------------------------------------------------------------------------- torch.func paths


def per_sample(f: Callable, batched: bool) -> Callable:
    if not batched:
        return f
    return lambda xi: f(xi.unsqueeze(0)).squeeze(0)


def nested_jacrev(g: Callable, k: int) -> Callable:
    for _ in range(k):
        g = torch.func.jacrev(g)
    return g


def reference_partials(f: Callable, x: Tensor, items: Sequence[MultiIndex], combos: Sequence[Combo],
                       batched: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Partials by nested reverse mode (torch.func), per sample: slow, independent of the Taylor engine.

    Uses vmap over the batch; where vmap cannot run ``f`` (data-dependent control flow), loops."""
    g = per_sample(f, batched)
    orders = sorted({len(a) for a in items} | {len(a) for c in combos for a, _ in c})
    ins = in_shape(x, batched)
    n = numel(ins)

    def all_orders(xi):
        res = {0: g(xi)}
        for k in orders:
            if k:
                d = nested_jacrev(g, k)(xi)
                res[k] = d.reshape(*d.shape[: d.dim() - k * len(ins)], *([n] * k))
        return res

    if batched:
        try:
            res = torch.func.vmap(all_orders)(x)
        except Exception:  # noqa: BLE001 - vmap cannot run f: loop over samples instead
            per = [all_orders(x[b]) for b in range(x.shape[0])]
            res = {k: torch.stack([p[k] for p in per]) for k in per[0]}
    else:
        res = all_orders(x)
    y = res[0]
    off = 1 if batched else 0

    def pick(a):
        t = res[len(a)]
        if not a:
            return t
        idx = (slice(None),) * (t.dim() - len(a)) + tuple(a)
        return t[idx]

    parts = torch.stack([pick(a) for a in items]) if items else None
    sums = None
    if combos:
        sums = torch.stack([sum(w * pick(a) for a, w in c) for c in combos])
    del off
    return y, parts, sums


def _traced_fallback(fname, f, x, items, combos, batched, err):
    warn_fallback("untraceable", f"{fname}: f could not be traced to a static graph ({err}); falling back to "
                  f"torch.func (correct, much slower). Avoid data-dependent Python control flow in f to get the "
                  f"fast path.", f)
    y = _probe_output(fname, f, x, batched)
    del y
    return reference_partials(f, x, items, combos, batched)

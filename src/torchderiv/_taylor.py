"""The forward Taylor path: plan a request's coefficient streams, get the generated graph, run it, and read
the requested partials and collapsed sums out of its outputs."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
from torch import Tensor

from . import _cache
from ._cache import captured, check_output, derivative_graph, register_fast
from ._capture import TraceError
from ._fallback import Combo, traced_fallback
from ._jet import full
from ._plan import MultiIndex, Plan


@lru_cache(maxsize=256)
def plan_for(items: tuple, combos: tuple, directions: tuple | None = None):
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


def normalized(items, combos) -> tuple[tuple, tuple]:
    """``items`` and ``combos`` as the hashable, sorted tuples that :func:`plan_for` takes."""
    return (tuple(tuple(sorted(a)) for a in items),
            tuple(tuple((tuple(a), float(w)) for a, w in c) for c in combos))


def streams(items, combos, directions=None) -> Plan:
    """The plan (coefficient rows per order) that the forward path propagates for a request."""
    return plan_for(*normalized(items, combos), directions)[1]


def taylor(fname: str, f, x: Tensor, items: Sequence[MultiIndex], combos: Sequence[Combo], batched: bool,
           chunk_size: int | None = None, stacked: bool = True, assemble=None, fast_key=None, directions=None,
           reference_combos=None):
    """Run the forward Taylor path.

    Returns ``(y, parts, sums)``: ``parts[i]`` is the partial derivative for ``items[i]`` (multi-indices
    of input coordinates; ``()`` is the value itself), ``sums[c]`` the collapsed combination ``combos[c]``.
    With ``stacked`` they are tensors ``[len, *y.shape]``, otherwise lists of ``y``-shaped tensors.

    ``directions`` replaces the one-hot coordinate directions by the given sparse vectors (univariate
    Taylor along chosen directions); ``reference_combos`` then gives the same combos in coordinates
    for the torch.func fallback, which runs when ``f`` cannot be traced.

    With ``assemble``, returns ``assemble(y, parts, sums)`` instead, and when the result came from one
    generated graph, registers that whole call path under ``fast_key`` so that later identical calls
    skip validation, planning and cache lookups (see :func:`torchderiv._cache.fast_call`).
    """
    assemble = assemble or (lambda *r: r)
    items, combos = normalized(items, combos)
    try:
        captured(f, x, batched, fname)
    except TraceError as e:  # the whole request through torch.func, unchunked
        y, parts, sums = traced_fallback(fname, f, x, items, reference_combos or combos, batched, e,
                                         None if reference_combos else directions, chunk_size)
        if not stacked:
            parts = list(parts) if parts is not None else None
            sums = list(sums) if sums is not None else None
        return assemble(y, parts, sums)
    if chunk_size is not None and (len(items) > chunk_size or any(len(c) > chunk_size for c in combos)):
        return assemble(*_chunked(fname, f, x, items, combos, batched, chunk_size, stacked, directions))
    coords, plan, where_items, where_combos, whole = plan_for(items, combos, directions)
    outputs = tuple(sorted({k for k, _ in where_items if k} | {k for k, _ in where_combos}))
    entry = derivative_graph(f, x, plan, coords, batched, fname, outputs)
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
    elif _cache.RECORD is not None:  # the torch.compile path asks which graph serves this request
        _cache.RECORD.append(((fname,), lambda x: assemble(*extract(x)), entry))
    return assemble(*res)


def _row(X: Tensor, r: int, y: Tensor) -> Tensor:
    return full(X[r : r + 1], y.shape)[0]


def _chunked(fname, f, x, items, combos, batched, chunk_size, stacked, directions=None):
    """At most ``chunk_size`` streams at a time (``f`` is traceable here: the chunks never fall back)."""
    y = None
    parts = []
    for s in range(0, len(items), chunk_size):
        chunk, dirs = items[s : s + chunk_size], None
        if directions is not None:  # multi-indices over directions: renumber this chunk's directions
            used = sorted({d for a in chunk for d in a})
            pos = {d: r for r, d in enumerate(used)}
            chunk, dirs = [tuple(pos[d] for d in a) for a in chunk], tuple(directions[d] for d in used)
        y, p, _ = taylor(fname, f, x, chunk, [], batched, None, stacked=False, directions=dirs)
        parts.extend(p)
    sums = []
    for combo in combos:
        acc = None
        for s in range(0, len(combo), chunk_size):
            y, _, c = taylor(fname, f, x, [], [combo[s : s + chunk_size]], batched, None, stacked=False,
                             directions=directions)
            acc = c[0] if acc is None else acc + c[0]
        sums.append(acc)
    if stacked:
        return y, torch.stack(parts) if parts else None, torch.stack(sums) if sums else None
    return y, parts or None, sums or None

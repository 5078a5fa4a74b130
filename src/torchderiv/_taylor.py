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
        cap = captured(f, x, batched, fname)
    except TraceError as e:  # the whole request through torch.func, unchunked
        y, parts, sums = traced_fallback(fname, f, x, items, reference_combos or combos, batched, e,
                                         None if reference_combos else directions, chunk_size)
        if not stacked:
            parts = list(parts) if parts is not None else None
            sums = list(sums) if sums is not None else None
        return assemble(y, parts, sums)
    if chunk_size is not None and (len(items) > chunk_size or any(len(c) > chunk_size for c in combos)):
        return assemble(*_chunked(fname, f, x, items, combos, batched, chunk_size, stacked, directions))
    groups = direction_groups(items, combos) if _repeatable(cap) else None
    if groups is None:
        coords, plan, where_items, where_combos, whole = plan_for(items, combos, directions)
        outputs = tuple(sorted({k for k, _ in where_items if k} | {k for k, _ in where_combos}))
        entry = derivative_graph(f, x, plan, coords, batched, fname, outputs)
    else:
        entry, where_items, where_combos = _group_graph(f, x, items, combos, groups, batched, fname, directions)
        whole = None
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


# At most this many independent groups are propagated side by side (see :func:`direction_groups`).
MAX_GROUPS = 4


def direction_groups(items: tuple, combos: tuple) -> list[tuple[list[int], list[int]]] | None:
    """Split a request into groups of directions propagated in coefficient tensors of their own, or ``None``
    to keep it whole.

    Two directions are independent when no requested multi-index or combination holds both: then no Taylor
    coefficient of one ever mixes in the other. Independent parts that ask for the same things (``u_xx`` and
    ``u_yy``: each one first and one pure second order) share one stacked plan, where every row takes part in
    every product term; parts that ask for different things (``u_t`` and ``u_xx``: the square of the
    first-order row of ``x`` only) are propagated apart (:func:`torchderiv._build.build` with several
    plans). Stacked, such a request slices single rows out for its product terms (the backward of a slice
    zero-fills the whole stack) and broadcasts every elementwise factor over rows that need it at different
    orders. ``u, u_t, u_xx`` is thus two groups (``t``; ``x``), ``u_t, u_xx, u_yy, u_zz`` two (``t``;
    ``x, y, z``), a Laplacian, a Hessian or ``u_xx, u_yy`` one. At most :data:`MAX_GROUPS`.

    Returns, per group, the positions of its items and of its combinations (the value ``()`` belongs to no
    group: it is the graph's first output)."""
    parent: dict[int, int] = {}

    def find(i: int) -> int:
        while parent.setdefault(i, i) != i:
            i = parent[i]
        return i

    def link(coords) -> None:
        coords = list(coords)
        for c in coords[1:]:
            parent[find(c)] = find(coords[0])
        for c in coords:
            find(c)

    for a in items:
        link(a)
    for c in combos:
        link([i for a, _ in c for i in a])
    if len({find(i) for i in parent}) < 2:
        return None
    # each independent part's request with its own coordinates renumbered 0, 1, ...: parts alike share a group
    parts: dict[int, tuple[list[int], list[int]]] = {}
    for i, a in enumerate(items):
        if a:
            parts.setdefault(find(a[0]), ([], []))[0].append(i)
    for j, c in enumerate(combos):
        parts.setdefault(find(c[0][0][0]), ([], []))[1].append(j)
    buckets: dict[tuple, tuple[list[int], list[int]]] = {}
    for gi, gc in parts.values():
        used = sorted({i for k in gi for i in items[k]} | {i for k in gc for a, _ in combos[k] for i in a})
        pos = {c: r for r, c in enumerate(used)}
        sig = (tuple(sorted(tuple(pos[i] for i in items[k]) for k in gi)),
               tuple(sorted(tuple((tuple(pos[i] for i in a), w) for a, w in combos[k]) for k in gc)))
        b = buckets.setdefault(sig, ([], []))
        b[0].extend(gi)
        b[1].extend(gc)
    if not 2 <= len(buckets) <= MAX_GROUPS:
        return None
    return [(sorted(gi), sorted(gc)) for gi, gc in buckets.values()]


def _repeatable(cap) -> bool:
    """Whether ``f``'s captured graph may run once per group (each group interprets it anew): no op that
    writes in place (a buffer updated twice) or draws random numbers (different draws per group)."""
    return not any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
                   and (n.target._schema.is_mutable or torch.Tag.nondeterministic_seeded in n.target.tags)
                   for n in cap.gm.graph.nodes)


def _group_graph(f, x, items, combos, groups, batched, fname, directions):
    """The generated graph of a request split into ``groups``, and where each item and combination lives
    in its outputs: ``(output index, row)``, index 0 the value."""
    subs = [plan_for(tuple(items[i] for i in gi), tuple(combos[j] for j in gc), directions) for gi, gc in groups]
    plans = tuple(s[1] for s in subs)
    dirs = tuple(tuple(s[0]) for s in subs)
    outputs = tuple(tuple(sorted({k for k, _ in s[2] if k} | {k for k, _ in s[3]})) for s in subs)
    entry = derivative_graph(f, x, plans, dirs, batched, fname, outputs)
    where_items: list = [(0, 0)] * len(items)
    where_combos: list = [None] * len(combos)
    off = 0
    for (gi, gc), (_, plan, wi, wc, _) in zip(groups, subs):
        for i, (k, r) in zip(gi, wi):
            where_items[i] = (off + k, r)
        for j, (k, r) in zip(gc, wc):
            where_combos[j] = (off + k, r)
        off += plan.order
    return entry, where_items, where_combos


def _row(X: Tensor, r: int, y: Tensor) -> Tensor:
    if X.shape[0] == 1 and X.shape[1:] == y.shape:  # a view whose backward is a view (no zero-filled copy)
        return X.reshape(y.shape)
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

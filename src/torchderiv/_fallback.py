"""The torch.func path, for an ``f`` that cannot be traced to a static graph: slow, independent of the
Taylor engine."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ._cache import check_output
from ._plan import MultiIndex
from ._warnings import warn_fallback

Combo = list[tuple[MultiIndex, float]]


def probe_output(fname: str, f, x: Tensor, batched: bool):
    """Run ``f`` once (no graph) and check its output."""
    with torch.no_grad():
        y = f(x)
    check_output(fname, y, x, batched)
    return y


def map_samples(g: Callable, x: Tensor) -> Tensor:
    """``vmap(g)(x)``, or a loop over the samples where vmap cannot run ``g`` (data-dependent control flow)."""
    try:
        return torch.func.vmap(g)(x)
    except Exception:  # noqa: BLE001 - any vmap failure: the loop is always correct
        return torch.stack([g(x[b]) for b in range(x.shape[0])])


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
    ins = tuple(x.shape[1:]) if batched else tuple(x.shape)
    n = math.prod(ins)

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
    return y, parts, sums


def traced_fallback(fname, f, x, items, combos, batched, err):
    warn_fallback("untraceable", f"{fname}: f could not be traced to a static graph ({err}); falling back to "
                  f"torch.func (correct, much slower). Avoid data-dependent Python control flow in f to get the "
                  f"fast path.", f)
    y = probe_output(fname, f, x, batched)
    del y
    return reference_partials(f, x, items, combos, batched)

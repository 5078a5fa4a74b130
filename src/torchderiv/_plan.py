"""Which Taylor coefficients a request needs, and the index tables that propagate them.

A *multi-index* is a sorted tuple of direction indices: ``(0,)`` is d/dv0, ``(0, 1)`` is d2/dv0 dv1,
``(1, 1, 1)`` is d3/dv1^3. A request names

* ``individual`` partials, kept one stream each, and
* ``combos``: fixed linear combinations of same-order partials (the Laplacian is sum_i d2/dv_i^2),
  propagated *collapsed* as one stream (Forward Laplacian, Li et al. 2023; collapsed Taylor mode,
  Dangel et al., NeurIPS 2025). This works because the top-order coefficient enters every
  propagation rule linearly.

The plan stores, for every order ``k``, the downward-closed set ``M_k`` of individual multi-indices,
the collapsed combinations, and precomputed index tables for

* composition with an elementwise function (multivariate Faa di Bruno over set partitions), and
* products of two jets (general Leibniz rule over subsets),

with identical terms merged and counted. Everything here is plain Python run once per cache entry.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from functools import cache

MultiIndex = tuple[int, ...]


@cache
def set_partitions(k: int) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """All set partitions of ``range(k)`` (Bell(k) of them), each a tuple of blocks."""
    if k == 0:
        return ((),)
    out = []
    for part in set_partitions(k - 1):
        # put k-1 in its own block, or into one of the existing blocks
        out.append(part + ((k - 1,),))
        for i in range(len(part)):
            out.append(part[:i] + (part[i] + (k - 1,),) + part[i + 1 :])
    return tuple(out)


@cache
def proper_subsets(k: int) -> tuple[tuple[int, ...], ...]:
    """Subsets S of range(k) with 0 < |S| < k."""
    return tuple(
        tuple(i for i in range(k) if mask >> i & 1) for mask in range(1, (1 << k) - 1)
    )


def sub_index(alpha: MultiIndex, positions) -> MultiIndex:
    return tuple(sorted(alpha[p] for p in positions))


@dataclass
class Contraction:
    """How a list of per-term products maps onto the stored rows of one order.

    ``rows[j]`` is the row term ``j`` lands in and ``vals[j]`` its factor (count times combo weight).
    ``dense`` is used instead when one term feeds several rows.
    """

    nrows: int
    rows: list[int] | None = None
    vals: list[float] | None = None
    dense: list[list[float]] | None = None

    @property
    def identity(self) -> bool:
        return (
            self.rows is not None
            and len(self.rows) == self.nrows
            and self.rows == list(range(self.nrows))
        )

    @property
    def unit(self) -> bool:
        return self.vals is not None and all(v == 1.0 for v in self.vals)


@dataclass
class TermGroup:
    """Terms of one shape: ``positions[s][j]`` indexes the coefficient of order ``orders[s]``."""

    orders: tuple[int, ...]
    positions: list[list[int]]
    contraction: Contraction


@dataclass
class OrderPlan:
    order: int
    individual: list[MultiIndex]
    # collapsed combinations: each a list of (multi-index, weight)
    combos: list[list[tuple[MultiIndex, float]]]
    # targets = individual + the combo multi-indices not individual; terms are built per target
    targets: list[MultiIndex] = field(default_factory=list)
    # elementwise composition: number of blocks m -> groups
    compose: dict[int, list[TermGroup]] = field(default_factory=dict)
    # products: groups of (order of a, order of b)
    product: list[TermGroup] = field(default_factory=list)

    @property
    def nrows(self) -> int:
        return len(self.individual) + len(self.combos)


def _target_rows(op: OrderPlan) -> list[list[tuple[int, float]]]:
    """For every target, the (row, weight) pairs it contributes to."""
    rows: list[list[tuple[int, float]]] = [[] for _ in op.targets]
    pos = {a: i for i, a in enumerate(op.targets)}
    for i in range(len(op.individual)):
        rows[i].append((i, 1.0))
    for c, combo in enumerate(op.combos):
        for alpha, w in combo:
            rows[pos[alpha]].append((len(op.individual) + c, float(w)))
    return rows


def _make_contraction(nrows: int, terms: list[tuple[list[tuple[int, float]], float]]) -> Contraction:
    """terms: per term, its target's (row, weight) list and the term's count."""
    if all(len(tr) == 1 for tr, _ in terms):
        return Contraction(
            nrows=nrows,
            rows=[tr[0][0] for tr, _ in terms],
            vals=[tr[0][1] * cnt for tr, cnt in terms],
        )
    dense = [[0.0] * len(terms) for _ in range(nrows)]
    for j, (tr, cnt) in enumerate(terms):
        for r, w in tr:
            dense[r][j] += w * cnt
    return Contraction(nrows=nrows, dense=dense)


class Plan:
    """Static description of the coefficients to propagate (hashable via ``key``)."""

    def __init__(
        self,
        ndirs: int,
        individual: list[MultiIndex],
        combos: list[list[tuple[MultiIndex, float]]] | None = None,
    ):
        combos = combos or []
        self.ndirs = ndirs
        need: set[MultiIndex] = set()

        def close(alpha: MultiIndex, strict: bool) -> None:
            k = len(alpha)
            for r in range(1, k + (0 if strict else 1)):
                for S in _combinations(k, r):
                    need.add(sub_index(alpha, S))

        for a in individual:
            if len(a) == 0:
                continue
            close(tuple(sorted(a)), strict=False)
        for combo in combos:
            for a, _ in combo:
                close(tuple(sorted(a)), strict=True)
        orders = [len(a) for a in need] + [len(combo[0][0]) for combo in combos if combo]
        self.order = max(orders, default=0)
        self.orders: list[OrderPlan] = []
        for k in range(1, self.order + 1):
            ind = sorted(a for a in need if len(a) == k)
            cmb = [
                [(tuple(sorted(a)), w) for a, w in combo]
                for combo in combos
                if combo and len(combo[0][0]) == k
            ]
            op = OrderPlan(order=k, individual=ind, combos=cmb)
            extra = sorted({a for combo in cmb for a, _ in combo} - set(ind))
            op.targets = ind + extra
            self.orders.append(op)
        self._pos = [{a: i for i, a in enumerate(op.individual)} for op in self.orders]
        for op in self.orders:
            self._build_tables(op)
        self.key = (
            ndirs,
            tuple(tuple(op.individual) for op in self.orders),
            tuple(tuple(tuple(c) for c in op.combos) for op in self.orders),
        )

    def position(self, alpha: MultiIndex) -> int:
        return self._pos[len(alpha) - 1][alpha]

    def _build_tables(self, op: OrderPlan) -> None:
        k = op.order
        trows = _target_rows(op)
        # --- composition: y_alpha = sum_partitions g^(m) prod_blocks x_(alpha_B)
        groups: dict[tuple[int, ...], dict[tuple, float]] = defaultdict(lambda: defaultdict(float))
        for t, alpha in enumerate(op.targets):
            for part in set_partitions(k):
                if len(part) < 2:
                    continue
                subs = sorted((sub_index(alpha, B) for B in part), key=lambda s: (-len(s), s))
                key = tuple(len(s) for s in subs)
                groups[key][(t, tuple(self.position(s) for s in subs))] += 1.0
        for key in sorted(groups):
            entries = groups[key]
            terms = [(trows[t], cnt) for (t, _), cnt in entries.items()]
            positions = [[p[s] for (_, p) in entries] for s in range(len(key))]
            g = TermGroup(orders=key, positions=positions, contraction=_make_contraction(op.nrows, terms))
            op.compose.setdefault(len(key), []).append(g)
        # --- products: (ab)_alpha = sum_S a_(alpha_S) b_(alpha_S^c)
        pgroups: dict[tuple[int, int], dict[tuple, float]] = defaultdict(lambda: defaultdict(float))
        for t, alpha in enumerate(op.targets):
            for S in proper_subsets(k):
                Sc = tuple(i for i in range(k) if i not in S)
                a_s, b_s = sub_index(alpha, S), sub_index(alpha, Sc)
                pgroups[(len(a_s), len(b_s))][(t, self.position(a_s), self.position(b_s))] += 1.0
        for key in sorted(pgroups):
            entries = pgroups[key]
            terms = [(trows[t], cnt) for (t, _, _), cnt in entries.items()]
            positions = [[e[1] for e in entries], [e[2] for e in entries]]
            op.product.append(
                TermGroup(orders=key, positions=positions, contraction=_make_contraction(op.nrows, terms))
            )


def _combinations(k: int, r: int):
    from itertools import combinations

    return combinations(range(k), r)

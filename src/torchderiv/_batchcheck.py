"""Batch independence: row ``b`` of ``f(x)`` must depend on row ``b`` of ``x`` alone.

The check follows the batch dimension of input 0 through the captured graph. Every value is tagged with the
position of its batch dim, or ``None`` when it does not depend on the input; a view may fold the batch
together with other dims (attention heads, tokens), which is tracked as well. Each op is handled by a small
rule registered for its ATen ops, one family of ops at a time (views, slicing, reductions, matrix products,
linear algebra, spatial ops, normalization, ...); a rule reads the op's arguments by name, through torch.fx's
schema normalization, and answers where the batch lands or raises :class:`BatchMixingError`.

Ops declared elementwise (or constant) next to their Taylor rule in :mod:`torchderiv._rules` need no rule
here. An op with neither a rule nor such a declaration counts as mixing rows: the check is conservative, so
an op nobody taught it can never let a row-mixing graph through silently.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import fx
from torch.fx.operator_schemas import normalize_function

from ._rules import CONSTANT, ELEMENTWISE, kind_of

if TYPE_CHECKING:
    from ._capture import Captured

aten = torch.ops.aten


class BatchMixingError(ValueError):
    """``batched=True`` was asked for, but the traced graph lets rows of ``x`` interact."""


# ----------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Fold:
    """A rule's answer for a view: the batch lands in dim ``dim`` with ``inner`` entries between rows."""

    dim: int
    inner: int


@dataclass(frozen=True)
class PerOutput:
    """A rule's answer for an op with several outputs: one batch position (or ``None``) per output."""

    dims: list


@dataclass(frozen=True)
class _Entry:
    rule: Callable
    fold_aware: bool  # follows a batch dim folded with other dims (acts on other dims, or per index of that dim)


BATCH_RULES: dict = {}  # OpOverloadPacket -> _Entry


def batch_rule(*names: str, fold_aware: bool = False):
    """Decorator: the batch rule of the ATen ops ``names`` (every overload). ``fold_aware``: the op may see a
    batch dim folded with other dims (the rule still refuses any work along that dim). Names this torch does
    not have are skipped."""

    def deco(fn):
        for name in names:
            packet = getattr(aten, name, None)
            if packet is not None:
                BATCH_RULES[packet] = _Entry(fn, fold_aware)
        return fn

    return deco


def _entry(op) -> _Entry:
    """The rule for ``op``: its family's, else the one its declared kind implies, else the refusal."""
    packet = getattr(op, "overloadpacket", None)
    if packet in BATCH_RULES:
        return BATCH_RULES[packet]
    kind = kind_of(op) if isinstance(op, torch._ops.OpOverload) else None
    if kind == ELEMENTWISE:
        return _ELEMENTWISE
    if kind == CONSTANT:
        return _CONSTANT
    return _UNKNOWN


def _val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def _arguments(n: fx.Node) -> dict:
    """Every argument of the ATen call ``n`` by name (``self`` is ``input``), defaults filled in."""
    try:
        pair = normalize_function(n.target, n.args, n.kwargs, normalize_to_only_use_kwargs=True)
    except Exception:  # noqa: BLE001 - a schema torch.fx cannot bind: read the schema below
        pair = None
    if pair is not None:
        return dict(pair.kwargs)
    out: dict = {}
    schema = getattr(n.target, "_schema", None)
    for i, a in enumerate(schema.arguments if schema is not None else ()):
        name = "input" if a.name == "self" else a.name
        if i < len(n.args) and not a.kwarg_only:
            out[name] = n.args[i]
        elif a.name in n.kwargs:
            out[name] = n.kwargs[a.name]
        elif a.has_default_value():
            out[name] = a.default_value
    return out


# ----------------------------------------------------------------------------- one call


class Call:
    """One op of the graph as a rule sees it: its arguments by name and the batch positions of its inputs."""

    def __init__(self, walk: _Walk, n: fx.Node, ins: list, out):
        self.walk, self.node, self.ins, self.B = walk, n, ins, walk.B
        self.name = n.target.__name__.split(".")[0] if hasattr(n.target, "__name__") else str(n.target)
        self.out = out
        self.outs = list(out) if isinstance(out, (tuple, list)) else [out]
        self.o0 = next(o for o in self.outs if isinstance(o, torch.Tensor))
        self.a = _arguments(n) if isinstance(n.target, torch._ops.OpOverload) else {}
        values = list(self.a.values())
        self.x = values[0] if values else (n.args[0] if n.args else None)  # the first argument (self / input)

    def at(self, v):
        """Batch position of graph value ``v`` (``None``: does not depend on x, or not a graph value)."""
        return self.walk.where.get(v) if isinstance(v, fx.Node) else None

    def ndim(self, v) -> int:
        return _val(v).dim()

    def fail(self, why: str):
        self.walk.fail(self.node, why)

    def first_only(self) -> bool:
        """The batch is in the first argument and in no other (weights, statistics, a second operand)."""
        rest = list(self.a.values())[1:] if self.a else (self.node.args[1:], self.node.kwargs)
        return self.at(self.x) is not None and not any(self.at(a) is not None for a in _nodes_in(rest))

    def input_batch(self) -> int:
        """Batch position of the first argument, which must be the only one that carries the batch."""
        if not self.first_only():
            self.fail("the batch reaches this op through an argument other than its input")
        return self.at(self.x)

    def broadcast(self) -> int:
        """Broadcasting: the batch keeps its place counted from the right, the same in every input."""
        o0 = self.o0
        ps = {o0.dim() - (self.ndim(a) - self.at(a)) for a in self.ins}
        if len(ps) != 1:
            self.fail("inputs carry the batch in different dimensions")
        p = ps.pop()
        size = _val(self.ins[0]).shape[self.at(self.ins[0])]
        if o0.dim() == 0 or p < 0 or o0.shape[p] != size:
            self.fail("the batch dimension disappears")
        return p

    def keeps_batch(self, p: int) -> int:
        """``p``, after checking that dim ``p`` of the output still holds the whole batch."""
        if self.o0.shape[p] != self.B:
            self.fail("the batch dimension disappears")
        return p

    def dim_arg(self, name: str = "dim", default=0, ndim: int | None = None) -> int:
        """The dim argument ``name``, non-negative for a tensor of rank ``ndim`` (the first argument's)."""
        d = self.a.get(name, default)
        nd = self.ndim(self.x) if ndim is None else ndim
        return d % nd if nd else 0

    def dims_arg(self, name: str, ndim: int) -> list[int]:
        """A dim or list of dims; ``None`` or empty means every dim."""
        dims = self.a.get(name)
        if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
            return list(range(ndim))
        if isinstance(dims, int):
            dims = [dims]
        return [d % ndim for d in dims]


def _nodes_in(args) -> list:
    """The graph values inside nested (tuple, list, dict) arguments."""
    found: list = []
    fx.node.map_arg(args, found.append)
    return found


# ----------------------------------------------------------------------------- the walk


class _Walk:
    def __init__(self, gm: fx.GraphModule, fname: str):
        self.gm, self.fname = gm, fname
        self.nodes = list(gm.graph.nodes)
        x = next(n for n in self.nodes if n.op == "placeholder")
        self.B = _val(x).shape[0]
        self.where: dict = {x: 0}  # value -> position of its batch dim (None: does not depend on x)
        # the batch index b sits inside its dim as (o * B + b) * inner + i: views may fold it together with other
        # dims (attention heads as the fast factor, tokens as the slow one); absent means inner = 1
        self.inner: dict = {}
        self.folded: set = set()  # values whose batch dim holds more than the batch (inner or outer factors)
        self.per_output: dict = {}  # multi-output ops whose outputs carry the batch in different dims

    def fail(self, node, why):
        fname = self.fname
        raise BatchMixingError(
            f"{fname}: batched=True requires that rows of x do not interact, but the traced graph "
            f"mixes them at `{node.target}` ({why}). If f really couples the samples (BatchNorm in "
            f"training mode, x.mean(0), attention across the batch ...), call {fname}(..., batched=False) "
            f"on one sample at a time, or put the module in eval mode. The check is conservative: an op "
            f"whose effect on the batch dimension it cannot follow counts as mixing, so if rows of f are "
            f"independent this is a limitation (batched=False per sample still works; please report the op)."
        )

    def run(self) -> None:
        for n in self.nodes:
            if n.op != "call_function":
                continue
            ins = [a for a in n.all_input_nodes if self.where.get(a) is not None]
            if not ins:
                continue
            if n.target is operator.getitem:
                self._getitem(n)
                continue
            out = _val(n)
            outs = out if isinstance(out, (tuple, list)) else [out]
            if not any(isinstance(o, torch.Tensor) for o in outs):
                continue
            self._call(n, ins, out)
        self._check_output()

    def _call(self, n, ins, out) -> None:
        entry = _entry(n.target)
        folded = [a for a in ins if a in self.folded]
        i_in = 1
        if folded:
            if not entry.fold_aware:
                self.fail(n, "the batch dimension is folded together with another dimension here")
            layouts = {(self.inner.get(a, 1), _val(a).shape[self.where[a]]) for a in ins}
            if len(layouts) != 1:
                self.fail(n, "inputs fold the batch dimension differently")
            (i_in, _), = layouts
        c = Call(self, n, ins, out)
        result = entry.rule(c)
        if isinstance(result, Fold):  # a view: the rule says how the batch is folded afterwards
            self.where[n] = result.dim
            if result.inner != 1:
                self.inner[n] = result.inner
            if result.inner != 1 or c.o0.shape[result.dim] != self.B:
                self.folded.add(n)
            return
        if isinstance(result, PerOutput):
            if isinstance(out, (tuple, list)):
                self.per_output[n] = result.dims
                result = next((q for q in result.dims if q is not None), None)
            else:
                result = result.dims[0]
        self.where[n] = result
        if folded and result is not None:
            self.folded.add(n)
            if i_in != 1:
                self.inner[n] = i_in

    def _getitem(self, n) -> None:
        src, i = n.args
        v = _val(n)
        if src in self.per_output:
            self.where[n] = self.per_output[src][i]
        else:
            self.where[n] = self.where.get(src) if isinstance(v, torch.Tensor) and v.dim() > 0 else None
            p = self.where[n]
            if src not in self.folded and p is not None and (p >= v.dim() or v.shape[p] != self.B):
                self.fail(n, "an output of this op does not carry the batch where its rule says")
        if src in self.folded and self.where[n] is not None:
            if self.inner.get(src, 1) != 1:
                self.inner[n] = self.inner[src]
            self.folded.add(n)

    def _check_output(self) -> None:
        out = next(n for n in self.nodes if n.op == "output").args[0]
        if isinstance(out, fx.Node) and self.where.get(out) not in (None, 0):
            raise BatchMixingError(
                f"{self.fname}: batched=True requires f(x)[b] to depend on x[b] only, but f moves the batch "
                f"dimension of x to dimension {self.where[out]} of its output (a transpose or permute at the "
                f"end?). Return [B, *out] from f, or pass batched=False to treat x as one point."
            )


def check_batch_independence(cap: Captured, fname: str) -> None:
    """Follow the batch dimension of input 0 through the graph; raise :class:`BatchMixingError` on any op that
    mixes rows, or whose effect on the batch dimension no rule here knows."""
    _Walk(cap.gm, fname).run()


# ============================================================================= rules, one family at a time
# A rule gets a :class:`Call` and returns the batch position of the result (``None``: does not depend on x),
# a :class:`PerOutput` for ops with several outputs, or a :class:`Fold` for views; it raises through
# ``c.fail`` when rows would mix.


def _elementwise(c: Call):
    return c.broadcast()


def _constant(c: Call):
    return None  # shape and dtype taken from the input, values not


def _unknown(c: Call):
    c.fail("torchderiv does not know how this op treats the batch dimension")


_ELEMENTWISE = _Entry(_elementwise, fold_aware=True)
_CONSTANT = _Entry(_constant, fold_aware=False)
_UNKNOWN = _Entry(_unknown, fold_aware=False)


# ----------------------------------------------------------------------------- views and reshapes


@batch_rule("view", "_unsafe_view", "reshape", "flatten", fold_aware=True)
def _view(c: Call):
    """Row-major order is kept: the batch stays one run of ``B`` equal blocks, maybe folded with other dims."""
    p = c.at(c.x)
    where = _view_batch(_val(c.x).shape, c.o0.shape, p, c.walk.inner.get(c.x, 1), c.B)
    if where is None:
        c.fail("a view splits the batch dimension")
    return Fold(*where)


def _view_batch(ishape, oshape, p, inner_in, B):
    """Where the batch lands after a view (row-major order is kept): ``(dim, inner)`` or ``None`` when
    the ``B`` consecutive blocks of the batch would straddle two output dims."""
    stride = inner_in  # distance between rows b and b + 1 in the flattened tensor
    for s in ishape[p + 1 :]:
        stride *= s
    tail = 1
    for j in range(len(oshape) - 1, -1, -1):
        if stride % tail == 0 and (tail * oshape[j]) % (stride * B) == 0:
            return j, stride // tail
        tail *= oshape[j]
    return None


@batch_rule("expand", "clone", "alias", "contiguous", "_to_copy", "detach", "lift_fresh_copy", fold_aware=True)
def _same_values(c: Call):
    """The same values, maybe broadcast to more leading dims: the batch keeps its place from the right."""
    return c.o0.dim() - (c.ndim(c.x) - c.at(c.x))


@batch_rule("unsqueeze", fold_aware=True)
def _unsqueeze(c: Call):
    p = c.at(c.x)
    return p + 1 if c.dim_arg(ndim=c.o0.dim()) <= p else p


@batch_rule("squeeze", fold_aware=True)
def _squeeze(c: Call):
    iv, p = _val(c.x), c.at(c.x)
    # squeeze removes only dims of size 1, never the batch's (B > 1)
    removed = [d for d in range(iv.dim()) if iv.shape[d] == 1 and c.o0.dim() < iv.dim()]
    return p - sum(1 for d in removed[: iv.dim() - c.o0.dim()] if d < p)


@batch_rule("t", "transpose", "permute", fold_aware=True)
def _permute(c: Call):
    nd, p = c.ndim(c.x), c.at(c.x)
    if c.name == "t":
        perm = [1, 0] if nd == 2 else list(range(nd))
    elif c.name == "transpose":
        perm = list(range(nd))
        d0, d1 = c.dim_arg("dim0"), c.dim_arg("dim1")
        perm[d0], perm[d1] = perm[d1], perm[d0]
    else:
        perm = [d % nd for d in c.a["dims"]]
    return perm.index(p)


@batch_rule("constant_pad_nd", fold_aware=True)
def _pad(c: Call):
    p, nd, pads = c.at(c.x), c.ndim(c.x), c.a["pad"]
    if p in [nd - 1 - i // 2 for i in range(len(pads)) if pads[i] != 0]:
        c.fail("padding along the batch dimension")
    return p


@batch_rule("repeat")
def _repeat(c: Call):  # tiles; the batch survives when its dim is repeated once
    reps = list(c.a["repeats"])
    q = c.at(c.x) + len(reps) - c.ndim(c.x)
    if reps[q] != 1:
        c.fail("repeat tiles along the batch dimension")
    return q


@batch_rule("roll")
def _roll(c: Call):
    p, nd = c.at(c.x), c.ndim(c.x)
    dims = c.a.get("dims", [])
    dims = [dims] if isinstance(dims, int) else list(dims)
    if not dims or p in [d % nd for d in dims]:
        c.fail("roll moves data between rows")
    return p


@batch_rule("flip")
def _flip(c: Call):
    p = c.at(c.x)
    if p in c.dims_arg("dims", c.ndim(c.x)):
        c.fail("flipping the batch dimension")
    return p


@batch_rule("view_as_real", "view_as_complex")
def _complex_view(c: Call):  # adds / removes a trailing dim of 2
    p = c.at(c.x)
    if p >= c.o0.dim():
        c.fail("the batch dimension holds real and imaginary parts")
    return p


@batch_rule("diagonal", fold_aware=True)
def _diagonal(c: Call):  # diagonal(x, offset, dim1, dim2): the diagonal becomes the last dim
    p = c.at(c.x)
    d1, d2 = c.dim_arg("dim1"), c.dim_arg("dim2")
    if p in (d1, d2):
        c.fail("a diagonal across the batch dimension")
    return p - sum(1 for d in (d1, d2) if d < p)


@batch_rule("unfold")
def _unfold(c: Call):  # unfold(x, dim, size, step): windows along dim, as a new last dim
    p = c.at(c.x)
    if c.a["dimension"] % max(c.ndim(c.x), 1) == p:
        c.fail("sliding windows along the batch dimension")
    return p


@batch_rule("copy")
def _copy(c: Call):
    """copy(dst, src): the values of src, broadcast to dst's shape; dst gives the shape only."""
    src = c.a["src"]
    p = c.at(src)
    if p is None:
        return None
    q = c.o0.dim() - (c.ndim(src) - p)
    if q < 0 or c.o0.shape[q] != c.B:
        c.fail("copying broadcasts the batch dimension away")
    return q


# ----------------------------------------------------------------------------- slicing, concatenation


@batch_rule("slice", "select", "narrow", "split", "split_with_sizes", "unbind", "chunk", fold_aware=True)
def _slice(c: Call):
    p, d = c.at(c.x), c.dim_arg()
    if d == p:
        c.fail("slicing or indexing along the batch dimension")
    return p - 1 if c.name in ("select", "unbind") and d < p else p


@batch_rule("cat", "stack", fold_aware=True)
def _cat(c: Call):
    d = c.dim_arg(ndim=c.o0.dim())
    ps = set()
    for t in c.a["tensors"]:
        q = c.at(t)
        if q is not None:
            ps.add(q if c.name == "cat" or q < d else q + 1)
            if c.name == "cat" and c.ndim(t) != c.o0.dim():
                c.fail("concatenating tensors of different rank")
    if len(ps) != 1 or d in ps:
        c.fail(f"{c.name} along the batch dimension")
    return ps.pop()


# ----------------------------------------------------------------------------- reading and writing by index


@batch_rule("index_select", fold_aware=True)
def _index_select(c: Call):
    if c.at(c.a["index"]) is not None:  # a constant table read at indices computed from x
        return _table_lookup(c, c.x, c.a["index"], c.dim_arg(ndim=c.o0.dim()))
    return _slice(c)


@batch_rule("embedding", fold_aware=True)
def _embedding(c: Call):  # the output has the index's shape plus a trailing feature dim
    return _table_lookup(c, c.a["weight"], c.a["indices"], c.at(c.a["indices"]))


def _table_lookup(c: Call, table, idx, q: int) -> int:
    """A constant table (a hash or dense grid encoding) read at indices computed from x: output dim ``q`` holds
    the index's batch dim (maybe folded), whole."""
    if c.at(table) is not None:
        c.fail("a table that depends on x read at indices that depend on x")
    if c.o0.shape[q] != _val(idx).shape[c.at(idx)]:
        c.fail("the batch dimension disappears")
    return q


@batch_rule("index")
def _index(c: Call):
    idx = c.a["indices"]
    if c.at(c.x) is None:
        # a constant table read at indices computed from x (the decomposed grid_sample): row b of the
        # output reads only row b of the indices, which carry the batch at one place from the right
        given = [t for t in idx if t is not None]
        rs = {c.ndim(t) - c.at(t) for t in given if c.at(t) is not None}
        pos = [i for i, t in enumerate(idx) if t is not None]
        nb = max(c.ndim(t) for t in given)
        if len(rs) != 1:
            c.fail("index tensors carry the batch in different dimensions")
        first = pos[0] if pos == list(range(pos[0], pos[-1] + 1)) else 0
        return c.keeps_batch(first + nb - rs.pop())
    # x indexed with constant index tensors along other dims: the batch passes through
    p = c.at(c.x)
    ok = p < len(idx) and idx[p] is None and not any(c.at(i) is not None for i in idx if i is not None)
    if ok:
        pos = [i for i, t in enumerate(idx) if t is not None]
        ok = pos == list(range(pos[0], pos[-1] + 1)) and (p < pos[0] or p > pos[-1])
        if ok and p > pos[-1]:
            p = p - len(pos) + max(c.ndim(idx[i]) for i in pos)
    if not ok or c.o0.shape[p] != c.B:
        c.fail("indexing along the batch dimension")
    return p


@batch_rule("gather")
def _gather(c: Call):  # gather(x, dim, index): out[i] = x[i with i_dim replaced by index[i]], shaped like index
    d = c.dim_arg(ndim=c.o0.dim())
    ps = {c.at(a) for a in c.ins}
    if c.at(c.x) is None:  # a constant table: entry i reads index[i] only, whatever dim is
        d = None
    if len(ps) != 1 or d in ps:
        c.fail("gathering along the batch dimension")
    return c.keeps_batch(ps.pop())


@batch_rule("scatter", "scatter_add", "scatter_reduce")
def _scatter(c: Call):
    # out[..., index[i], ...] = src[i] along dim, with every other index of i kept: self, index and src
    # have the rank of out, and a row of out only receives the same row of index and src
    d = c.dim_arg(ndim=c.o0.dim())
    ps = {c.at(a) for a in c.ins}
    if len(ps) != 1 or d in ps or any(c.ndim(a) != c.o0.dim() for a in c.ins):
        c.fail("scattering along the batch dimension")
    return c.keeps_batch(ps.pop())


@batch_rule("slice_scatter", "select_scatter")
def _slice_scatter(c: Call):
    d = c.dim_arg(ndim=c.o0.dim())
    p_in, p_src = c.at(c.x), c.at(c.a["src"])
    if p_src is not None and c.name == "select_scatter":
        p_src = p_src if p_src < d else p_src + 1
    ps = {p for p in (p_in, p_src) if p is not None}
    if len(ps) != 1 or d in ps:
        c.fail("writing into a slice along the batch dimension")
    return c.keeps_batch(ps.pop())


@batch_rule("index_put")
def _index_put(c: Call):
    """``index_put(inp, indices, values)`` with constant indices."""
    inp, indices, values = c.x, c.a["indices"], c.a["values"]
    if any(c.at(i) is not None for i in indices):
        c.fail("indices that depend on the input")
    iv = _val(inp)
    pos = [i for i, t in enumerate(indices) if t is not None]
    if not pos or pos != list(range(pos[0], pos[-1] + 1)):
        c.fail("non-adjacent advanced indices")
    idx_vals = [_val(indices[i]) for i in pos]
    if any(v.dtype == torch.bool for v in idx_vals):
        nd_idx = 1
        n_idx_dims = sum(v.dim() for v in idx_vals)
    else:
        nd_idx = max(v.dim() for v in idx_vals)
        n_idx_dims = len(pos)
    first, after = pos[0], pos[0] + n_idx_dims
    p_in = c.at(inp)
    if p_in is not None and first <= p_in < after:
        c.fail("indexing along the batch dimension")
    p_val = None
    if c.at(values) is not None:
        rank = iv.dim() - n_idx_dims + nd_idx  # rank of inp[indices], which values broadcast to
        q = rank - (c.ndim(values) - c.at(values))
        if q < first:
            p_val = q
        elif q >= first + nd_idx:
            p_val = q - nd_idx + n_idx_dims
        else:
            c.fail("values carry the batch along the indexed dimensions")
        if iv.shape[p_val] != c.B:
            c.fail("values broadcast along the batch dimension")
    ps = {p for p in (p_in, p_val) if p is not None}
    if len(ps) != 1:
        c.fail("inputs carry the batch in different dimensions")
    return ps.pop()


@batch_rule("masked_scatter", "channel_shuffle", "native_channel_shuffle", "put", "index_reduce", "take",
            "as_strided")
def _moves_between_rows(c: Call):
    """Ops that move values between positions without a dim argument saying where: always refused."""
    c.fail("this op moves values between positions, and so between rows")


# ----------------------------------------------------------------------------- reductions and scans


@batch_rule("prod", "var_mean", "argmax", "argmin", "max", "min", "norm", "linalg_vector_norm", "cumsum")
@batch_rule("sum", "mean", "amax", "amin", "var", "std", "logsumexp", "_softmax", "_log_softmax", "any", "all",
            fold_aware=True)
def _reduce(c: Call):
    """Along the dims in ``dim`` (every dim when it is absent or empty): never the batch's."""
    p, nd = c.at(c.x), c.ndim(c.x)
    dims = c.dims_arg("dim", nd)
    if p in dims:
        c.fail("a reduction over the batch dimension")
    return p if c.o0.dim() == nd else p - sum(1 for d in dims if d < p)


@batch_rule("sort", "argsort", "topk", "kthvalue", "median", "nanmedian", "mode", "cumprod", "cummax", "cummin",
            "logcumsumexp")
def _along_dim(c: Call):
    """Along one dim, independently for every index of the other dims; the output keeps the input's rank or
    drops that dim. Without a dim argument (``median(x)``), along every dim."""
    p, nd = c.at(c.x), c.ndim(c.x)
    d = c.dim_arg(default=-1) if "dim" in c.a else p
    if not c.first_only() or d == p:
        c.fail(f"{c.name} along the batch dimension")
    return p if c.o0.dim() == nd else p - (d < p)


# ----------------------------------------------------------------------------- matrix products, linear maps


@batch_rule("mm", "addmm", "bmm", "baddbmm", fold_aware=True)
def _matmul(c: Call):
    names = {"mm": ("input", "mat2"), "bmm": ("input", "mat2"), "addmm": ("mat1", "mat2"),
             "baddbmm": ("batch1", "batch2")}[c.name]
    lhs, rhs = c.a[names[0]], c.a[names[1]]
    pa, pb = c.at(lhs), c.at(rhs)
    nd = c.ndim(lhs)  # 2 for mm, 3 for bmm
    if nd == 3 and pa in (None, 0) and pb in (None, 0):
        q = 0  # batch of matrices along dim 0
    elif pb is None and pa == nd - 2:
        q = nd - 2  # batch along the rows of the left factor
    elif pa is None and pb == nd - 1:
        q = nd - 1  # batch along the columns of the right factor
    else:
        c.fail("a matrix product contracts over the batch")
    if c.name in ("addmm", "baddbmm") and c.at(c.x) is not None:
        if c.o0.dim() - (c.ndim(c.x) - c.at(c.x)) != q:
            c.fail("the added term carries the batch in another dimension")
    return q


@batch_rule("_trilinear")
def _trilinear(c: Call):  # nn.Bilinear: inputs unsqueezed at expand_k, multiplied, summed over sumdim
    ts = [c.a["i1"], c.a["i2"], c.a["i3"]]
    expands = [c.a["expand1"], c.a["expand2"], c.a["expand3"]]
    total = c.ndim(ts[0]) + len(expands[0])
    qs = set()
    for t, expand in zip(ts, expands):
        if c.at(t) is not None:
            new = {e % total for e in expand}
            qs.add([i for i in range(total) if i not in new][c.at(t)])
    sums = [d % total for d in c.a["sumdim"]]
    if len(qs) != 1 or qs & set(sums):
        c.fail("a multilinear form sums over the batch dimension")
    q = qs.pop()
    return c.keeps_batch(q - sum(1 for d in sums if d < q))


@batch_rule("_fft_r2c", "_fft_c2r", "_fft_c2c")
def _fft(c: Call):  # transforms along the dims listed in dim
    p = c.at(c.x)
    if p in {d % c.ndim(c.x) for d in c.a["dim"]}:
        c.fail("a Fourier transform along the batch dimension")
    return p


# ----------------------------------------------------------------------------- linear algebra


@batch_rule("_linalg_det", "linalg_det", "det", "_linalg_slogdet", "linalg_slogdet", "slogdet", "logdet",
            "linalg_inv_ex", "linalg_inv", "inverse", "linalg_matrix_exp", "matrix_exp", "linalg_cholesky_ex",
            "linalg_cholesky", "cholesky", "cholesky_inverse", "_linalg_eigh", "linalg_eigh", "_linalg_svd",
            "linalg_qr", "linalg_lu_factor_ex", "linalg_lu", "linalg_eig")
def _matrix_function(c: Call):
    """On the last two dims of one input; every output keeps the input's leading (batch) dims."""
    p = c.at(c.x)
    if not c.first_only() or p >= c.ndim(c.x) - 2:
        c.fail("the batch dimension is a matrix dimension here")
    for o in c.outs:
        if isinstance(o, torch.Tensor) and o.numel() and (o.dim() <= p or o.shape[p] != c.B):
            c.fail("the batch dimension disappears")
    return p


@batch_rule("_linalg_solve_ex", "linalg_solve_triangular", "cholesky_solve", "_cdist_forward", "_euclidean_dist")
def _matrix_pair(c: Call):
    """On the trailing (matrix) dims of two inputs whose leading dims broadcast as batch dims: solve, triangular
    solve, cdist. Counted from the matrix dims, the batch must sit at the same distance in every input that
    carries it."""
    a, b = list(c.a.values())[:2]
    va, vb = _val(a), _val(b)
    cores_in, cores_out = (2, 2), [2] * len(c.outs)
    if c.name == "_linalg_solve_ex":  # (result, LU, pivots, info); B is a stack of vectors or of matrices
        vector = vb.dim() == 1 or (vb.dim() == va.dim() - 1 and tuple(vb.shape) == tuple(va.shape[:-1]))
        cores_in, cores_out = (2, 1 if vector else 2), [1 if vector else 2, 2, 1, 0]
    rs = {c.ndim(t) - k - c.at(t) for t, k in zip((a, b), cores_in) if c.at(t) is not None}
    if len(rs) != 1 or min(rs) < 1:
        c.fail("the batch dimension is a matrix dimension here")
    r = rs.pop()
    dims = []
    for o, k in zip(c.outs, cores_out):
        q = o.dim() - k - r if isinstance(o, torch.Tensor) else -1
        if q < 0:  # no batch dims that far out: computed from an input without the batch (the LU of a constant A)
            dims.append(None)
            continue
        if o.shape[q] != c.B:
            c.fail("the batch dimension disappears")
        dims.append(q)
    return PerOutput(dims)


# ----------------------------------------------------------------------------- spatial: [N, C, *spatial]


@batch_rule("convolution", "avg_pool2d", "max_pool2d_with_indices", "avg_pool1d", "adaptive_avg_pool2d",
            "_adaptive_avg_pool2d", "avg_pool3d", "_adaptive_avg_pool3d")
def _per_sample(c: Call):
    """Each sample of dim 0 on its own, with weights that do not depend on x."""
    if not c.first_only():
        c.fail("the weights depend on the input")
    if c.at(c.x) != 0:
        c.fail("the batch dimension is not the leading one")
    return 0


_SPATIAL_DIMS = {"upsample_nearest1d": 1, "upsample_linear1d": 1, "_upsample_nearest_exact1d": 1,
                 "upsample_nearest2d": 2, "upsample_bilinear2d": 2, "upsample_bicubic2d": 2,
                 "_upsample_nearest_exact2d": 2, "_upsample_bilinear2d_aa": 2, "_upsample_bicubic2d_aa": 2,
                 "upsample_nearest3d": 3, "upsample_trilinear3d": 3, "_upsample_nearest_exact3d": 3}


@batch_rule(*_SPATIAL_DIMS)
def _resample(c: Call):
    """Each (sample, channel) slice on its own: the batch may be N or C, never a spatial dim."""
    p = c.at(c.x)
    if not c.first_only() or p >= c.ndim(c.x) - _SPATIAL_DIMS[c.name]:
        c.fail("the batch dimension is a spatial one")
    return p


@batch_rule("grid_sampler_2d", "grid_sampler_3d")
def _grid_sample(c: Call):
    # out[n, :, *loc] samples input[n] at grid[n, *loc]: the batch may sit in N (input and grid) or,
    # with a constant input (a feature plane of a neural field), in a location dim of the grid
    grid = c.a["grid"]
    pi, pg = c.at(c.x), c.at(grid)
    last = c.ndim(grid) - 1
    if (pi is not None and pi != 0) or pg == last or (pi is not None and pg not in (None, 0)):
        c.fail("sampling mixes the batch with channels, positions or coordinates")
    return c.keeps_batch(0 if pg in (None, 0) else pg + 1)


# ----------------------------------------------------------------------------- normalization


@batch_rule("native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
            "_native_batch_norm_legit_functional", "batch_norm", fold_aware=True)
def _batch_norm(c: Call):
    """[N, C, *]: training mode normalizes each channel over N and the rest, eval mode is elementwise."""
    if not c.first_only():
        c.fail("normalization parameters depend on the input")
    p = c.at(c.x)
    training = c.name != "_native_batch_norm_legit_no_training" and c.a.get("training", True)
    if training and p != 1:
        c.fail("batch normalization in training mode uses batch statistics")
    # then saved (training) and updated running statistics, one entry per channel
    return PerOutput([p] + [0 if training else None] * (len(c.outs) - 1))


@batch_rule("native_layer_norm", fold_aware=True)
def _layer_norm(c: Call):
    p = c.input_batch()  # weight and bias span the normalized dims: one that carries the batch mixes rows
    if p >= c.ndim(c.x) - len(c.a["normalized_shape"]):
        c.fail("layer_norm normalizes over the batch dimension")
    return p


@batch_rule("native_group_norm")
def _group_norm(c: Call):
    return _per_sample(c)

"""Build the derivative graph of a captured graph (the Taylor-mode code generator).

The transform interprets the captured ATen graph once with :class:`~torchderiv._jet.Jet` values,
applying the rule of every op, while ``make_fx`` records the tensor operations this performs. The
recorded graph is plain torch code computing ``(y, coefficients of order 1..K)``: no Python
interpreter, no rule lookups and no zero-tracking remain at run time. It takes the input and the
captured constants (parameters, buffers) as inputs, so an ordinary backward reaches the parameters.
"""

from __future__ import annotations

import contextlib
import operator

import torch
from torch import fx
from torch._guards import TracingContext, tracing
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils import _pytree as pytree

from . import _onehot
from ._capture import Captured
from ._jet import Ctx, Jet
from ._plan import Plan
from ._rules import RULES, Unsupported
from ._warnings import warn_fallback

# ----------------------------------------------------------------------------- fallback


class NoForwardDerivative(NotImplementedError):
    """The forward Taylor path cannot differentiate an op at the requested order (no Taylor rule, and the
    generic rule is order 1 only or PyTorch has no forward-mode formula): only reverse mode works."""


def _fallback(ctx: Ctx, op, args, kwargs):
    """Generic rule for ops without one: forward-mode AD of the op itself (order 1 only)."""
    name = str(op)
    if ctx.K > 1:
        raise NoForwardDerivative(
            f"torchderiv: no Taylor rule for `{name}` and its generic fallback supports order 1 only, "
            f"but this request needs order {ctx.K}. Use method='reverse' where the operator has it (jacobian, "
            f"hessian, laplacian, ...), or replace the op in f (or open an issue with this message)."
        )
    flat, spec = pytree.tree_flatten((args, kwargs))
    jet_pos = [i for i, a in enumerate(flat) if isinstance(a, Jet)]
    primals = [a.p if isinstance(a, Jet) else a for a in flat]

    def call(*jet_primals):
        vals = list(primals)
        for i, v in zip(jet_pos, jet_primals):
            vals[i] = v
        a, k = pytree.tree_unflatten(vals, spec)
        return op(*a, **k)

    jp = tuple(primals[i] for i in jet_pos)
    y = call(*jp)
    X = [flat[i].c[0] for i in jet_pos]
    if all(t is None for t in X):
        return y
    rows = next(t for t in X if t is not None).shape[0]
    tangents_rows = []
    for r in range(rows):
        tangents = tuple(
            (t[r].expand(p.shape) if t is not None else torch.zeros_like(p)) for t, p in zip(X, jp)
        )
        try:
            _, dy = torch.func.jvp(call, jp, tangents)
        except NotImplementedError as e:  # PyTorch has no forward-mode formula either (grid_sampler_3d ...)
            raise NoForwardDerivative(
                f"torchderiv: no Taylor rule for `{name}`, and PyTorch has no forward-mode derivative for it "
                f"({str(e).splitlines()[0]}). Use method='reverse' (jacobian, hessian), or replace the op in f."
            ) from e
        tangents_rows.append(dy)
    # warned once it worked (an op without a forward-mode formula raises NoForwardDerivative above instead)
    warn_fallback(("no rule", name), f"torchderiv: no rule for `{name}`; using the generic forward-mode fallback "
                  f"(slower).")

    def wrap(yi, rows_i):
        # integer outputs (indices of sort / topk / max) carry no derivative: plain tensors, not jets
        if not (isinstance(yi, torch.Tensor) and (yi.is_floating_point() or yi.is_complex())):
            return yi
        return Jet(yi, [torch.stack(rows_i)])

    if isinstance(y, torch.Tensor):
        return wrap(y, tangents_rows)
    return type(y)(wrap(yi, [t[i] for t in tangents_rows]) for i, yi in enumerate(y))


# ----------------------------------------------------------------------------- interpretation


def _functional(op):
    """The out-of-place twin of an in-place ATen op (``add_`` -> ``add``), else the op itself."""
    if not isinstance(op, torch._ops.OpOverload):
        return op
    name = op._schema.name.split("::")[-1]
    if not name.endswith("_") or name.startswith("_"):
        return op
    packet = getattr(torch.ops.aten, name[:-1], None)
    twin = getattr(packet, op._overloadname, None) if packet is not None else None
    return twin if twin is not None else op


def _no_rule(ctx: Ctx, op, args, kwargs):
    """Ops without a rule: constants when they produce no floating-point tensor, else the fallback."""
    primal = pytree.tree_map(lambda a: a.p if isinstance(a, Jet) else a, (args, kwargs))
    y = op(*primal[0], **primal[1])
    outs = [t for t in pytree.tree_leaves(y) if isinstance(t, torch.Tensor)]
    if not any(t.is_floating_point() or t.is_complex() for t in outs):
        return y  # comparisons, argmax, integer index math: no derivative flows
    return _fallback(ctx, op, args, kwargs)


def _interpret(ctx: Ctx, gm: fx.GraphModule, inputs: list):
    env: dict = {}
    it = iter(inputs)
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            env[n] = next(it)
        elif n.op == "call_function":
            args = pytree.tree_map(lambda a: env[a] if isinstance(a, fx.Node) else a, n.args)
            kwargs = pytree.tree_map(lambda a: env[a] if isinstance(a, fx.Node) else a, n.kwargs)
            if n.target is operator.getitem:
                env[n] = args[0][args[1]]
                continue
            has_jet = any(isinstance(a, Jet) for a in pytree.tree_leaves((args, kwargs)))
            if not has_jet:
                env[n] = n.target(*args, **kwargs)
                continue
            target = _functional(n.target)
            y = None
            if _onehot.involved(args, kwargs):  # sparse one-hot seeds: kept sparse where an op allows
                y = _onehot.sparse_rule(ctx, target, args, kwargs)
                if y is None:
                    args, kwargs = _onehot.densify(args, kwargs)
            if y is not None:
                env[n] = y
            else:
                r = RULES.get(target)
                try:
                    if r is None:
                        raise Unsupported("no rule")
                    env[n] = r(ctx, *args, **kwargs)
                except Unsupported:
                    env[n] = _no_rule(ctx, target, args, kwargs)
            if target is not n.target and isinstance(n.args[0], fx.Node):
                env[n.args[0]] = env[n]  # an in-place op: later readers of its input see the result
        elif n.op == "output":
            return pytree.tree_map(lambda a: env[a] if isinstance(a, fx.Node) else a, n.args[0])
        else:  # pragma: no cover - capture removes get_attr / call_module
            raise RuntimeError(f"torchderiv: unexpected node {n.op} {n.target}")


def seeds(plan_dirs: list, x: torch.Tensor, batched: bool) -> torch.Tensor:
    """Seeds ``[R, 1, *in]`` (batched) or ``[R, *in]``: one-hot for an int direction (an input coordinate),
    else the sparse vector ``((coord, value), ...)``."""
    in_shape = x.shape[1:] if batched else x.shape
    n = 1
    for s in in_shape:
        n *= s
    eye = torch.zeros(len(plan_dirs), n, dtype=x.dtype, device=x.device)
    for r, d in enumerate(plan_dirs):
        for c, v in ((d, 1.0),) if isinstance(d, int) else d:
            eye[r, c] = v
    return eye.reshape(len(plan_dirs), *([1] if batched else []), *in_shape)


def _one_meta_mode():
    """make_fx in real mode records each value's metadata (shape, strides) as a fake tensor; finding no ambient
    fake mode, it makes a new ``FakeTensorMode`` for every value it records (about 1 ms each, with a stack trace:
    half of a build's time). One mode for the whole trace, handed over through a tracing context (only where none
    is active: under torch.compile, dynamo's own context and mode stay)."""
    if TracingContext.try_get() is not None:
        return contextlib.nullcontext()
    return tracing(TracingContext(FakeTensorMode(allow_fallback_kernels=True)))


def build(cap: Captured, plan: Plan | tuple[Plan, ...], dirs: list, x: torch.Tensor, batched: bool,
          outputs: tuple | None = None, seed_shape: tuple[int, ...] | None = None,
          seed_index: bool = False) -> fx.GraphModule:
    """Generate the derivative graph: ``(x, *constants) -> (y, c_1, ..., c_K)``.

    ``outputs`` names the orders the caller reads; the others come back as ``None`` and the work that
    only they needed (the last layers' lower-order coefficients of a Laplacian) is removed from the graph.

    With ``seed_shape`` (``[R, B or 1, *in]``), the first-order seeds are not baked in as constants but
    are a graph input: ``(x, seeds, *constants)``; ``dirs`` is then unused (random directions drawn
    afresh on every call reuse one graph, see :mod:`torchderiv._random`). With ``seed_index`` as well, that
    input is an int64 tensor ``seed_shape`` (``[R, B or 1]``, or ``[R]`` unbatched) of flat input coordinates:
    one-hot seeds kept sparse (:mod:`torchderiv._onehot`)).

    With a tuple of plans (``dirs`` and ``outputs`` then tuples of one entry per plan; constant seeds only),
    the graph propagates independent groups of directions side by side, each in its own coefficient tensors:
    ``(x, *constants) -> (y, c_1 of the first plan, ..., c_K of the first plan, c_1 of the second, ...)``.
    Each group interprets ``f`` again, so ``f``'s graph must neither write in place nor draw random numbers
    (the caller checks: :func:`torchderiv._taylor._repeatable`); the repeated primal computation is one
    computation after :func:`merge_common`. See :func:`torchderiv._taylor.direction_groups` for when this
    pays."""
    # one entry per group of directions: (plan, dirs, outputs); one group unless a tuple of plans came
    if isinstance(plan, Plan):
        groups = [(plan, dirs, outputs)]
    else:
        groups = list(zip(plan, dirs, outputs or (None,) * len(plan)))

    def taylor(xx, *rest):
        if seed_shape is not None:
            s_in, consts = rest[0], rest[1:]
        else:
            s_in, consts = None, rest
        y, coefs = None, []
        for (plan_g, _, outs), s_g in zip(groups, seed_consts):
            s = s_g if s_in is None else s_in
            ctx = Ctx(plan_g)
            if seed_index:
                s = _onehot.OneHot(s, (*s.shape, *(xx.shape[1:] if batched else xx.shape)))
            res = _jet_coefs(ctx, _interpret(ctx, cap.gm, [Jet(xx, [s] + [None] * (plan_g.order - 1)), *consts]),
                             outs)
            y = res[0] if y is None else y  # every group computes the same value
            coefs += res[1:]
        return (y, *coefs)

    # tensors made while building (seeds, index and coefficient tables) are kept in the graph: never
    # inference tensors, which could not take part in a later call that autograd records
    with torch.inference_mode(False), torch.no_grad():
        # building runs the ops for real: buffers that f updates in place (spectral_norm's power iteration in
        # training mode) are written in copies, so that only the calls of the graph advance them
        written = {n.args[0] for n in cap.gm.graph.nodes
                   if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
                   and n.target._schema.is_mutable and n.args and isinstance(n.args[0], fx.Node)}
        holders = [n for n in cap.gm.graph.nodes if n.op == "placeholder"][1:]
        consts = [c.detach().clone() if n in written else c.detach() for n, c in zip(holders, cap.constants)]
        xb = x.detach().clone(memory_format=torch.contiguous_format)  # the strides run() gets; never inference
        seed_consts = [None if seed_shape is not None else seeds(d, x, batched) for _, d, _ in groups]
        sb = () if seed_shape is None else (torch.zeros(seed_shape, dtype=torch.long if seed_index else x.dtype,
                                                         device=x.device),)
        with _one_meta_mode():
            gm = make_fx(taylor)(xb, *sb, *consts)
    if len(groups) > 1:  # each group interpreted f anew: one primal computation
        merge_common(gm.graph)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _jet_coefs(ctx: Ctx, out, outputs: tuple[int, ...] | None) -> list:
    """The coefficients a generated graph returns for ``f``'s result ``out``: ``None`` for orders not read,
    explicit zeros for orders that stayed identically zero, dense tensors for sparse one-hot ones."""
    if not isinstance(out, Jet):
        out = Jet(out, [None] * ctx.plan.order)
    coefs = []
    for k, X in enumerate(out.c):
        if outputs is not None and k + 1 not in outputs:
            coefs.append(None)
            continue
        if X is None:
            X = ctx.zeros(k + 1, out.p)
        elif isinstance(X, _onehot.OneHot):  # f returned (a scaled copy of) its input
            X = X.dense(out.p.dtype)
        coefs.append(X)
    return [out.p, *coefs]


def _hashable(a):
    if isinstance(a, (list, tuple)):
        return tuple(_hashable(b) for b in a)
    if isinstance(a, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in a.items()))
    if isinstance(a, (fx.Node, int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout,
                      torch.memory_format)):
        return a
    raise TypeError  # a tensor or another object held in the graph: not compared


def merge_common(graph: fx.Graph) -> int:
    """Common-subexpression elimination: one node for every set of calls of the same pure ATen op on the same
    arguments (the primal computation that each group of :func:`build` repeats); returns how many went.
    Ops that mutate or draw random numbers are never merged."""
    seen: dict = {}
    merged = 0
    for n in list(graph.nodes):
        t = n.target
        if n.op != "call_function" or not isinstance(t, torch._ops.OpOverload) or t._schema.is_mutable \
                or torch.Tag.nondeterministic_seeded in t.tags:
            continue
        try:
            key = (t, _hashable(n.args), _hashable(n.kwargs))
        except TypeError:
            continue
        prev = seen.get(key)
        if prev is None:
            seen[key] = n
        else:
            n.replace_all_uses_with(prev)
            graph.erase_node(n)
            merged += 1
    return merged

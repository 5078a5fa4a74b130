"""Transform a captured graph into a derivative graph, cache it, run it.

The transform interprets the captured ATen graph once with :class:`~torchderiv._jet.Jet` values,
applying the rule of every op, while ``make_fx`` records the tensor operations this performs. The
recorded graph is plain torch code computing ``(y, coefficients of order 1..K)``: no Python
interpreter, no rule lookups and no zero-tracking remain at run time. It takes the input and the
captured constants (parameters, buffers) as inputs, so an ordinary backward reaches the parameters.
"""

from __future__ import annotations

import functools
import operator
import types
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils import _pytree as pytree

from ._capture import Captured, capture, check_batch_independence
from ._jet import Ctx, Jet
from ._plan import Plan
from ._rules import RULES, Unsupported, _select_scatter_op, _slice_scatter_op, copy_out_of_place
from ._warnings import about, warn_fallback

# ----------------------------------------------------------------------------- fallback


class NoForwardDerivative(NotImplementedError):
    """An op has no Taylor rule and PyTorch has no forward-mode formula for it: only reverse mode works."""


def _fallback(ctx: Ctx, op, args, kwargs):
    """Generic rule for ops without one: forward-mode AD of the op itself (order 1 only)."""
    name = str(op)
    if ctx.K > 1:
        raise NotImplementedError(
            f"torchderiv: no Taylor rule for `{name}` and its generic fallback supports order 1 only, "
            f"but this request needs order {ctx.K}. Replace the op in f (or open an issue with this message)."
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


def build(cap: Captured, plan: Plan, dirs: list[int], x: torch.Tensor, batched: bool,
          outputs: tuple[int, ...] | None = None) -> fx.GraphModule:
    """Generate the derivative graph: ``(x, *constants) -> (y, c_1, ..., c_K)``.

    ``outputs`` names the orders the caller reads; the others come back as ``None`` and the work that
    only they needed (the last layers' lower-order coefficients of a Laplacian) is removed from the graph."""

    def taylor(xx, *consts):
        ctx = Ctx(plan)
        xj = Jet(xx, [s] + [None] * (plan.order - 1))
        out = _interpret(ctx, cap.gm, [xj, *consts])
        if not isinstance(out, Jet):
            out = Jet(out, [None] * plan.order)
        coefs = []
        for k, X in enumerate(out.c):
            if outputs is not None and k + 1 not in outputs:
                coefs.append(None)
                continue
            if X is None:
                X = ctx.zeros(k + 1, out.p)
            coefs.append(X)
        return (out.p, *coefs)

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
        s = seeds(dirs, x, batched)
        gm = make_fx(taylor)(xb, *consts)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


# ----------------------------------------------------------------------------- cache


@dataclass
class Entry:
    gm: fx.GraphModule | None
    constants: list[torch.Tensor]
    # what the trace depended on besides x (see :func:`fingerprint`); the entry is reused only while
    # it is unchanged. Holding ``constants`` keeps their ids from being reused by new tensors.
    fp: tuple = ()
    error: NotImplementedError | None = None  # the build raised it: remembered, not retried every call
    # (tensor, its value when traced) for tensors the trace read as Python numbers (Captured.reads)
    reads: tuple = ()

    def fresh(self, f) -> bool:
        return self.fp == fingerprint(f) and all(torch.equal(t, v) for t, v in self.reads)  # equal: shapes too


def _state(f, cap: Captured) -> dict:
    """What an entry built from ``cap`` stays valid for: ``f``'s fingerprint and the values it read."""
    with torch.no_grad():
        reads = tuple((t, t.detach().clone()) for t in cap.reads)
    return {"fp": fingerprint(f), "reads": reads}


_SIMPLE = (int, float, bool, str, bytes, complex, type(None))


def _fp_value(v, out: list, depth: int) -> None:
    """Append what a trace may have read from ``v``: values of Python scalars, identities of tensors,
    functions and modules, and the state of modules, closures, ``functools.partial`` objects and plain
    objects (a callable class wrapping a net; recursively, ``depth`` levels)."""
    if isinstance(v, _SIMPLE):
        out.append(v)
    elif isinstance(v, torch.Tensor):
        out.append(id(v))
    elif isinstance(v, torch.nn.Module):
        _fp_module(v, out)
    elif isinstance(v, (tuple, list)) and len(v) <= 16:
        out.append(len(v))
        for a in v:
            _fp_value(a, out, depth)
    elif isinstance(v, dict) and len(v) <= 16:
        out.append(len(v))
        for k, a in v.items():
            out.append(k if isinstance(k, _SIMPLE) else id(k))
            _fp_value(a, out, depth)
    elif isinstance(v, functools.partial):
        out.append(id(v))
        _fp_value(v.func, out, depth)
        _fp_value(v.args, out, depth)
        _fp_value(v.keywords, out, depth)
    elif depth > 0 and (hasattr(v, "__code__") or hasattr(v, "__func__")):
        _fp_function(v, out, depth - 1)
    elif depth > 0 and _plain_object(v):
        out.append(id(v))
        _fp_globals(type(v), out)
        d = vars(v)
        out.append(len(d))
        for k, a in list(d.items())[:32]:
            out.append(k)
            _fp_value(a, out, depth - 1)
    else:
        out.append(id(type(v)))


def _plain_object(v) -> bool:
    """An instance of a user class with attributes (not a type, module, function or torch object)."""
    return hasattr(v, "__dict__") and not isinstance(v, (type, types.ModuleType)) and _user_class(type(v))


def _user_class(cls: type) -> bool:
    """Defined outside torch and the builtins (whose state and globals need no watching)."""
    return cls.__module__.split(".")[0] not in ("torch", "builtins")


def _fp_module(m: torch.nn.Module, out: list) -> None:
    # on every call of the fast path: kept to plain loops over the modules' dicts
    d = m.__dict__
    out.append(id(m))
    for k, v in d.items():
        if k not in _MODULE_INTERNALS:  # public and private attributes (self.w0, self._scale)
            out.append(k)
            if type(v) in _SIMPLE_TYPES:
                out.append(v)
            else:
                _fp_value(v, out, 0)
    out.extend(map(id, d["_parameters"].values()))
    out.extend(d["_parameters"])
    out.extend(map(id, d["_buffers"].values()))
    out.extend(d["_buffers"])
    for hk in _HOOKS:  # hooks change what the module computes (handles are unique ids)
        h = d.get(hk)
        if h:
            out.append(hk)
            out.extend(h)
    _fp_globals(type(m), out)
    for sub in d["_modules"].values():
        if sub is not None:
            _fp_module(sub, out)


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
# nn.Module's own bookkeeping: the parameter/buffer/submodule dicts are fingerprinted by identity above,
# the hook dicts by their handles; state-dict hooks do not change what forward computes
_MODULE_INTERNALS = frozenset(torch.nn.Module().__dict__) - {"training"}
_CLASS_GLOBALS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _fp_globals(cls: type, out: list) -> None:
    """The globals read by the methods of ``cls`` (``SCALE = 2.0`` rebound between calls)."""
    g = _CLASS_GLOBALS.get(cls)
    if g is None:
        g = _CLASS_GLOBALS[cls] = _class_globals(cls)
    for gd, names in g:
        for name in names:
            v = gd.get(name, _MISSING)
            if type(v) in _SIMPLE_TYPES:
                out.append(v)
            elif not isinstance(v, (type, types.ModuleType)):
                out.append(id(v))


def _class_globals(cls: type) -> list[tuple[dict, tuple[str, ...]]]:
    """For each function defined on ``cls`` or its bases outside torch: its globals dict and the names
    its code (nested functions included) reads from there. torch's own modules read nothing that changes."""
    res = []
    for k in cls.__mro__:
        if not _user_class(k):
            continue
        for fn in vars(k).values():
            fn = getattr(fn, "__func__", fn)  # static and class methods
            code = getattr(fn, "__code__", None)
            if code is None:
                continue
            names: list[str] = []
            stack = [code]
            while stack:
                c = stack.pop()
                names.extend(c.co_names)
                stack.extend(cc for cc in c.co_consts if isinstance(cc, types.CodeType))
            gd = fn.__globals__
            res.append((gd, tuple(n for n in dict.fromkeys(names) if n in gd)))
    return res


_SIMPLE_TYPES = frozenset(_SIMPLE)


def _fp_function(f, out: list, depth: int) -> None:
    if hasattr(f, "__func__"):  # bound method: its instance and its function
        _fp_value(f.__self__, out, depth)
        f = f.__func__
    out.append(id(f))
    code = getattr(f, "__code__", None)
    if code is None:
        return
    for c in f.__closure__ or ():
        try:
            _fp_value(c.cell_contents, out, depth)
        except ValueError:  # an empty cell
            out.append(None)
    for d in f.__defaults__ or ():
        _fp_value(d, out, depth)
    g = f.__globals__
    for name in code.co_names:
        v = g.get(name, _MISSING)
        if v is not _MISSING and not isinstance(v, (type, types.ModuleType)):
            _fp_value(v, out, depth)


_MISSING = object()


def fingerprint(f) -> tuple:
    """The state a trace of ``f`` depends on besides its input: for a module, the identity of every
    submodule, parameter and buffer, training flags, plain Python attributes (``self.w0 = 3.0``, private
    ones too), forward/backward hooks, and the globals read by the methods of classes defined outside
    torch; for a function, its closure variables, defaults and the globals it names (rebinding ``W = ...``).
    In-place updates of tensors (optimizer steps, ``load_state_dict``) keep the identities: the
    generated graphs read the live tensors. Values of tensors that ``f`` read as Python numbers are
    checked separately (``Entry.reads``)."""
    out: list = []
    if isinstance(f, torch.nn.Module):
        _fp_module(f, out)
    elif hasattr(f, "__code__") or hasattr(f, "__func__"):
        _fp_function(f, out, 2)
    else:  # functools.partial, an instance of a callable class
        _fp_value(f, out, 2)
    return tuple(out)


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_STRONG_FALLBACK: OrderedDict = OrderedDict()  # for callables that cannot be weak-referenced
_PER_F = 32


def _owner(f):
    """Object whose lifetime bounds the cache entries of ``f`` (a bound method's instance and function)."""
    if hasattr(f, "__self__") and hasattr(f, "__func__"):
        return f.__self__, f.__func__
    return f, None


def _slot(f) -> OrderedDict:
    owner, func = _owner(f)
    try:
        d = _CACHE.get(owner)
        if d is None:
            d = _CACHE[owner] = {}
    except TypeError:
        d = _STRONG_FALLBACK
        func = id(owner)
    return d.setdefault(func, OrderedDict())


def cache_info() -> dict:
    """Number of live cache owners and entries (for tests and debugging)."""
    owners = len(_CACHE)
    entries = sum(len(od) for d in _CACHE.values() for od in d.values())
    return {"owners": owners, "entries": entries}


def clear_cache() -> None:
    """Drop every cached derivative graph."""
    _CACHE.clear()
    _FAST.clear()
    _STRONG_FALLBACK.clear()


def _mode(f):
    return f.training if isinstance(f, torch.nn.Module) else None


def captured(f: Callable, x: torch.Tensor, batched: bool, fname: str) -> Captured:
    """The captured graph of ``f`` at inputs shaped like ``x`` (cached; batch independence checked once)."""
    slot = _slot(f)
    key = ("capture", tuple(x.shape), x.dtype, x.device, batched, _mode(f))
    e = slot.get(key)
    if e is not None and e[1].fresh(f):
        return e[0]
    cap = capture(f, x)
    out = next(n for n in cap.gm.graph.nodes if n.op == "output").args[0]
    cap.out_val = pytree.tree_map(lambda a: a.meta.get("val") if isinstance(a, fx.Node) else a, out)
    if not isinstance(cap.out_val, torch.Tensor):
        _check_traced_output(fname, cap.out_val, x, batched)
    if batched and x.shape[0] > 1:  # a single row has nothing to mix with
        check_batch_independence(cap, fname)  # before the shape check: names the op that mixes rows
    _check_traced_output(fname, cap.out_val, x, batched)
    slot[key] = (cap, Entry(gm=None, constants=cap.constants, **_state(f, cap)))
    return cap


_NORMS = ("native_layer_norm.default", "native_batch_norm.default", "_native_batch_norm_legit.default",
          "_native_batch_norm_legit.no_stats", "_native_batch_norm_legit_no_training.default",
          "native_group_norm.default")


def reverse_function(f: Callable, x: torch.Tensor, batched: bool, fname: str) -> Callable:
    """``f`` as the torch.func (reverse) paths should run it: its traced graph with normalization layers
    written out in elementary ops (torch's own higher derivatives of ``native_layer_norm`` and
    ``native_batch_norm`` are wrong in some versions: parameter gradients of Hessians, third
    derivatives), reading the live parameters. Shape-specialized to ``x``; cached like the rest."""
    slot = _slot(f)
    key = ("reverse", tuple(x.shape), x.dtype, x.device, batched, _mode(f))
    e = slot.get(key)
    if e is None or not e.fresh(f):
        cap = captured(f, x, batched, fname)
        from torch._decomp import get_decompositions

        ops = []
        for name in _NORMS:
            packet, overload = name.split(".")
            op = getattr(getattr(torch.ops.aten, packet, None), overload, None)
            if op is not None:
                ops.append(op)
        consts = cap.constants
        with torch.inference_mode(False), torch.no_grad():
            fake_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            table = get_decompositions(ops)
            table[torch.ops.aten.copy.default] = copy_out_of_place  # functional copy has no autograd formula
            gm = make_fx(cap.gm, decomposition_table=table, tracing_mode="fake",
                         _allow_non_fake_inputs=True)(fake_x, *[c.detach() for c in consts])
        _patch_for_autograd(gm)
        e = Entry(gm=gm, constants=consts, **_state(f, cap))
        slot[key] = e
    gm, consts = e.gm, e.constants
    # the graph was traced at a contiguous x: its views assume those strides (channels_last, expanded or
    # transposed inputs would fail in `view` or in an in-place write)
    return lambda xx: gm(xx.contiguous(), *consts)


def _patch_for_autograd(gm: fx.GraphModule) -> None:
    """Work around two gaps of torch's reverse mode in the traced graph (both met in slice writes such as
    an FNO's ``Y[..., :modes] = ...`` or ``buf[:, 1:] = h``): autograd has no complex formula for
    slice_scatter / select_scatter, so complex ones run on real views, as the forward rules do; and the
    backward of a slice under vmap overflows on the open end ``2**63 - 1`` of ``x[1:]``, so slice bounds
    are clamped to the dim's size."""
    aten = torch.ops.aten
    swap = {aten.slice_scatter.default: _slice_scatter_op, aten.select_scatter.default: _select_scatter_op}
    bounds = {aten.slice.Tensor: 2, aten.slice_scatter.default: 3}  # position of start (end follows)
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target in bounds and isinstance(n.args[0], fx.Node):
            i = bounds[n.target]
            args = list(n.args)
            src = n.args[0].meta.get("val")
            dim = args[i - 1] if len(args) > i - 1 else 0
            if isinstance(src, torch.Tensor) and src.dim():
                size = src.shape[dim]
                for j in (i, i + 1):
                    if j < len(args) and isinstance(args[j], int) and args[j] > size:
                        args[j] = size
                n.args = tuple(args)
        val = n.meta.get("val")
        if n.target in swap and isinstance(val, torch.Tensor) and val.is_complex():
            n.target = swap[n.target]
    gm.recompile()


def _check_traced_output(fname: str, y, x: torch.Tensor, batched: bool) -> None:
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{fname}: f must return a single tensor, got {type(y).__name__}")
    if batched and (y.dim() == 0 or y.shape[0] != x.shape[0]):
        raise ValueError(
            f"{fname}: with batched=True, f(x) must keep the batch dimension: x has shape {tuple(x.shape)} "
            f"(B={x.shape[0]}) but f(x) has shape {tuple(y.shape)}. Return [B, *out] from f, or pass "
            f"batched=False to treat x as one point"
        )


def output_shape(f: Callable, x: torch.Tensor, batched: bool, fname: str):
    """Shape of ``f(x)`` from the traced graph (``f`` is not run)."""
    return tuple(captured(f, x, batched, fname).out_val.shape)


def derivative_graph(f: Callable, x: torch.Tensor, plan: Plan, dirs: list[int], batched: bool,
                     fname: str, outputs: tuple[int, ...] | None = None) -> Entry:
    slot = _slot(f)
    key = (tuple(x.shape), x.dtype, x.device, plan.key, tuple(dirs), batched, _mode(f), outputs)
    e = slot.get(key)
    if e is not None and e.fresh(f):
        slot.move_to_end(key)
    else:
        cap = captured(f, x, batched, fname)
        try:
            with about(f):  # a per-op fallback warning while building names this f
                gm = build(cap, plan, dirs, x, batched, outputs)
            e = Entry(gm=gm, constants=cap.constants, **_state(f, cap))
        except NotImplementedError as err:  # an op without a rule at this order (or without forward AD at all)
            # a fresh copy: the caught one's traceback would keep the failed trace's frames alive
            e = Entry(gm=None, constants=cap.constants, error=type(err)(*err.args), **_state(f, cap))
        slot[key] = e
        while len(slot) > _PER_F:
            slot.popitem(last=False)
    if e.error is not None:
        raise type(e.error)(*e.error.args)
    return e


def run(entry: Entry, x: torch.Tensor):
    return entry.gm(x.contiguous(), *entry.constants)


# ----------------------------------------------------------------------------- fast path

_FAST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def register_fast(f, key, runner, entry: Entry) -> None:
    """Remember the complete call path of a request whose result comes from one generated graph."""
    try:
        d = _FAST.setdefault(_owner(f)[0], {})
    except TypeError:
        return
    if len(d) > 4 * _PER_F:
        d.clear()
    d[(_owner(f)[1], key)] = (runner, entry, _mode(f))


def fast_call(f, key, x):
    """Run a registered call path, or return ``None`` when there is none (or it went stale)."""
    try:
        d = _FAST.get(_owner(f)[0])
    except TypeError:
        return None
    if d is None:
        return None
    hit = d.get((_owner(f)[1], key))
    if hit is None:
        return None
    runner, entry, mode = hit
    if mode != _mode(f) or not entry.fresh(f):
        del d[(_owner(f)[1], key)]
        return None
    return runner(x)

"""The cache of captured and generated graphs: per-``f`` slots, the fingerprint that tells when an entry went
stale, and the fast path that replays a whole registered call."""

from __future__ import annotations

import functools
import types
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx
from torch.utils import _pytree as pytree

from ._batchcheck import check_batch_independence
from ._build import build
from ._capture import BatchMixingError, Captured, capture
from ._errors import one_d_hint
from ._plan import Plan
from ._warnings import about


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
        check_output(fname, cap.out_val, x, batched)
    if batched and x.shape[0] > 1:  # a single row has nothing to mix with
        try:
            check_batch_independence(cap, fname)  # before the shape check: names the op that mixes rows
        except BatchMixingError as e:
            if x.dim() != 1:
                raise
            # a 1-D x whose entries f mixes: almost always one point passed without its batch dimension
            raise BatchMixingError(f"{fname}: {one_d_hint(x)} (f mixes the entries of x, which batched=True "
                                   f"reads as separate samples)") from e
    check_output(fname, cap.out_val, x, batched)
    slot[key] = (cap, Entry(gm=None, constants=cap.constants, **_state(f, cap)))
    return cap


def check_output(fname: str, y, x: torch.Tensor, batched: bool) -> None:
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


def derivative_graph(f: Callable, x: torch.Tensor, plan: Plan | tuple[Plan, ...], dirs: list, batched: bool,
                     fname: str, outputs: tuple | None = None,
                     seed_shape: tuple[int, ...] | None = None, seed_index: bool = False) -> Entry:
    """The cached generated graph; with ``seed_shape`` its seeds are a graph input (see ``build``; with
    ``seed_index``, one-hot seeds given as coordinates); with a tuple of plans, one graph for independent
    groups of directions (``dirs`` and ``outputs`` one entry per plan)."""
    slot = _slot(f)
    pkey = plan.key if isinstance(plan, Plan) else tuple(p.key for p in plan)
    key = (tuple(x.shape), x.dtype, x.device, pkey, tuple(dirs), batched, _mode(f), outputs, seed_shape,
           seed_index)
    e = slot.get(key)
    if e is not None and e.fresh(f):
        slot.move_to_end(key)
    else:
        cap = captured(f, x, batched, fname)
        try:
            with about(f):  # a per-op fallback warning while building names this f
                gm = build(cap, plan, dirs, x, batched, outputs, seed_shape, seed_index)
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


# ----------------------------------------------------------------------------- fast path

_FAST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# while not None, every registered or hit call path is appended as (key, runner, entry): how the
# torch.compile path (``_compile.py``) learns which generated graph serves a request
RECORD: list | None = None


def register_fast(f, key, runner, entry: Entry) -> None:
    """Remember the complete call path of a request whose result comes from one generated graph."""
    try:
        d = _FAST.setdefault(_owner(f)[0], {})
    except TypeError:
        return
    if len(d) > 4 * _PER_F:
        d.clear()
    d[(_owner(f)[1], key)] = (runner, entry, _mode(f))
    if RECORD is not None:
        RECORD.append((key, runner, entry))


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
    if RECORD is not None:
        RECORD.append((key, runner, entry))
    return runner(x)

"""torchderiv inside ``torch.compile``: the generated graph is compiled into the user's graph, and dynamo never
traces (nor guards on) torchderiv's caches.

Every public operator, when dynamo traces it, comes here instead of its eager body:

1. :func:`_plan` is marked ``torch._dynamo.assume_constant_result``: dynamo *calls* it (it does not trace it)
   with Python constants (the operator's name and options, ``f`` -- a plain function as its code, defaults
   and closure contents --, the per-sample input shape, dtype, device). It runs the eager operator once on
   a zero input of one row (building and caching the derivative graph as usual; a two-row capture first
   checks that rows do not interact), picks up the call path the operator registered, and returns a small
   integer handle plus, for each tensor the graph reads (parameters, buffers, closure tensors), where dynamo
   finds it on ``f``. Nothing of this is guarded on.
2. Those tensors are read from ``f`` in traced code (attribute chains), so dynamo lifts them as inputs of
   the user's graph and the backward reaches them; the generated graph's own constants (seeds, index
   tables) are read from :data:`_HOLDER`, one attribute each.
3. :func:`_apply` is marked ``torch._dynamo.nonstrict_trace``: dynamo records one opaque call, and
   aot_autograd traces into it, so the generated ops, vmapped over the rows (the graph is built for one row),
   are compiled and fused with the rest of the user's loss, forward and backward. The batch size is not
   part of a plan: after dynamo's usual recompile on the first change of batch size the batch dimension is
   dynamic, where functorch's batching rules of the graph's ops are shape-generic (tanh / sine MLPs with
   layer norms); some (``cat``, ``convolution``) specialize the batch size, and such a model compiles once
   per batch size.

What graph-breaks instead (works without ``fullgraph=True``; the operator then runs eagerly): a function
created inside the compiled region (``lambda z: net(z)[:, :1]`` in the loss: dynamo does not expose its
closure cells; define it outside), an ``f`` that cannot be traced to a static graph (torch.func fallback), a
request that is not one generated graph (``chunk_size`` smaller than the request, all-zero Laplacian
weights), an ``f`` holding a tensor that requires grad and cannot be found on it, and ``method="autograd"``
(nested ``torch.autograd.grad``: aot_autograd does not support double backward).
"""

from __future__ import annotations

import itertools
import operator
import sys
import types
import weakref

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from . import _cache
from ._capture import BatchMixingError

__all__ = ["compiling", "call"]


def compiling() -> bool:
    """Whether dynamo is tracing the caller. ``torch.compiler.is_compiling()`` is also true while dynamo runs
    :func:`_plan` for real, which then builds with the eager operators: ``is_dynamo_compiling`` is not."""
    return torch.compiler.is_dynamo_compiling()


# handle -> (owner weakref, runner, constants list, {position: path}, batched)
_TABLE: dict[int, tuple] = {}
_BY_RUNNER: dict[int, int] = {}
_ids = itertools.count()


def _purge() -> None:
    for h in [h for h, v in _TABLE.items() if v[0]() is None]:
        _BY_RUNNER.pop(id(_TABLE[h][1]), None)
        for i in range(len(_TABLE[h][6])):
            delattr(_HOLDER, f"c{h}_{i}")
        del _TABLE[h]


def _paths(f) -> dict[int, tuple]:
    """``id(tensor) -> path`` for the tensors reachable from ``f`` in ways dynamo can follow."""
    out: dict[int, tuple] = {}

    def module(m, root):
        for name, t in itertools.chain(m.named_parameters(remove_duplicate=False),
                                       m.named_buffers(remove_duplicate=False)):
            out.setdefault(id(t), (*root, name))

    def value(v, root):
        if isinstance(v, torch.nn.Module):
            module(v, root)
        elif isinstance(v, Tensor):
            out.setdefault(id(v), (*root, None))

    if isinstance(f, torch.nn.Module):
        module(f, ("m", None))
        return out
    if isinstance(f, types.MethodType):
        if isinstance(f.__self__, torch.nn.Module):
            module(f.__self__, ("self", None))
        elif hasattr(f.__self__, "__dict__"):  # a plain object holding nets and tensors
            for k, v in list(vars(f.__self__).items())[:32]:
                value(v, ("selfattr", k))
    fn = getattr(f, "__func__", f)
    for i, cell in enumerate(getattr(fn, "__closure__", None) or ()):
        try:
            value(cell.cell_contents, ("cell", i))
        except ValueError:  # an empty cell
            pass
    code = getattr(fn, "__code__", None)
    g = getattr(fn, "__globals__", {})
    for name in code.co_names if code is not None else ():
        if name in g:
            value(g[name], ("glob", name))
    return out


def _resolve(f, path):
    kind, a, name = path
    if kind == "m":
        obj = f
    elif kind == "self":
        obj = f.__self__
    elif kind == "selfattr":
        obj = getattr(f.__self__, a)
    elif kind == "cell":
        obj = f.__closure__[a].cell_contents
    else:
        obj = f.__globals__[a]
    if name is None:
        return obj
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


@torch._dynamo.assume_constant_result
def _plan(op: str, f, ins: tuple, batched: bool, dtype, device, training, options: tuple, *parts):
    """Build (or find) the derivative graph of the request for one row; return ``(handle, paths)`` or
    ``(-1, ())`` when the request is not one generated graph. Called by dynamo, never traced.

    A plain function comes as ``parts`` (code, module name, number of defaults, the defaults, the closure
    contents; one argument each, so that dynamo converts each one) and is rebuilt here:
    a function created inside the compiled region (``lambda z: net(z)[:, :1]``) exists only as dynamo's
    model of it while the region is traced."""
    from . import _api

    _purge()
    keep = None
    if parts:
        obj, code, module, nd = parts[:4]
        defaults, cells = parts[4 : 4 + nd] or None, parts[4 + nd :]
        f = keep = types.FunctionType(code, sys.modules[module].__dict__, code.co_name, defaults,
                                      tuple(types.CellType(c) for c in cells) or None)
        if obj is not None:  # a bound method
            f = keep = types.MethodType(f, obj)
    fn = getattr(_api, op)
    kw = dict(options)
    if "spec" in kw:
        kw["spec"] = list(kw["spec"])
    if kw.get("method") == "auto":  # the generated Taylor graph: reverse mode and autograd do not compile in
        kw["method"] = "forward"
    record, _cache.RECORD = _cache.RECORD, []
    try:
        with torch._guards.tracing(None), torch.no_grad():  # outside dynamo's fake mode
            if batched:
                # two rows: the capture checks that rows do not interact (one row has nothing to mix)
                _cache.output_shape(f, torch.zeros((2, *ins), dtype=dtype, device=device), True, op)
            x = torch.zeros(((1,) if batched else ()) + tuple(ins), dtype=dtype, device=device)
            fn(f, x, **kw)
        hits = [(r, e) for k, r, e in _cache.RECORD if k is not None and k[0] == op]
    except BatchMixingError:
        raise  # the request itself is wrong: say so now (dynamo shows this message)
    except Exception:  # noqa: BLE001 - anything else: the eager operator, behind a graph break, handles it
        hits = []
    finally:
        _cache.RECORD = record
    if not hits:
        return (-1, (), 0)
    runner, entry = hits[-1]
    h = _BY_RUNNER.get(id(runner))
    if h is None:
        where = _paths(f)
        paths = {}
        for i, c in enumerate(entry.constants):
            p = where.get(id(c))
            if p is not None:
                paths[i] = p
            elif c.requires_grad:  # cannot be lifted: its gradient would be lost
                return (-1, (), 0)
        h = next(_ids)
        try:
            owner = (lambda: keep) if keep is not None else weakref.ref(_cache._owner(f)[0])
        except TypeError:
            return (-1, (), 0)
        gm = entry.gm
        # make_fx's _tensor_constantN: buffers of the graph module (plain attributes in some versions)
        names = tuple(dict.fromkeys([k for k, _ in gm.named_buffers() if "." not in k]
                                    + [k for k, v in vars(gm).items() if isinstance(v, Tensor)]))
        _TABLE[h] = (owner, runner, entry.constants, paths, batched, gm, names)
        for i, k in enumerate(names):
            setattr(_HOLDER, f"c{h}_{i}", getattr(gm, k))
        _BY_RUNNER[id(runner)] = h
    paths, names = _TABLE[h][3], _TABLE[h][6]
    return (h, tuple(paths.values()), len(names))


class _Holder:
    """The generated graphs' own tensor constants (seeds, index tables), one attribute per handle and
    constant: read in traced code, dynamo lifts them as inputs of the user's graph, so that no real tensor
    is met inside :func:`_apply` (inductor's fake-tensor pass refuses those). Each attribute is written once
    and removed only with its handle."""


_HOLDER = _Holder()


@torch._dynamo.nonstrict_trace
def _apply(h: int, x: Tensor, consts: tuple, extra: tuple):
    """Run the generated graph of handle ``h`` on ``x`` with the traced ``consts`` (the tensors of ``f``) and
    ``extra`` (the graph's own constants); aot_autograd traces it."""
    _, runner, constants, paths, batched, gm, names = _TABLE[h]
    saved = list(constants)
    for pos, c in zip(paths, consts):
        constants[pos] = c
    own = [getattr(gm, k) for k in names]
    for k, t in zip(names, extra):
        setattr(gm, k, t)
    try:
        if not batched:
            return runner(x)

        def row(xr):
            return pytree.tree_map(lambda t: t.squeeze(0), runner(xr.unsqueeze(0)))

        return torch.vmap(row)(x)
    finally:
        constants[:] = saved
        for k, t in zip(names, own):
            setattr(gm, k, t)


@torch.compiler.disable
def run_eager(op: str, f, x: Tensor, kw: dict):
    """The eager operator behind a graph break."""
    from . import _api

    return getattr(_api, op)(f, x, **kw)


def call(op: str, f, x: Tensor, **kw):
    """The operator ``op`` (a public name) under dynamo: compiled into the user's graph where possible,
    else a graph break around the eager operator."""
    batched = kw.get("batched", True)
    if kw.get("method") == "autograd" or not isinstance(x, Tensor):
        return run_eager(op, f, x, kw)
    if isinstance(kw.get("weights"), Tensor):
        kw["weights"] = kw["weights"].tolist()
    options = tuple(sorted((k, _frozen(v)) for k, v in kw.items()))
    # operator.index specializes the feature dims to constants (dynamo's automatic dynamic shapes makes them
    # SymInts after a recompile for a net of another input size, which _plan cannot take: it graph-broke for
    # every later net of that loss); int() would not specialize. The batch dimension stays dynamic.
    ins = tuple(operator.index(s) for s in (x.shape[1:] if batched else x.shape))
    parts = ()
    fn = f.__func__ if isinstance(f, types.MethodType) else f
    if isinstance(fn, types.FunctionType):
        try:
            cells = fn.__closure__ or ()
        except AttributeError:  # a function created inside the compiled region: dynamo cannot show its cells
            return run_eager(op, f, x, kw)
        defaults = fn.__defaults__ or ()
        parts = (f.__self__ if isinstance(f, types.MethodType) else None, fn.__code__, fn.__module__,
                 len(defaults), *defaults, *[c.cell_contents for c in cells])
    h, paths, n_extra = _plan(op, None if parts else f, ins, batched, x.dtype, x.device, getattr(f, "training", None),
                     options, *parts)
    if h < 0:
        return run_eager(op, f, x, kw)
    consts = tuple(_resolve(f, p) for p in paths)
    extra = tuple(getattr(_HOLDER, f"c{h}_{i}") for i in range(n_extra))
    return _apply(h + 0, x, consts, extra)  # `+ 0`: a plain constant, not one dynamo would guard on


def _frozen(v):
    if isinstance(v, (list, tuple, range)):
        return tuple(_frozen(a) for a in v)
    return v


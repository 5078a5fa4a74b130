"""Serve DeepXDE's ``dde.grad.jacobian`` / ``dde.grad.hessian`` (PyTorch backend) from one torchderiv pass.

One line in a DeepXDE script::

    import torchderiv
    torchderiv.deepxde.enable()

How it works. DeepXDE hands its PDE function ``y = model.net(x)`` and the residual asks for one partial
derivative per call (``dde.grad.jacobian(y, x, i=0, j=1)``), each a reverse pass. While enabled:

* a forward hook (installed by :func:`enable` on every ``dde.nn.NN``) remembers, with weak references,
  which network and which inputs tensor produced each output ``y``;
* every tensor this module hands out is remembered the same way, as the list of partials its columns hold
  (``(output component, multi-index)``), so that a derivative of a returned derivative
  (``dde.grad.hessian(dy_xx, x)`` in an Euler-beam residual) and slices ``y[:, k:k+1]`` are understood;
* per (network, input shape) a *record* keeps the multi-indices the residual asked for in earlier steps;
  the first request of a step computes all of them in ONE :func:`torchderiv.partials` call and serves this
  and the later requests of the step from that result. A request the record does not hold yet (the
  first step, a new term) is computed on demand by DeepXDE's own implementation and added to the record;
* ``dde.grad.clear()``, which ``dde.Model`` calls at the end of every loss evaluation, drops the step's
  results and the remembered tensors.

Anything it cannot serve as a derivative of the network (an expression computed from derivatives, a tensor
modified in place, a network torchderiv cannot trace, tuple inputs) goes to DeepXDE's original function,
with a one-time :class:`DeepXDEFallbackWarning` naming the reason: never a wrong derivative. The served
tensors are ordinary differentiable tensors: w.r.t. the inputs (a fallback may differentiate them again)
and twice w.r.t. the parameters (Hessian-vector products of the loss).
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Iterator

import torch
from torch import Tensor

import torchderiv

__all__ = ["enable", "disable", "enabled", "is_enabled", "DeepXDEFallbackWarning"]


class DeepXDEFallbackWarning(UserWarning):
    """A ``dde.grad`` request that :mod:`torchderiv.deepxde` passed to DeepXDE's own implementation."""


# ----------------------------------------------------------------------------- state

_MAX_ORIGINS = 4096  # tensors remembered between two dde.grad.clear() calls (a safety valve only)
_MAX_STEPS = 8  # (network, inputs) pairs whose results are kept when clear() is never called
_MAX_RECORDS = 8  # input shapes remembered per network
_MAX_ALPHAS = 64  # multi-indices per record
_AGE = 8  # a multi-index not asked for in this many steps of its record leaves it


class _State:
    on = False
    busy = False  # inside our own torchderiv call: the hook must not record the traced calls
    dde = None  # the deepxde module
    nn_class = None  # deepxde.nn.NN of the PyTorch backend
    originals: dict = {}
    hook = None


_S = _State()
_warned: set = set()
# how requests were answered: from a torchderiv pass, on demand by DeepXDE (then recorded), by DeepXDE as
# a fallback (unresolvable, warned once), or passed on untouched (DeepXDE's own errors and cases)
_COUNTS = {"served": 0, "on_demand": 0, "fallback": 0, "passed": 0, "passes": 0}


def _warn_once(key, msg: str, stacklevel: int = 3) -> None:
    if key in _warned:
        return
    if len(_warned) > 256:
        _warned.clear()
    _warned.add(key)
    warnings.warn(f"torchderiv.deepxde: {msg}; passed to DeepXDE's own implementation (correct, not "
                  f"accelerated). This warning is shown once.", DeepXDEFallbackWarning, stacklevel=stacklevel)


class _Origin:
    """What a tensor is as a function of (net, x): ``cols[r] = (component, multi-index)`` for column ``r``
    (``None``: the network output itself, every component undifferentiated)."""

    __slots__ = ("tref", "net", "x", "cols", "version", "fn")

    def __init__(self, t: Tensor, net, x: Tensor, cols, fn=None):
        self.tref = weakref.ref(t, _forget(id(t)))
        self.net = weakref.ref(net)
        self.x = weakref.ref(x)
        self.cols = cols
        self.version = t._version
        self.fn = weakref.ref(fn) if fn is not None else None


_ORIGINS: dict[int, _Origin] = {}


def _forget(key: int):
    def drop(ref):
        o = _ORIGINS.get(key)
        if o is not None and o.tref is ref:
            del _ORIGINS[key]

    return drop


def _remember(t: Tensor, net, x: Tensor, cols, fn=None, replace: bool = False) -> None:
    o = _ORIGINS.get(id(t))
    if not replace and o is not None and o.tref() is t:
        return
    if len(_ORIGINS) >= _MAX_ORIGINS:  # clear() never called: forget everything (requests fall back)
        _ORIGINS.clear()
    _ORIGINS[id(t)] = _Origin(t, net, x, cols, fn)


def _hook(module, args, output) -> None:
    """Global forward hook: remember that ``output`` is ``module(x)`` for DeepXDE networks."""
    if _S.busy or not isinstance(module, _S.nn_class):
        return
    if len(args) == 1 and isinstance(args[0], Tensor) and isinstance(output, Tensor):
        # hooks fire inner module first: a network returning an inner network's output unchanged is
        # remembered as the outer one, a function of the inputs the residual differentiates against
        _remember(output, module, args[0], None, replace=True)


class _Record:
    """The multi-indices a residual asked for on one (network, input shape), with the step each was last
    asked for."""

    __slots__ = ("alphas", "step", "failed", "vetted", "dropout", "methods")

    def __init__(self, net):
        # a second pass would draw other dropout masks than DeepXDE's forward (read once per record)
        self.dropout = any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in net.modules())
        self.vetted: set = set()  # specs whose first pass was watched for torchderiv's trace fallback
        self.methods: dict = {}  # spec -> what _method chose for it
        self.alphas: dict[tuple[int, ...], int] = {}
        self.step = 0
        self.failed: str | None = None

    def new_step(self) -> list[tuple[int, ...]]:
        self.step += 1
        old = [a for a, s in self.alphas.items() if self.step - s > _AGE]
        for a in old:
            del self.alphas[a]
        return sorted(self.alphas, key=lambda a: (len(a), a))

    def use(self, alphas) -> None:
        for a in alphas:
            self.alphas[a] = self.step
        while len(self.alphas) > _MAX_ALPHAS:
            del self.alphas[min(self.alphas, key=self.alphas.__getitem__)]


_RECORDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _record(net, x: Tensor) -> _Record:
    per_net = _RECORDS.get(net)
    if per_net is None:
        per_net = _RECORDS[net] = OrderedDict()
    key = (tuple(x.shape), x.dtype, x.device)
    r = per_net.get(key)
    if r is None:
        r = per_net[key] = _Record(net)
        while len(per_net) > _MAX_RECORDS:
            per_net.popitem(last=False)
    else:
        per_net.move_to_end(key)
    return r


class _Step:
    """One step's results for one (network, inputs): ``res[alpha]`` is ``[B, m]``; ``served`` the tensors
    handed out, by their columns."""

    __slots__ = ("net", "x", "res", "served")

    def __init__(self, net, x, res):
        self.net = weakref.ref(net)
        self.x = weakref.ref(x)
        self.res: dict = res
        self.served: dict = {}


_STEPS: OrderedDict = OrderedDict()


def _stats() -> dict:
    """Sizes of the internal state (tests check that they stay constant over training)."""
    return {**_COUNTS, "origins": len(_ORIGINS), "steps": len(_STEPS),
            "records": sum(len(d) for d in _RECORDS.values()),
            "alphas": sum(len(r.alphas) for d in _RECORDS.values() for r in d.values())}


# ----------------------------------------------------------------------------- the speed policy


def _method(net, x: Tensor, spec) -> str:
    """How to serve a step's recorded partials: a ``method=`` of :func:`torchderiv.partials` (``"forward"``,
    Taylor mode, one generated pass; ``"autograd"``, nested reverse passes reused across the step, DeepXDE's
    own idea in one call) or ``"passthrough"`` (every request by DeepXDE's own implementation).

    The one place for the speed policy, priced by the calibrated cost model of ``method="auto"`` (no timing):
    DeepXDE's own path is nested reverse passes on the graph of the forward pass it already ran, i.e. the
    autograd method without its forward; serving by torchderiv runs the network once more (and its backward
    in training). So the step passes through when the autograd method is the cheapest, or when the
    cheapest method is not predicted at least :data:`_MARGIN` times faster than DeepXDE's own path."""
    from ._costmodel import cheapest
    from ._dispatch import predicted_times

    times = predicted_times("partials", net, x, spec=list(spec), one_pass=True)
    if times is None:
        return "forward"  # untraceable: the first pass is watched and passes the step through (_Untraceable)
    extra = times.pop("one_pass")
    best = cheapest(times)
    own = times.get("autograd")
    if own is None:
        return best
    # both steps also run DeepXDE's forward; best == "autograd" (own <= times[best]) always passes through
    if times[best] * _MARGIN >= own - extra:
        return "passthrough"
    return best


# Serve by torchderiv only where it is predicted at least this much faster than DeepXDE's own path: on the
# calibration's small physics-informed points (docs/calibration/rows-pinn-seed2.jsonl) the model's ratio of
# nested autograd to Taylor mode is 1.00x the measured one in the median and 1.33x at the 90th percentile
# (with the table of stop 13; 1.16x and 1.57x with the one the margin was chosen on, stop 12); a wrong serve
# makes the user's step slower, a wrong pass-through only misses a gain.
_MARGIN = 1.6


class _Untraceable(RuntimeError):
    """torchderiv answered through its torch.func fallback: slower than DeepXDE's own path."""


def _compute(net, x: Tensor, spec, rec: _Record, y: Tensor | None = None) -> dict | None:
    """The partials ``spec`` of ``net`` at ``x`` in one call, or ``None`` to pass the step through.

    The first call of a spec is watched: when torchderiv cannot trace the network it answers through
    torch.func (correct, slow) and says so in a warning, then DeepXDE's own path is the faster one; and the
    value of the pass must equal ``y``, the output DeepXDE differentiates (a network that draws random
    numbers or keeps state in its forward would give the derivatives of another function)."""
    key = tuple(spec)
    method = rec.methods.get(key)
    if method is None:  # the policy is asked once per (record, spec): it may trace, time or look up tables
        if len(rec.methods) > 16:
            rec.methods.clear()
        _S.busy = True  # the policy traces the network: its forward hook must not serve that call
        try:
            method = rec.methods[key] = _method(net, x, [(), *spec])
        finally:
            _S.busy = False
    if method == "passthrough":
        return None
    spec = [(), *spec]  # the value comes with the pass at no cost: it is what the check compares
    key = tuple(spec)
    _S.busy = True
    _COUNTS["passes"] += 1
    try:
        if key in rec.vetted:
            return torchderiv.partials(net, x, spec, method=method)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            res = torchderiv.partials(net, x, spec, method=method)
    finally:
        _S.busy = False
    untraced = [w for w in seen if "could not be traced" in str(w.message)]
    for w in seen:
        if w not in untraced:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if untraced:
        raise _Untraceable(str(untraced[0].message).split(";")[0])
    if y is None:
        return res  # nothing to compare with: the next pass of this spec is watched again
    with torch.no_grad():
        v, ref = res[()], y.detach()
        tol = 1e-3 if v.dtype in (torch.float16, torch.bfloat16, torch.float32) else 1e-8
        if v.shape != ref.shape or not bool((v - ref).abs().max() <= tol * (1 + ref.abs().max())):
            raise _Untraceable("the network returned other values on a second call with the same inputs "
                               "(random numbers or state in its forward)")
    if len(rec.vetted) > 16:
        rec.vetted.clear()
    rec.vetted.add(key)
    return res


# ----------------------------------------------------------------------------- resolving a request


def _lookup(t) -> _Origin | None:
    o = _ORIGINS.get(id(t))
    if o is not None and o.tref() is t:
        return o
    return None


def _resolve(t, x, forward_pair=None):
    """``(origin, net, cols)`` for a tensor ``t`` requested w.r.t. ``x``, or ``(None, reason)``."""
    if not isinstance(t, Tensor) or t.dim() != 2:
        return None, "the tensor is not a 2-D [points, components] tensor"
    o = _lookup(t)
    first = 0
    if o is None and forward_pair is None and t._base is not None:  # a column slice y[:, k:k+w]
        base = t._base
        o = _lookup(base)
        if o is not None:
            first = _column_offset(t, base)
            if first is None:
                return None, "the tensor is a view of a network output or derivative that is not a column slice"
    if o is None:
        return None, ("the tensor is neither a network output seen by torchderiv.deepxde nor a derivative it "
                      "returned (an expression computed from them: differentiate the terms instead, or "
                      "ignore this warning)")
    net, ox = o.net(), o.x()
    if net is None or ox is None:
        return None, "the network or its inputs no longer exist"
    if ox is not x:
        return None, "x is not the tensor the network was called on"
    if t._version != o.version:
        return None, "the tensor was modified in place after it was computed"
    if forward_pair is not None:
        expected = net if o.fn is None else o.fn()
        if forward_pair is not expected:
            return None, "the callable of the (value, callable) pair is not the one that came with the value"
    if _S.nn_class is not None and not isinstance(net, _S.nn_class):
        return None, "not a deepxde network"
    base_cols = o.cols
    if base_cols is None:  # the network output: every component, undifferentiated
        base_cols = tuple((c, ()) for c in range(o.tref().shape[1]))
    cols = base_cols[first: first + t.shape[1]]
    if len(cols) != t.shape[1]:
        return None, "unexpected tensor shape"
    return o, net, cols


def _column_offset(t: Tensor, base: Tensor) -> int | None:
    """``k`` when ``t`` is ``base[:, k:k+w]`` of a contiguous 2-D ``base``, else None."""
    if base.dim() != 2 or not base.is_contiguous() or t.dtype != base.dtype or t.shape[0] != base.shape[0]:
        return None
    B, m = base.shape
    w = t.shape[1]
    k = t.storage_offset() - base.storage_offset()
    if not 0 <= k <= m - w or (B > 1 and t.stride(0) != m) or (w > 1 and t.stride(1) != 1):
        return None
    return k


def _unusable(net, rec: _Record) -> str | None:
    """Why ``net`` should not be served by a separate pass at all (randomness, per-step state)."""
    if net.training and rec.dropout:
        return f"{type(net).__name__} has dropout in training mode (a second pass would draw other masks)"
    if getattr(net, "auxiliary_vars", None) is not None:
        return f"{type(net).__name__} has auxiliary_vars (they change every step)"
    return None


def _try_compute(net, x: Tensor, spec, rec: _Record, y: Tensor | None = None) -> dict:
    """:func:`_compute`, or ``{}`` with the record marked failed (and a one-time warning) when the network
    cannot be served."""
    if not spec or rec.failed is not None:
        return {}
    why = _unusable(net, rec)
    if why is not None:
        rec.failed = why
        _warn_once(("unusable", type(net), why), why, stacklevel=5)
        return {}
    try:
        return _compute(net, x, spec, rec, y) or {}
    except Exception as e:  # noqa: BLE001 - any failure of the pass: DeepXDE computes it
        msg = str(e).strip().splitlines()
        rec.failed = f"{type(e).__name__}: {msg[0][:300] if msg else ''}"
        _warn_once(("failed", type(net), type(e)), f"torchderiv could not serve {type(net).__name__} "
                   f"({rec.failed})", stacklevel=5)
        return {}


def _serve(net, x: Tensor, cols, compute_missing: bool = False, y: Tensor | None = None) -> Tensor | None:
    """The tensor of columns ``cols`` from this step's torchderiv results, or ``None`` (not computed:
    the caller computes it by DeepXDE's implementation and records it). With ``compute_missing``, partials
    the step has not computed yet are computed by one more torchderiv call instead."""
    key = (id(net), id(x))
    step = _STEPS.get(key)
    if step is not None and (step.net() is not net or step.x() is not x):
        del _STEPS[key]
        step = None
    alphas = {a for _, a in cols}
    rec = _record(net, x)
    if step is None:  # the first request of a step: every recorded partial in one pass
        step = _STEPS[key] = _Step(net, x, _try_compute(net, x, rec.new_step(), rec, y))
        while len(_STEPS) > _MAX_STEPS:
            _STEPS.popitem(last=False)
    rec.use(alphas)
    hit = step.served.get(cols)
    if hit is not None:
        return hit
    missing = [a for a in alphas if a not in step.res]
    if missing and compute_missing:
        step.res.update(_try_compute(net, x, sorted(missing, key=lambda a: (len(a), a)), rec, y))
        missing = [a for a in alphas if a not in step.res]
    if missing:
        return None
    t = _assemble(step.res, cols)
    step.served[cols] = t
    return t


def _assemble(res: dict, cols) -> Tensor:
    a0 = cols[0][1]
    full = res[a0]
    if full.dim() != 2:
        raise RuntimeError("torchderiv.deepxde: the network output is not [points, components]")
    if all(a == a0 for _, a in cols) and [c for c, _ in cols] == list(range(full.shape[1])):
        return full
    parts = [res[a][:, c: c + 1] for c, a in cols]
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def _note(result, net, x, cols, is_pair: bool):
    """Remember what a result computed by DeepXDE's implementation is, so later requests on it are
    understood; returns ``result``."""
    t = result[0] if is_pair else result
    if isinstance(t, Tensor) and t.dim() == 2 and t.shape[1] == len(cols):
        _remember(t, net, x, cols, result[1] if is_pair else None)
    return result


# ----------------------------------------------------------------------------- the replacements


def _index(v):
    if v is None:
        return None
    try:
        return int(v.__index__())
    except (AttributeError, TypeError):
        return False  # not an index: DeepXDE's own error


def _grad_ok(x) -> bool:
    return isinstance(x, Tensor) and x.dim() == 2 and x.requires_grad


def _request_cols(cols, n: int, i, j, forward: bool):
    """The columns DeepXDE's ``jacobian(T, x, i, j)`` returns for a tensor ``T`` of columns ``cols`` and
    ``n`` input coordinates, or ``None`` where DeepXDE would raise (it then raises its own error)."""
    w = len(cols)
    if i is False or j is False:
        return None
    if i is None and j is None:
        if n > 1 or w > 1:
            return None
        i = j = 0
    if (i is not None and not 0 <= i < w) or (j is not None and not 0 <= j < n):
        return None
    if forward:
        if j is None:
            if n > 1:
                return None
            j = 0
        if i is None or w == 1:
            return tuple((c, tuple(sorted(a + (j,)))) for c, a in cols)
        c, a = cols[i]
        return ((c, tuple(sorted(a + (j,)))),)
    if i is None:
        if w > 1:
            return None
        i = 0
    c, a = cols[i]
    if j is None or n == 1:
        return tuple((c, tuple(sorted(a + (k,)))) for k in range(n))
    return ((c, tuple(sorted(a + (j,)))),)


def _column_fn(net, cols):
    """A function ``X -> the columns cols of net's partials at X`` (nested torch.func.jvp, as DeepXDE's
    forward configuration builds them), for the callable of a served ``(value, callable)`` pair."""

    def along(g, k):
        def d(X):
            e = torch.zeros_like(X)
            e[:, k] = 1
            return torch.func.jvp(g, (X,), (e,))[1]

        return d

    def fn(X):
        out = []
        for c, a in cols:
            g = net
            for k in a:
                g = along(g, k)
            out.append(g(X)[:, c: c + 1])
        return out[0] if len(out) == 1 else torch.cat(out, 1)

    return fn


def _passed(call):
    _COUNTS["passed"] += 1
    return call()


def _fallback(call, why: str, fname: str):
    _COUNTS["fallback"] += 1
    _warn_once(("resolve", why), f"dde.grad.{fname}: {why}", stacklevel=4)
    return call()


def _forward_config() -> bool:
    # DeepXDE before 1.11 has no forward configuration (no config.autodiff)
    return getattr(_S.dde.config, "autodiff", "reverse") == "forward"


def _jacobian(ys, xs, i=None, j=None):
    """``dde.grad.jacobian`` served by torchderiv (see :mod:`torchderiv.deepxde`)."""
    orig = _S.originals["jacobian"]
    call = lambda: orig(ys, xs, i=i, j=j)  # noqa: E731
    forward = _forward_config()
    is_pair = forward and isinstance(ys, tuple) and len(ys) == 2
    t = ys[0] if is_pair else ys
    if (forward and not is_pair) or not _grad_ok(xs) or not isinstance(t, Tensor) or not t.requires_grad:
        return _passed(call)  # DeepXDE's own behaviour, errors included
    r = _resolve(t, xs, ys[1] if is_pair else None)
    if r[0] is None:
        return _fallback(call, r[1], "jacobian")
    _, net, cols = r
    new = _request_cols(cols, xs.shape[1], _index(i), _index(j), forward)
    if new is None:
        return _passed(call)
    # DeepXDE's forward configuration is not trusted on demand: the callable of its (i, j) pairs slices the
    # batch axis (`J[j][1](x)[i : i + 1]`, DeepXDE 1.15), so a derivative of one would be wrong
    out = _serve(net, xs, new, compute_missing=forward, y=r[0].tref() if r[0].cols is None else None)
    if out is None:  # not in this step's results: DeepXDE computes it, the record learns it
        _COUNTS["on_demand"] += 1
        return _note(call(), net, xs, new, is_pair)
    _COUNTS["served"] += 1
    if not is_pair:
        _remember(out, net, xs, new)
        return out
    key = ("pair", new)
    step = _STEPS.get((id(net), id(xs)))
    pair = step.served.get(key) if step is not None else None
    if pair is None:
        pair = (out, _column_fn(net, new))
        if step is not None:
            step.served[key] = pair
    _remember(out, net, xs, new, pair[1])
    return pair


def _hessian(ys, xs, component=0, i=0, j=0):
    """``dde.grad.hessian`` served by torchderiv (see :mod:`torchderiv.deepxde`)."""
    if _forward_config():
        # DeepXDE's forward configuration composes two jacobians; so do we, each served or passed on
        return _jacobian(_jacobian(ys, xs, i=None, j=j), xs, i=component, j=i)
    orig = _S.originals["hessian"]
    call = lambda: orig(ys, xs, component=component, i=i, j=j)  # noqa: E731
    if not _grad_ok(xs) or not isinstance(ys, Tensor) or not ys.requires_grad:
        return _passed(call)
    r = _resolve(ys, xs)
    if r[0] is None:
        return _fallback(call, r[1], "hessian")
    _, net, cols = r
    comp = _index(component)
    new = None
    if comp is not None and comp is not False and 0 <= comp < len(cols):
        # DeepXDE: the gradient row of the component, then entry (j, i) of that row's Jacobian
        row = _request_cols(cols, xs.shape[1], comp, None, False)
        new = _request_cols(row, xs.shape[1], _index(j), _index(i), False) if row is not None else None
    if new is None:
        return _passed(call)
    out = _serve(net, xs, new, y=r[0].tref() if r[0].cols is None else None)
    if out is None:
        _COUNTS["on_demand"] += 1
        return _note(call(), net, xs, new, False)
    _COUNTS["served"] += 1
    _remember(out, net, xs, new)
    return out


def _clear():
    """``dde.grad.clear`` that also drops torchderiv.deepxde's per-step results."""
    _S.originals["clear"]()
    _STEPS.clear()
    _ORIGINS.clear()


# ----------------------------------------------------------------------------- public API


def _import_deepxde():
    try:
        return importlib.import_module("deepxde")
    except ImportError as e:
        raise ImportError("torchderiv.deepxde.enable: DeepXDE is not installed; install it with "
                          "`pip install torchderiv[deepxde]` (and set DDE_BACKEND=pytorch)") from e


def enable() -> None:
    """Serve ``dde.grad.jacobian`` and ``dde.grad.hessian`` by torchderiv from now on (idempotent).

    Also wraps ``dde.grad.clear`` (which ``dde.Model`` calls after every loss evaluation) and installs a
    forward hook that remembers which DeepXDE network produced each output. With a DeepXDE backend other
    than PyTorch it warns and does nothing. Code that imported the functions themselves before
    (``from deepxde.grad import jacobian``) keeps DeepXDE's originals.

    Example:
        >>> import torchderiv
        >>> torchderiv.deepxde.enable()       # doctest: +SKIP
        >>> torchderiv.deepxde.is_enabled()   # doctest: +SKIP
        True
    """
    if _S.on:
        return
    dde = _import_deepxde()
    backend = dde.backend.backend_name
    if backend != "pytorch":
        warnings.warn(f"torchderiv.deepxde.enable: DeepXDE uses the {backend!r} backend; torchderiv serves the "
                      f"PyTorch backend only (set DDE_BACKEND=pytorch). Nothing was changed.",
                      DeepXDEFallbackWarning, stacklevel=2)
        return
    from deepxde.nn.pytorch.nn import NN

    g = dde.gradients
    _S.dde, _S.nn_class = dde, NN
    _S.originals = {"jacobian": g.jacobian, "hessian": g.hessian, "clear": g.clear}
    g.jacobian, g.hessian, g.clear = _jacobian, _hessian, _clear
    _S.hook = torch.nn.modules.module.register_module_forward_hook(_hook)
    _S.on = True


def disable() -> None:
    """Restore DeepXDE's own ``dde.grad.jacobian``, ``hessian`` and ``clear`` and remove the hook.

    Example:
        >>> import torchderiv
        >>> torchderiv.deepxde.disable()      # doctest: +SKIP
        >>> torchderiv.deepxde.is_enabled()   # doctest: +SKIP
        False
    """
    if not _S.on:
        return
    g = _S.dde.gradients
    mine = {"jacobian": _jacobian, "hessian": _hessian, "clear": _clear}
    for name, fn in _S.originals.items():
        if getattr(g, name) is mine[name]:  # leave alone what someone else installed since
            setattr(g, name, fn)
    _S.hook.remove()
    _S.hook = None
    _S.on = False
    _STEPS.clear()
    _ORIGINS.clear()  # the records (which partials each residual asks for) stay: a later enable() uses them


def is_enabled() -> bool:
    """Whether :func:`enable` is in effect."""
    return _S.on


@contextlib.contextmanager
def enabled() -> Iterator[None]:
    """Context manager: enabled inside, the previous state restored on exit.

    Example:
        >>> import torchderiv
        >>> with torchderiv.deepxde.enabled():    # doctest: +SKIP
        ...     model.train(iterations=1000)
    """
    was = _S.on
    enable()
    try:
        yield
    finally:
        if not was:
            disable()

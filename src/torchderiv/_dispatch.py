"""The one dispatch path of every public operator: fast path -> validation -> method choice -> run.

    _api (operator: docstring, builds a Request)
      -> _dispatch.dispatch
           -> _cache.fast_call                   (a registered call path: replayed, done)
           -> validate, _requests.prepare        (what to propagate, how to assemble the result)
           -> _method                            (auto: the calibrated cost model, _costmodel)
           -> _taylor.taylor | Work.reverse      (-> _cache -> _capture / _build)

The fallback policy is the same for every operator: with ``method="auto"``, an op that PyTorch cannot
differentiate in forward mode sends the call to the operator's reverse-mode form where it has one.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._autograd import admissible, autograd_taylor
from ._build import NoForwardDerivative
from ._cache import captured, fast_call
from ._capture import TraceError
from ._compile import call, compiling, run_eager
from ._costmodel import autograd_units, cheapest, forward_units, graph_cost, predict, reverse_units
from ._random import is_random
from ._random import run as run_random
from ._requests import METHODS, Request, Work, in_shape, prepare
from ._taylor import streams, taylor
from ._warnings import warn_fallback


def validate(req: Request, f, x) -> None:
    fname = req.op
    if not callable(f):
        raise TypeError(f"{fname}: f must be callable (an nn.Module or a function of one tensor), got {type(f)}")
    if not isinstance(x, Tensor):
        raise TypeError(f"{fname}: x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{fname}: x must be a floating-point tensor to be differentiated, got dtype {x.dtype}; "
            f"convert it first, e.g. x.float() or x.double()"
        )
    if req.batched and x.dim() < 1:
        raise ValueError(
            f"{fname}: batched=True expects x of shape [B, *in] with a leading batch dimension, got a 0-d "
            f"tensor; pass batched=False for a single point"
        )
    methods = METHODS[fname]
    if req.method not in methods:
        raise ValueError(f"{fname}: method must be one of {methods}, got {req.method!r}")
    cs = req.chunk_size
    if cs is not None and (not isinstance(cs, int) or isinstance(cs, bool) or cs < 1):
        raise ValueError(f"{fname}: chunk_size must be None or a positive int, got {cs!r}")


def choose_method(op: str, f, x: Tensor, *, batched: bool = True, **options) -> str:
    """The method that ``method="auto"`` picks for the call ``op(f, x, batched=batched, **options)``.

    A pure function of the request, ``f``'s traced graph, ``x``'s shape / dtype / device, the grad mode
    (whether a backward to the parameters of ``f`` can follow) and whether torch.compile is tracing: the
    calibrated cost model of :mod:`torchderiv._costmodel` (constants fitted by ``torchderiv calibrate``)
    predicts each admissible method's time and the least wins. ``f`` is traced (cached), not run.

    Example:
        >>> import torch, torchderiv
        >>> net = torch.nn.Sequential(torch.nn.Linear(100, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
        >>> with torch.no_grad():  # 100 inputs, 1 output: one reverse pass beats 101 forward streams
        ...     torchderiv.choose_method("jacobian", net, torch.rand(64, 100)) in ("reverse", "autograd")
        True
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 20), torch.nn.Tanh(), torch.nn.Linear(20, 3))
        >>> torchderiv.choose_method("partials", net, torch.rand(256, 2), spec=[(0, 0, 0)])  # third order
        'forward'
    """
    req, work = _auto_request("choose_method", op, f, x, batched, options)
    return _method(req, work, f, x)


def _auto_request(caller: str, op, f, x: Tensor, batched: bool, options: dict) -> tuple[Request, Work]:
    """The validated ``method="auto"`` request of the call ``op(f, x, batched=batched, **options)`` and its work."""
    op = getattr(op, "__name__", op)
    if op not in METHODS:
        raise ValueError(f"{caller}: op must name a torchderiv operator ({', '.join(METHODS)}), got {op!r}")
    req = Request(op, batched, "auto", None, tuple(options.items()))
    validate(req, f, x)
    return req, prepare(req, f, x)


def _method(req: Request, work: Work, f, x: Tensor) -> str:
    if req.method != "auto":
        return req.method
    times = predicted(req, work, f, x)
    if times is None:
        return "forward"  # untraceable f: the torch.func fallback is used whatever the method
    return cheapest(times)


def predicted(req: Request, work: Work, f, x: Tensor, one_pass: bool = False) -> dict[str, float] | None:
    """The cost model's predicted seconds of every admissible method for ``req``, or ``None`` for an ``f``
    that does not trace. With ``one_pass``, the entry
    ``"one_pass"`` adds the predicted time of one plain pass of ``f`` (with its backward in grad mode): what
    a caller that already ran ``f`` saves by not running it again (the DeepXDE adapter)."""
    try:
        cap = captured(f, x, req.batched, req.op)
    except TraceError:
        return None
    batch = x.shape[0] if req.batched else 1
    grad = torch.is_grad_enabled() and any(isinstance(c, Tensor) and c.requires_grad for c in cap.constants)
    units = candidates(req, work, cap)
    if torch.compiler.is_compiling():  # also while _compile._plan builds: never autograd there
        units.pop("autograd", None)  # a graph break at every torch.autograd.grad
    cost = graph_cost(cap.gm, batch)
    times = {m: predict(m, u, cost, batch, grad) for m, u in units.items()}
    if one_pass:
        times["one_pass"] = predict("autograd", 1.0, cost, batch, grad)
    return times


def predicted_times(op: str, f, x: Tensor, *, batched: bool = True, one_pass: bool = False,
                    **options) -> dict[str, float] | None:
    """:func:`predicted` for the call ``op(f, x, batched=batched, **options)`` (see :func:`choose_method`)."""
    req, work = _auto_request("predicted_times", op, f, x, batched, options)
    return predicted(req, work, f, x, one_pass)


def candidates(req: Request, work: Work, cap) -> dict[str, float]:
    """The admissible methods of a request and their units of work (see :mod:`torchderiv._costmodel`)."""
    m = math.prod(cap.out_val.shape[1:] if req.batched else cap.out_val.shape)
    allowed = METHODS[req.op]
    units = {"forward": forward_units(streams(work.items, work.combos, work.directions))}
    if "reverse" in allowed and work.reverse is not None and work.kind in ("jacobian", "hessian"):
        units["reverse"] = reverse_units(work.kind, m, work.n_in)
    if "autograd" in allowed and autograd_admissible(cap, work):
        indices = list(work.items) + [a for c in (work.reference_combos or work.combos) for a, _ in c]
        units["autograd"] = autograd_units(indices, m)
    return units


def autograd_admissible(cap, work: Work) -> bool:
    """Whether nested torch.autograd can serve ``work`` exactly (:func:`torchderiv._autograd.admissible`)."""
    return admissible(cap)


def dispatch(req: Request, f, x):
    """Compute the request ``req`` for ``f`` at ``x`` (see the module docstring for the path)."""
    if compiling():  # dynamo is tracing: compile the generated graph into the user's graph (_compile.py)
        kw = dict(req.options)
        if is_random(req):
            return run_eager(req.op, f, x, dict(batched=req.batched, method=req.method,
                                                chunk_size=req.chunk_size, **kw))
        return call(req.op, f, x, batched=req.batched, method=req.method, chunk_size=req.chunk_size, **kw)
    key = req.key(x)
    if key is not None:
        r = fast_call(f, key, x)
        if r is not None:
            return r
    validate(req, f, x)
    if is_random(req):  # estimator= / directions=: an unbiased randomized estimate (issue 14)
        return run_random(req, f, x)
    work = prepare(req, f, x)
    if work.direct is not None:
        return work.direct()
    method = _method(req, work, f, x)
    if method != "forward":
        return _run(method, req, work, f, x, key)
    try:
        return _run("forward", req, work, f, x, key)
    except NoForwardDerivative as e:
        if req.method != "auto":
            raise
        forward_error = e
    # an op the forward path cannot differentiate at this order (grid_sampler_3d, an op whose generic rule is
    # order 1 only): "auto" takes the operator's reverse form, else nested autograd, where admissible
    others = []
    if work.reverse is not None:
        others.append("reverse")
    if "autograd" in METHODS[req.op] and _autograd_ok(req, work, f, x):
        others.append("autograd")
    failures = []
    for m in others:
        try:
            r = _run(m, req, work, f, x, key)
        except RuntimeError as e:  # torch cannot either (grid_sampler_3d's backward under vmap)
            failures.append(f"{m}: {str(e).splitlines()[0]}")
            continue
        warn_fallback(f"auto: {m}", f"{req.op}: {forward_error.args[0]} method='auto' used {m} mode instead; "
                      f"pass method='{m}' to choose it explicitly.", f)
        return r
    raise NoForwardDerivative(
        f"{forward_error.args[0]} " + ("; ".join(f"Reverse mode failed too ({f})" for f in failures)
                                       if failures else "No other method applies.")
    ) from forward_error


def _autograd_ok(req: Request, work: Work, f, x) -> bool:
    try:
        return autograd_admissible(captured(f, x, req.batched, req.op), work)
    except TraceError:
        return False


def _run(method: str, req: Request, work: Work, f, x, key):
    if method == "reverse":
        return work.reverse()
    if method == "autograd":  # nested torch.autograd.grad (_autograd.py); biharmonic in coordinates
        combos, dirs = ((work.reference_combos, None) if work.reference_combos is not None
                        else (work.combos, work.directions))
        return autograd_taylor(req.op, f, x, work.items, combos, req.batched, stacked=work.stacked,
                               assemble=work.assemble, fast_key=key, directions=dirs)
    return taylor(req.op, f, x, work.items, work.combos, req.batched, req.chunk_size, stacked=work.stacked,
                  assemble=work.assemble, fast_key=key, directions=work.directions,
                  reference_combos=work.reference_combos)


__all__ = ["Request", "choose_method", "dispatch", "in_shape", "validate"]

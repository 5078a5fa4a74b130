"""The one dispatch path of every public operator: fast path -> validation -> method choice -> run.

    _api (operator: docstring, builds a Request)
      -> _dispatch.dispatch
           -> _cache.fast_call                   (a registered call path: replayed, done)
           -> validate, _requests.prepare        (what to propagate, how to assemble the result)
           -> choose_method                      (forward Taylor, or reverse where the operator has it)
           -> _taylor.taylor | Work.reverse      (-> _cache -> _capture / _build)

The fallback policy is the same for every operator: with ``method="auto"``, an op that PyTorch cannot
differentiate in forward mode sends the call to the operator's reverse-mode form where it has one.
"""

from __future__ import annotations

import math

from torch import Tensor

from ._build import NoForwardDerivative
from ._cache import fast_call, output_shape
from ._capture import TraceError
from ._requests import METHODS, Request, Work, in_shape, prepare
from ._taylor import taylor


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


def choose_method(kind: str, n_in: int, n_out: int) -> str:
    """The documented cost model of ``method="auto"``, in forward-pass equivalents (FPE).

    Forward Taylor mode costs about one FPE per propagated coefficient stream. A reverse (vector-Jacobian)
    pass costs about 3 FPE (forward plus backward), vectorized over output directions.

    * ``jacobian``: forward ``1 + n_in`` against reverse ``1 + 3 n_out``.
    * ``hessian``: forward ``1 + n_in + n_in (n_in + 1) / 2`` against reverse-over-reverse
      ``3 n_out (1 + n_in)``.
    * everything else (collapsed Laplacian, partials, biharmonic): forward.

    Example:
        >>> import torchderiv
        >>> torchderiv.choose_method("jacobian", n_in=100, n_out=1)
        'reverse'
    """
    if kind == "jacobian":
        return "forward" if 1 + n_in <= 1 + 3 * n_out else "reverse"
    if kind == "hessian":
        fwd = 1 + n_in + n_in * (n_in + 1) / 2
        rev = 3 * n_out * (1 + n_in)
        return "forward" if fwd <= rev else "reverse"
    return "forward"


def _out_size(req: Request, f, x: Tensor) -> int:
    """Per-sample output size of ``f``, read off the traced graph (``f`` itself is not run)."""
    try:
        shape = output_shape(f, x, req.batched, req.op)
    except TraceError:
        return 1  # untraceable f: the torch.func fallback is used whatever the method
    return math.prod(shape[1:] if req.batched else shape)


def _method(req: Request, work: Work, f, x: Tensor) -> str:
    if req.method != "auto":
        return req.method
    if work.reverse is None or work.kind not in ("jacobian", "hessian"):
        return "forward"
    return choose_method(work.kind, work.n_in, _out_size(req, f, x))


def dispatch(req: Request, f, x):
    """Compute the request ``req`` for ``f`` at ``x`` (see the module docstring for the path)."""
    key = req.key(x)
    if key is not None:
        r = fast_call(f, key, x)
        if r is not None:
            return r
    validate(req, f, x)
    work = prepare(req, f, x)
    if work.direct is not None:
        return work.direct()
    method = _method(req, work, f, x)
    if method == "reverse":
        return work.reverse()
    try:
        return taylor(req.op, f, x, work.items, work.combos, req.batched, req.chunk_size, stacked=work.stacked,
                      assemble=work.assemble, fast_key=key, directions=work.directions,
                      reference_combos=work.reference_combos)
    except NoForwardDerivative as e:
        if req.method != "auto" or work.reverse is None:
            raise
        # an op PyTorch cannot differentiate in forward mode (grid_sampler_3d): "auto" takes reverse mode
        forward_error = e
    try:
        return work.reverse()
    except RuntimeError as e:  # torch's reverse mode cannot either (grid_sampler_3d's backward under vmap)
        raise NoForwardDerivative(
            f"{forward_error.args[0]} Reverse mode failed too: {str(e).splitlines()[0]}"
        ) from e


__all__ = ["Request", "choose_method", "dispatch", "in_shape", "validate"]

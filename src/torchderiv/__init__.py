"""torchderiv: fast, exact per-sample derivatives of PyTorch networks with respect to their inputs.

A Taylor-mode transform traces ``f`` once to an ATen fx graph, generates a forward graph that propagates
the value plus the Taylor coefficients a request needs, caches it and runs it. Results stay
differentiable w.r.t. the parameters of ``f`` with one ordinary backward pass.
"""

from ._api import (
    biharmonic,
    choose_method,
    divergence,
    hessian,
    hessian_diagonal,
    jacobian,
    jacobian_diagonal,
    laplacian,
    partials,
)
from ._cache import cache_info, clear_cache
from ._capture import BatchMixingError, TraceError
from ._sparsity import sparsity
from ._warnings import FallbackWarning, reset_fallback_warnings

__version__ = "0.1.0"


__all__ = [
    "jacobian",
    "jacobian_diagonal",
    "hessian",
    "hessian_diagonal",
    "laplacian",
    "divergence",
    "partials",
    "biharmonic",
    "sparsity",
    "choose_method",
    "cache_info",
    "clear_cache",
    "BatchMixingError",
    "TraceError",
    "FallbackWarning",
    "reset_fallback_warnings",
]


def __getattr__(name: str):
    # optional integrations load on first access, so that importing torchderiv never imports them
    if name == "deepxde":
        import importlib

        return importlib.import_module(".deepxde", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

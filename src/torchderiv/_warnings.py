"""The warning raised when a call leaves the generated Taylor graph, and its once-per-reason memory.

Every path that computes a result by other means than the generated forward graph (the whole-call
fallback to torch.func for an ``f`` that cannot be traced, the generic per-op rule for an op without a
Taylor rule, ``method="auto"`` switching to reverse mode) warns with :class:`FallbackWarning`, once per
``(reason, f)``. The result is still correct; it is slower. Tests turn the warning into an error to make
sure that the engine, not its fallback, produced the numbers they check.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import warnings
import weakref
from collections.abc import Hashable, Iterator

import torch

__all__ = ["FallbackWarning", "reset_fallback_warnings", "warn_fallback", "about"]


class FallbackWarning(UserWarning):
    """A result was computed outside the generated Taylor graph (correct, slower).

    Raised once per reason and function. Turn it into an error to insist on the fast path::

        warnings.simplefilter("error", torchderiv.FallbackWarning)
    """


# (f's owner) -> reasons already reported for it. Weak keys: a function that goes away frees its entry and a
# new function at the same address is not mistaken for it.
_seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_seen_by_id: set = set()  # owners that take no weak reference (rare): keyed by id, until reset
_current: contextvars.ContextVar = contextvars.ContextVar("torchderiv_function", default=None)
_PKG = os.path.dirname(os.path.abspath(__file__))
_TORCH = os.path.dirname(os.path.abspath(torch.__file__))


def reset_fallback_warnings() -> None:
    """Forget which fallbacks were already reported, so that each warns again on its next use.

    :class:`FallbackWarning` is raised once per reason and function; tests that check for it call this first.

    Example:
        >>> import torchderiv
        >>> torchderiv.reset_fallback_warnings()
    """
    _seen.clear()
    _seen_by_id.clear()


@contextlib.contextmanager
def about(f) -> Iterator[None]:
    """Within this block, fallbacks reported without an explicit ``f`` (the per-op rule) are about ``f``."""
    token = _current.set(f)
    try:
        yield
    finally:
        _current.reset(token)


def _owner_and_reason(f, reason: Hashable) -> tuple[object, Hashable]:
    # a bound method is a new object at every attribute access: key it by its instance and function
    self = getattr(f, "__self__", None)
    if self is not None and hasattr(f, "__func__"):
        return self, (reason, f.__func__)
    return f, reason


def _first_seen(f, reason: Hashable) -> bool:
    owner, key = _owner_and_reason(f, reason)
    try:
        reasons = _seen.setdefault(owner, set())
    except TypeError:  # not weakly referenceable (None, some builtins)
        k = (id(owner), key)
        if k in _seen_by_id:
            return False
        _seen_by_id.add(k)
        return True
    if key in reasons:
        return False
    reasons.add(key)
    return True


def _stacklevel() -> int:
    """The stack level of the user's call: the first frame outside torchderiv and torch (the build runs inside
    make_fx) and outside code that torch.fx generates (``<string>``), else the first outside torchderiv and torch
    (a call typed at the interactive prompt, ``<stdin>``)."""
    level, frame, first = 1, sys._getframe(1), None
    while frame is not None:
        name = frame.f_code.co_filename
        if not os.path.abspath(name).startswith((_PKG, _TORCH)):
            if not name.startswith("<"):
                return level
            first = first or level
        frame = frame.f_back
        level += 1
    return first or 1


def warn_fallback(reason: Hashable, message: str, f=None) -> None:
    """Warn with :class:`FallbackWarning` unless ``(reason, f)`` was reported already.

    ``f`` defaults to the function set by :func:`about` (``None`` outside such a block)."""
    if f is None:
        f = _current.get()
    if _first_seen(f, reason):
        warnings.warn(message, FallbackWarning, stacklevel=_stacklevel())

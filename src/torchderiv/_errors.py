"""Bad input, reported cleanly: torch's internal loggers kept quiet while ``f`` is traced, errors raised by
``f`` itself prefixed with the operator and the shape of ``x``, and the 1-D ``x`` hint."""

from __future__ import annotations

import contextlib
import logging

from torch import Tensor

# torch loggers that print tracebacks of failed fake-tensor / tracing steps at ERROR level (a shape mismatch
# in f prints one per failed meta kernel, about 300 lines) although the failure is raised anyway
_TRACE_LOGGERS = (
    "torch._subclasses.fake_tensor",
    "torch.fx.experimental.proxy_tensor",
    "torch.fx.experimental.symbolic_shapes",
    "torch._dynamo",
    "torch._export",
    "torch.export",
)


@contextlib.contextmanager
def quiet_torch_logs():
    """Silence torch's tracing loggers for the duration of a capture; their previous state is restored."""
    loggers = [logging.getLogger(name) for name in _TRACE_LOGGERS]
    before = [lg.disabled for lg in loggers]
    for lg in loggers:
        lg.disabled = True
    try:
        yield
    finally:
        for lg, was in zip(loggers, before):
            lg.disabled = was


def f_error(fname: str, x: Tensor, e: BaseException, *, batched: bool = True,
            what: str = "f raised an error") -> BaseException:
    """``e`` (raised by ``f`` itself) as the same exception type with the operator's name and ``x``'s shape in
    front of torch's own message; the caller raises it ``from e``. A 1-D ``x`` with ``batched=True`` gets the
    hint that each entry is one sample."""
    shape = tuple(x.shape)
    msg = f"{fname}: {what} on x of shape {shape}: {e}"
    if batched and x.dim() == 1:
        msg += "; " + one_d_hint(x)
    if e.__context__ is not None and e.__cause__ is None:
        e.__suppress_context__ = True  # f ran after a failed trace: that trace's traceback is noise here
    try:
        new = type(e)(msg)
    except Exception:  # noqa: BLE001 - an exception type that does not take one message
        new = RuntimeError(msg)
    if str(new) != msg:  # KeyError quotes its message, others may reformat it
        new = RuntimeError(msg)
    return new


def one_d_hint(x: Tensor) -> str:
    n = x.shape[0]
    return (f"x is 1-D of shape ({n},); batched=True expects [B, *in] and treats each of the {n} entries as "
            f"one scalar sample: pass x[None] / x.unsqueeze(0) for one point with {n} coordinates, or "
            f"batched=False")

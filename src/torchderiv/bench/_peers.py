"""Methods specific to one scenario: the seeds' own code, DeepXDE, the PINN training step.

The generic ways to compute each request (torchderiv, torch.func, autograd loops) are in ``_methods``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import os
from collections.abc import Callable

import torch
from torch import nn

import torchderiv

from . import _methods as M
from ._methods import Builder, Runner, Setup

# ----------------------------------------------------------------------------- seed-specific methods


def af_jacobian_diagonal(vectorize: bool) -> Builder:
    """The seeds' method: the full ``[B, *out, B, *in]`` Jacobian by ``torch.autograd.functional.jacobian``,
    then its batch diagonal."""

    def build(s: Setup) -> Runner:
        def run():
            J = torch.autograd.functional.jacobian(s.f, s.x, vectorize=vectorize)
            B, n = s.B, s.n
            m = J.numel() // (B * B * n)
            d = J.reshape(B, m, B, n).diagonal(0, 0, 2)  # [m, n, B]
            return (d.permute(2, 0, 1).reshape(*J.shape[: J.dim() - s.x.dim()], *s.x.shape[1:]).detach(),)

        return run

    return build


def backward_sampling(s: Setup) -> Runner:
    """Seed 002's answer: ``out.backward(m)`` with a one-hot column ``m`` per output component, reading
    ``x.grad`` (rows are independent). Like the seed it also accumulates parameter gradients; they are
    reset afterwards."""
    params = [p for p in s.f.parameters()] if isinstance(s.f, nn.Module) else []

    def run():
        with torch.enable_grad():
            a = s.x.detach().clone().requires_grad_(True)
            out = s.f(a)
            of = out.reshape(out.shape[0], -1)
            cols = []
            for k in range(of.shape[1]):
                m = torch.zeros_like(of)
                m[:, k] = 1
                of.backward(m, retain_graph=True)
                cols.append(a.grad.reshape(a.shape[0], -1))
                a.grad = None
            for p in params:
                p.grad = None
            return (torch.stack(cols, 1).reshape(*out.shape, *a.shape[1:]),)

    return run


def seed001_loop(s: Setup) -> Runner:
    """Seed 001's code: per output component, ``continuous_diff`` (autograd.grad with create_graph=True)
    for the gradient and once more per input coordinate: ``(J [B, m, n], H [B, m, n, n])``."""

    def continuous_diff(x, y):
        return torch.autograd.grad(y, x, torch.ones_like(y), retain_graph=True, create_graph=True)[0]

    def run():
        with torch.enable_grad():
            x = s.x.detach().requires_grad_(True)
            output = s.f(x)
            J, H = [], []
            for k in range(output.shape[1]):
                y = output[:, k]
                dx = continuous_diff(x, y)
                H.append(torch.stack([continuous_diff(x, dx[:, i]) for i in range(x.shape[1])], 1))
                J.append(dx)
            return torch.stack(J, 1).detach(), torch.stack(H, 1).detach()

    return run


def td_jet(spec_pairs: bool = False) -> Builder:
    """``(J, H)`` from ``torchderiv.jacobian`` + ``torchderiv.hessian`` (two passes), or with ``spec_pairs``
    the one ``torchderiv.partials`` call over every multi-index of order 1 and 2 that a user writes (its
    ``n + n(n+1)/2`` tensors; :func:`jet_to_dense` lays them out as ``(J, H)`` for the agreement check)."""

    def build(s: Setup) -> Runner:
        n = s.n
        if not spec_pairs:
            return lambda: (torchderiv_jacobian(s), torchderiv_hessian(s))
        spec = [(i,) for i in range(n)] + [(i, j) for i in range(n) for j in range(i, n)]
        return lambda: tuple(t.detach() for t in torchderiv.partials(s.f, s.x, spec).values())

    return build


def jet_to_dense(parts: tuple) -> tuple:
    """``n`` first partials then the ``(i, j), i <= j`` second partials (``[B, *out]`` each) as the
    dense ``(J [B, *out, n], H [B, *out, n, n])`` of torch.func (mixed partials duplicated)."""
    n = 0
    while n + n * (n + 1) // 2 < len(parts):
        n += 1
    pairs = [(i, j) for i in range(n) for j in range(i, n)]
    order = [pairs.index((min(i, j), max(i, j))) for i in range(n) for j in range(n)]
    J = torch.stack(parts[:n], -1)
    H = torch.stack([parts[n + k] for k in order], -1)
    return J, H.unflatten(-1, (n, n))


def torchderiv_jacobian(s):
    return torchderiv.jacobian(s.f, s.x).detach()


def torchderiv_hessian(s):
    return torchderiv.hessian(s.f, s.x).detach()


def _deepxde():
    """The DeepXDE module with the PyTorch backend, or None when it is not installed."""
    os.environ.setdefault("DDE_BACKEND", "pytorch")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it announces its backend on stdout
            dde = importlib.import_module("deepxde")
    except Exception:  # noqa: BLE001 - any import failure means: not available
        return None
    if dde.backend.backend_name != "pytorch":
        raise RuntimeError(f"DeepXDE uses the {dde.backend.backend_name} backend; set DDE_BACKEND=pytorch")
    return dde


def dde_jacobian(s: Setup) -> Runner:
    dde = _deepxde()

    def run():
        with torch.enable_grad():
            x = s.x.detach().requires_grad_(True)
            y = s.f(x)
            cols = [torch.cat([dde.grad.jacobian(y, x, i=k, j=j) for j in range(s.n)], 1)
                    for k in range(y.shape[1])]
            dde.grad.clear()
            return (torch.stack(cols, 1).detach(),)

    return run


def dde_jet(s: Setup) -> Runner:
    dde = _deepxde()
    n = s.n

    def run():
        with torch.enable_grad():
            x = s.x.detach().requires_grad_(True)
            y = s.f(x)
            m = y.shape[1]
            J = torch.stack([torch.cat([dde.grad.jacobian(y, x, i=k, j=j) for j in range(n)], 1)
                             for k in range(m)], 1)
            H = torch.stack([torch.stack([torch.cat([dde.grad.hessian(y, x, component=k, i=i, j=j)
                                                     for j in range(n)], 1) for i in range(n)], 1)
                             for k in range(m)], 1)
            dde.grad.clear()
            return J.detach(), H.detach()

    return run


def dde_laplacian(s: Setup) -> Runner:
    dde = _deepxde()

    def run():
        with torch.enable_grad():
            x = s.x.detach().requires_grad_(True)
            y = s.f(x)
            lap = sum(dde.grad.hessian(y, x, i=i, j=i) for i in range(s.n))
            dde.grad.clear()
            return (lap.detach(),)

    return run


def dde_available() -> bool:
    """Whether DeepXDE is installed (checked without importing it: the import is slow)."""
    return importlib.util.find_spec("deepxde") is not None


# ----------------------------------------------------------------------------- PINN training step


def pinn_step(lap_fn: Callable[[Callable, torch.Tensor], torch.Tensor]) -> Builder:
    """``loss = mean(lap(f)(x)^2); loss.backward()``: returns ``(lap, all parameter gradients)``."""

    def build(s: Setup) -> Runner:
        params = list(s.f.parameters())

        def run():
            with torch.enable_grad():
                for p in params:
                    p.grad = None
                lap = lap_fn(s.f, s.x)
                loss = (lap**2).mean()
                loss.backward()
                # parameters the Laplacian does not depend on (the output bias) get no gradient
                grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
                return lap.detach(), torch.cat([g.reshape(-1) for g in grads])

        return run

    return build


def compile_available() -> bool:
    """Whether ``torch.compile`` can compile here: inductor needs a C++ compiler for CPU code."""
    import shutil

    if os.environ.get("TORCHDERIV_BENCH_NO_COMPILE"):
        return False
    try:
        import torch._inductor  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means no compiler backend
        return False
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


def pinn_step_compiled(s: Setup) -> Runner:
    """:func:`pinn_step` of ``torchderiv.laplacian`` with the loss compiled by ``torch.compile``.

    One eager call first builds torchderiv's cached graph, so dynamo traces through the cached call path
    into the generated graph and compiles the loss, forward and backward, as one graph (the pattern of
    docs/training.md). The compilation (the first compiled call) happens here, outside the timed runs; its
    wall time is left on the runner as ``setup_seconds``. The autograd-loop baseline cannot take this route
    (torch.compile does not support the double backward it needs)."""
    def loss_fn(x):
        lap = torchderiv.laplacian(s.f, x)
        return (lap**2).mean(), lap

    with torch.enable_grad():
        loss_fn(s.x)
    return compiled_step(s, loss_fn)


def compiled_step(s, loss_fn) -> Callable:
    """A runner of one training step with ``loss_fn(x) -> (loss, out)`` compiled by ``torch.compile``: the
    compilation (the first compiled call and its backward) happens here, outside the timed runs, its wall
    time left on the runner as ``setup_seconds``; a machine where inductor cannot build raises
    :class:`MethodUnavailable`. The runner returns ``(out, flattened parameter gradients)``."""
    import time

    params = list(s.f.parameters())
    # each scenario measured as its own program: without the reset, dynamo's recompiles for the earlier
    # scenarios' nets (same loss code, other closures) make the batch dimension dynamic and fill the
    # recompile limit, and a later scenario would time the leftovers of the earlier ones
    torch._dynamo.reset()
    with torch.enable_grad():
        compiled = torch.compile(loss_fn)
        t0 = time.perf_counter()
        try:
            loss, _ = compiled(s.x)
        except Exception as e:  # noqa: BLE001 - inductor cannot build here (compiler, headers): a note
            msg = str(e).strip().splitlines()
            raise M.MethodUnavailable(f"torch.compile failed on this machine: {type(e).__name__}: "
                                      f"{msg[0][:200] if msg else ''}") from e
        loss.backward()
        for p in params:
            p.grad = None
        secs = time.perf_counter() - t0

    def run():
        with torch.enable_grad():
            for p in params:
                p.grad = None
            loss, out = compiled(s.x)
            loss.backward()
            grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
            return out.detach(), torch.cat([g.reshape(-1) for g in grads])

    run.setup_seconds = secs  # type: ignore[attr-defined]
    return run


def lap_autograd(f, x):
    x = x.detach().requires_grad_(True)
    return M.ag_laplacian_graph(x, f(x), create_graph=True)


def lap_torchderiv(f, x):
    return torchderiv.laplacian(f, x)


def lap_vmap_hessian(f, x):
    H = torch.func.vmap(torch.func.hessian(M.per_sample(f)))(x)  # [B, 1, n, n]
    return H.diagonal(0, -2, -1).sum(-1)


def lap_dde(f, x):
    dde = _deepxde()
    x = x.detach().requires_grad_(True)
    y = f(x)
    lap = sum(dde.grad.hessian(y, x, i=i, j=i) for i in range(x.shape[1]))
    dde.grad.clear()
    return lap

"""Randomized estimators (issue 14): the methods of the ``laplacian-d1000-random`` and ``divergence-ffjord``
scenarios.

A stochastic method returns a different estimate on every call; the runner reports its relative RMS error
over repeated calls against the float64 exact value (the ``rel RMS err`` column) instead of checking it to
a tolerance. Directions are drawn inside every timed call (per sample unless the row says shared).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

import torch
from torch import Tensor, nn
from torch.func import jvp, vmap

import torchderiv

from ._methods import Builder, MethodUnavailable, Runner, Setup


def td_random(op: str, estimator: str, samples: int, shared: bool = False) -> Builder:
    """``torchderiv.<op>(..., estimator=, samples=)`` with a fixed-seed generator on the setup's device."""

    def build(s: Setup) -> Runner:
        fn = getattr(torchderiv, op)
        g = torch.Generator(device=s.x.device).manual_seed(0)

        def run():
            return (fn(s.f, s.x, estimator=estimator, samples=samples, generator=g, shared=shared).detach(),)

        return run

    return build


def _signs(shape, g, device, dtype) -> Tensor:
    return torch.randint(0, 2, shape, generator=g, device=device).to(dtype).mul_(2).sub_(1)


def tf_hutchinson_laplacian(samples: int) -> Builder:
    """torch.func: per-sample Rademacher ``v``, ``d2/dt2 f(x + t v)`` by ``jvp`` of ``jvp`` (forward over
    forward), ``vmap`` over the ``K`` directions; rows do not interact, so each row gets its own ``v``."""

    def build(s: Setup) -> Runner:
        f, x = s.f, s.x
        g = torch.Generator(device=x.device).manual_seed(0)

        def second(v):
            return jvp(lambda z: jvp(f, (z,), (v,))[1], (x,), (v,))[1]

        def run():
            V = _signs((samples, *x.shape), g, x.device, x.dtype)
            return (vmap(second)(V).mean(0).detach(),)

        return run

    return build


def tf_hutchinson_divergence(samples: int) -> Builder:
    """torch.func: ``v^T (J v)`` with ``jvp``, ``vmap`` over ``K`` per-sample Rademacher directions."""

    def build(s: Setup) -> Runner:
        f, x = s.f, s.x
        g = torch.Generator(device=x.device).manual_seed(0)

        def run():
            V = _signs((samples, *x.shape), g, x.device, x.dtype)
            Jv = vmap(lambda v: jvp(f, (x,), (v,))[1])(V)
            return ((V * Jv).flatten(2).sum(-1).mean(0).detach(),)

        return run

    return build


def ag_hutchinson_divergence(samples: int) -> Builder:
    """FFJORD's estimator: ``v^T J`` by one ``torch.autograd.grad`` (vector-Jacobian product) per direction,
    dotted with ``v``; Rademacher ``v`` per sample."""

    def build(s: Setup) -> Runner:
        f, x0 = s.f, s.x
        g = torch.Generator(device=x0.device).manual_seed(0)

        def run():
            with torch.enable_grad():
                x = x0.detach().requires_grad_(True)
                y = f(x)
                acc = 0.0
                for _ in range(samples):
                    v = _signs(x.shape, g, x.device, x.dtype)
                    (vJ,) = torch.autograd.grad(y, x, v, retain_graph=samples > 1)
                    acc = acc + (vJ * v).flatten(1).sum(-1)
            return ((acc / samples).detach(),)

        return run

    return build


def jet_available() -> bool:
    return importlib.util.find_spec("jet") is not None


def jet_version() -> str:
    try:
        return importlib.metadata.version("jet-for-pytorch")
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"


def jet_laplacian(samples: int) -> Builder:
    """jet-for-pytorch's randomized collapsed Laplacian (Rademacher, ``K`` samples), per sample (``vmap``
    over the batch). Only when the package is importable; its API is looked up, not assumed."""

    def build(s: Setup) -> Runner:
        if not jet_available():
            raise MethodUnavailable("jet-for-pytorch is not installed")
        import jet  # type: ignore[import-not-found]

        lap = getattr(jet, "laplacian", None)
        if lap is not None and not callable(lap):
            lap = getattr(lap, "laplacian", None)
        if lap is None:
            try:
                from jet.laplacian import laplacian as lap  # type: ignore[import-not-found,no-redef]
            except ImportError as e:
                raise MethodUnavailable(f"jet-for-pytorch has no laplacian transform here ({e})") from e
        f = lambda xi: s.f(xi.unsqueeze(0)).squeeze(0)  # noqa: E731 - jet works per sample
        try:
            L = lap(f, (s.x[0],), randomization=("rademacher", samples))
        except TypeError:
            L = lap(f, s.x[0], randomization=("rademacher", samples))
        per = vmap(L, randomness="different")

        def run():
            out = per(s.x)
            out = out[-1] if isinstance(out, tuple) else out
            return (out.detach(),)

        return run

    return build


# ----------------------------------------------------------------------------- networks


class CNFField(nn.Module):
    """A CNF-style vector field ``dz/dt = f(z)``: ``D -> H -> H -> D``, softplus (as in FFJORD's MLPs)."""

    def __init__(self, d: int, h: int):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(d, h), nn.Linear(h, h), nn.Linear(h, d)

    def forward(self, z):
        h = nn.functional.softplus(self.l1(z))
        h = nn.functional.softplus(self.l2(h))
        return self.l3(h)

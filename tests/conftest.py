"""Shared fixtures and reference helpers; the zoo harness itself (case type, reference cache, closeness check)
lives in ``_harness.py``.

Every reference runs through :class:`_harness.PrimitiveTwin` (``layer_norm``, ``prod`` and ``cumprod`` written
out from primitives): torch's own nested autograd through those ops is wrong at order >= 3 (``layer_norm``) or
divides by the input (``prod`` / ``cumprod`` backward). Models with a ``reference`` method use it instead of
themselves (a hand-written twin with the same parameters).

Fixtures here: one thread per process (xdist runs the processes side by side), a fixed global seed and a
fresh :class:`torchderiv.FallbackWarning` memory for every test (pytest turns that warning into an error:
a test that expects a fallback says so with ``pytest.warns``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jacrev

import torchderiv
from _harness import ATOL, DTYPE, RTOL, Case, close, disable_engine, partials, restricted, twin, value

torch.set_num_threads(1)  # the only thread setting of the suite: one per worker process


def pytest_addoption(parser):
    parser.addoption("--engine-disabled", action="store_true", default=False,
                     help="patch torchderiv's capture to raise TraceError: every call goes through the torch.func "
                          "fallback (the suite must then fail broadly; see test_harness.py)")


def pytest_configure(config):
    if config.getoption("--engine-disabled"):
        assert disable_engine(setattr) > 0, "--engine-disabled found no capture function to patch"


@pytest.fixture(autouse=True)
def _fresh_state():
    """A fixed global seed and a fresh fallback-warning memory for every test."""
    torch.manual_seed(0)
    torchderiv.reset_fallback_warnings()
    yield


# ----------------------------------------------------------------------------- comparison and references


def assert_close(actual, expected, atol: float = ATOL, rtol: float = RTOL, msg: str = "") -> None:
    close(actual, expected, msg, atol, rtol)


def in_shape(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(x.shape[1:])


def n_in(x: torch.Tensor) -> int:
    return math.prod(in_shape(x))


def ref_restricted(f: Callable, x: torch.Tensor, coords: Sequence[int], k: int) -> torch.Tensor:
    """Order-``k`` derivatives of ``f`` per sample w.r.t. the flattened input coordinates ``coords`` only:
    ``[B, *out, m, ..., m]``."""
    return restricted(f, x, k, coords)


def ref_value(f: Callable, x: torch.Tensor) -> torch.Tensor:
    return value(f, x)


def ref_jacobian(f: Callable, x: torch.Tensor) -> torch.Tensor:
    """``[B, *out, *in]``."""
    J = restricted(f, x, 1)
    return J.reshape(*J.shape[:-1], *in_shape(x))


def ref_hessian(f: Callable, x: torch.Tensor) -> torch.Tensor:
    """``[B, *out, *in, *in]``."""
    H = restricted(f, x, 2)
    return H.reshape(*H.shape[:-2], *in_shape(x), *in_shape(x))


def ref_partials_autograd(f: Callable, x: torch.Tensor, spec: Sequence[tuple[int, ...]]) -> dict:
    """Partials by the classic nested ``torch.autograd.grad(create_graph=True)`` loop of the twin of ``f``, shared
    prefixes reused: a second reference, independent of vmap / jacrev, cross-checked in test_zoo.py.

    Differentiates ``sum_b y[b, o]``: per-sample derivatives because the rows of ``f`` do not interact."""
    B = x.shape[0]
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        y = twin(f)(x)
        out_shape = y.shape[1:]
        yf = y.reshape(B, -1)
        memo: dict = {}

        def d(o: int, key: tuple[int, ...]) -> torch.Tensor:
            if not key:
                return yf[:, o]
            if (o, key) not in memo:
                parent = d(o, key[:-1])
                g = None
                if parent.requires_grad:
                    g = torch.autograd.grad(parent.sum(), x, create_graph=True, allow_unused=True)[0]
                memo[(o, key)] = x.new_zeros(B) if g is None else g.reshape(B, -1)[:, key[-1]]
            return memo[(o, key)]

        return {key: torch.stack([d(o, tuple(sorted(key))) for o in range(yf.shape[1])], 1)
                .reshape(B, *out_shape).detach() for key in spec}


def ref_partials(f: Callable, x: torch.Tensor, spec: Sequence[tuple[int, ...]]) -> dict:
    """Reference for ``torchderiv.partials`` with tuple specs: one dict entry ``[B, *out]`` per key."""
    return partials(f, x, spec)


def ref_laplacian(f: Callable, x: torch.Tensor, dims=None, weights=None) -> torch.Tensor:
    dims = list(range(n_in(x))) if dims is None else list(dims)
    H = restricted(f, x, 2, dims)  # [B, *out, m, m]
    if weights is None:
        return H.diagonal(dim1=-2, dim2=-1).sum(-1)
    return (H * torch.as_tensor(weights, dtype=H.dtype)).sum((-2, -1))


def ref_biharmonic(f: Callable, x: torch.Tensor, dims=None) -> torch.Tensor:
    dims = list(range(n_in(x))) if dims is None else list(dims)
    keys = [(i, i, j, j) for i in dims for j in dims]
    P = ref_partials_autograd(f, x, keys)
    return sum(P[k] for k in keys)


def fd_derivative(g: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, coord: int, h: float = 1e-4):
    """Fourth-order central finite difference of ``g`` along the flattened per-sample coordinate ``coord``."""
    e = torch.zeros_like(x).reshape(x.shape[0], -1)
    e[:, coord] = 1.0
    e = e.reshape(x.shape)
    return (-g(x + 2 * h * e) + 8 * g(x + h * e) - 8 * g(x - h * e) + g(x - 2 * h * e)) / (12 * h)


def ref_jacobian_unbatched(f: Callable, x: torch.Tensor) -> torch.Tensor:
    return jacrev(twin(f))(x)


# ----------------------------------------------------------------------------- the zoo


class Sin(nn.Module):
    def __init__(self, w0: float = 1.0):
        super().__init__()
        self.w0 = w0

    def forward(self, x):
        return torch.sin(self.w0 * x)


def mlp(sizes: Sequence[int], act: Callable[[], nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), act()]
    return nn.Sequential(*layers[:-1])


def manual_layer_norm(h: torch.Tensor, ln: nn.LayerNorm) -> torch.Tensor:
    """LayerNorm as mean / centered / var / rsqrt, sharing ``ln``'s parameters (reference twin)."""
    m = h.mean(-1, keepdim=True)
    c = h - m
    v = (c * c).mean(-1, keepdim=True)
    return c * torch.rsqrt(v + ln.eps) * ln.weight + ln.bias


class ResidualLN(nn.Module):
    """Linear -> [h + W tanh(LN(h))] -> LN -> tanh -> Linear."""

    def __init__(self, d_in=3, width=12, d_out=2):
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.ln1 = nn.LayerNorm(width)
        self.mid = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.out = nn.Linear(width, d_out)
        with torch.no_grad():  # non-trivial affine parameters
            for ln in (self.ln1, self.ln2):
                ln.weight.copy_(1 + 0.3 * torch.randn(width))
                ln.bias.copy_(0.2 * torch.randn(width))

    def _body(self, x, norm):
        h = self.inp(x)
        h = h + self.mid(torch.tanh(norm(h, self.ln1)))
        return self.out(torch.tanh(norm(h, self.ln2)))

    def forward(self, x):
        return self._body(x, lambda h, ln: ln(h))

    def reference(self, x):
        return self._body(x, manual_layer_norm)


class FourierNet(nn.Module):
    def __init__(self, d_in=2, n_feat=6, width=12, d_out=1):
        super().__init__()
        self.register_buffer("B", 1.5 * torch.randn(d_in, n_feat))
        self.net = mlp([2 * n_feat, width, d_out], nn.Tanh)

    def forward(self, x):
        z = x @ self.B
        return self.net(torch.cat([torch.sin(z), torch.cos(z)], -1))


class Attention(nn.Module):
    """Single-head softmax self-attention over the tokens of each sample: [B, T, d] -> [B, T, d]."""

    def __init__(self, d=3):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.scale = 1 / math.sqrt(d)

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        a = torch.softmax(q @ k.transpose(-2, -1) * self.scale, dim=-1)
        return self.o(a @ v) + x


class Conv1dNet(nn.Module):
    """[B, 2, L] -> [B, 2, L] (a square map)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3, padding=1)
        self.c2 = nn.Conv1d(4, 2, 3, padding=1)

    def forward(self, x):
        return self.c2(torch.tanh(self.c1(x)))


class Conv2dNet(nn.Module):
    """[B, 1, 3, 3] -> [B, 2]."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(1, 3, 3, padding=1)
        self.fc = nn.Linear(27, 2)

    def forward(self, x):
        return self.fc(F.softplus(self.c(x)).flatten(-3))


class Pointwise(nn.Module):
    def forward(self, x):
        return torch.sin(x) * x


class MultiOutput(nn.Module):
    """[B, 2] -> [B, 2, 3]."""

    def __init__(self):
        super().__init__()
        self.net = mlp([2, 10, 6], nn.Tanh)

    def forward(self, x):
        return self.net(x).unflatten(-1, (2, 3))


class RationalLog(nn.Module):
    """log(1 + h^2), 1 / (1 + h^2) and a division by an input-dependent denominator."""

    def __init__(self, d_in=2, width=10, d_out=2):
        super().__init__()
        self.a = nn.Linear(d_in, width)
        self.b = nn.Linear(d_in, width)
        self.out = nn.Linear(2 * width, d_out)

    def forward(self, x):
        h, g = self.a(x), self.b(x)
        u = torch.log(1 + h**2) + 1 / (1 + h**2)
        w = g / (1.5 + torch.tanh(h))
        return self.out(torch.cat([u, w], -1))


class SigExpSqrt(nn.Module):
    def __init__(self, d_in=3, width=10, d_out=1):
        super().__init__()
        self.a = nn.Linear(d_in, width)
        self.out = nn.Linear(width, d_out)

    def forward(self, x):
        h = self.a(x)
        return self.out(torch.sigmoid(h) * torch.exp(-0.5 * h**2) + torch.sqrt(1 + h**2))


ZOO: list[Case] = [
    Case("tanh_mlp", lambda: mlp([3, 12, 12, 2], nn.Tanh), (3,), dims=[0, 1]),
    Case("siren", lambda: mlp([2, 16, 16, 1], lambda: Sin(2.0)), (2,), dims=[0, 1]),
    Case("gelu_mlp", lambda: nn.Sequential(nn.Linear(3, 12), nn.GELU(), nn.Linear(12, 12),
                                              nn.GELU(approximate="tanh"), nn.Linear(12, 3)), (3,), dims=[0, 1]),
    Case("silu_softplus_mlp", lambda: nn.Sequential(nn.Linear(2, 12), nn.SiLU(), nn.Linear(12, 12),
                                                       nn.Softplus(), nn.Linear(12, 2)), (2,), dims=[0, 1]),
    Case("residual_layernorm", ResidualLN, (3,), dims=[0, 1]),
    Case("fourier_features", FourierNet, (2,), dims=[0, 1]),
    Case("attention", Attention, (3, 3), heavy=True, dims=[0, 4, 8]),
    Case("conv1d", Conv1dNet, (2, 4), heavy=True, dims=[1, 6]),
    Case("conv2d", Conv2dNet, (1, 3, 3), heavy=True, dims=[0, 4, 8]),
    Case("pointwise", Pointwise, (2, 2), dims=[1, 3]),
    Case("multi_output", MultiOutput, (2,), dims=[0, 1]),
    Case("rational_log", RationalLog, (2,), dims=[0, 1]),
    Case("sigmoid_exp_sqrt", SigExpSqrt, (3,), dims=[0, 1]),
]
ZOO_IDS = [c.name for c in ZOO]
ZOO_BY_NAME = {c.name: c for c in ZOO}


@pytest.fixture
def tanh_mlp():
    torch.manual_seed(0)
    return mlp([2, 16, 16, 3], nn.Tanh).to(DTYPE)

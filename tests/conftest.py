"""Shared fixtures and helpers: the model zoo and independent torch.func reference derivatives.

References are computed per sample with nested reverse mode (``vmap`` of ``jacrev`` applied ``k`` times),
never with forward-over-forward (``jacfwd(jacfwd)`` is wrong through ``layer_norm`` in torch 2.13). Models
with LayerNorm carry a twin ``ref`` callable that uses a manual decomposition of LayerNorm with the very
same parameters, because nested ``jacrev`` through ``F.layer_norm`` is wrong at order >= 3.

Orders 1-2 are taken w.r.t. only the input coordinates a request names (the function is restricted to
those coordinates). Orders 3-4 use the classic nested ``torch.autograd.grad(create_graph=True)`` loop, which
is far cheaper than nested ``jacrev`` through attention / convolutions; test_zoo.py cross-checks the two.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jacrev, vmap

DTYPE = torch.float64
ATOL = 1e-8
RTOL = 1e-6


# ----------------------------------------------------------------------------- comparison


def assert_close(actual, expected, atol: float = ATOL, rtol: float = RTOL, msg: str = "") -> None:
    assert isinstance(actual, torch.Tensor), f"{msg}: expected a tensor, got {type(actual)}"
    assert actual.shape == expected.shape, f"{msg}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{msg}: dtype {actual.dtype} != {expected.dtype}"
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{msg}\n{m}")


# ----------------------------------------------------------------------------- references


def in_shape(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(x.shape[1:])


def n_in(x: torch.Tensor) -> int:
    return math.prod(in_shape(x))


def per_sample(f: Callable) -> Callable:
    return lambda xi: f(xi.unsqueeze(0)).squeeze(0)


def nested_jacrev(g: Callable, k: int) -> Callable:
    for _ in range(k):
        g = jacrev(g)
    return g


def ref_restricted(f: Callable, x: torch.Tensor, coords: Sequence[int], k: int) -> torch.Tensor:
    """Order-``k`` derivatives of ``f`` per sample w.r.t. the flattened input coordinates ``coords`` only.

    Returns ``[B, *out, m, ..., m]`` (``k`` trailing axes of size ``m = len(coords)``)."""
    ins = in_shape(x)
    n = math.prod(ins)
    coords = list(coords)
    E = torch.eye(n, dtype=x.dtype, device=x.device)[:, coords]  # [n, m]
    idx = torch.tensor(coords, dtype=torch.long, device=x.device)

    def per_component(o):
        def one(xi):
            flat = xi.reshape(-1)
            z0 = flat.index_select(0, idx)

            def g(z):
                y = f((flat + E @ (z - z0)).reshape(1, *ins)).squeeze(0)
                return y if o is None else y.reshape(-1)[o]

            return nested_jacrev(g, k)(z0)

        return vmap(one)(x)

    if k < 3:
        return per_component(None)
    # order >= 3: one scalar output component at a time (nested jacrev over vector outputs blows up memory
    # through bmm / softmax)
    out_shape = ref_value(f, x[:1]).shape[1:]
    R = torch.stack([per_component(o) for o in range(math.prod(out_shape))], 1)
    return R.reshape(x.shape[0], *out_shape, *R.shape[2:])


def ref_value(f: Callable, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return f(x)


def ref_jacobian(f: Callable, x: torch.Tensor) -> torch.Tensor:
    """``[B, *out, *in]``."""
    J = ref_restricted(f, x, range(n_in(x)), 1)
    return J.reshape(*J.shape[:-1], *in_shape(x))


def ref_hessian(f: Callable, x: torch.Tensor) -> torch.Tensor:
    """``[B, *out, *in, *in]``."""
    H = ref_restricted(f, x, range(n_in(x)), 2)
    return H.reshape(*H.shape[:-2], *in_shape(x), *in_shape(x))


def ref_partials_autograd(f: Callable, x: torch.Tensor, spec: Sequence[tuple[int, ...]]) -> dict:
    """Partials by the classic nested ``torch.autograd.grad(create_graph=True)`` loop, shared prefixes reused.

    Differentiates ``sum_b y[b, o]``: per-sample derivatives because the rows of ``f`` do not interact (the
    batched contract). Much cheaper than nested ``jacrev`` at orders 3-4 on attention / conv nets."""
    B = x.shape[0]
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        y = f(x)
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
    """Reference for ``torchderiv.partials`` with tuple specs: one dict entry ``[B, *out]`` per key.

    Orders <= 2 by ``vmap`` of nested ``jacrev`` (one call per order over the coordinates used), orders >= 3
    by :func:`ref_partials_autograd` (the two are cross-checked in test_zoo.py)."""
    out = {}
    by_order: dict[int, list] = {}
    for key in spec:
        by_order.setdefault(len(key), []).append(key)
    for k, keys in by_order.items():
        if k == 0:
            for key in keys:
                out[key] = ref_value(f, x)
        elif k <= 2:
            coords = sorted({i for key in keys for i in key})
            pos = {c: i for i, c in enumerate(coords)}
            T = ref_restricted(f, x, coords, k)
            for key in keys:
                out[key] = T[(..., *[pos[i] for i in key])]
        else:
            out.update(ref_partials_autograd(f, x, keys))
    return {key: out[key] for key in spec}


def ref_laplacian(f: Callable, x: torch.Tensor, dims=None, weights=None) -> torch.Tensor:
    n = n_in(x)
    dims = list(range(n)) if dims is None else list(dims)
    H = ref_restricted(f, x, dims, 2)  # [B, *out, m, m]
    if weights is None:
        return H.diagonal(dim1=-2, dim2=-1).sum(-1)
    C = torch.as_tensor(weights, dtype=H.dtype)
    return (H * C).sum((-2, -1))


def ref_biharmonic(f: Callable, x: torch.Tensor, dims=None) -> torch.Tensor:
    n = n_in(x)
    dims = list(range(n)) if dims is None else list(dims)
    keys = [(i, i, j, j) for i in dims for j in dims]
    P = ref_partials_autograd(f, x, keys)
    return sum(P[k] for k in keys)


def ref_jacobian_unbatched(f: Callable, x: torch.Tensor) -> torch.Tensor:
    return jacrev(f)(x)


def fd_derivative(g: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, coord: int, h: float = 1e-4):
    """Fourth-order central finite difference of ``g`` along the flattened per-sample coordinate ``coord``."""
    e = torch.zeros_like(x).reshape(x.shape[0], -1)
    e[:, coord] = 1.0
    e = e.reshape(x.shape)
    return (-g(x + 2 * h * e) + 8 * g(x + h * e) - 8 * g(x - h * e) + g(x - 2 * h * e)) / (12 * h)


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


@dataclass
class ZooCase:
    name: str
    factory: Callable[[], nn.Module]
    in_shape: tuple[int, ...]
    batch: int = 3
    scale: float = 0.8
    heavy: bool = False  # wide input: biharmonic and full order-4 checks restricted to a few coordinates
    lap_dims: list[int] = field(default_factory=lambda: [0, 1])

    def build(self, seed: int = 0):
        torch.manual_seed(1000 + seed)
        model = self.factory().to(DTYPE).eval()
        g = torch.Generator().manual_seed(2000 + seed)
        x = self.scale * torch.randn(self.batch, *self.in_shape, dtype=DTYPE, generator=g)
        ref = model.reference if hasattr(model, "reference") else model
        return model, ref, x

    @property
    def n(self) -> int:
        return math.prod(self.in_shape)


ZOO: list[ZooCase] = [
    ZooCase("tanh_mlp", lambda: mlp([3, 12, 12, 2], nn.Tanh), (3,)),
    ZooCase("siren", lambda: mlp([2, 16, 16, 1], lambda: Sin(2.0)), (2,)),
    ZooCase("gelu_mlp", lambda: nn.Sequential(nn.Linear(3, 12), nn.GELU(), nn.Linear(12, 12),
                                              nn.GELU(approximate="tanh"), nn.Linear(12, 3)), (3,)),
    ZooCase("silu_softplus_mlp", lambda: nn.Sequential(nn.Linear(2, 12), nn.SiLU(), nn.Linear(12, 12),
                                                       nn.Softplus(), nn.Linear(12, 2)), (2,)),
    ZooCase("residual_layernorm", ResidualLN, (3,)),
    ZooCase("fourier_features", FourierNet, (2,)),
    ZooCase("attention", Attention, (3, 3), heavy=True, lap_dims=[0, 4, 8]),
    ZooCase("conv1d", Conv1dNet, (2, 4), heavy=True, lap_dims=[1, 6]),
    ZooCase("conv2d", Conv2dNet, (1, 3, 3), heavy=True, lap_dims=[0, 4, 8]),
    ZooCase("pointwise", Pointwise, (2, 2), lap_dims=[1, 3]),
    ZooCase("multi_output", MultiOutput, (2,)),
    ZooCase("rational_log", RationalLog, (2,)),
    ZooCase("sigmoid_exp_sqrt", SigExpSqrt, (3,)),
]
ZOO_IDS = [c.name for c in ZOO]
ZOO_BY_NAME = {c.name: c for c in ZOO}


@pytest.fixture(params=ZOO, ids=ZOO_IDS)
def zoo_case(request) -> ZooCase:
    return request.param


@pytest.fixture
def tanh_mlp():
    torch.manual_seed(0)
    return mlp([2, 16, 16, 3], nn.Tanh).to(DTYPE)


@pytest.fixture(autouse=True)
def _fixed_seed():
    torch.manual_seed(0)
    yield

"""Fourier layers and complex intermediates: FNO-style spectral convolutions (rfft, complex weights, a slice
write of the kept modes, irfft), 2-D FFTs, holomorphic complex chains, and what must not pass silently
(non-holomorphic functions of complex tensors at order >= 2, Fourier transforms along the batch).

Everything in float64 against torch.func nested reverse mode or nested torch.autograd.grad."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchderiv as td

DT = torch.float64


def per_sample(f):
    return lambda xi: f(xi.unsqueeze(0)).squeeze(0)


def rev(f, k):
    for _ in range(k):
        f = torch.func.jacrev(f)
    return f


class SpectralConv1d(nn.Module):
    """One FNO layer on a function sampled at n points: lift, keep the lowest Fourier modes with complex
    weights (written into a zero spectrum: ``Y[..., :modes] = ...``), back to space, plus a pointwise conv."""

    def __init__(self, n: int = 12, modes: int = 4, width: int = 6):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.modes = modes
        self.lift = nn.Linear(1, width)
        self.proj = nn.Linear(width, 1)
        self.wr = nn.Parameter(torch.randn(width, width, modes, generator=g) / width)
        self.wi = nn.Parameter(torch.randn(width, width, modes, generator=g) / width)
        self.pointwise = nn.Conv1d(width, width, 1)

    def forward(self, x):  # [B, n] -> [B, n]
        h = self.lift(x.unsqueeze(-1)).transpose(1, 2)  # [B, width, n]
        X = torch.fft.rfft(h, dim=-1)
        Y = torch.zeros_like(X)
        Y[..., : self.modes] = torch.einsum("bim,iom->bom", X[..., : self.modes], torch.complex(self.wr, self.wi))
        h = torch.tanh(torch.fft.irfft(Y, n=h.shape[-1], dim=-1) + self.pointwise(h))
        return self.proj(h.transpose(1, 2)).squeeze(-1)


class Fourier2d(nn.Module):
    """2-D FFT of a per-sample image, a complex filter, inverse FFT; real and imaginary parts both used."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.filt = nn.Parameter(torch.randn(4, 4, dtype=torch.complex128, generator=g))
        self.out = nn.Linear(32, 2, dtype=DT)  # no .to(DT) on this module: it would make the filter real

    def forward(self, x):  # [B, 16]
        img = x.view(-1, 4, 4)
        Z = torch.fft.ifft2(torch.fft.fft2(img) * self.filt)
        return self.out(torch.sin(torch.cat([Z.real, Z.imag], -1).flatten(1)))


class HolomorphicChain(nn.Module):
    """Complex numbers built from the input, analytic functions of them, real view out."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(3, 4)
        self.out = nn.Linear(8, 1)

    def forward(self, x):
        z = torch.complex(self.a(x), self.b(x))
        w = torch.exp(0.3 * z) * z + torch.tanh(z) / (z * z + 2.0)
        return self.out(torch.view_as_real(w).flatten(1))


class SliceWrite(nn.Module):
    """A real slice write (functionalized to ``copy`` + ``slice_scatter``) on the path to the output."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 5)
        self.out = nn.Linear(6, 1)

    def forward(self, x):
        buf = (x[:, :1] * 0).repeat(1, 6)  # zeros that vmap (the reference) sees as per-sample
        buf[:, 1:] = torch.tanh(self.a(x))
        return self.out(buf)


MODELS = {
    "fno_spectral_conv": (lambda: SpectralConv1d().to(DT), (12,)),
    "fft2_filter": (Fourier2d, (16,)),
    "holomorphic_chain": (lambda: HolomorphicChain().to(DT), (3,)),
    "slice_write": (lambda: SliceWrite().to(DT), (3,)),
}
models = pytest.mark.parametrize("name", list(MODELS))


def build(name, batch=5):
    make, shape = MODELS[name]
    torch.manual_seed(3)
    return make(), torch.randn(batch, *shape, dtype=DT)


@models
@pytest.mark.parametrize("method", ["forward", "reverse"])
def test_jacobian_and_hessian(name, method):
    net, x = build(name)
    g = per_sample(net)
    torch.testing.assert_close(td.jacobian(net, x, method=method), torch.func.vmap(rev(g, 1))(x))
    torch.testing.assert_close(td.hessian(net, x, method=method), torch.func.vmap(rev(g, 2))(x))


@models
def test_laplacian_and_its_parameter_gradients(name):
    net, x = build(name)
    g = per_sample(net)

    def ref_lap(xx):
        return torch.func.vmap(rev(g, 2))(xx).diagonal(dim1=-2, dim2=-1).sum(-1)

    lap = td.laplacian(net, x)
    torch.testing.assert_close(lap, ref_lap(x))
    params = [p for p in net.parameters() if p.requires_grad]
    got = torch.autograd.grad((lap**2).mean(), params, allow_unused=True)
    want = torch.autograd.grad((ref_lap(x) ** 2).mean(), params, allow_unused=True)
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ["fno_spectral_conv", "holomorphic_chain"])
def test_third_and_fourth_order_partials(name):
    net, x = build(name, batch=2)
    spec = [(0, 0, 1), (0, 0, 1, 2), (1, 1, 1, 1)]
    got = td.partials(net, x, spec)
    xb = x.clone().requires_grad_(True)

    def d(t, i):  # rows do not interact: the sum over the batch differentiates each row
        return torch.autograd.grad(t.sum(), xb, create_graph=True)[0][:, i]

    for o in range(min(3, got[spec[0]].shape[1])):
        for a in spec:
            t = net(xb)[:, o]
            for i in a:
                t = d(t, i)
            torch.testing.assert_close(got[a][:, o], t, msg=f"{name} partial {a} of output {o}")


def test_non_holomorphic_function_of_a_complex_tensor():
    """|z| is not complex-analytic: its order-1 derivative comes from the generic fallback (correct, with a
    warning) and higher orders raise instead of applying a real-variable formula to complex numbers."""
    lin = nn.Linear(3, 4).to(DT)

    def f(x):
        return torch.abs(torch.complex(lin(x), torch.sin(x) @ torch.ones(3, 4, dtype=DT))).sum(-1, keepdim=True)

    x = torch.randn(4, 3, dtype=DT)
    with pytest.warns(td.FallbackWarning, match="abs"):
        J = td.jacobian(f, x, method="forward")
    torch.testing.assert_close(J, torch.func.vmap(rev(per_sample(f), 1))(x))
    with pytest.raises(NotImplementedError, match="abs"):
        td.hessian(f, x, method="forward")


def test_fourier_transform_along_the_batch_is_refused():
    lin = nn.Linear(3, 3).to(DT)

    def f(x):
        return torch.fft.rfft(lin(x), dim=0).real[: x.shape[0]]

    x = torch.randn(6, 3, dtype=DT)
    with pytest.raises(td.BatchMixingError, match="fft"):
        td.jacobian(f, x)


@pytest.mark.parametrize("op", ["norm", "var"])
def test_reductions_of_complex_tensors_are_not_squared_naively(op):
    """|z|^2 is not z * z: the norm and variance of a complex tensor take the order-1 fallback (right, with a
    warning) and raise at order 2, never a real-variable formula applied to complex numbers."""
    lin = nn.Linear(3, 4).to(DT)

    def f(x):
        z = torch.complex(lin(x), torch.sin(x) @ torch.ones(3, 4, dtype=DT))
        r = torch.linalg.vector_norm(z, dim=-1) if op == "norm" else torch.var(z, dim=-1)
        return r.unsqueeze(-1)

    x = torch.randn(4, 3, dtype=DT)
    with pytest.warns(td.FallbackWarning, match="no rule"):
        J = td.jacobian(f, x, method="forward")
    torch.testing.assert_close(J, torch.func.vmap(rev(per_sample(f), 1))(x))
    with pytest.raises(NotImplementedError):
        td.hessian(f, x, method="forward")

"""Variational Monte Carlo: the local kinetic energy of a Slater-determinant wave function needs the
Laplacian and the gradient of ``log |psi|`` with respect to all electron coordinates, per walker, and its
parameter gradient for training. Checked in float64 against torch.func nested reverse mode."""

from __future__ import annotations

import torch
from torch import nn

import torchderiv as td

DT = torch.float64


class SlaterNet(nn.Module):
    """A small FermiNet-like ansatz for ``n`` electrons in 3-D: a permutation-equivariant layer, orbitals with
    an exponential envelope, ``log |det|`` of the [n, n] orbital matrix per walker."""

    def __init__(self, n: int = 3, hidden: int = 16):
        super().__init__()
        self.n = n
        self.mix = nn.Linear(3 * n, hidden)
        self.one = nn.Linear(hidden + 3, hidden)
        self.orbitals = nn.Linear(hidden, n)

    def forward(self, x):  # [B, 3n] -> [B, 1]
        B = x.shape[0]
        r = x.view(B, self.n, 3)
        g = torch.tanh(self.mix(x)).unsqueeze(1).expand(B, self.n, -1)
        h = torch.tanh(self.one(torch.cat([g, r], -1)))
        env = torch.exp(-torch.linalg.vector_norm(r, dim=-1, keepdim=True))
        _, logabs = torch.linalg.slogdet(self.orbitals(h) * env)
        return logabs.unsqueeze(-1)


def _per_sample(f):
    return lambda xi: f(xi.unsqueeze(0)).squeeze(0)


def test_local_kinetic_energy_and_its_parameter_gradient():
    torch.manual_seed(0)
    net = SlaterNet().to(DT)
    x = torch.randn(8, 9, dtype=DT)
    g = _per_sample(net)

    def ref_kinetic(xx):
        H = torch.func.vmap(torch.func.jacrev(torch.func.jacrev(g)))(xx)[:, 0]  # [B, 9, 9]
        J = torch.func.vmap(torch.func.jacrev(g))(xx)[:, 0]  # [B, 9]
        return -0.5 * (H.diagonal(dim1=-2, dim2=-1).sum(-1) + (J**2).sum(-1))

    lap = td.laplacian(net, x)[:, 0]
    grad = td.jacobian(net, x)[:, 0]
    kinetic = -0.5 * (lap + (grad**2).sum(-1))
    want = ref_kinetic(x)
    torch.testing.assert_close(kinetic, want)

    params = list(net.parameters())
    got = torch.autograd.grad(kinetic.mean(), params)
    ref = torch.autograd.grad(want.mean(), params)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)


def test_one_call_gives_value_gradient_and_laplacian():
    """``partials`` with the value, every first derivative and the Laplacian terms in one generated pass."""
    torch.manual_seed(1)
    net = SlaterNet(n=2).to(DT)
    x = torch.randn(5, 6, dtype=DT)
    spec = [()] + [(i,) for i in range(6)] + [(i, i) for i in range(6)]
    d = td.partials(net, x, spec)
    H = torch.func.vmap(torch.func.jacrev(torch.func.jacrev(_per_sample(net))))(x)[:, 0]
    torch.testing.assert_close(sum(d[(i, i)] for i in range(6))[:, 0], H.diagonal(dim1=-2, dim2=-1).sum(-1))
    torch.testing.assert_close(d[()], net(x))

"""DeepXDE training steps: its ``dde.grad`` against the same script with ``torchderiv.deepxde.enable()``.

Each scenario is one training step as ``dde.Model`` runs it: the network on the collocation points, the
residual written the DeepXDE way (one ``dde.grad`` call per term), ``dde.grad.clear()``, the mean squared
residual and ONE backward to the parameters. The two rows run the very same code; the torchderiv row only
switches :mod:`torchderiv.deepxde` on around it. Results: the residuals and the parameter gradient.
"""

from __future__ import annotations

import contextlib
import math

import torch

from ._methods import Builder, Runner, Setup

PI = math.pi


def _burgers(g, x, y):
    u_x = g.jacobian(y, x, i=0, j=0)
    u_t = g.jacobian(y, x, i=0, j=1)
    u_xx = g.hessian(y, x, i=0, j=0)
    return [u_t + y * u_x - 0.01 / PI * u_xx]


def _kovasznay(g, x, y):
    re = 20.0
    u, v = y[:, 0:1], y[:, 1:2]
    u_x, u_y = g.jacobian(y, x, i=0, j=0), g.jacobian(y, x, i=0, j=1)
    v_x, v_y = g.jacobian(y, x, i=1, j=0), g.jacobian(y, x, i=1, j=1)
    p_x, p_y = g.jacobian(y, x, i=2, j=0), g.jacobian(y, x, i=2, j=1)
    lap_u = g.hessian(y, x, component=0, i=0, j=0) + g.hessian(y, x, component=0, i=1, j=1)
    lap_v = g.hessian(y, x, component=1, i=0, j=0) + g.hessian(y, x, component=1, i=1, j=1)
    return [u * u_x + v * u_y + p_x - lap_u / re, u * v_x + v * v_y + p_y - lap_v / re, u_x + v_y]


def _euler_beam(g, x, y):
    u_xx = g.hessian(y, x)
    return [g.hessian(u_xx, x) + 1]


def _navier_stokes_3d(g, x, y):
    """Unsteady incompressible Navier-Stokes in 3-D, inputs (x, y, z, t), outputs (u, v, w, p)."""
    vel = [y[:, k: k + 1] for k in range(3)]
    res = []
    for c in range(3):
        conv = sum(vel[k] * g.jacobian(y, x, i=c, j=k) for k in range(3))
        lap = sum(g.hessian(y, x, component=c, i=k, j=k) for k in range(3))
        res.append(g.jacobian(y, x, i=c, j=3) + conv + g.jacobian(y, x, i=3, j=c) - lap)
    res.append(sum(g.jacobian(y, x, i=k, j=k) for k in range(3)))
    return res


# name -> (residual, layer sizes, points, domain low, domain high)
PROBLEMS = {
    "burgers": (_burgers, [2, 20, 20, 20, 1], 2540, [-1.0, 0.0], [1.0, 0.99]),
    "kovasznay": (_kovasznay, [2, 50, 50, 50, 50, 3], 3000, [-0.5, -0.5], [1.0, 1.5]),
    "euler-beam": (_euler_beam, [1, 20, 20, 20, 1], 200, [0.0], [1.0]),
    "navier-stokes-3d": (_navier_stokes_3d, [4, 50, 50, 50, 50, 4], 2000, [-1.0, -1.0, -1.0, 0.0],
                         [1.0, 1.0, 1.0, 1.0]),
}


def make(problem: str):
    """A ``Setup`` factory: DeepXDE's FNN (tanh, Glorot normal) and uniform collocation points."""

    def build() -> Setup:
        from ._peers import _deepxde

        dde = _deepxde()
        _, sizes, n, lo, hi = PROBLEMS[problem]
        torch.manual_seed(0)
        net = dde.nn.FNN(sizes, "tanh", "Glorot normal").float()
        lo_t, hi_t = torch.tensor(lo), torch.tensor(hi)
        x = lo_t + (hi_t - lo_t) * torch.rand(n, len(lo))
        return Setup(net, x, {"problem": problem})

    return build


def step(problem: str, torchderiv_on: bool) -> Builder:
    """One DeepXDE-style training step; with ``torchderiv_on`` inside ``torchderiv.deepxde.enabled()``."""

    def build(s: Setup) -> Runner:
        from ._peers import _deepxde

        dde = _deepxde()
        import torchderiv

        residual = PROBLEMS[problem][0]
        params = list(s.f.parameters())
        switch = torchderiv.deepxde.enabled if torchderiv_on else contextlib.nullcontext

        def run():
            with torch.enable_grad(), switch():
                for p in params:
                    p.grad = None
                x = s.x.detach().requires_grad_(True)
                y = s.f(x)
                res = residual(dde.grad, x, y)
                loss = sum((r**2).mean() for r in res)
                dde.grad.clear()
                loss.backward()
                grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
                return torch.cat([r.detach() for r in res], 1), torch.cat([g.reshape(-1) for g in grads])

        return run

    return build

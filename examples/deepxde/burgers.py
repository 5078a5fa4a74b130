"""Viscous Burgers in one space dimension and time, the DeepXDE way; one flag switches dde.grad to torchderiv.

    u_t + u u_x = nu u_xx   on x in (-1, 1), t in (0, 1),   nu = 0.1,

with the traveling viscous shock u(x, t) = c - a tanh(a (x - x0 - c t) / (2 nu)) (a = 1, c = 0.5, x0 = -0.25)
as the exact solution; its values give the initial and the boundary data.

    python examples/deepxde/burgers.py                  # DeepXDE's dde.grad (reverse mode, cached)
    python examples/deepxde/burgers.py --torchderiv     # the same script with torchderiv.deepxde.enable()
"""

from __future__ import annotations

import numpy as np
from _run import options, prepare, report, train

NU, A, C, X0 = 0.1, 1.0, 0.5, -0.25


def exact(xt):
    x, t = xt[:, 0:1], xt[:, 1:2]
    return C - A * np.tanh(A * (x - X0 - C * t) / (2 * NU))


def main():
    args = options(__doc__.splitlines()[0], iterations=2000)
    dde = prepare(args)

    def pde(x, u):
        u_x = dde.grad.jacobian(u, x, i=0, j=0)
        u_t = dde.grad.jacobian(u, x, i=0, j=1)
        u_xx = dde.grad.hessian(u, x, i=0, j=0)
        return u_t + u * u_x - NU * u_xx

    domain = dde.geometry.GeometryXTime(dde.geometry.Interval(-1, 1), dde.geometry.TimeDomain(0, 1))
    boundary = dde.icbc.DirichletBC(domain, exact, lambda _, on_boundary: on_boundary)
    initial = dde.icbc.IC(domain, exact, lambda _, on_initial: on_initial)
    data = dde.data.TimePDE(domain, pde, [boundary, initial], num_domain=2000, num_boundary=100,
                            num_initial=100, num_test=2000)
    net = dde.nn.FNN([2] + [32] * 3 + [1], "tanh", "Glorot normal")
    model = dde.Model(data, net)
    model.compile("adam", lr=2e-3, loss_weights=[1, 10, 10])
    per_step = train(model, args)

    xt = domain.random_points(5000)
    err = dde.metrics.l2_relative_error(exact(xt), model.predict(xt))
    report("burgers", args, per_step, err)


if __name__ == "__main__":
    main()

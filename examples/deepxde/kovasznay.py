"""Kovasznay flow: steady incompressible Navier-Stokes in 2-D with three outputs (u, v, p), the DeepXDE way.

    u u_x + v u_y + p_x - (u_xx + u_yy) / Re = 0
    u v_x + v v_y + p_y - (v_xx + v_yy) / Re = 0
    u_x + v_y = 0                         on (-0.5, 1) x (-0.5, 1.5),   Re = 20,

with Kovasznay's exact solution (1948), l = Re / 2 - sqrt(Re^2 / 4 + 4 pi^2):
u = 1 - exp(l x) cos(2 pi y), v = l / (2 pi) exp(l x) sin(2 pi y), p = (1 - exp(2 l x)) / 2, whose values
are the Dirichlet data on the whole boundary. Ten dde.grad calls per residual evaluation.

    python examples/deepxde/kovasznay.py                # DeepXDE's dde.grad
    python examples/deepxde/kovasznay.py --torchderiv   # with torchderiv.deepxde.enable()
"""

from __future__ import annotations

import numpy as np
from _run import options, prepare, report, train

RE = 20.0
LAM = RE / 2 - np.sqrt(RE**2 / 4 + 4 * np.pi**2)


def exact(xy):
    x, y = xy[:, 0:1], xy[:, 1:2]
    u = 1 - np.exp(LAM * x) * np.cos(2 * np.pi * y)
    v = LAM / (2 * np.pi) * np.exp(LAM * x) * np.sin(2 * np.pi * y)
    p = 0.5 * (1 - np.exp(2 * LAM * x))
    return np.hstack([u, v, p])


def column(k):
    return lambda xy: exact(xy)[:, k: k + 1]


def main():
    args = options(__doc__.splitlines()[0], iterations=2000)
    dde = prepare(args)
    grad = dde.grad

    def navier_stokes(xy, out):
        u, v = out[:, 0:1], out[:, 1:2]
        u_x, u_y = grad.jacobian(out, xy, i=0, j=0), grad.jacobian(out, xy, i=0, j=1)
        v_x, v_y = grad.jacobian(out, xy, i=1, j=0), grad.jacobian(out, xy, i=1, j=1)
        p_x, p_y = grad.jacobian(out, xy, i=2, j=0), grad.jacobian(out, xy, i=2, j=1)
        lap_u = grad.hessian(out, xy, component=0, i=0, j=0) + grad.hessian(out, xy, component=0, i=1, j=1)
        lap_v = grad.hessian(out, xy, component=1, i=0, j=0) + grad.hessian(out, xy, component=1, i=1, j=1)
        momentum_x = u * u_x + v * u_y + p_x - lap_u / RE
        momentum_y = u * v_x + v * v_y + p_y - lap_v / RE
        return [momentum_x, momentum_y, u_x + v_y]

    box = dde.geometry.Rectangle([-0.5, -0.5], [1.0, 1.5])
    on_wall = lambda _, on_boundary: on_boundary  # noqa: E731
    bcs = [dde.icbc.DirichletBC(box, column(k), on_wall, component=k) for k in range(3)]
    data = dde.data.PDE(box, navier_stokes, bcs, num_domain=2000, num_boundary=200, num_test=2000)
    net = dde.nn.FNN([2] + [50] * 4 + [3], "tanh", "Glorot normal")
    model = dde.Model(data, net)
    model.compile("adam", lr=1e-3)
    per_step = train(model, args)

    xy = box.random_points(5000)
    err = dde.metrics.l2_relative_error(exact(xy), model.predict(xy))
    report("kovasznay", args, per_step, err)


if __name__ == "__main__":
    main()

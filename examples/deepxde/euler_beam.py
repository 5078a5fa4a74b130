"""A cantilever Euler-Bernoulli beam, fourth order, the DeepXDE way (the fourth derivative from nested calls).

    u''''(x) = q(x) = -1   on (0, 1),
    clamped at x = 0:  u = 0, u' = 0;      free at x = 1:  u'' = 0, u''' = 0,

exact solution u = -x^4 / 24 + x^3 / 6 - x^2 / 4. The residual differentiates a returned derivative,
dde.grad.hessian(u_xx, x); the free-end conditions are OperatorBCs on u'' and u''' = d/dx of u''.

    python examples/deepxde/euler_beam.py               # DeepXDE's dde.grad
    python examples/deepxde/euler_beam.py --torchderiv  # with torchderiv.deepxde.enable()
"""

from __future__ import annotations

from _run import options, prepare, report, train


def exact(x):
    return -(x**4) / 24 + x**3 / 6 - x**2 / 4


def main():
    args = options(__doc__.splitlines()[0], iterations=3000)
    dde = prepare(args)

    def second(x, u):
        return dde.grad.hessian(u, x)

    def third(x, u):
        return dde.grad.jacobian(second(x, u), x)

    def beam(x, u):
        u_xx = dde.grad.hessian(u, x)
        return dde.grad.hessian(u_xx, x) + 1

    beam_axis = dde.geometry.Interval(0, 1)
    at_root = lambda x, on_boundary: on_boundary and dde.utils.isclose(x[0], 0)  # noqa: E731
    at_tip = lambda x, on_boundary: on_boundary and dde.utils.isclose(x[0], 1)  # noqa: E731
    bcs = [dde.icbc.DirichletBC(beam_axis, lambda x: 0, at_root),
           dde.icbc.NeumannBC(beam_axis, lambda x: 0, at_root),
           dde.icbc.OperatorBC(beam_axis, lambda x, u, _: second(x, u), at_tip),
           dde.icbc.OperatorBC(beam_axis, lambda x, u, _: third(x, u), at_tip)]
    data = dde.data.PDE(beam_axis, beam, bcs, num_domain=100, num_boundary=20, solution=exact, num_test=200)
    net = dde.nn.FNN([1] + [20] * 3 + [1], "tanh", "Glorot uniform")
    model = dde.Model(data, net)
    model.compile("adam", lr=1e-3)
    per_step = train(model, args)

    x = beam_axis.uniform_points(1000)
    err = dde.metrics.l2_relative_error(exact(x), model.predict(x))
    report("euler_beam", args, per_step, err)


if __name__ == "__main__":
    main()

"""torchderiv.deepxde: DeepXDE's dde.grad served by torchderiv, checked against DeepXDE itself in float64.

Every residual here is written for these tests in the way DeepXDE's forward-problem examples write theirs
(one ``dde.grad`` call per term); each is evaluated through ``dde.Model``'s own compiled loss (PDE and
boundary terms, ``dde.grad.clear()`` at the end) with and without ``enable()``: losses and parameter
gradients must agree, and the counters must show that the later steps were really served by torchderiv.
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
import subprocess
import sys
import tracemalloc
import warnings

import numpy as np
import pytest
import torch

os.environ.setdefault("DDE_BACKEND", "pytorch")
_prev_device = torch.get_default_device()
with contextlib.redirect_stdout(io.StringIO()):
    dde = pytest.importorskip("deepxde")
if torch.get_default_device() != _prev_device:  # DeepXDE moves the default device to a GPU when it sees one
    torch.set_default_device(None if _prev_device.type == "cpu" else _prev_device)
if dde.backend.backend_name != "pytorch":
    pytest.skip("DeepXDE runs another backend (set DDE_BACKEND=pytorch)", allow_module_level=True)

import torchderiv  # noqa: E402
from torchderiv import deepxde as tdx  # noqa: E402

RTOL, ATOL = 1e-9, 1e-11


@pytest.fixture(autouse=True, scope="module")
def _float64_deepxde():
    dtype, precision, autodiff = torch.get_default_dtype(), dde.config.real.precision, dde.config.autodiff
    with contextlib.redirect_stdout(io.StringIO()):
        dde.config.set_default_float("float64")
    yield
    tdx.disable()
    torch.set_default_dtype(dtype)
    {16: dde.config.real.set_float16, 32: dde.config.real.set_float32,
     64: dde.config.real.set_float64}[precision]()
    dde.config.autodiff = autodiff


@pytest.fixture(autouse=True)
def _serve(request, monkeypatch):
    """The tests of what is served: torchderiv serves every recorded step by auto's choice (the speed policy
    would pass the small nets of these tests through to DeepXDE); the policy's own tests see the real one."""
    if "policy" not in request.node.name:
        monkeypatch.setattr(tdx, "_method", lambda net, x, spec: torchderiv.choose_method(
            "partials", net, x, spec=list(spec)))


@pytest.fixture(autouse=True)
def _off_after():
    dde.config.autodiff = "reverse"
    yield
    tdx.disable()
    dde.config.autodiff = "reverse"
    tdx._warned.clear()


def _counts():
    return {k: tdx._COUNTS[k] for k in ("served", "on_demand", "fallback", "passed", "passes")}


def _delta(before):
    now = _counts()
    return {k: now[k] - before[k] for k in now}


# ----------------------------------------------------------------------------- residuals (DeepXDE style)

PI = np.pi


def burgers():
    def pde(x, y):
        dy_x = dde.grad.jacobian(y, x, i=0, j=0)
        dy_t = dde.grad.jacobian(y, x, i=0, j=1)
        dy_xx = dde.grad.hessian(y, x, i=0, j=0)
        return dy_t + y * dy_x - 0.01 / PI * dy_xx

    geom = dde.geometry.GeometryXTime(dde.geometry.Interval(-1, 1), dde.geometry.TimeDomain(0, 1))
    bc = dde.icbc.DirichletBC(geom, lambda x: 0, lambda _, on: on)
    ic = dde.icbc.IC(geom, lambda x: -np.sin(PI * x[:, 0:1]), lambda _, on: on)
    data = dde.data.TimePDE(geom, pde, [bc, ic], num_domain=40, num_boundary=8, num_initial=8)
    return data, dde.nn.FNN([2, 12, 12, 1], "tanh", "Glorot normal"), pde


def poisson_neumann_robin():
    """-u'' = pi^2 sin(pi x) on [-1, 1]; Robin at the left end, Neumann at the right end."""

    def pde(x, y):
        return -dde.grad.hessian(y, x) - PI**2 * torch.sin(PI * x)

    geom = dde.geometry.Interval(-1, 1)
    left = lambda x, on: on and np.isclose(x[0], -1)  # noqa: E731
    right = lambda x, on: on and np.isclose(x[0], 1)  # noqa: E731
    bcs = [dde.icbc.RobinBC(geom, lambda x, y: y + PI, left),
           dde.icbc.NeumannBC(geom, lambda x: -PI * np.ones_like(x), right)]
    data = dde.data.PDE(geom, pde, bcs, num_domain=24, num_boundary=2)
    return data, dde.nn.FNN([1, 12, 12, 1], "tanh", "Glorot normal"), pde


def poisson2d_neumann():
    """A 2-D Poisson problem with a Neumann condition on the vertical sides (the normal derivative uses the
    whole gradient row, j=None, on the full batch, then slices rows)."""

    def pde(x, y):
        u_xx = dde.grad.hessian(y, x, i=0, j=0)
        u_yy = dde.grad.hessian(y, x, i=1, j=1)
        return u_xx + u_yy + 2 * PI**2 * torch.cos(PI * x[:, 0:1]) * torch.sin(PI * x[:, 1:2])

    geom = dde.geometry.Rectangle([0, 0], [1, 1])
    sides = lambda x, on: on and (np.isclose(x[0], 0) or np.isclose(x[0], 1))  # noqa: E731
    caps = lambda x, on: on and (np.isclose(x[1], 0) or np.isclose(x[1], 1))  # noqa: E731
    bcs = [dde.icbc.NeumannBC(geom, lambda x: 0 * x[:, 0:1], sides), dde.icbc.DirichletBC(geom, lambda x: 0, caps)]
    data = dde.data.PDE(geom, pde, bcs, num_domain=30, num_boundary=12)
    return data, dde.nn.FNN([2, 12, 12, 1], "tanh", "Glorot normal"), pde


def kovasznay():
    """Steady incompressible Navier-Stokes in 2-D, outputs (u, v, p): a vector PDE with three residuals."""
    re = 20.0

    def pde(x, y):
        u, v = y[:, 0:1], y[:, 1:2]
        u_x = dde.grad.jacobian(y, x, i=0, j=0)
        u_y = dde.grad.jacobian(y, x, i=0, j=1)
        v_x = dde.grad.jacobian(y, x, i=1, j=0)
        v_y = dde.grad.jacobian(y, x, i=1, j=1)
        p_x = dde.grad.jacobian(y, x, i=2, j=0)
        p_y = dde.grad.jacobian(y, x, i=2, j=1)
        lap_u = dde.grad.hessian(y, x, component=0, i=0, j=0) + dde.grad.hessian(y, x, component=0, i=1, j=1)
        lap_v = dde.grad.hessian(y, x, component=1, i=0, j=0) + dde.grad.hessian(y, x, component=1, i=1, j=1)
        return [u * u_x + v * u_y + p_x - lap_u / re, u * v_x + v * v_y + p_y - lap_v / re, u_x + v_y]

    geom = dde.geometry.Rectangle([-0.5, -0.5], [1, 1.5])
    on = lambda _, b: b  # noqa: E731
    bcs = [dde.icbc.DirichletBC(geom, lambda x: 1 - np.exp(-x[:, 0:1]) * np.cos(2 * PI * x[:, 1:2]), on, component=0),
           dde.icbc.DirichletBC(geom, lambda x: 0 * x[:, 0:1], on, component=1)]
    data = dde.data.PDE(geom, pde, bcs, num_domain=30, num_boundary=10)
    return data, dde.nn.FNN([2, 14, 14, 3], "tanh", "Glorot normal"), pde


def euler_beam():
    """u'''' = -1 on [0, 1]: fourth order from a nested call, hessian(dy_xx, x); a third derivative in a
    boundary operator from jacobian(dy_xx, x); a Neumann condition at the clamped end."""

    def d2(x, y):
        return dde.grad.hessian(y, x)

    def d3(x, y):
        return dde.grad.jacobian(d2(x, y), x)

    def pde(x, y):
        dy_xx = dde.grad.hessian(y, x)
        return dde.grad.hessian(dy_xx, x) + 1

    geom = dde.geometry.Interval(0, 1)
    left = lambda x, on: on and np.isclose(x[0], 0)  # noqa: E731
    right = lambda x, on: on and np.isclose(x[0], 1)  # noqa: E731
    bcs = [dde.icbc.DirichletBC(geom, lambda x: 0, left), dde.icbc.NeumannBC(geom, lambda x: 0, left),
           dde.icbc.OperatorBC(geom, lambda x, y, _: d2(x, y), right),
           dde.icbc.OperatorBC(geom, lambda x, y, _: d3(x, y), right)]
    data = dde.data.PDE(geom, pde, bcs, num_domain=20, num_boundary=2)
    return data, dde.nn.FNN([1, 12, 12, 1], "tanh", "Glorot normal"), pde


def heat3d():
    """u_t = k (u_xx + u_yy + u_zz) + f in three space dimensions plus time: four inputs."""

    def pde(x, y):
        u_t = dde.grad.jacobian(y, x, i=0, j=3)
        lap = sum(dde.grad.hessian(y, x, i=k, j=k) for k in range(3))
        return u_t - 0.1 * lap - torch.sin(x[:, 0:1]) * x[:, 3:4]

    geom = dde.geometry.GeometryXTime(dde.geometry.Cuboid([0, 0, 0], [1, 1, 1]), dde.geometry.TimeDomain(0, 1))
    ic = dde.icbc.IC(geom, lambda x: np.sin(PI * x[:, 0:1]), lambda _, on: on)
    bc = dde.icbc.DirichletBC(geom, lambda x: 0, lambda _, on: on)
    data = dde.data.TimePDE(geom, pde, [bc, ic], num_domain=30, num_boundary=10, num_initial=8)
    return data, dde.nn.FNN([4, 12, 12, 1], "tanh", "Glorot normal"), pde


def helmholtz_hard_bc():
    """Helmholtz in 2-D with the Dirichlet condition built into the net (output transform) and Fourier
    input features (feature transform): both are part of the function torchderiv differentiates."""
    k0 = 2 * PI

    def pde(x, y):
        lap = dde.grad.hessian(y, x, i=0, j=0) + dde.grad.hessian(y, x, i=1, j=1)
        return -lap - k0**2 * y - k0**2 * torch.sin(k0 * x[:, 0:1]) * torch.sin(k0 * x[:, 1:2])

    geom = dde.geometry.Rectangle([0, 0], [1, 1])
    data = dde.data.PDE(geom, pde, [], num_domain=30)
    net = dde.nn.FNN([4, 12, 12, 1], "sin", "Glorot uniform")
    net.apply_feature_transform(lambda x: torch.cat([x, torch.sin(PI * x)], 1))
    net.apply_output_transform(lambda x, y: x[:, 0:1] * (1 - x[:, 0:1]) * x[:, 1:2] * (1 - x[:, 1:2]) * y)
    return data, net, pde


def elasticity_pfnn():
    """2-D linear elasticity (Navier-Cauchy) with displacement outputs (ux, uy) from a PFNN: mixed second
    derivatives hessian(y, x, component, i=0, j=1)."""
    lam, mu = 1.0, 0.5

    def pde(x, y):
        ux_xx = dde.grad.hessian(y, x, component=0, i=0, j=0)
        ux_yy = dde.grad.hessian(y, x, component=0, i=1, j=1)
        ux_xy = dde.grad.hessian(y, x, component=0, i=0, j=1)
        uy_xx = dde.grad.hessian(y, x, component=1, i=0, j=0)
        uy_yy = dde.grad.hessian(y, x, component=1, i=1, j=1)
        uy_xy = dde.grad.hessian(y, x, component=1, i=1, j=0)
        fx = (lam + mu) * (ux_xx + uy_xy) + mu * (ux_xx + ux_yy)
        fy = (lam + mu) * (ux_xy + uy_yy) + mu * (uy_xx + uy_yy)
        return [fx + torch.cos(x[:, 0:1]), fy]

    geom = dde.geometry.Rectangle([0, 0], [1, 1])
    bc = dde.icbc.DirichletBC(geom, lambda x: 0, lambda _, on: on, component=0)
    data = dde.data.PDE(geom, pde, [bc], num_domain=30, num_boundary=8)
    return data, dde.nn.PFNN([2, [10, 10], [10, 10], 2], "tanh", "Glorot normal"), pde


class ResNet(dde.nn.NN):
    """A user network: residual sine blocks, written on dde.nn.NN (transforms honoured)."""

    def __init__(self, d_in, width, d_out, blocks=2):
        super().__init__()
        self.inp = torch.nn.Linear(d_in, width)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(blocks))
        self.out = torch.nn.Linear(width, d_out)

    def forward(self, inputs):
        x = inputs if self._input_transform is None else self._input_transform(inputs)
        h = torch.tanh(self.inp(x))
        for b in self.blocks:
            h = h + torch.sin(b(h))
        y = self.out(h)
        return y if self._output_transform is None else self._output_transform(inputs, y)


def schrodinger_resnet():
    """Nonlinear Schroedinger i h_t + h_xx / 2 + |h|^2 h = 0 for h = u + i v, written with slices of the output
    (u = y[:, 0:1], then jacobian(u, x, j=...)): the slices are served, not sent to the fallback."""

    def pde(x, y):
        u, v = y[:, 0:1], y[:, 1:2]
        u_t = dde.grad.jacobian(u, x, j=1)
        v_t = dde.grad.jacobian(v, x, j=1)
        u_xx = dde.grad.hessian(u, x, i=0, j=0)
        v_xx = dde.grad.hessian(v, x, i=0, j=0)
        m = u**2 + v**2
        return [u_t + 0.5 * v_xx + m * v, v_t - 0.5 * u_xx - m * u]

    geom = dde.geometry.GeometryXTime(dde.geometry.Interval(-5, 5), dde.geometry.TimeDomain(0, 1))
    ic = dde.icbc.IC(geom, lambda x: 2 / np.cosh(x[:, 0:1]), lambda _, on: on, component=0)
    data = dde.data.TimePDE(geom, pde, [ic], num_domain=40, num_initial=8)
    return data, ResNet(2, 12, 2), pde


CASES = {f.__name__: f for f in (burgers, poisson_neumann_robin, poisson2d_neumann, kovasznay, euler_beam,
                                 heat3d, helmholtz_hard_bc, elasticity_pfnn, schrodinger_resnet)}


def _model(case):
    dde.config.set_random_seed(0)
    data, net, pde = CASES[case]()
    with contextlib.redirect_stdout(io.StringIO()):
        model = dde.Model(data, net)
        model.compile("adam", lr=1e-3)
    return model, pde


def _steps(case: str, on: bool, steps: int = 3, hvp: bool = False):
    """Losses and parameter gradients of ``steps`` evaluations of DeepXDE's compiled training loss (the
    parameters nudged in between, as an optimizer would), optionally a Hessian-vector product of the loss."""
    model, _ = _model(case)
    X, Y, aux = model.data.train_next_batch()
    params = list(model.net.parameters())
    out = []
    with tdx.enabled() if on else contextlib.nullcontext():
        for s in range(steps):
            _, losses = model.outputs_losses_train(X, Y, aux)
            grads = torch.autograd.grad(losses.sum(), params, create_graph=hvp, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
            flat = torch.cat([g.reshape(-1) for g in grads])
            res = [losses.detach(), flat.detach()]
            if hvp:
                v = torch.cos(torch.arange(flat.numel(), dtype=flat.dtype))
                Hv = torch.autograd.grad(flat @ v, params, allow_unused=True)
                res.append(torch.cat([(torch.zeros_like(p) if h is None else h).reshape(-1)
                                      for p, h in zip(params, Hv)]))
            out.append(res)
            with torch.no_grad():
                for p in params:
                    p.mul_(1 + 1e-3 * (s + 1))
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_losses_and_gradients_agree(case):
    ref = _steps(case, on=False)
    before = _counts()
    with warnings.catch_warnings():
        warnings.simplefilter("error", tdx.DeepXDEFallbackWarning)
        got = _steps(case, on=True)
    d = _delta(before)
    for s, (a, b) in enumerate(zip(ref, got)):
        for name, ta, tb in zip(("losses", "parameter gradients"), a, b):
            torch.testing.assert_close(tb, ta, rtol=RTOL, atol=ATOL, msg=lambda m: f"{case} step {s} {name}: {m}")
    # step 1 on demand by DeepXDE, steps 2 and 3 from one torchderiv pass each; nothing fell back
    assert d["passes"] == 2 and d["served"] > 0 and d["fallback"] == 0, d
    assert d["on_demand"] * 2 == d["served"] or case in ("poisson2d_neumann", "euler_beam"), d


@pytest.mark.parametrize("case", ["kovasznay", "euler_beam", "schrodinger_resnet"])
def test_hessian_vector_products_of_the_loss_agree(case):
    ref = _steps(case, on=False, steps=2, hvp=True)
    got = _steps(case, on=True, steps=2, hvp=True)
    for a, b in zip(ref[1], got[1]):
        torch.testing.assert_close(b, a, rtol=RTOL, atol=ATOL)


def test_served_derivatives_stay_differentiable_wrt_x():
    """A served derivative differentiated again by autograd (what a fallback does) equals DeepXDE's."""
    model, _ = _model("kovasznay")
    x = torch.rand(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    res = []
    for on in (False, True):
        with tdx.enabled() if on else contextlib.nullcontext():
            for _ in range(2):  # the second step is served
                y = model.net(x)
                u_x = dde.grad.jacobian(y, x, i=0, j=0)
                u_xx = dde.grad.hessian(y, x, component=0, i=0, j=0)
                dde.grad.clear()
            g = torch.autograd.grad((u_x * u_xx).sum(), x, create_graph=True)[0]
            gg = torch.autograd.grad(g[:, 1].sum(), x)[0]
            res.append((u_x, u_xx, g, gg))
    for a, b in zip(*res):
        torch.testing.assert_close(b, a, rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------- fallback


def _pde_values(model, pde, x, steps=2):
    out = None
    for _ in range(steps):
        y = model.net(x)
        out = pde(x, y)
        dde.grad.clear()
    return out


def test_expression_of_derivatives_falls_back_with_one_warning():
    model, _ = _model("burgers")

    def pde(x, y):
        dy_x = dde.grad.jacobian(y, x, i=0, j=0)
        flux = y * dy_x  # an expression: its derivative is DeepXDE's business
        return dde.grad.jacobian(flux, x, i=0, j=0) + dde.grad.hessian(flux, x)

    x = torch.rand(12, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    ref = _pde_values(model, pde, x)
    tdx.enable()
    with pytest.warns(tdx.DeepXDEFallbackWarning, match="expression"):
        got = _pde_values(model, pde, x, steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", tdx.DeepXDEFallbackWarning)  # once only
        got = _pde_values(model, pde, x, steps=2)
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("kind", ["in place", "strided view", "auxiliary_vars"])
def test_unservable_tensors_fall_back(kind):
    """A served derivative modified in place, a view that is not a column slice, a net with auxiliary_vars:
    DeepXDE's answer, a warning naming the reason."""
    model, _ = _model("kovasznay")
    x = torch.rand(12, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)

    def pde(x, y):
        if kind == "in place":
            d = dde.grad.jacobian(y, x, i=1, j=1)
            d.mul_(2.0)
            return d + dde.grad.jacobian(d, x, i=0, j=0)
        if kind == "strided view":
            return dde.grad.jacobian(y[:, 0:3:2], x, i=1, j=0)  # component 2 through a strided view
        return dde.grad.hessian(y, x, component=2, i=0, j=1)

    if kind == "auxiliary_vars":
        model.net.auxiliary_vars = torch.ones(12, 1, dtype=torch.float64)
    ref = _pde_values(model, pde, x)
    tdx.enable()
    with pytest.warns(tdx.DeepXDEFallbackWarning, match=kind.split()[-1]):
        got = _pde_values(model, pde, x, steps=3)
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=ATOL)


class Branchy(dde.nn.NN):
    """Data-dependent Python control flow: torchderiv cannot trace it to one graph."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(2, 8)
        self.b = torch.nn.Linear(8, 1)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if h.sum() > 0:
            h = 2 * h
        return self.b(h)


class Dropped(dde.nn.NN):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(2, 8)
        self.d = torch.nn.Dropout(0.2)
        self.b = torch.nn.Linear(8, 1)

    def forward(self, x):
        return self.b(self.d(torch.tanh(self.a(x))))


class BatchNormed(dde.nn.NN):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(2, 8)
        self.n = torch.nn.BatchNorm1d(8)
        self.b = torch.nn.Linear(8, 1)

    def forward(self, x):
        return self.b(torch.tanh(self.n(self.a(x))))


class Noisy(dde.nn.NN):
    """Draws random numbers in its forward: a second pass is another function."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(2, 8)
        self.b = torch.nn.Linear(8, 1)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h * (1 + 0.1 * torch.randn_like(h)))


@pytest.mark.parametrize("net_cls,match", [(Branchy, "could not be traced"), (BatchNormed, "BatchMixing|rows"),
                                           (Dropped, "dropout"), (Noisy, "second call")])
def test_unservable_networks_fall_back(net_cls, match):
    """Each step's residual equals the autograd derivatives of that step's own output (a random network's
    output differs from step to step), with one warning naming the reason."""
    torch.manual_seed(0)
    net = net_cls().double()
    x = torch.rand(10, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)

    def pde(x, y):
        return dde.grad.jacobian(y, x, i=0, j=1) + dde.grad.hessian(y, x, i=0, j=0)

    def autograd_pde(x, y):
        g = torch.autograd.grad(y.sum(), x, create_graph=True)[0]
        return g[:, 1:2] + torch.autograd.grad(g[:, 0].sum(), x, create_graph=True)[0][:, 0:1]

    tdx.enable()
    with pytest.warns(tdx.DeepXDEFallbackWarning, match=match):
        for _ in range(3):
            y = net(x)
            torch.testing.assert_close(pde(x, y), autograd_pde(x, y), rtol=RTOL, atol=ATOL)
            dde.grad.clear()


def test_deepxde_errors_are_deepxde_errors():
    model, _ = _model("kovasznay")
    x = torch.rand(6, 2, dtype=torch.float64, requires_grad=True)
    tdx.enable()
    y = model.net(x)
    with pytest.raises(NotImplementedError):
        dde.grad.jacobian(y, x, j=0)  # a column of a multi-output net in reverse mode
    with pytest.raises(ValueError):
        dde.grad.hessian(y, x, component=3)
    with pytest.raises(ValueError):
        dde.grad.jacobian(y, x, i=0, j=2)


# ----------------------------------------------------------------------------- forward configuration


def _v(t):
    return t[0] if isinstance(t, tuple) else t


# the residuals written for both configurations (in the forward one y = (outputs, net) and (value, callable)
# pairs come back; _v takes the value)
def burgers_fwd(x, y):
    dy_x = _v(dde.grad.jacobian(y, x, i=0, j=0))
    dy_t = _v(dde.grad.jacobian(y, x, i=0, j=1))
    dy_xx = _v(dde.grad.hessian(y, x, i=0, j=0))
    return dy_t + _v(y) * dy_x - 0.01 / PI * dy_xx


def kovasznay_fwd(x, y):
    u, v = _v(y)[:, 0:1], _v(y)[:, 1:2]
    u_x, u_y = (_v(dde.grad.jacobian(y, x, i=0, j=k)) for k in (0, 1))
    v_x, v_y = (_v(dde.grad.jacobian(y, x, i=1, j=k)) for k in (0, 1))
    p_x = _v(dde.grad.jacobian(y, x, i=2, j=0))
    lap_u = _v(dde.grad.hessian(y, x, component=0, i=0, j=0)) + _v(dde.grad.hessian(y, x, component=0, i=1, j=1))
    return [u * u_x + v * u_y + p_x - lap_u / 20, u_x + v_y + v_x]


def heat3d_fwd(x, y):
    u_t = _v(dde.grad.jacobian(y, x, i=0, j=3))
    return u_t - 0.1 * sum(_v(dde.grad.hessian(y, x, i=k, j=k)) for k in range(3))


def euler_beam_fwd(x, y):
    dy_xx = dde.grad.hessian(y, x)
    return _v(dde.grad.hessian(dy_xx, x)) + 1


def elasticity_fwd(x, y):
    uy_xy = _v(dde.grad.hessian(y, x, component=1, i=1, j=0))
    ux_xx = _v(dde.grad.hessian(y, x, component=0, i=0, j=0))
    return [ux_xx + uy_xy, _v(dde.grad.jacobian(y, x, i=1, j=1))]


FORWARD = {"burgers": burgers_fwd, "kovasznay": kovasznay_fwd, "heat3d": heat3d_fwd,
           "euler_beam": euler_beam_fwd, "elasticity_pfnn": elasticity_fwd}


@pytest.mark.parametrize("case", list(FORWARD))
def test_forward_configuration_matches_reverse(case):
    """In DeepXDE's forward configuration ``y`` arrives as (outputs, net) and (value, callable) pairs go
    back; the served values equal DeepXDE's reverse configuration, and the pairs' callables their values."""
    model, _ = _model(case)
    pde = FORWARD[case]
    x = torch.rand(12, model.data.geom.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(4),
                   requires_grad=True)
    ref = pde(x, model.net(x))  # reverse configuration, DeepXDE alone
    dde.grad.clear()
    dde.config.autodiff = "forward"
    tdx.enable()
    before = _counts()
    for _ in range(3):
        got = pde(x, (model.net(x), model.net))
        dde.grad.clear()
    assert _delta(before)["served"] > 0 and _delta(before)["fallback"] == 0
    for a, b in zip(ref if isinstance(ref, list) else [ref], got if isinstance(got, list) else [got]):
        torch.testing.assert_close(b, a, rtol=RTOL, atol=ATOL)
    y = model.net(x)
    for pair in (dde.grad.jacobian((y, model.net), x, i=None, j=0),
                 dde.grad.hessian((y, model.net), x, component=0, i=0, j=0)):
        torch.testing.assert_close(pair[1](x), pair[0], rtol=RTOL, atol=ATOL)
    dde.grad.clear()


# ----------------------------------------------------------------------------- switching


def test_disable_restores_the_originals_exactly():
    g = dde.grad
    orig = (g.jacobian, g.hessian, g.clear)
    hooks = dict(torch.nn.modules.module._global_forward_hooks)
    tdx.enable()
    tdx.enable()  # idempotent
    assert (g.jacobian, g.hessian, g.clear) != orig and tdx.is_enabled()
    assert len(torch.nn.modules.module._global_forward_hooks) == len(hooks) + 1
    tdx.disable()
    assert (g.jacobian, g.hessian, g.clear) == orig and not tdx.is_enabled()
    assert dict(torch.nn.modules.module._global_forward_hooks) == hooks
    tdx.disable()  # idempotent
    assert tdx._stats()["origins"] == 0 and tdx._stats()["steps"] == 0


def test_enabled_context_restores_the_previous_state():
    with tdx.enabled():
        assert tdx.is_enabled()
        with tdx.enabled():
            assert tdx.is_enabled()
        assert tdx.is_enabled()  # was on before the inner block
    assert not tdx.is_enabled()
    with pytest.raises(KeyError), tdx.enabled():
        raise KeyError("x")
    assert not tdx.is_enabled()


def test_import_torchderiv_does_not_import_deepxde():
    code = ("import sys, torchderiv; assert 'deepxde' not in sys.modules; m = torchderiv.deepxde; "
            "assert 'deepxde' not in sys.modules; assert callable(m.enable); print('ok')")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_predict_with_operator():
    model, pde = _model("kovasznay")
    X = model.data.test()[0][:20]
    with contextlib.redirect_stdout(io.StringIO()):
        ref = [model.predict(X, operator=pde) for _ in range(2)]
        with tdx.enabled():
            got = [model.predict(X, operator=pde) for _ in range(3)]
    for a, b in zip(ref[-1], got[-1]):
        np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-11)


# ----------------------------------------------------------------------------- training


def _train(case, on, optimizer, iters):
    model, _ = _model(case)
    if optimizer == "L-BFGS":
        with contextlib.redirect_stdout(io.StringIO()):
            model.compile("L-BFGS")
    with contextlib.redirect_stdout(io.StringIO()), tdx.enabled() if on else contextlib.nullcontext():
        if optimizer == "L-BFGS":
            hist, _ = model.train(display_every=1, verbose=0)
        else:
            hist, _ = model.train(iterations=iters, display_every=1, verbose=0)
    return np.array([np.sum(v) for v in hist.loss_train])


@pytest.mark.parametrize("case", ["burgers", pytest.param("kovasznay", marks=pytest.mark.slow)])
def test_adam_training_loss_history_matches(case):
    ref = _train(case, False, "adam", 100)
    got = _train(case, True, "adam", 100)
    assert len(ref) == len(got) == 101
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    assert ref[-1] < ref[0]  # it trained


def test_lbfgs_training_loss_history_matches():
    saved = dict(dde.optimizers.config.LBFGS_options)
    dde.optimizers.config.set_LBFGS_options(maxiter=40)
    # two L-BFGS iterations per DeepXDE step (with one, DeepXDE takes the step for convergence): a history
    # entry every two iterations
    dde.optimizers.config.LBFGS_options.update(iter_per_step=2, fun_per_step=60)
    try:
        ref = _train("euler_beam", False, "L-BFGS", None)
        got = _train("euler_beam", True, "L-BFGS", None)
    finally:
        dde.optimizers.config.LBFGS_options.update(saved)
    assert len(ref) == len(got) > 5
    np.testing.assert_allclose(got, ref, rtol=1e-5)


@pytest.mark.slow  # tracemalloc makes every step about three times slower
def test_records_constant_and_memory_flat_over_training():
    model, _ = _model("poisson_neumann_robin")
    X, Y, aux = model.data.train_next_batch()
    # the records of networks from earlier tests go with those networks: collect them now, not between steps
    # 100 and 400 (cyclic garbage: 17 records at step 100, 1 at step 400 in one test order)
    gc.collect()
    tdx.enable()
    stats = {}
    tracemalloc.start()
    try:
        for step in range(401):
            model.train_step(X, Y, aux)
            if step == 100:
                stats[100] = tdx._stats()
                base = tracemalloc.take_snapshot()
            elif step == 400:
                stats[400] = tdx._stats()
                growth = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(base, "filename"))
    finally:
        tracemalloc.stop()
    keys = ("origins", "steps", "records", "alphas")
    assert {k: stats[100][k] for k in keys} == {k: stats[400][k] for k in keys}
    assert stats[400]["passes"] - stats[100]["passes"] == 300
    assert growth < 2**20, f"{growth} bytes"


# ----------------------------------------------------------------------------- bench rows


def test_bench_rows_agree():
    """The bench's two DeepXDE rows (the same step with and without the switch) give the same residuals and
    parameter gradients, and the torchderiv row is really served after its first call."""
    from torchderiv.bench import SCENARIOS
    from torchderiv.bench._methods import Setup

    sc = SCENARIOS["dde-euler-beam"]
    s = sc.make()
    s = Setup(s.f.double(), s.x[:24].double(), s.extra)
    base, served = (m.build(s) for m in sc.methods)
    ref = base()
    before = _counts()
    for _ in range(3):
        got = served()
    assert _delta(before)["served"] > 0 and not tdx.is_enabled()
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=RTOL, atol=ATOL)


class Wrapper(dde.nn.NN):
    """A network whose output IS an inner DeepXDE network's output, called on features of the inputs."""

    def __init__(self):
        super().__init__()
        self.inner = dde.nn.FNN([3, 10, 2], "tanh", "Glorot normal")

    def forward(self, x):
        return self.inner(torch.cat([x, x[:, :1] * x[:, 1:]], 1))


def test_nested_networks_are_served_as_the_outer_one():
    torch.manual_seed(0)
    net = Wrapper()
    x = torch.rand(10, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(6), requires_grad=True)

    def pde(x, y):
        return dde.grad.hessian(y, x, component=1, i=0, j=1) + dde.grad.jacobian(y, x, i=0, j=1)

    outs = []
    for on in (False, True):
        with tdx.enabled() if on else contextlib.nullcontext():
            before = _counts()
            for _ in range(3):
                out = pde(x, net(x))
                dde.grad.clear()
            outs.append(out)
    assert _delta(before)["served"] > 0 and _delta(before)["fallback"] == 0
    torch.testing.assert_close(outs[1], outs[0], rtol=RTOL, atol=ATOL)


def test_other_backend_warns_and_changes_nothing(monkeypatch):
    monkeypatch.setattr(dde.backend, "backend_name", "tensorflow")
    g = dde.grad
    orig = (g.jacobian, g.hessian, g.clear)
    with pytest.warns(tdx.DeepXDEFallbackWarning, match="PyTorch backend only"):
        tdx.enable()
    assert not tdx.is_enabled() and (g.jacobian, g.hessian, g.clear) == orig


class TupleInputs(dde.nn.NN):
    """Called on a tuple of tensors, as DeepONet-style networks are."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)

    def forward(self, inputs):
        a, b = inputs
        return torch.tanh(self.lin(torch.cat([a, b], 1)))


def test_tuple_inputs_fall_back():
    torch.manual_seed(0)
    net = TupleInputs().double()
    g = torch.Generator().manual_seed(7)
    a = torch.rand(6, 2, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.rand(6, 1, dtype=torch.float64, generator=g)

    def res():
        out = dde.grad.hessian(net((a, b)), a, component=1, i=0, j=1)
        dde.grad.clear()
        return out

    ref = res()
    with tdx.enabled(), pytest.warns(tdx.DeepXDEFallbackWarning, match="neither a network output"):
        got = res()
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=ATOL)


def test_passthrough_policy_serves_everything_by_deepxde(monkeypatch):
    """When the speed policy says pass-through, no torchderiv pass runs, nothing warns, the answers are
    DeepXDE's."""
    monkeypatch.setattr(tdx, "_method", lambda net, x, spec: "passthrough")
    ref = _steps("kovasznay", on=False, steps=2)
    before = _counts()
    with warnings.catch_warnings():
        warnings.simplefilter("error", tdx.DeepXDEFallbackWarning)
        got = _steps("kovasznay", on=True, steps=2)
    d = _delta(before)
    assert d["passes"] == 0 and d["served"] == 0 and d["on_demand"] > 0, d
    for a, b in zip(ref, got):
        for ta, tb in zip(a, b):
            torch.testing.assert_close(tb, ta, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("times, want", [
    ({"forward": 1.0, "autograd": 10.0, "one_pass": 1.0}, "forward"),  # Taylor beats DeepXDE's 9 by far
    ({"forward": 5.0, "autograd": 6.0, "one_pass": 2.0}, "passthrough"),  # 5 against DeepXDE's own 4
    ({"forward": 3.0, "autograd": 5.5, "one_pass": 1.0}, "passthrough"),  # 4.5: faster, but within the margin
    ({"forward": 3.0, "autograd": 6.0, "one_pass": 1.0}, "forward"),  # 5 >= 1.6 x 3
    ({"forward": 3.0, "autograd": 2.0, "one_pass": 0.5}, "passthrough"),  # nested autograd is cheapest
    ({"forward": 3.0, "one_pass": 0.5}, "forward"),  # nothing to compare with (autograd not admissible)
    (None, "forward"),  # untraceable: the watched first pass decides (_Untraceable)
])
def test_speed_policy_prices_deepxde_own_path(monkeypatch, times, want):
    """DeepXDE's own path is the autograd method without its forward (DeepXDE ran it already): the policy
    serves by torchderiv only where that is predicted cheaper."""
    import torchderiv._dispatch as dispatch

    monkeypatch.setattr(dispatch, "predicted_times", lambda *a, **k: None if times is None else dict(times))
    assert tdx._method(torch.nn.Linear(2, 1), torch.zeros(3, 2), [(), (0,)]) == want

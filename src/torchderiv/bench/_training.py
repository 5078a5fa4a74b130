"""Training-step scenarios on small physics-informed nets (issue 12): one step is partials -> PDE residual ->
mean square -> one backward to the parameters, timed as a whole.

Three PDEs of the sizes users train (DeepXDE's examples): a scalar PDE in one space dimension plus time
(viscous Burgers), a 2-D steady flow with three outputs (Kovasznay: u, v, p), a 3-D unsteady flow with four
outputs (Beltrami: u, v, w, p of x, y, z, t). Rows: the autograd loop a user writes by hand (the baseline
and the reference), ``torchderiv.partials`` with ``method="forward"``, ``"autograd"`` and ``"auto"``, and
the torchderiv loss under ``torch.compile``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

import torchderiv

from . import _methods as M
from ._methods import Runner, Setup
from ._peers import compile_available, compiled_step


class _Sin(torch.nn.Module):
    def forward(self, x):
        return torch.sin(x)


ACTIVATIONS = {"tanh": torch.nn.Tanh, "sin": _Sin, "gelu": torch.nn.GELU, "silu": torch.nn.SiLU}


def _mlp(sizes, act: str = "tanh") -> torch.nn.Sequential:
    layers: list[torch.nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [torch.nn.Linear(a, b), ACTIVATIONS[act]()]
    return torch.nn.Sequential(*layers[:-1])


# a PDE: its coordinates, the partials it reads, and its residual from them (each [B, m])
class PDE:
    def __init__(self, coords: str, spec: list[str], residual: Callable[[dict], Tensor]):
        self.coords, self.spec, self.residual = coords, spec, residual


def _burgers(d):  # u_t + u u_x - nu u_xx
    return d["t"] + d[""] * d["x"] - 0.01 / torch.pi * d["xx"]


def _kovasznay(d):  # steady Navier-Stokes, Re = 20: momentum in x and y, continuity
    u, v = d[""][:, 0], d[""][:, 1]
    ux, uy, vx, vy, px, py = d["x"][:, 0], d["y"][:, 0], d["x"][:, 1], d["y"][:, 1], d["x"][:, 2], d["y"][:, 2]
    lu = d["xx"][:, 0] + d["yy"][:, 0]
    lv = d["xx"][:, 1] + d["yy"][:, 1]
    return torch.stack([u * ux + v * uy + px - lu / 20, u * vx + v * vy + py - lv / 20, ux + vy], -1)


def _beltrami(d):  # unsteady Navier-Stokes in 3-D, Re = 1
    U = d[""]
    res = []
    for i in range(3):
        conv = sum(U[:, j] * d["xyz"[j]][:, i] for j in range(3))
        lap = sum(d[c + c][:, i] for c in "xyz")
        res.append(d["t"][:, i] + conv + d["xyz"[i]][:, 3] - lap)
    res.append(sum(d["xyz"[j]][:, j] for j in range(3)))
    return torch.stack(res, -1)


def _allen_cahn(d):  # u_t - 0.001 u_xx + 5 (u^3 - u)
    return d["t"] - 0.001 * d["xx"] + 5 * (d[""] ** 3 - d[""])


def _helmholtz(d):  # -u_xx - u_yy - k^2 u - f, k = 2 pi, f = k^2 sin(k x) sin(k y)
    return -d["xx"] - d["yy"] - (2 * torch.pi) ** 2 * d[""]


def _heat3d(d):  # u_t - (u_xx + u_yy + u_zz) / 4
    return d["t"] - (d["xx"] + d["yy"] + d["zz"]) / 4


def _wave(d):  # u_tt - 4 u_xx
    return d["tt"] - 4 * d["xx"]


PDES = {
    "burgers": PDE("tx", ["", "t", "x", "xx"], _burgers),
    "allen-cahn": PDE("tx", ["", "t", "xx"], _allen_cahn),
    "helmholtz": PDE("xy", ["", "xx", "yy"], _helmholtz),
    "heat3d": PDE("xyzt", ["t", "xx", "yy", "zz"], _heat3d),
    "wave": PDE("tx", ["tt", "xx"], _wave),
    "kovasznay": PDE("xy", ["", "x", "y", "xx", "yy"], _kovasznay),
    "beltrami": PDE("xyzt", ["", "t", "x", "y", "z", "xx", "yy", "zz"], _beltrami),
}


def autograd_loop(f, x: Tensor, pde: PDE) -> dict:
    """The partials as written by hand: per output component, one gradient, then one more per second
    derivative the PDE reads (DeepXDE's ``dde.grad`` pattern), every one kept differentiable."""
    x = x.detach().requires_grad_(True)
    u = f(x)
    pos = {c: i for i, c in enumerate(pde.coords)}
    out: dict = {"": u}
    first = [torch.autograd.grad(u[:, o].sum(), x, create_graph=True)[0] for o in range(u.shape[1])]
    for k in pde.spec:
        if len(k) == 1:
            out[k] = torch.stack([g[:, pos[k]] for g in first], 1)
        elif len(k) == 2:
            i, j = pos[k[0]], pos[k[1]]
            out[k] = torch.stack([torch.autograd.grad(g[:, i].sum(), x, create_graph=True)[0][:, j]
                                  for g in first], 1)
    return out


def _step(partials_fn: Callable[[Setup], dict]) -> M.Builder:
    def build(s: Setup) -> Runner:
        params = list(s.f.parameters())
        pde = s.extra["pde"]

        def run():
            with torch.enable_grad():
                for p in params:
                    p.grad = None
                r = pde.residual(partials_fn(s))
                (r ** 2).mean().backward()
                grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
                return r.detach(), torch.cat([g.reshape(-1) for g in grads])

        return run

    return build


def _td(method: str) -> M.Builder:
    return _step(lambda s: torchderiv.partials(s.f, s.x, s.extra["pde"].spec, coords=s.extra["pde"].coords,
                                               method=method))


def _compiled(s: Setup) -> Runner:
    """The torchderiv loss (method="auto") under torch.compile (inductor); compiled outside the timing."""
    pde = s.extra["pde"]

    def loss_fn(x):
        r = pde.residual(torchderiv.partials(s.f, x, pde.spec, coords=pde.coords))
        return (r ** 2).mean(), r

    return compiled_step(s, loss_fn)


# name -> (pde, layer sizes, points, activation). The "untuned" ones were fixed before the calibration and
# the speed work of issue 12 and never used to tune anything (its "nets you have not tuned to").
TRAINING = {
    "train-burgers": ("burgers", [2, 20, 20, 20, 1], 2540, "tanh"),
    "train-kovasznay": ("kovasznay", [2, 50, 50, 50, 50, 3], 2601, "tanh"),
    "train-beltrami": ("beltrami", [4, 50, 50, 50, 50, 4], 5000, "tanh"),
    "untuned-allen-cahn": ("allen-cahn", [2, 20, 20, 20, 1], 8000, "tanh"),
    "untuned-helmholtz": ("helmholtz", [2, 64, 64, 64, 1], 4000, "sin"),
    "untuned-heat3d": ("heat3d", [4, 32, 32, 32, 1], 4000, "gelu"),
    "untuned-wave": ("wave", [2, 40, 40, 40, 40, 1], 3000, "silu"),
}

BASELINE = "autograd loop + backward"


def register_training(register, Scenario, Method) -> None:  # noqa: N803 - the classes of _scenarios
    rows = [
        Method(BASELINE, _step(lambda s: autograd_loop(s.f, s.x, s.extra["pde"]))),
        Method("torchderiv.partials forward + backward", _td("forward"), kind="torchderiv"),
        Method("torchderiv.partials autograd + backward", _td("autograd"), kind="torchderiv"),
        Method("torchderiv.partials auto + backward", _td("auto"), kind="torchderiv"),
    ]
    compiled = compile_available()
    if compiled:
        rows.append(Method("torchderiv.partials + backward, torch.compile", _compiled, kind="torchderiv",
                           memory=False))
    for name, (pde_name, sizes, points, act) in TRAINING.items():
        pde = PDES[pde_name]

        def make(sizes=sizes, points=points, pde=pde, act=act) -> Setup:
            torch.manual_seed(0)
            return Setup(_mlp(sizes, act), torch.rand(points, sizes[0]), {"pde": pde})

        widths = "x".join(str(w) for w in sizes)
        register(Scenario(
            name, f"PINN training step ({pde_name}): residual of {pde.spec} -> mean square -> backward, "
                  f"{widths} {act}, B={points}",
            make, list(rows), baseline=BASELINE, reference=BASELINE, op="partials+backward", rtol=2e-3,
            notes=[f"{name}: times include the backward to the parameters"]
            + ([] if compiled else [f"{name}: no torch.compile row (no C++ compiler for inductor)"])))

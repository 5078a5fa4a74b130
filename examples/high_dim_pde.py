"""A Poisson problem in D = 1000 dimensions (up to 100,000) trained with randomized Laplacians.

    Δu = g   in the unit ball of R^D,      u = 0   on its sphere,

with the closed-form solution of the stochastic-dimension and STDE papers' "two-body" test problem
(Hu et al. 2023; Shi et al. 2024)

    u*(x) = (1 - |x|^2) * sum_{i<D} c_i sin(x_i + cos(x_{i+1}) + x_{i+1} cos(x_i)),     c_i ~ N(0, 1) fixed,

and g = Δu* in closed form (:func:`source`). The boundary condition is built into the network,
``u(x) = (1 - |x|^2) N(x)``, so the loss is the PDE residual alone. Its Laplacian is an unbiased random
estimate (``torchderiv.laplacian(..., estimator=, samples=K)``: K + 2 forward-pass equivalents whatever D).
The square of an unbiased estimate is biased (E[(L - g)^2] = (E L - g)^2 + Var L), so the loss is the
product of two INDEPENDENT estimates, E[(L1 - g)(L2 - g)] = (E L - g)^2, whose gradient is unbiased for
the gradient of the exact squared residual (``--biased-loss``: one estimate squared, cheaper, biased).
docs/high_dim.md fixes the problem, the net and the test set, and gives the measured figures.

    python examples/high_dim_pde.py                                  # D = 1000, Rademacher, K = 4
    python examples/high_dim_pde.py --estimator coordinates          # sparse one-hot seeds
    python examples/high_dim_pde.py --exact                          # the exact collapsed Laplacian
    python examples/high_dim_pde.py --dim 100000 --steps 20          # memory check at D = 100,000
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch
from _common import mlp
from torch import Tensor, nn

import torchderiv


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dim", type=int, default=1000, help="space dimension D")
    p.add_argument("--estimator", default="rademacher", choices=["rademacher", "gaussian", "coordinates"])
    p.add_argument("--samples", type=int, default=4,
                   help="random directions K per estimate (docs/high_dim.md: the estimator's error is far below the "
                        "residual's, so a larger K only costs time)")
    p.add_argument("--exact", action="store_true", help="the exact collapsed Laplacian (D + 2 streams) instead")
    p.add_argument("--biased-loss", action="store_true",
                   help="square ONE estimate (half the cost; biased by its variance) instead of the product of two")
    p.add_argument("--shared", action="store_true", help="one set of directions for the whole batch")
    p.add_argument("--steps", type=int, default=6000, help="Adam steps")
    p.add_argument("--points", type=int, default=100, help="collocation points per step (fresh every step)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-final", type=float, default=0.05, help="exponential decay to lr * lr_final")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=3, help="tanh hidden layers")
    p.add_argument("--scale-inputs", action=argparse.BooleanOptionalAction, default=True,
                   help="feed sqrt(D) x to the MLP (coordinates of size about 1) and start its last layer at zero")
    p.add_argument("--test-points", type=int, default=2000, help="held-out points (fixed seed)")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--float64", action="store_true")
    a = p.parse_args(argv)
    if a.dim < 2:
        p.error("--dim must be at least 2")
    return a


# ----------------------------------------------------------------------------- the problem


def coefficients(dim: int, dtype, device) -> Tensor:
    return torch.randn(dim - 1, generator=torch.Generator().manual_seed(1234), dtype=torch.float64).to(device, dtype)


def sample_ball(n: int, dim: int, gen: torch.Generator, dtype, device) -> Tensor:
    """Uniform in the unit ball: a uniform direction times radius U^(1/D)."""
    z = torch.randn(n, dim, generator=gen, dtype=dtype)
    r = torch.rand(n, 1, generator=gen, dtype=dtype) ** (1.0 / dim)
    return (z / z.norm(dim=1, keepdim=True) * r).to(device)


def solution_and_source(x: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """``u*(x)`` and ``g = Δu*`` in closed form, both ``[B, 1]``.

    With ``s = sum_i c_i sin(a_i)``, ``a_i = x_i + cos(x_{i+1}) + x_{i+1} cos(x_i)`` and ``phi = 1 - |x|^2``:
    ``Δ(phi s) = phi Δs - 4 x . grad s - 2 D s``, ``Δ sin(a) = cos(a) Δa - sin(a) |grad a|^2``."""
    D = x.shape[1]
    xi, xj = x[:, :-1], x[:, 1:]
    a = xi + torch.cos(xj) + xj * torch.cos(xi)
    da_i, da_j = 1 - xj * torch.sin(xi), torch.cos(xi) - torch.sin(xj)
    dda = -xj * torch.cos(xi) - torch.cos(xj)
    sa, ca = torch.sin(a), torch.cos(a)
    s = (c * sa).sum(1, keepdim=True)
    lap_s = (c * (ca * dda - sa * (da_i**2 + da_j**2))).sum(1, keepdim=True)
    x_grad_s = (c * ca * (xi * da_i + xj * da_j)).sum(1, keepdim=True)
    phi = 1 - (x**2).sum(1, keepdim=True)
    return phi * s, phi * lap_s - 4 * x_grad_s - 2 * D * s


class Ansatz(nn.Module):
    """``u(x) = (1 - |x|^2) N(x)``: zero on the sphere by construction; ``N`` a tanh MLP. With
    ``input_scale``, ``N`` sees ``input_scale * x`` (points of the ball have coordinates of size about
    ``1 / sqrt(D)``) and its last layer starts at zero (``N`` starts constant)."""

    def __init__(self, dim: int, width: int, depth: int, input_scale: float = 1.0):
        super().__init__()
        self.scale = input_scale
        self.net = mlp(dim, width, depth)
        if input_scale != 1.0:
            nn.init.zeros_(self.net[-1].weight)

    def forward(self, x):
        return (1 - (x * x).sum(-1, keepdim=True)) * self.net(x * self.scale if self.scale != 1.0 else x)


# ----------------------------------------------------------------------------- training


def laplacian(u: nn.Module, x: Tensor, a: argparse.Namespace, gen: torch.Generator) -> Tensor:
    if a.exact:
        return torchderiv.laplacian(u, x)
    return torchderiv.laplacian(u, x, estimator=a.estimator, samples=a.samples, generator=gen, shared=a.shared)


def loss_fn(u: nn.Module, x: Tensor, g: Tensor, a: argparse.Namespace, gen: torch.Generator) -> Tensor:
    scale = 1.0 / x.shape[1] ** 2  # g grows like D: keep the loss O(1)
    r1 = laplacian(u, x, a, gen) - g
    if a.exact or a.biased_loss:
        return scale * (r1**2).mean()
    r2 = laplacian(u, x, a, gen) - g  # an independent second estimate
    return scale * (r1 * r2).mean()


def rel_l2(u: nn.Module, x: Tensor, exact: Tensor) -> float:
    with torch.no_grad():
        pred = torch.cat([u(x[i : i + 500]) for i in range(0, x.shape[0], 500)])
    return float((pred.double() - exact).norm() / exact.norm())


def main(argv=None) -> dict:
    a = parse(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    dtype = torch.float64 if a.float64 else torch.float32
    dev = torch.device(a.device)
    c = coefficients(a.dim, dtype, dev)
    u = Ansatz(a.dim, a.width, a.depth, math.sqrt(a.dim) if a.scale_inputs else 1.0).to(dev, dtype)
    test_x = sample_ball(a.test_points, a.dim, torch.Generator().manual_seed(99), torch.float64, dev)
    # in chunks: at D = 100,000 the closed form's temporaries for all 2000 points at once took 17.5 GB
    test_u = torch.cat([solution_and_source(test_x[i : i + 100], c.double())[0]
                        for i in range(0, test_x.shape[0], 100)])
    test_x = test_x.to(dtype)
    pts = torch.Generator().manual_seed(a.seed + 1)
    dirs = torch.Generator(device=dev).manual_seed(a.seed + 2)
    opt = torch.optim.Adam(u.parameters(), lr=a.lr)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, a.lr_final ** (1.0 / max(a.steps, 1)))
    how = "exact collapsed Laplacian" if a.exact else (
        f"{a.estimator} K={a.samples}{' shared' if a.shared else ''}, "
        f"{'one estimate squared (biased)' if a.biased_loss else 'two independent estimates'}")
    print(f"Poisson, D={a.dim}, unit ball, u = (1-|x|^2) N(x), N: {a.dim} -> {a.depth} x {a.width} -> 1 tanh; "
          f"{a.points} points/step; {how}; {torch.get_num_threads()} thread(s)", flush=True)
    times, hist = [], []
    err = err0 = rel_l2(u, test_x, test_u)
    t_start = time.perf_counter()
    for step in range(1, a.steps + 1):
        x = sample_ball(a.points, a.dim, pts, dtype, dev)
        g = solution_and_source(x, c)[1]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(u, x, g, a, dirs)
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        sched.step()
        if step % a.eval_every == 0 or step == a.steps:
            err = rel_l2(u, test_x, test_u)
            hist.append((step, time.perf_counter() - t_start, err))
        if sys.stdout.isatty() or step % a.eval_every == 0 or step == a.steps:
            bar = "#" * int(30 * step / a.steps)
            med = sorted(times[1:] or times)[len(times[1:] or times) // 2]
            end = "\n" if (step % a.eval_every == 0 or step == a.steps) else "\r"
            print(f"[{bar:<30}] step {step}/{a.steps} loss {float(loss.detach()):.3e} rel L2 {err:.3e} "
                  f"{1e3 * med:.1f} ms/step", end=end, flush=True)
    total = time.perf_counter() - t_start
    med = sorted(times[1:] or times)[len(times[1:] or times) // 2]
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    print(f"done: {a.steps} steps in {total:.1f} s (median {1e3 * med:.1f} ms/step, first step {times[0]:.2f} s), "
          f"relative L2 error {err:.3e}" + (f", peak GPU memory {peak / 2**30:.2f} GiB" if peak else ""))
    return {"rel_l2": err, "rel_l2_init": err0, "ms_per_step": 1e3 * med, "total_s": total, "history": hist,
            "first_step_s": times[0], "finite": math.isfinite(err)}


if __name__ == "__main__":
    main()

"""Physics-informed training: the viscous Burgers equation in one space dimension and time.

    u_t + u u_x - nu u_xx = 0   on x in (-1, 1), t in (0, 1),   nu = 0.1,

with the closed-form viscous shock (a traveling wave; exact for every nu, found e.g. by Cole-Hopf)

    u(t, x) = c - A tanh(A (x - x0 - c t) / (2 nu)),   A = 1, c = 0.5, x0 = -0.25,

joining u = c + A on the left to u = c - A on the right and moving at speed c. Its values give the initial
condition at t = 0 and the Dirichlet data at x = -1 and x = 1. All four quantities of the residual come
from ONE torchderiv call, one generated forward pass:

    d = torchderiv.partials(net, tx, ["", "t", "x", "xx"], coords="tx")
    residual = d["t"] + d[""] * d["x"] - nu * d["xx"]

    python examples/burgers.py               # torchderiv
    python examples/burgers.py --autograd    # the same training with torch.autograd.grad loops
"""

from __future__ import annotations

import torch
from _common import Problem, Result, autograd_partials, mlp, no_grad_eval, parser, run, setup
from torch import Tensor, nn

import torchderiv

NU, A, C, X0 = 0.1, 1.0, 0.5, -0.25
IC_WEIGHT = BC_WEIGHT = 10.0
SPEC = ["", "t", "x", "xx"]


def exact(tx: Tensor) -> Tensor:
    t, x = tx[:, :1], tx[:, 1:2]
    return C - A * torch.tanh(A * (x - X0 - C * t) / (2 * NU))


def sample(n: int, n_ic: int, n_bc: int, gen: torch.Generator, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Interior points, initial points (t = 0) and boundary points (x = -1 or 1), as [n, 2] tensors (t, x)."""
    r = torch.rand(n, 2, generator=gen, dtype=dtype)
    interior = torch.cat([r[:, :1], 2 * r[:, 1:] - 1], 1)
    x0 = 2 * torch.rand(n_ic, 1, generator=gen, dtype=dtype) - 1
    initial = torch.cat([torch.zeros_like(x0), x0], 1)
    tb = torch.rand(n_bc, 1, generator=gen, dtype=dtype)
    side = (torch.arange(n_bc) % 2).to(dtype)[:, None] * 2 - 1
    boundary = torch.cat([tb, side], 1)
    return interior, initial, boundary


def burgers_residual(net: nn.Module, tx: Tensor, *, autograd: bool = False) -> Tensor:
    d = autograd_partials(net, tx, SPEC, "tx") if autograd else torchderiv.partials(net, tx, SPEC, coords="tx")
    return d["t"] + d[""] * d["x"] - NU * d["xx"]


def burgers_loss(net: nn.Module, interior: Tensor, initial: Tensor, boundary: Tensor, *,
                 autograd: bool = False) -> Tensor:
    r = burgers_residual(net, interior, autograd=autograd)
    data = torch.cat([initial, boundary])
    misfit = net(data) - exact(data)
    n_ic = initial.shape[0]
    return ((r**2).mean() + IC_WEIGHT * (misfit[:n_ic] ** 2).mean() + BC_WEIGHT * (misfit[n_ic:] ** 2).mean())


def test_grid(dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.cartesian_prod(torch.linspace(0, 1, 101, dtype=dtype), torch.linspace(-1, 1, 201, dtype=dtype))


def build(argv=None) -> Problem:
    p = parser(__doc__.split("\n\n")[0], steps=3000, lr=3e-3, points=1024, width=32, depth=3)
    p.add_argument("--data-points", type=int, default=128, help="initial and boundary points each, per step")
    args = p.parse_args(argv)
    opts = setup(args)
    dtype, dev = opts["dtype"], opts["device"]
    net = mlp(2, args.width, args.depth, **opts)
    gen = torch.Generator().manual_seed(args.seed)
    tg = test_grid(dtype).to(dev)
    return Problem(args, net,
                   lambda: [t.to(dev) for t in sample(args.points, args.data_points, args.data_points, gen, dtype)],
                   lambda *pts, autograd=False: burgers_loss(net, *pts, autograd=autograd),
                   no_grad_eval(net, tg, exact(tg)),
                   f"Burgers 1D+t (nu={NU}): MLP 2 -> {args.depth} x {args.width} -> 1 (tanh), {args.points} "
                   f"interior + {2 * args.data_points} initial/boundary points per step")


def main(argv=None) -> Result:
    return run(build(argv))


if __name__ == "__main__":
    main()

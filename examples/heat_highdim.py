"""Physics-informed training in high dimension: the heat equation in D = 20 space dimensions.

    u_t = Laplace_x u   on x in (-1, 1)^D, t in (0, 1),

with the exact solution (a sum of heat modes, zero mean over the cube, so the relative error is not
flattered by a constant offset)

    u(t, x) = exp(-pi^2 t / 4) * sum_i sin(pi x_i / 2),

whose values give the initial condition at t = 0 and the Dirichlet data on the faces of the cube. The
input is (t, x_1, ..., x_D); the spatial Laplacian is ONE collapsed Taylor pass over the D space
coordinates (D + 2 coefficient streams, the D second derivatives never formed one by one):

    lap = torchderiv.laplacian(net, tx, dims=range(1, D + 1))      # [B, 1]
    u_t = torchderiv.partials(net, tx, [(0,)])[(0,)]               # [B, 1]

The ``--autograd`` reference needs one backward for the gradient and then one per space coordinate
(D + 1 = 21 backward passes through the network, each differentiated again by the training backward).

    python examples/heat_highdim.py              # torchderiv
    python examples/heat_highdim.py --autograd   # torch.autograd.grad loops
    python examples/heat_highdim.py --dim 50
"""

from __future__ import annotations

import math

import torch
from _common import Problem, Result, autograd_partials, mlp, no_grad_eval, parser, run, setup
from torch import Tensor, nn

import torchderiv

PI = math.pi
DATA_WEIGHT = 100.0


def exact(tx: Tensor) -> Tensor:
    t, x = tx[:, :1], tx[:, 1:]
    return torch.exp(-(PI**2) * t / 4) * torch.sin(PI * x / 2).sum(1, keepdim=True)


def sample(n: int, n_data: int, dim: int, gen: torch.Generator, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Interior points ``[n, 1 + dim]`` and data points ``[n_data, 1 + dim]``: half at t = 0, half on a
    random face of the cube (one random space coordinate set to -1 or 1). Columns: (t, x_1, ..., x_D)."""
    scale = torch.tensor([1.0] + [2.0] * dim, dtype=dtype)
    shift = torch.tensor([0.0] + [-1.0] * dim, dtype=dtype)
    interior = torch.rand(n, 1 + dim, generator=gen, dtype=dtype) * scale + shift
    data = torch.rand(n_data, 1 + dim, generator=gen, dtype=dtype) * scale + shift
    half = n_data // 2
    data[:half, 0] = 0
    face = torch.randint(1, 1 + dim, (n_data - half,), generator=gen)
    side = torch.randint(0, 2, (n_data - half,), generator=gen).to(dtype) * 2 - 1
    data[half + torch.arange(n_data - half), face] = side
    return interior, data


def heat_residual(net: nn.Module, tx: Tensor, *, autograd: bool = False) -> Tensor:
    space = range(1, tx.shape[1])
    if autograd:
        d = autograd_partials(net, tx, [(0,)] + [(i, i) for i in space])
        return d[(0,)] - sum(d[(i, i)] for i in space)
    lap = torchderiv.laplacian(net, tx, dims=space)
    u_t = torchderiv.partials(net, tx, [(0,)])[(0,)]
    return u_t - lap


def heat_loss(net: nn.Module, interior: Tensor, data: Tensor, *, autograd: bool = False) -> Tensor:
    r = heat_residual(net, interior, autograd=autograd)
    return (r**2).mean() + DATA_WEIGHT * ((net(data) - exact(data)) ** 2).mean()


def build(argv=None) -> Problem:
    p = parser(__doc__.split("\n\n")[0], steps=3000, lr=5e-3, points=256, width=64, depth=3, lr_final=0.05)
    p.add_argument("--dim", type=int, default=20, help="space dimension D")
    p.add_argument("--data-points", type=int, default=256, help="initial + boundary points per step")
    args = p.parse_args(argv)
    opts = setup(args)
    dtype, dev = opts["dtype"], opts["device"]
    net = mlp(1 + args.dim, args.width, args.depth, **opts)
    gen = torch.Generator().manual_seed(args.seed)
    test = sample(4096, 0, args.dim, torch.Generator().manual_seed(12345), dtype)[0].to(dev)
    return Problem(args, net, lambda: [t.to(dev) for t in sample(args.points, args.data_points, args.dim, gen, dtype)],
                   lambda *pts, autograd=False: heat_loss(net, *pts, autograd=autograd),
                   no_grad_eval(net, test, exact(test)),
                   f"Heat equation, D={args.dim}: MLP {1 + args.dim} -> {args.depth} x {args.width} -> 1 (tanh), "
                   f"{args.points} interior + {args.data_points} initial/boundary points per step")


def main(argv=None) -> Result:
    return run(build(argv))


if __name__ == "__main__":
    main()

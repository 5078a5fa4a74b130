"""Physics-informed training: the Poisson equation on the unit square.

    -Laplace(u) = f  on (0, 1)^2,   u = 0 on the boundary,   f = 2 pi^2 sin(pi x) sin(pi y),

whose solution is u = sin(pi x) sin(pi y). A tanh MLP is trained on the squared residual at random
collocation points (resampled every step) plus the squared boundary misfit. torchderiv computes the
Laplacian as a plain forward graph (collapsed Taylor mode), so a step needs one ordinary backward.

    python examples/poisson2d.py                 # torchderiv
    python examples/poisson2d.py --autograd      # the same training with torch.autograd.grad loops
    python examples/poisson2d.py --compile       # the loss compiled with torch.compile (checked against eager)

The last line reads ``mode=... steps=... time/step=...ms ... rel_l2=...`` (error on a 101 x 101 grid).
"""

from __future__ import annotations

import math
import time

import torch
from _common import Problem, Result, autograd_laplacian, mlp, no_grad_eval, parser, run, setup
from torch import Tensor, nn

import torchderiv

PI = math.pi
BC_WEIGHT = 100.0


def exact(xy: Tensor) -> Tensor:
    return torch.sin(PI * xy[:, :1]) * torch.sin(PI * xy[:, 1:2])


def source(xy: Tensor) -> Tensor:
    return 2 * PI**2 * exact(xy)


def sample_interior(n: int, gen: torch.Generator, dtype: torch.dtype) -> Tensor:
    return torch.rand(n, 2, generator=gen, dtype=dtype)


def sample_boundary(n: int, gen: torch.Generator, dtype: torch.dtype) -> Tensor:
    """``n`` points on the boundary of the unit square, ``n / 4`` on each side."""
    s = torch.rand(n, generator=gen, dtype=dtype)
    side = torch.arange(n) % 4
    fixed = (side % 2).to(dtype)  # sides 0, 2 at coordinate 0; sides 1, 3 at coordinate 1
    along_x = side < 2  # sides 0, 1: y fixed, x = s
    return torch.where(along_x[:, None], torch.stack([s, fixed], 1), torch.stack([fixed, s], 1))


def loss_from(lap: Tensor, x_in: Tensor, u_b: Tensor, x_b: Tensor) -> Tensor:
    """Mean squared residual of -Laplace(u) = f at ``x_in`` plus the weighted boundary misfit at ``x_b``."""
    residual = -lap - source(x_in)
    return (residual**2).mean() + BC_WEIGHT * ((u_b - exact(x_b)) ** 2).mean()


def poisson_loss(net: nn.Module, x_in: Tensor, x_b: Tensor, *, autograd: bool = False) -> Tensor:
    lap = autograd_laplacian(net, x_in) if autograd else torchderiv.laplacian(net, x_in)  # [B, 1]
    return loss_from(lap, x_in, net(x_b), x_b)


def test_grid(n: int = 101, dtype: torch.dtype = torch.float32) -> Tensor:
    g = torch.linspace(0, 1, n, dtype=dtype)
    return torch.cartesian_prod(g, g)


def compiled_loss(loss_fn, batch: tuple, params: list[Tensor]):
    """``torch.compile(loss_fn)``, checked against eager on ``batch`` (loss and parameter gradients).

    One eager call first: it builds and caches torchderiv's derivative graph, so that dynamo then traces
    through torchderiv's cached call path straight into the generated graph and compiles the whole loss
    (derivative graph, residual, boundary term) as ONE graph, forward and backward, without graph breaks.
    """
    eager = loss_fn(*batch)
    g_eager = torch.autograd.grad(eager, params)
    fn = torch.compile(loss_fn)
    t0 = time.perf_counter()
    loss = fn(*batch)
    g = torch.autograd.grad(loss, params)
    secs = time.perf_counter() - t0
    dloss = abs(loss.item() - eager.item()) / abs(eager.item())
    dgrad = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(g, g_eager))
    print(f"torch.compile: first call (compile, forward + backward) {secs:.1f}s; vs eager: "
          f"loss rel. diff {dloss:.1e}, grads max rel. diff {dgrad:.1e}", flush=True)
    return fn, dloss, dgrad


def build(argv=None) -> Problem:
    p = parser(__doc__.split("\n\n")[0], steps=3000, lr=3e-3, points=1024, width=64, depth=3)
    p.add_argument("--boundary-points", type=int, default=256, help="boundary points per step")
    p.add_argument("--compile", action="store_true",
                   help="compile the loss with torch.compile (checked against eager at the first step)")
    args = p.parse_args(argv)
    if args.compile and args.autograd:
        p.error("--compile applies to the torchderiv loss (torch.compile does not trace a double backward)")
    opts = setup(args)
    dtype, dev = opts["dtype"], opts["device"]
    net = mlp(2, args.width, args.depth, **opts)
    gen = torch.Generator().manual_seed(args.seed)

    def sample():
        return (sample_interior(args.points, gen, dtype).to(dev),
                sample_boundary(args.boundary_points, gen, dtype).to(dev))

    xt = test_grid(dtype=dtype).to(dev)
    return Problem(args, net, sample, lambda *pts, autograd=False: poisson_loss(net, *pts, autograd=autograd),
                   no_grad_eval(net, xt, exact(xt)),
                   f"Poisson 2D: MLP 2 -> {args.depth} x {args.width} -> 1 (tanh), {args.points} interior + "
                   f"{args.boundary_points} boundary points per step")


def main(argv=None) -> Result:
    prob = build(argv)
    loss_fn = None
    if prob.args.compile:
        loss_fn, *_ = compiled_loss(prob.loss_fn(), prob.sample(), list(prob.net.parameters()))
    return run(prob, loss_fn)


if __name__ == "__main__":
    main()

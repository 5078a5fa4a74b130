"""Multi-process physics-informed training with DistributedDataParallel: the Poisson problem of poisson2d.py.

    torchrun --nproc_per_node=2 examples/ddp_poisson.py [--steps N] [--points N] ...

Every process draws its own collocation points (``--points`` per process) and computes its Laplacian with
torchderiv; DDP all-reduces (averages) the gradients in the one ordinary backward. The backend is gloo on
CPU and NCCL when each process has a GPU (``LOCAL_RANK`` picks it).

The one rule: DDP synchronizes only what flows through a forward call of the DDP module, and expects
every parameter to get a gradient. So wrap what the loss needs, the torchderiv Laplacian at the interior
points AND the plain values at the boundary points (the output bias enters only those), in one module
and give that to DDP, as :class:`PoissonTerms` does:

    model = DDP(PoissonTerms(net))
    lap, u_b = model(x_in, x_b)            # torchderiv inside DDP's forward
    loss = loss_from(lap, x_in, u_b, x_b)
    loss.backward()                        # gradients averaged over the processes

Rank 0 prints progress and the final line (``mode=torchderiv-ddp... rel_l2=...``).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from _common import Result, mlp, no_grad_eval, parser, setup, train
from poisson2d import exact, loss_from, sample_boundary, sample_interior, test_grid
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

import torchderiv


class PoissonTerms(nn.Module):
    """``(x_in, x_b) -> (Laplace u at x_in, u at x_b)``: everything the loss needs from the network."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x_in: Tensor, x_b: Tensor) -> tuple[Tensor, Tensor]:
        return torchderiv.laplacian(self.net, x_in), self.net(x_b)


def init(rank: int, world_size: int, device: str | None = None) -> torch.device:
    """Join the process group (MASTER_ADDR / MASTER_PORT from the environment, as torchrun sets them).

    ``device=None`` takes one GPU per local process with NCCL when there are enough GPUs on this node,
    else the CPU with gloo; ``"cpu"`` forces gloo on the CPU (what the test suite does on any machine)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if device is None:
        device = "cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= local else "cpu"
    if device == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return dev


def main(argv=None) -> Result:
    p = parser(__doc__.split("\n\n")[0], steps=3000, lr=3e-3, points=512, width=64, depth=3)
    p.add_argument("--boundary-points", type=int, default=128, help="boundary points per step and process")
    args = p.parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    dev = init(rank, world)
    args.device = str(dev)
    try:
        opts = setup(args)  # the same seed everywhere: the same initial weights (DDP also broadcasts rank 0's)
        dtype = opts["dtype"]
        net = mlp(2, args.width, args.depth, **opts)
        model = DDP(PoissonTerms(net))
        gen = torch.Generator().manual_seed(args.seed + 1000 * rank)  # different points on every process

        def sample():
            return (sample_interior(args.points, gen, dtype).to(dev),
                    sample_boundary(args.boundary_points, gen, dtype).to(dev))

        def loss_fn(x_in, x_b):
            lap, u_b = model(x_in, x_b)
            return loss_from(lap, x_in, u_b, x_b)

        if rank == 0:
            print(f"Poisson 2D, DDP over {world} processes ({dist.get_backend()}): MLP 2 -> {args.depth} x "
                  f"{args.width} -> 1, {args.points} interior + {args.boundary_points} boundary points per step "
                  f"and process, {args.steps} steps, {torch.get_num_threads()} threads per process", flush=True)
        xt = test_grid(dtype=dtype).to(dev)
        return train(model, loss_fn, sample, no_grad_eval(net, xt, exact(xt)), args, log=rank == 0,
                     mode=f"torchderiv-ddp{world}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

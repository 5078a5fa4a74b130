"""What the three DeepXDE scripts share: options, the one line, timing and the final report.

Not an example by itself; ``burgers.py``, ``kovasznay.py`` and ``euler_beam.py`` import it (Python puts this
directory on ``sys.path`` when a script here runs).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import time

os.environ.setdefault("DDE_BACKEND", "pytorch")


def options(description: str, iterations: int) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--torchderiv", action="store_true",
                   help="serve dde.grad by torchderiv: torchderiv.deepxde.enable(), the one line")
    p.add_argument("--iterations", type=int, default=iterations, help="Adam iterations")
    p.add_argument("--float64", action="store_true", help="train in double precision")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def prepare(args: argparse.Namespace):
    """Import DeepXDE quietly, set precision, seed and threads; returns the ``deepxde`` module."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    with contextlib.redirect_stdout(io.StringIO()):  # DeepXDE announces its backend and settings
        import deepxde as dde

        if args.float64:
            dde.config.set_default_float("float64")
        dde.config.set_random_seed(args.seed)
    if args.torchderiv:
        import torchderiv

        torchderiv.deepxde.enable()  # <- the one line
    return dde


def train(model, args: argparse.Namespace, warmup: int = 20) -> float:
    """Adam for ``args.iterations`` steps; returns the mean wall time per step after the first ``warmup``
    steps (those trace and build graphs once; they are not what a long run costs). Includes DeepXDE's own
    loss evaluations for its report at the end of training."""
    quiet = contextlib.redirect_stdout(io.StringIO())
    with quiet:
        model.train(iterations=min(warmup, args.iterations), display_every=10**9)
    rest = args.iterations - min(warmup, args.iterations)
    t0 = time.perf_counter()
    with quiet:
        model.train(iterations=rest, display_every=max(rest, 1))
    return (time.perf_counter() - t0) / max(rest, 1)


def report(name: str, args: argparse.Namespace, per_step: float, error: float) -> None:
    mode = "DeepXDE + torchderiv.deepxde" if args.torchderiv else "DeepXDE dde.grad"
    print(f"{name} [{mode}, {'float64' if args.float64 else 'float32'}]: {args.iterations} Adam steps, "
          f"{per_step * 1e3:.2f} ms/step, relative L2 error {error:.3e}")

"""Step-time comparison of the three problems, torchderiv against the torch.autograd.grad loops, interleaved.

The examples time a whole training run per mode; on a shared or busy machine the load changes between two
runs. Here the modes take turns inside one process, step by step on the same network, optimizer and fresh
points, so the ratio is robust to load. Each problem runs at its example's default settings (network,
points); the step is the same as in training: the loss, one backward, a fused Adam step.

    python examples/compare.py                     # poisson2d, burgers, heat_highdim
    python examples/compare.py --compile           # also the torchderiv loss under torch.compile
    python examples/compare.py --problems heat_highdim --rounds 100

``--compile`` also tries to compile the autograd-loop loss: torch 2.13 compiles it with graph breaks at
every ``torch.autograd.grad`` or rejects it ("does not currently support double backward"), depending on
the problem; a failure is reported instead of a time.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import burgers
import heat_highdim
import poisson2d
import torch
from _common import Problem

PROBLEMS = {"poisson2d": poisson2d, "burgers": burgers, "heat_highdim": heat_highdim}


def compile_loss(prob: Problem, autograd: bool):
    """``torch.compile`` of the loss, after one eager call (which caches torchderiv's derivative graph);
    returns the compiled loss and the seconds its first call (compilation, forward and backward) took."""
    fn = prob.loss_fn(autograd)
    batch = prob.sample()
    fn(*batch).backward()
    compiled = torch.compile(fn)
    t0 = time.perf_counter()
    compiled(*batch).backward()
    return compiled, time.perf_counter() - t0


def compare(name: str, rounds: int, with_compile: bool, threads: int) -> dict:
    prob = PROBLEMS[name].build(["--threads", str(threads)])
    modes = {"torchderiv": prob.loss_fn(False), "autograd": prob.loss_fn(True)}
    notes = []
    if with_compile:
        torch._dynamo.reset()  # a clean slate: no guards or recompilation budget left from another problem
        fn, secs = compile_loss(prob, False)
        modes["torchderiv+compile"] = fn
        notes.append(f"torchderiv+compile: compiled in {secs:.1f}s")
        try:
            fn, secs = compile_loss(prob, True)
            modes["autograd+compile"] = fn
            notes.append(f"autograd+compile: compiled in {secs:.1f}s")
        except Exception as e:  # noqa: BLE001 - torch.compile refuses the double backward: report it
            notes.append(f"autograd+compile: fails: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
    opt = torch.optim.Adam(prob.net.parameters(), lr=prob.args.lr * prob.args.lr_final, fused=True)
    times: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(rounds + 3):  # 3 rounds of warm-up (the first builds torchderiv's graph)
        for mode, fn in modes.items():
            batch = prob.sample()
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            fn(*batch).backward()
            opt.step()
            if r >= 3:
                times[mode].append(time.perf_counter() - t0)
    ref = statistics.median(times["autograd"])
    print(prob.describe, flush=True)
    for mode, t in times.items():
        med = statistics.median(t)
        print(f"  {mode:20s} median {1e3 * med:8.2f} ms  min {1e3 * min(t):8.2f} ms  "
              f"speed-up vs autograd x{ref / med:.2f}", flush=True)
    for n in notes:
        print("  " + n, flush=True)
    return {m: statistics.median(t) for m, t in times.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    p.add_argument("--rounds", type=int, default=60, help="timed steps per mode")
    p.add_argument("--compile", action="store_true", help="also time the torchderiv loss under torch.compile")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: torch's default)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", module="torch._dynamo")
    print(f"{torch.get_num_threads() if not args.threads else args.threads} thread(s), {args.rounds} rounds")
    return {name: compare(name, args.rounds, args.compile, args.threads) for name in args.problems}


if __name__ == "__main__":
    main()

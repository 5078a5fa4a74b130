"""``torchderiv calibrate``: time every method over a designed sample of networks and requests, fit the
constants of the cost model (:mod:`torchderiv._costmodel`) and write them as ``calibration.json``.

The design: tanh MLPs with widths 16-1024, depths 2-8, input dims 1-100, output dims 1-400, batches
1-10^5, requests of orders 1-4 (a Jacobian; a Laplacian; first and pure second partials, as a PDE residual
reads them; pure partials up to order 3 or 4 along two coordinates), each with and without a backward to
the parameters afterwards. Points are drawn by a fixed-seed Latin-hypercube-like scheme over those
factors; a point whose result or forward pass would be too large is skipped, and each timing is capped.
Rerun it on a new machine (a GPU) to re-fit: ``torchderiv calibrate --out path`` then ship the file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import signal
import statistics
import time
from pathlib import Path

import torch

import torchderiv

from .. import _costmodel
from .._cache import captured
from .._dispatch import candidates, validate
from .._requests import Request, prepare

WIDTHS = [16, 32, 64, 128, 256, 512, 1024]
DEPTHS = [2, 3, 4, 6, 8]
DIN = [1, 2, 3, 5, 10, 30, 100]
DOUT = [1, 2, 3, 10, 50, 150, 400]
BATCH = [1, 10, 100, 1000, 10_000, 100_000]
REQUESTS = ["jacobian", "laplacian", "pde2", "pure3", "pure4"]
# the "pinn" stratum: the small networks of physics-informed training (a few inputs and outputs, widths
# 16-64, 10^3-10^4 points, first and second partials, a backward to the parameters), where the methods are
# within tens of percent of each other and the wide design above has few points. "pde1" (every first partial
# and ONE pure second, the shape of most time-dependent 1-D residuals) was added after seed 2 was measured
# (docs/calibration/rows-pinn-seed2.jsonl holds that seed's points as drawn then)
STRATA = {
    "wide": {"width": WIDTHS, "depth": DEPTHS, "din": DIN, "dout": DOUT, "batch": BATCH, "request": REQUESTS,
             "grad": [False, True]},
    "pinn": {"width": [16, 24, 32, 48, 64], "depth": [3, 4, 5, 6], "din": [1, 2, 3, 4], "dout": [1, 2, 3, 4],
             "batch": [500, 1000, 2000, 4000, 8000, 16000],
             "request": ["pde2", "pde1", "pde1", "laplacian", "pure3"],
             "grad": [True, True, True, False]},
}


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("calibrate", help="fit the cost model of method='auto' on this machine",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", type=int, default=300, help="design points (default 300)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stratum", choices=sorted(STRATA), default="wide",
                   help="the design's levels: 'wide' (the whole range, default) or 'pinn' (small "
                        "physics-informed networks)")
    p.add_argument("--cap", type=float, default=2.0, help="seconds: a method slower than this is timed once")
    p.add_argument("--budget", type=float, default=2e10,
                   help="skip points whose plain forward exceeds this many multiply-adds (default 2e10)")
    p.add_argument("--point-limit", type=float, default=30.0,
                   help="seconds: a design point that takes longer in all (building included) is skipped")
    p.add_argument("--out", default=str(_costmodel.TABLE_PATH), help="where to write the table")
    p.add_argument("--rows", metavar="PATH", help="also write the raw timings (JSON lines) here")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--refit", nargs="+", metavar="ROWS",
                   help="measure nothing: fit the table from raw timings written by earlier runs (--rows)")
    return p


def design(points: int, seed: int, stratum: str = "wide") -> list[dict]:
    """Stratified draws: each factor cycles through its levels in a shuffled order (Latin-hypercube-like)."""
    rng = random.Random(seed)
    cols = {}
    for name, levels in STRATA[stratum].items():
        col = [levels[i % len(levels)] for i in range(points)]
        rng.shuffle(col)
        cols[name] = col
    return [{k: cols[k][i] for k in cols} for i in range(points)]


def _request(kind: str, din: int):
    """(operator, options) of a design request."""
    if kind == "jacobian":
        return "jacobian", {}
    if kind == "laplacian":
        return "laplacian", {}
    d = min(din, 2)
    if kind == "pde1":  # all first partials and one pure second: u_t + u u_x - nu u_xx, Allen-Cahn, ...
        return "partials", {"spec": [()] + [(i,) for i in range(din)] + [(din - 1, din - 1)]}
    if kind == "pde2":
        spec = [()] + [(i,) for i in range(din)] + [(i, i) for i in range(min(din, 3))]
        return "partials", {"spec": spec}
    k = 3 if kind == "pure3" else 4
    spec = [tuple([i] * j) for i in range(d) for j in range(1, k + 1)]
    return "partials", {"spec": spec}


def _indices(point: dict) -> list[tuple[int, ...]]:
    """The multi-indices (coordinates) a design point's request asks for."""
    din = point["din"]
    op, options = _request(point["request"], din)
    if op == "jacobian":
        return [(i,) for i in range(din)]
    if op == "laplacian":
        return [(i, i) for i in range(din)]
    return [tuple(a) for a in options["spec"]]


def _net(width, depth, din, dout, device):
    layers, w = [], din
    for _ in range(depth - 1):
        layers += [torch.nn.Linear(w, width), torch.nn.Tanh()]
        w = width
    layers.append(torch.nn.Linear(w, dout))
    return torch.nn.Sequential(*layers).to(device)


def _time(fns: list, cap: float) -> list[float]:
    """Median seconds of each of ``fns``, timed side by side: one call of each per round, so that a change of
    the machine's speed during a point (a shared VM) moves every method alike. The first call of each builds
    and caches its graph and is not timed; a method slower than ``cap`` is timed once."""
    first = []
    for fn in fns:
        fn()
        t0 = time.perf_counter()
        fn()
        first.append(time.perf_counter() - t0)
    live = [i for i, t in enumerate(first) if t <= cap]
    reps = max(3, min(9, int(cap / max(sum(first[i] for i in live), 1e-6)))) if live else 0
    ts: list[list[float]] = [[t] for t in first]
    for _ in range(reps):
        for i in live:
            t0 = time.perf_counter()
            fns[i]()
            ts[i].append(time.perf_counter() - t0)
    return [statistics.median(t[1:]) if len(t) > 1 else t[0] for t in ts]


def measure(point: dict, cap: float, budget: float, device: str) -> list[dict]:
    torch.manual_seed(0)
    width, depth, din, dout, batch = (point[k] for k in ("width", "depth", "din", "dout", "batch"))
    op, options = _request(point["request"], din)
    fwd_macs = batch * (din * width + (depth - 2) * width * width + width * dout)
    net = _net(width, depth, din, dout, device)
    x = torch.rand(batch, din, device=device)
    req = Request(op, True, "auto", None, tuple(options.items()))
    validate(req, net, x)
    work = prepare(req, net, x)
    cap_ = captured(net, x, True, op)
    units = candidates(req, work, cap_)
    result_values = batch * dout * (len(work.items) + len(work.combos)) * (din if op == "jacobian" else 1)
    if result_values * 4 > 2**30:
        return []
    cost = _costmodel.graph_cost(cap_.gm, batch)
    grad = point["grad"]
    fn_op = getattr(torchderiv, op)
    kept = {m: u for m, u in units.items() if fwd_macs * u <= budget}

    def call_of(m):
        def call():
            if grad:
                r = fn_op(net, x, method=m, **options)
                loss = sum(v.square().mean() for v in (r.values() if isinstance(r, dict) else [r]))
                loss.backward()
            else:
                with torch.no_grad():
                    fn_op(net, x, method=m, **options)
            if device == "cuda":
                torch.cuda.synchronize()
        return call

    seconds = _time([call_of(m) for m in kept], cap)
    rows = []
    for (m, u), secs in zip(kept.items(), seconds):
        rows.append({"method": m, "grad": grad, "units": u, "ops": cost.ops, "flops": cost.flops,
                     "elems": cost.elems, "batch": batch, "seconds": secs, "point": point, "op": op})
    return rows


def evaluate(rows: list[dict], constants: dict, factors: dict | None = None) -> dict:
    """How often the fitted model (with decision margins ``factors``) picks the fastest measured method, and its
    worst loss (time / fastest)."""
    by_point: dict = {}
    for r in rows:
        by_point.setdefault(json.dumps(r["point"], sort_keys=True), []).append(r)
    hits, n, worst, losses = 0, 0, 1.0, []
    for group in by_point.values():
        secs: dict = {}  # a point measured in several runs: each method's geometric-mean time
        for r in group:
            secs.setdefault(r["method"], []).append(math.log(r["seconds"]))
        if len(secs) < 2:
            continue
        secs = {m: math.exp(statistics.fmean(v)) for m, v in secs.items()}
        first = {r["method"]: r for r in reversed(group)}
        cost = _costmodel.GraphCost(group[0]["ops"], group[0]["flops"], group[0]["elems"])
        pick = _costmodel.cheapest(
            {m: _costmodel.predict(m, r["units"], cost, r["batch"], r["grad"], constants) for m, r in first.items()},
            factors or {})
        best = min(secs.values())
        n += 1
        hits += secs[pick] == best
        losses.append(secs[pick] / best)
        worst = max(worst, secs[pick] / best)
    gm = math.exp(statistics.fmean(math.log(v) for v in losses)) if losses else 1.0
    return {"points_compared": n, "picked_fastest": hits, "worst_loss": worst, "geomean_loss": gm}


def run(args) -> int:
    if args.refit:
        rows = [json.loads(line) for path in args.refit for line in Path(path).read_text().splitlines() if line]
        for r in rows:  # units by the current formula (they are a pure function of the design point)
            if r["method"] == "autograd":
                r["units"] = _costmodel.autograd_units(_indices(r["point"]), r["point"]["dout"])
        return _write(args, rows, points=len({json.dumps(r["point"], sort_keys=True) for r in rows}), seconds=0.0)
    points = design(args.points, args.seed, args.stratum)
    rows: list[dict] = []
    t0 = time.perf_counter()
    for i, p in enumerate(points):
        try:
            with _time_limit(args.point_limit):
                got = measure(p, args.cap, args.budget, args.device)
        except (RuntimeError, ValueError, NotImplementedError, TimeoutError) as e:  # report and go on
            print(f"[{i + 1}/{len(points)}] {p}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:80]})")
            continue
        rows.extend(got)
        desc = ", ".join(f"{r['method']} {r['seconds'] * 1e3:.2f} ms" for r in got) or "skipped (too large)"
        print(f"[{i + 1}/{len(points)}] {p}: {desc}", flush=True)
    if args.rows:
        Path(args.rows).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return _write(args, rows, points=len(points), seconds=time.perf_counter() - t0)


def fit_margins(rows: list[dict], constants: dict) -> dict:
    """The decision margin of the autograd method: the factor (1 to 1.5, steps of 0.05) on its predicted time
    that minimizes the geometric-mean loss of the choice over the calibration points; where several do, the
    middle one. Nested autograd and Taylor mode are often within tens of percent on small networks, where the
    model's error is of that size too; the margin places the boundary where the measured choices are best."""
    grid = [round(1 + 0.05 * i, 2) for i in range(11)]
    loss = {mu: round(evaluate(rows, constants, {"autograd": mu})["geomean_loss"], 9) for mu in grid}
    best = [mu for mu in grid if loss[mu] == min(loss.values())]
    return {"autograd": best[len(best) // 2]}


def _write(args, rows: list[dict], points: int, seconds: float) -> int:
    constants = _costmodel.fit(rows)
    factors = fit_margins(rows, constants)
    quality = evaluate(rows, constants, factors)
    out = {"machine": _machine(args.device), "points": points, "timings": len(rows),
           "seconds": round(seconds, 1), "quality": quality, "constants": constants, "margins": factors}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({"quality": quality, "constants": constants, "margins": factors}, indent=1))
    print(f"wrote {args.out}")
    return 0


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Raise TimeoutError in the main thread after ``seconds`` (SIGALRM; no limit where it is missing)."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"over the {seconds:g} s point limit")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _machine(device: str) -> str:
    import platform

    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    return f"{name}, torch {torch.__version__}, {torch.get_num_threads()} threads"

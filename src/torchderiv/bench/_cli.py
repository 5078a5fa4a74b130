"""``torchderiv bench``: argument parsing and the run loop."""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from . import _calibrate, _scenarios
from ._runner import ScenarioResult, run_scenario
from ._timing import TimingPolicy

EPILOG = """\
scenarios (default: all of them):
{scenarios}

--op for --model: jacobian, jacobian_diagonal, hessian, laplacian, divergence, biharmonic or
partials:SPEC, where SPEC lists multi-indices separated by commas, one digit per input coordinate
differentiated once: "0,00,011" means d/dx0, d2/dx0^2 and d3/dx0 dx1^2 (coordinates 0-9 of the
flattened per-sample input; an empty item is the value itself).

Every method runs in one process on the same inputs; times are medians after warm-up (spread: half the
interquartile range). FPE = time / plain forward time of the same f on the same batch in the same run.
speed-up = baseline time / time. Each method is checked against a float64 reference; the exit code is 0
only if every method agreed, 1 otherwise, 2 for usage errors.
"""


class UsageError(Exception):
    pass


def _scenario_list() -> str:
    return "\n".join(f"  {name:15s} {sc.description}" for name, sc in _scenarios.SCENARIOS.items()
                     if not sc.hidden)


def resolve_device(choice: str) -> str:
    """``auto`` is ``cuda`` when torch sees a GPU, else ``cpu``; explicit choices are kept."""
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def add_bench_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "bench", help="benchmark derivative methods side by side",
        description="Benchmark torchderiv against torch.func, autograd loops and the seeds' own code.",
        epilog=EPILOG.format(scenarios=_scenario_list()), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenarios", nargs="*", metavar="SCENARIO", help="scenario names (see below); default: all")
    p.add_argument("--quick", action="store_true",
                   help="fewer repeats and shorter time budgets (same problem sizes); memory skipped unless --memory")
    p.add_argument("--repeat", type=int, default=None, metavar="N",
                   help="timed samples per method (default 15, 5 with --quick)")
    p.add_argument("--json", metavar="PATH", help="write machine-readable results here")
    p.add_argument("--plot", metavar="PATH", help="write a PNG chart of the speed-ups here")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to run: auto (default) takes the GPU when torch sees one, else the CPU")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                   help="measure peak memory per method (a subprocess per method on CPU); default: on "
                        "without --quick")
    p.add_argument("--model", metavar="MODULE:FACTORY",
                   help="benchmark your own network: FACTORY() returns (module, example_input)")
    p.add_argument("--op", metavar="OP", help="with --model: the derivative to compute (see below)")
    p.add_argument("--batch", type=int, metavar="B", help="with --model: repeat the example rows to B rows")
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    return p


def build_parser() -> argparse.ArgumentParser:
    import torchderiv

    parser = argparse.ArgumentParser(prog="torchderiv", description="torchderiv command line")
    parser.add_argument("--version", action="version", version=f"torchderiv {torchderiv.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_bench_parser(sub)
    _calibrate.add_parser(sub)
    return parser


def _select(args) -> list[_scenarios.Scenario]:
    reg = _scenarios.SCENARIOS
    chosen: list[_scenarios.Scenario] = []
    names = list(args.scenarios)
    if not names and not args.model:
        names = [n for n, s in reg.items() if not s.hidden]
    if names == ["all"]:
        names = [n for n, s in reg.items() if not s.hidden]
    unknown = [n for n in names if n not in reg]
    if unknown:
        known = ", ".join(n for n, s in reg.items() if not s.hidden)
        raise UsageError(f"unknown scenario(s): {', '.join(unknown)}; known scenarios: {known}")
    chosen = [reg[n] for n in names]
    if args.batch is not None and args.batch < 1:
        raise UsageError("--batch must be a positive integer")
    if args.model:
        if not args.op:
            raise UsageError("--model needs --op (e.g. --op jacobian or --op partials:0,00)")
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            chosen.append(_scenarios.model_scenario(args.model, args.op, args.batch))
        except _scenarios.ModelSpecError as e:
            raise UsageError(str(e)) from e
    else:
        if args.op:
            raise UsageError("--op is only used with --model MODULE:FACTORY")
        if args.batch is not None:
            raise UsageError("--batch is only used with --model MODULE:FACTORY")
    return chosen


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _console():
    from rich.console import Console

    c = Console()
    if not c.is_terminal:
        c = Console(width=150)
    return c


def run_bench(args, argv: list[str] | None) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from . import _report

    if args.list:
        print(_scenario_list())
        return 0
    if args.repeat is not None and args.repeat < 1:
        raise UsageError("--repeat must be a positive integer")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available in this torch build / machine")
    chosen = _select(args)
    device = torch.device(resolve_device(args.device))
    memory = (not args.quick) if args.memory is None else args.memory
    if args.quick:
        policy = TimingPolicy(repeat=args.repeat or 5, warmup=1, min_sample_s=0.005, budget_s=1.5, min_repeat=3)
    else:
        policy = TimingPolicy(repeat=args.repeat or 15, warmup=2, min_sample_s=0.02, budget_s=10.0, min_repeat=5)
    if args.repeat is not None:
        policy.min_repeat = min(policy.min_repeat, args.repeat)

    console = _console()
    load_start = _load()
    t_start = time.perf_counter()
    results: list[ScenarioResult] = []
    err_console = type(console)(stderr=True)
    with Progress(TextColumn("[bold]{task.fields[scn]}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.description}"), TimeElapsedColumn(), console=err_console,
                  transient=True) as progress:
        def steps(sc):  # reference, warm-ups (forward + methods), timing rounds, memory probes
            return 2 + len(sc.methods) + policy.repeat + (len(sc.methods) if memory else 0)

        task = progress.add_task("", total=sum(steps(sc) for sc in chosen), scn="")
        done = 0
        for sc in chosen:
            progress.update(task, scn=sc.name, completed=done)

            def on_step(msg):
                if msg != "setup":
                    progress.advance(task)
                progress.update(task, description=msg)

            def probe_spec(method, _sc=sc):
                if _sc.name.startswith("model:"):
                    return {"model": args.model, "op": args.op, "batch": args.batch, "method": method}
                return {"scenario": _sc.name, "method": method}

            results.append(run_scenario(sc, device, policy, args.quick, memory, probe_spec, on_step))
            done += steps(sc)
    total_s = time.perf_counter() - t_start

    for r in results:
        console.print(_report.scenario_table(r))
        for line in _report.scenario_footer(r, args.quick):
            console.print("  " + line, highlight=False)
        if r.name.startswith("model:"):
            rec = _report.recommendation(r)
            if rec:
                console.print(f"  [bold]{rec}[/bold]", highlight=False)
        console.print()

    meta = _report.metadata(device, argv)
    meta["load_average_at_start"] = load_start
    settings = {"quick": args.quick, "repeat": policy.repeat, "warmup": policy.warmup, "memory": memory,
                "device": str(device), "scenarios": [sc.name for sc in chosen], "total_seconds": total_s}
    if args.json:
        _report.write_json(args.json, results, meta, settings)
    if args.plot:
        _report.write_plot(args.plot, results, meta)

    bad = [(r.name, m.name, m.status) for r in results for m in r.methods if not m.ok]
    bad += [(r.name, "(scenario)", "ERROR") for r in results if r.error]
    targets = [(r.name, t) for r in results for t in r.targets]
    if targets:
        met = sum(1 for _, t in targets if t.met)
        console.print(f"targets met: {met}/{len(targets)}", highlight=False)
    console.print(f"total wall time: {total_s:.1f} s ({torch.get_num_threads()} torch threads, {device})",
                  highlight=False)
    if args.json:
        console.print(f"wrote {args.json}", highlight=False)
    if args.plot:
        console.print(f"wrote {args.plot}", highlight=False)
    ncpu = os.cpu_count() or 1
    if load_start is not None and load_start > 0.5 * ncpu:
        console.print(f"[yellow]warning: the machine was busy when the run started (1-minute load average "
                      f"{load_start:.1f} on {ncpu} CPUs): timings are less reliable; rerun on an idle machine"
                      f"[/yellow]", highlight=False)
    if bad:
        console.print(f"[bold red]{len(bad)} method(s) failed or disagreed with the reference:[/bold red] "
                      + "; ".join(f"{s}/{m}: {st}" for s, m, st in bad), highlight=False)
        return 1
    console.print("[green]every method agreed with the reference[/green]")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, argparse errors (code 2)
        return int(e.code or 0)
    if args.command == "calibrate":
        return _calibrate.run(args)
    if args.command != "bench":
        parser.print_help()
        return 2
    try:
        return run_bench(args, argv if argv is not None else sys.argv[1:])
    except UsageError as e:
        print(f"torchderiv bench: error: {e}", file=sys.stderr)
        return 2

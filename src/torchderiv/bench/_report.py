"""Output of a benchmark run: rich tables, the JSON document, the PNG chart."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import sys
import textwrap
from pathlib import Path

import torch

from ._runner import MethodResult, ScenarioResult


def fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def fmt_mem(b: int | None) -> str:
    if b is None:
        return "-"
    if b < 2**20:
        return f"{b / 1024:.0f} KiB"
    return f"{b / 2**20:.1f} MiB"


def _fmt_x(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}x" if v < 100 else f"{v:,.0f}x"


def _fmt_fpe(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if v < 1000 else f"{v:,.0f}"


def _spread(m: MethodResult) -> str:
    t = m.timing
    if t is None:
        return "-"
    if t.timed_once:
        return "once"
    return f"±{100 * t.iqr_rel / 2:.0f}% IQR" if len(t.samples) > 1 else "-"


def scenario_table(r: ScenarioResult):
    from rich import box
    from rich.table import Table
    from rich.text import Text

    title = f"[bold]{r.name}[/bold]: {r.description}"
    t = Table(title=title, box=box.SIMPLE_HEAVY, title_justify="left", show_lines=False)
    t.add_column("method")
    t.add_column("median", justify="right")
    t.add_column("spread", justify="right")
    t.add_column("FPE", justify="right")
    t.add_column("speed-up", justify="right")
    t.add_column("peak mem", justify="right")
    t.add_column("max err", justify="right")
    rms = any(m.stochastic for m in r.methods)
    if rms:
        t.add_column("rel RMS err", justify="right")
    t.add_column("status")
    if r.forward is not None:
        t.add_row(Text("plain forward f(x)", style="dim"), fmt_time(r.forward.median),
                  f"±{100 * r.forward.iqr_rel / 2:.0f}% IQR", "1", "", "", "", *([""] if rms else []), "",
                  style="dim")
    for m in r.methods:
        name = m.name + (" (baseline)" if m.is_baseline else "") + (f" {m.flags()}" if m.flags() else "")
        style = "bold cyan" if m.kind == "torchderiv" else None
        if m.status == "ok":
            status = Text("ok", style="green")
        else:
            status = Text(m.status, style="bold red")
        err = "-" if m.max_abs_err is None else f"{m.max_abs_err:.1e}"
        extra = [("-" if m.rel_rms_err is None else f"{m.rel_rms_err:.2e}")] if rms else []
        t.add_row(Text(name, style=style or ""), fmt_time(m.timing.median if m.timing else None), _spread(m),
                  _fmt_fpe(m.fpe), _fmt_x(m.speedup), fmt_mem(m.peak_bytes), err, *extra, status)
    return t


def scenario_footer(r: ScenarioResult, quick: bool = False) -> list[str]:
    lines = []
    if r.error:
        lines.append(f"[bold red]ERROR[/bold red] {r.error}")
    lines.append(f"[dim]batch {r.batch}, {r.n_in} input coordinate(s){', torch.no_grad' if r.no_grad else ''}; "
                 f"reference: {r.reference}; agreement: max|err| <= {r.rtol:g} max|ref|[/dim]")
    flags = {f for m in r.methods for f in m.flags()}
    if "†" in flags:
        lines.append("[dim]† slow: timed once, without warm-up" + (" (--quick)" if quick else "") + "[/dim]")
    for m in r.methods:
        if m.sub_batch is not None:
            lines.append(f"[dim]‡ {m.name}: timed on B={m.sub_batch} (scaled from B={m.sub_batch} to "
                         f"B={m.batch} linearly)[/dim]")
    for m in r.methods:
        if m.status != "ok":
            lines.append(f"[red]{m.status}[/red] {m.name}: {m.error}")
    for tg in r.targets:
        mark = {True: "[green]met[/green]", False: "[red]missed[/red]", None: "[yellow]n/a[/yellow]"}[tg.met]
        lines.append(f"target: {tg.description}: {tg.value} -> {mark}")
    for n in r.notes:
        lines.append(f"[dim]note: {n}[/dim]")
    return lines


def recommendation(r: ScenarioResult) -> str | None:
    ok = [m for m in r.methods if m.ok and m.timing is not None and not m.stochastic]
    if not ok:
        return None
    best = min(ok, key=lambda m: m.timing.median)
    base = r.method(r.baseline)
    vs = ""
    if base is not None and base is not best and base.timing is not None:
        vs = f", {base.timing.median / best.timing.median:.3g}x faster than {base.name}"
    return (f"Recommendation: {best.name} ({fmt_time(best.timing.median)} per call, {best.fpe:.3g} FPE{vs}; "
            f"agrees with the reference to {best.max_rel_err:.1e} relative)")


# ----------------------------------------------------------------------------- metadata and JSON


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def metadata(device: torch.device, argv: list[str] | None = None) -> dict:
    import torchderiv

    gpu = None
    if device.type == "cuda" and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(device)
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "torchderiv_version": torchderiv.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu_name": gpu,
        "load_average": list(load) if load else None,
        "argv": argv,
    }


def _finite(obj):
    """Strict JSON: non-finite floats become null (the status and error fields say why)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: str, results: list[ScenarioResult], meta: dict, settings: dict) -> None:
    doc = {
        "metadata": meta,
        "settings": settings,
        "all_agreed": all(r.all_ok for r in results),
        "scenarios": [r.to_json() for r in results],
    }
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(_finite(doc), indent=2, allow_nan=False) + "\n")


# ----------------------------------------------------------------------------- chart


def _bar_label(m: MethodResult) -> str:
    # no-break spaces keep the suffixes on the line of the name's last word
    name = m.name + ("\u00a0(baseline)" if m.is_baseline else "") + ("\u00a0" + m.flags() if m.flags() else "")
    return textwrap.fill(name, 38, break_long_words=False, break_on_hyphens=False)


def _value_label(m: MethodResult, v: float) -> str:
    if not m.ok:
        return m.status
    txt = f"{v:.3g}x" if v < 1000 else f"{v:,.0f}x"
    if m.fpe is not None:
        txt += f"  ({m.fpe:.3g} FPE)" if m.fpe < 1000 else f"  ({m.fpe:,.0f} FPE)"
    return txt


def _tick(x: float, _pos=None) -> str:
    if x >= 1e4:
        return f"$10^{{{round(math.log10(x))}}}$x"
    return f"{x:,.0f}x" if x >= 1 else f"{x:g}x"


def write_plot(path: str, results: list[ScenarioResult], meta: dict) -> None:
    """Speed-up over each scenario's baseline, one panel per scenario: horizontal bars from 1x (right:
    faster, left: slower) on a log axis, with the FPE next to each bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    rs = [r for r in results if r.methods] or results
    ncols = 2 if len(rs) > 1 else 1
    nrows = (len(rs) + ncols - 1) // ncols
    heights = []
    for i in range(nrows):
        row = rs[i * ncols : (i + 1) * ncols]
        lines = max(sum(_bar_label(m).count("\n") + 1 for m in r.methods) for r in row)
        heights.append(max(lines, 2) * 0.32 + 1.1)
    fig, axes = plt.subplots(nrows, ncols, figsize=(8.0 * ncols, sum(heights) + 0.9),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax in axes.flat[len(rs):]:
        ax.set_visible(False)
    for ax, r in zip(axes.flat, rs):
        ms = list(reversed(r.methods))
        vals = [m.speedup if (m.speedup and m.ok) else None for m in ms]
        pos = [v for v in vals if v]
        lo, hi = min(pos + [1.0]) / 2, max(pos + [1.0]) * 2
        span = math.log10(hi / lo)
        hi *= 10 ** (0.45 * span + 0.3)  # room for the value labels on the right
        ys = list(range(len(ms)))
        for y, m, v in zip(ys, ms, vals):
            if not m.ok:
                color = "#d62728"
            elif m.is_baseline:
                color = "#7f7f7f"
            elif m.kind == "torchderiv":
                color = "#1f77b4"
            else:
                color = "#ff9f40"
            if v is None:  # failed: a red marker at 1x, labelled
                ax.plot([1.0], [y], marker="x", color=color, ms=9, mew=2)
            elif m.is_baseline or v == 1.0:
                ax.plot([1.0], [y], marker="D", color=color, ms=7)
            else:
                ax.barh(y, v - 1.0, left=1.0, color=color, height=0.68)
            ax.text(max(v or 1.0, 1.0) * 1.15, y, _value_label(m, v or 1.0), va="center", fontsize=8,
                    color="#d62728" if not m.ok else "black")
        ax.set_xscale("log")
        ax.set_xlim(lo, hi)
        ax.set_ylim(-0.6, len(ms) - 0.4)
        ax.axvline(1.0, color="black", lw=0.8)
        ax.xaxis.set_major_locator(LogLocator(base=10, numticks=7))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.xaxis.set_major_formatter(FuncFormatter(_tick))
        ax.set_yticks(ys)
        ax.set_yticklabels([_bar_label(m) for m in ms], fontsize=8)
        ax.set_title(r.name, fontsize=10, loc="left", fontweight="bold")
        ax.set_title(textwrap.shorten(r.description, 75, placeholder="…"), fontsize=7.5, loc="right", color="#444")
        ax.set_xlabel("speed-up over the baseline (log scale; left of 1x = slower)", fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="x", which="major", alpha=0.3)
    dev = meta.get("gpu_name") or meta.get("cpu_model", "")
    fig.suptitle(f"torchderiv bench, median times: speed-up per scenario  [{dev}, torch {meta.get('torch_version')}, "
                 f"{meta.get('torch_num_threads')} threads, {meta.get('date', '')}]\n"
                 f"blue: torchderiv   orange: other methods   grey: baseline (the seed's own method)   red: failed   "
                 f"† timed once   ‡ timed on a sub-batch, scaled", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=110)
    plt.close(fig)

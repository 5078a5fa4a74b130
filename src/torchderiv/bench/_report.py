"""Output of a benchmark run: rich tables, the JSON document, the PNG chart."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import sys
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
    t.add_column("status")
    if r.forward is not None:
        t.add_row(Text("plain forward f(x)", style="dim"), fmt_time(r.forward.median),
                  f"±{100 * r.forward.iqr_rel / 2:.0f}% IQR", "1", "", "", "", "", style="dim")
    for m in r.methods:
        name = m.name + (" (baseline)" if m.is_baseline else "") + (f" {m.flags()}" if m.flags() else "")
        style = "bold cyan" if m.kind == "torchderiv" else None
        if m.status == "ok":
            status = Text("ok", style="green")
        else:
            status = Text(m.status, style="bold red")
        err = "-" if m.max_abs_err is None else f"{m.max_abs_err:.1e}"
        t.add_row(Text(name, style=style or ""), fmt_time(m.timing.median if m.timing else None), _spread(m),
                  _fmt_fpe(m.fpe), _fmt_x(m.speedup), fmt_mem(m.peak_bytes), err, status)
    return t


def scenario_footer(r: ScenarioResult) -> list[str]:
    lines = []
    if r.error:
        lines.append(f"[bold red]ERROR[/bold red] {r.error}")
    lines.append(f"[dim]batch {r.batch}, {r.n_in} input coordinate(s){', torch.no_grad' if r.no_grad else ''}; "
                 f"reference: {r.reference}; agreement: max|err| <= {r.rtol:g} max|ref|[/dim]")
    flags = {f for m in r.methods for f in m.flags()}
    if "†" in flags:
        lines.append("[dim]† slow: timed once, without warm-up[/dim]")
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
    ok = [m for m in r.methods if m.ok and m.timing is not None]
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


def write_plot(path: str, results: list[ScenarioResult], meta: dict) -> None:
    """Horizontal bars of speed-up over each scenario's baseline (log scale), one panel per scenario."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = [r for r in results if r.methods]
    if not rs:
        rs = results
    ncols = 2 if len(rs) > 1 else 1
    nrows = (len(rs) + ncols - 1) // ncols
    heights = []
    for i in range(nrows):
        row = rs[i * ncols : (i + 1) * ncols]
        heights.append(max(max(len(r.methods), 1) for r in row) * 0.42 + 1.0)
    fig, axes = plt.subplots(nrows, ncols, figsize=(7.5 * ncols, sum(heights) + 1.0),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax in axes.flat[len(rs):]:
        ax.set_visible(False)
    for ax, r in zip(axes.flat, rs):
        ms = list(reversed(r.methods))
        vals, colors, labels = [], [], []
        for m in ms:
            v = m.speedup if (m.speedup and m.ok) else None
            vals.append(v if v else 0.0)
            if not m.ok:
                colors.append("#d62728")
            elif m.is_baseline:
                colors.append("#7f7f7f")
            elif m.kind == "torchderiv":
                colors.append("#1f77b4")
            else:
                colors.append("#ff9f40")
            label = m.name if len(m.name) <= 44 else m.name[:42] + "…"
            labels.append(label + (" (baseline)" if m.is_baseline else "") + (" " + m.flags() if m.flags() else ""))
        pos = [v for v in vals if v > 0]
        lo = min(pos + [1.0]) / 3
        hi = max(pos + [1.0]) * 6
        ys = range(len(ms))
        ax.barh(ys, [v if v > 0 else lo for v in vals], color=colors, left=0, height=0.7)
        ax.set_xscale("log")
        ax.set_xlim(lo, hi)
        ax.axvline(1.0, color="black", lw=0.8, ls="--")
        ax.set_yticks(list(ys))
        ax.set_yticklabels(labels, fontsize=8)
        for y, m, v in zip(ys, ms, vals):
            txt = f"{v:.3g}x" if v >= 0.01 and v < 100 else (f"{v:,.0f}x" if v >= 100 else f"{v:.1e}x")
            if not m.ok:
                txt = m.status
            elif m.fpe is not None:
                txt += f"  ({m.fpe:.3g} FPE)" if m.fpe < 1000 else f"  ({m.fpe:,.0f} FPE)"
            ax.text(max(v, lo) * 1.08, y, txt, va="center", fontsize=7.5)
        ax.set_title(f"{r.name}  (B={r.batch})", fontsize=10, loc="left", fontweight="bold")
        ax.set_xlabel("speed-up over the baseline (log scale)", fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="x", which="major", alpha=0.3)
    dev = meta.get("gpu_name") or meta.get("cpu_model", "")
    fig.suptitle(f"torchderiv bench: speed-up per scenario, medians  [{dev}, torch {meta.get('torch_version')}, "
                 f"{meta.get('torch_num_threads')} threads]   blue: torchderiv, orange: peers, grey: baseline, "
                 f"red: failed", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=110)
    plt.close(fig)

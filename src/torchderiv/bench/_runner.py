"""Run one scenario: reference, plain forward, every method side by side in one process."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ._methods import MethodUnavailable, Setup
from ._scenarios import Method, Scenario
from ._timing import Candidate, Timing, TimingPolicy, cuda_peak, measure_interleaved, memprobe_env


@dataclass
class MethodResult:
    name: str
    kind: str
    is_baseline: bool
    status: str = "ok"  # ok | FAIL (disagrees with the reference) | ERROR (raised)
    timing: Timing | None = None
    fpe: float | None = None
    speedup: float | None = None
    peak_bytes: int | None = None
    memory_how: str | None = None
    max_abs_err: float | None = None
    max_rel_err: float | None = None
    agreed: bool = False
    error: str | None = None
    sub_batch: int | None = None
    batch: int | None = None
    stochastic: bool = False
    rel_rms_err: float | None = None  # a randomized estimator's relative RMS error over repeated calls

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def flags(self) -> str:
        f = ""
        if self.timing is not None and self.timing.timed_once:
            f += "†"
        if self.sub_batch is not None:
            f += "‡"
        return f

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "kind": "baseline" if self.is_baseline else self.kind,
            "status": self.status,
            "agreed": self.agreed,
            "time": self.timing.to_json() if self.timing else None,
            "fpe": self.fpe,
            "speedup": self.speedup,
            "peak_memory_bytes": self.peak_bytes,
            "peak_memory_mib": None if self.peak_bytes is None else self.peak_bytes / 2**20,
            "memory_method": self.memory_how,
            "max_abs_err": self.max_abs_err,
            "max_rel_err": self.max_rel_err,
            "timed_once": bool(self.timing and self.timing.timed_once),
            "scaled_from_batch": self.sub_batch,
            "stochastic": self.stochastic,
            "rel_rms_err": self.rel_rms_err,
            "error": self.error,
        }


@dataclass
class TargetResult:
    description: str
    met: bool | None
    value: str

    def to_json(self) -> dict:
        return {"description": self.description, "met": self.met, "value": self.value}


@dataclass
class ScenarioResult:
    name: str
    description: str
    op: str
    batch: int | None = None
    n_in: int | None = None
    no_grad: bool = False
    baseline: str = ""
    reference: str = ""
    rtol: float = 0.0
    forward: Timing | None = None
    methods: list[MethodResult] = field(default_factory=list)
    targets: list[TargetResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def all_ok(self) -> bool:
        return self.error is None and all(m.ok for m in self.methods)

    def method(self, name: str) -> MethodResult | None:
        return next((m for m in self.methods if m.name == name), None)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "op": self.op,
            "batch": self.batch,
            "n_in": self.n_in,
            "no_grad": self.no_grad,
            "baseline": self.baseline,
            "reference": self.reference,
            "agreement_rtol": self.rtol,
            "forward": self.forward.to_json() if self.forward else None,
            "methods": [m.to_json() for m in self.methods],
            "targets": [t.to_json() for t in self.targets],
            "notes": self.notes,
            "error": self.error,
            "all_agreed": self.all_ok,
        }


def _to_device(s: Setup, device: torch.device) -> Setup:
    f = s.f.to(device) if isinstance(s.f, torch.nn.Module) else s.f
    return Setup(f, s.x.to(device), s.extra)


def _ctx(no_grad: bool):
    return torch.no_grad() if no_grad else contextlib.nullcontext()


def _wrap(run: Callable[[], tuple], no_grad: bool) -> Callable[[], tuple]:
    if not no_grad:
        return run

    def wrapped():
        with torch.no_grad():
            return run()

    return wrapped


def _as_tuple(out) -> tuple:
    if isinstance(out, torch.Tensor):
        return (out,)
    return tuple(out)


def compare(out: tuple, ref: tuple, rtol: float) -> tuple[float, float, bool, str | None]:
    """Max abs error, max error relative to the reference's largest entry, agreed, and a mismatch message.

    Rows are independent, so an output computed on fewer rows (a sub-batch) is compared with the
    reference's first rows, and the other way round."""
    out, ref = _as_tuple(out), _as_tuple(ref)
    if len(out) != len(ref):
        return float("inf"), float("inf"), False, f"returned {len(out)} tensors, the reference {len(ref)}"
    worst_abs, worst_rel = 0.0, 0.0
    for o, r in zip(out, ref):
        o = o.detach().to("cpu", torch.float64)
        r = r.detach().to("cpu", torch.float64)
        if o.dim() and r.dim() and o.shape[1:] == r.shape[1:] and o.shape[0] != r.shape[0]:
            k = min(o.shape[0], r.shape[0])
            o, r = o[:k], r[:k]
        if o.shape != r.shape:
            return float("inf"), float("inf"), False, f"shape {tuple(o.shape)} != reference {tuple(r.shape)}"
        err = (o - r).abs().max().item() if o.numel() else 0.0
        if err != err:  # NaN
            return float("nan"), float("nan"), False, "non-finite values"
        scale = r.abs().max().item() if r.numel() else 0.0
        rel = err / scale if scale > 0 else (0.0 if err == 0 else float("inf"))
        worst_abs, worst_rel = max(worst_abs, err), max(worst_rel, rel)
    return worst_abs, worst_rel, worst_rel <= rtol, None


def rel_rms(outs: list[tuple], ref: tuple) -> float:
    """``sqrt(mean (out - ref)^2) / sqrt(mean ref^2)`` over every call and entry (the first tensor)."""
    r = ref[0].double()
    se = sum(float(((o[0].double().to(r.device) - r) ** 2).sum()) for o in outs) / len(outs)
    return math.sqrt(se / max(float((r**2).sum()), 1e-300))


def probe_memory_subprocess(spec: dict, timeout: float = 900.0) -> tuple[int | None, str]:
    """Peak RSS of one method in a fresh process (so other methods' allocations do not count)."""
    env = memprobe_env()
    env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [env.get("PYTHONPATH", "")])
    try:
        p = subprocess.run([sys.executable, "-m", "torchderiv.bench._memprobe", json.dumps(spec)],
                           capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return None, "timeout"
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]
        return None, f"probe failed: {tail[0]}"
    res = json.loads(lines[-1])
    return res.get("peak_bytes"), res.get("how", "")


def run_scenario(sc: Scenario, device: torch.device, policy: TimingPolicy, quick: bool, memory: bool,
                 probe_spec: Callable[[str], dict] | None = None,
                 on_step: Callable[[str], None] | None = None) -> ScenarioResult:
    step = on_step or (lambda _msg: None)
    res = ScenarioResult(sc.name, sc.description, sc.op, no_grad=sc.no_grad, baseline=sc.baseline,
                         reference=sc.reference, rtol=sc.rtol, notes=list(sc.notes))
    by_name = {m.name: m for m in sc.methods}
    try:
        step("setup")
        setup = _to_device(sc.make(), device)
        res.batch, res.n_in = setup.B, setup.n
    except Exception as e:  # noqa: BLE001 - reported, never hidden
        res.error = f"setup failed: {type(e).__name__}: {e}"
        return res

    # reference: once, in float64 where the function can be cast; otherwise the baseline in float32
    step("float64 reference")
    ref = None
    ref_m = by_name.get(sc.reference)
    try:
        rs = setup.cast(torch.float64)
        if sc.reference_rows:
            rs = rs.rows(sc.reference_rows)
        with _ctx(sc.no_grad):
            ref = _as_tuple(ref_m.build(rs)())
        res.reference = f"{sc.reference}, float64" + (f", first {sc.reference_rows} rows" if sc.reference_rows else "")
    except Exception as e:  # noqa: BLE001
        res.notes.append(f"float64 reference failed ({type(e).__name__}: {e}); comparing against the "
                         f"float32 baseline instead")
        res.reference = f"{sc.baseline}, float32"

    # every method and the plain forward, timed side by side (interleaved rounds)
    fwd = sc.forward(setup) if sc.forward else (lambda: setup.f(setup.x))
    order = _ordered(sc)
    cands = [Candidate(_wrap(fwd, sc.no_grad))]
    kept = []
    for m in order:
        mr = MethodResult(m.name, m.kind, m.name == sc.baseline, batch=setup.B, stochastic=m.stochastic)
        s = setup
        scale = 1.0
        if quick and m.quick_sub_batch and m.quick_sub_batch < setup.B:
            s = setup.rows(m.quick_sub_batch)
            scale = setup.B / m.quick_sub_batch
            mr.sub_batch = m.quick_sub_batch
        try:
            with _ctx(sc.no_grad):
                run = m.build(s)
            cand = Candidate(_wrap(run, sc.no_grad), once=m.slow or (quick and m.quick_once), scale=scale)
        except MethodUnavailable as e:  # cannot run on this machine: a note, not an error
            res.notes.append(f"{m.name}: left out ({e})")
            continue
        except Exception as e:  # noqa: BLE001 - shown as ERROR, never hidden
            cand = Candidate(lambda: None, error=e)
        else:
            secs = getattr(run, "setup_seconds", None)
            if secs is not None:
                res.notes.append(f"{m.name}: set-up (compilation, first call) {secs:.1f} s, not timed")
        kept.append(m)
        res.methods.append(mr)
        cands.append(cand)
    order = kept
    names = ["plain forward"] + [m.name for m in order]
    measure_interleaved(cands, device, policy, on_round=lambda r: step(f"round {r + 1}/{policy.repeat}"),
                        on_warm=lambda i: step(f"warm-up: {names[i]}"))
    if cands[0].error is not None:
        e = cands[0].error
        res.error = f"plain forward failed: {type(e).__name__}: {e}"
        return res
    res.forward = cands[0].timing
    outputs = {}
    for m, mr, c in zip(order, res.methods, cands[1:]):
        if c.error is not None:
            mr.status = "ERROR"
            mr.error = f"{type(c.error).__name__}: {c.error}"
            mr.timing = None
            continue
        mr.timing = c.timing
        mr._out = _as_tuple(c.out)  # type: ignore[attr-defined]
        if m.stochastic:  # more calls (untimed) for the relative RMS error against the reference
            reps = max(1, sc.error_reps // 10 if quick else sc.error_reps)
            mr._outs = [mr._out] + [_as_tuple(c.fn()) for _ in range(reps - 1)]  # type: ignore[attr-defined]
        if m.standardize is not None:
            mr._out = _as_tuple(m.standardize(mr._out))  # type: ignore[attr-defined]
        outputs[mr.name + "/out"] = mr._out  # type: ignore[attr-defined]
    del cands

    if ref is None:
        base = outputs.get(sc.baseline + "/out")
        if base is None:
            res.error = "no reference: the float64 reference and the baseline both failed"
            for mr in res.methods:
                if mr.status == "ok":
                    mr.status, mr.agreed = "FAIL", False
                    mr.error = "no reference to check against"
        ref = base
    for mr in res.methods:
        out = getattr(mr, "_out", None)
        if mr.status == "ERROR" or ref is None or out is None:
            continue
        if any(m.stochastic for m in sc.methods):
            mr.rel_rms_err = rel_rms(getattr(mr, "_outs", [out]), ref)
        if mr.stochastic:  # not checked to rtol: its error is the rel RMS column
            mr.agreed = math.isfinite(mr.rel_rms_err)
            if not mr.agreed:
                mr.status, mr.error = "FAIL", "non-finite estimates"
            del mr._out  # type: ignore[attr-defined]
            continue
        a, r, ok, why = compare(out, ref, sc.rtol)
        mr.max_abs_err, mr.max_rel_err, mr.agreed = a, r, ok
        if not ok:
            mr.status = "FAIL"
            mr.error = why or f"max error {r:.2e} of max|ref| > rtol {sc.rtol:g}"
        del mr._out  # type: ignore[attr-defined]

    base = res.method(sc.baseline)
    for mr in res.methods:
        if mr.timing is None:
            continue
        mr.fpe = mr.timing.median / res.forward.median
        if base is not None and base.timing is not None:
            mr.speedup = base.timing.median / mr.timing.median

    if memory:
        for mr in res.methods:
            if mr.status == "ERROR":
                continue
            step(f"memory: {mr.name}")
            _memory(sc, by_name[mr.name], setup, device, mr, probe_spec)

    res.targets = [_target(res, t) for t in sc.targets]
    return res


def _ordered(sc: Scenario) -> list[Method]:
    """Baseline first, then the others in the scenario's order."""
    return sorted(sc.methods, key=lambda m: m.name != sc.baseline)


def _memory(sc: Scenario, m: Method, setup: Setup, device, mr: MethodResult, probe_spec) -> None:
    if not m.memory:
        mr.memory_how = "not measured for this method"
        return
    try:
        if device.type == "cuda":
            with _ctx(sc.no_grad):
                run = m.build(setup)
                if not (m.slow or m.quick_once):
                    run()
                pm = cuda_peak(run, device)
            mr.peak_bytes, mr.memory_how = pm.peak_bytes, pm.how
        elif probe_spec is not None:
            mr.peak_bytes, mr.memory_how = probe_memory_subprocess(probe_spec(m.name))
    except Exception as e:  # noqa: BLE001
        mr.memory_how = f"failed: {type(e).__name__}: {e}"


def _target(res: ScenarioResult, t) -> TargetResult:
    m = res.method(t.method)
    desc = t.describe()
    if m is None or m.timing is None or not m.ok:
        return TargetResult(desc, None if m is None else False, "method failed" if m else "method missing")
    if t.max_fpe is not None:
        return TargetResult(desc, m.fpe <= t.max_fpe, f"{m.fpe:.2f} FPE")
    other = res.method(t.versus or res.baseline)
    if other is None or other.timing is None:
        return TargetResult(desc, None, "comparison method missing")
    sp = other.timing.median / m.timing.median
    return TargetResult(desc, sp >= t.min_speedup, f"{sp:.2f}x")

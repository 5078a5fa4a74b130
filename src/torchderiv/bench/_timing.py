"""Timing and memory measurement: medians after warm-up, synchronized on CUDA, memory per method."""

from __future__ import annotations

import gc
import math
import os
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Per-call seconds of one method: every sample, their median and spread."""

    samples: list[float]
    n_inner: int = 1  # calls averaged inside one sample (tiny calls are timed in groups)
    timed_once: bool = False  # a slow method: one call, no warm-up
    scale: float = 1.0  # samples were multiplied by this (timed on a sub-batch and scaled linearly)
    warmup: int = 0

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def q1(self) -> float:
        return _quantile(self.samples, 0.25)

    @property
    def q3(self) -> float:
        return _quantile(self.samples, 0.75)

    @property
    def iqr_rel(self) -> float:
        """Interquartile range relative to the median (0.05 = 5 %)."""
        return (self.q3 - self.q1) / self.median if self.median > 0 else 0.0

    def to_json(self) -> dict:
        return {
            "median_s": self.median,
            "q1_s": self.q1,
            "q3_s": self.q3,
            "min_s": min(self.samples),
            "max_s": max(self.samples),
            "samples_s": list(self.samples),
            "calls_per_sample": self.n_inner,
            "warmup_calls": self.warmup,
            "timed_once": self.timed_once,
            "scale": self.scale,
        }


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass
class TimingPolicy:
    """How long to measure one method.

    ``repeat`` samples after ``warmup`` calls; each sample groups enough calls to last ``min_sample_s``
    (timer resolution and Python noise on tiny calls); sampling stops early after ``budget_s`` once
    ``min_repeat`` samples are in.
    """

    repeat: int = 15
    warmup: int = 2
    min_sample_s: float = 0.01
    budget_s: float = 8.0
    min_repeat: int = 3
    max_inner: int = 1000


@dataclass
class Candidate:
    """One function to time in :func:`measure_interleaved`."""

    fn: Callable[[], object]
    once: bool = False
    scale: float = 1.0
    timing: Timing | None = None
    out: object = None
    error: BaseException | None = None
    n_inner: int = 1
    spent: float = 0.0


def measure_interleaved(cands: list[Candidate], device: torch.device, policy: TimingPolicy,
                        on_round: Callable[[int], None] | None = None,
                        on_warm: Callable[[int], None] | None = None) -> None:
    """Time several functions side by side: warm every one up, then take one sample of each per round,
    so that a change of machine load during the run affects every method alike.

    A candidate that raises keeps its exception in ``error``; ``once`` candidates are called a single
    time, without warm-up. Every sample follows one untimed call of the same function (steady state);
    calls faster than ``policy.min_sample_s`` are timed in groups of ``n_inner``. Sampling of a candidate
    stops after ``policy.budget_s`` (timed calls) once it has ``policy.min_repeat`` samples.
    """
    gc.collect()
    for i, c in enumerate(cands):
        try:
            if c.once:
                synchronize(device)
                t0 = time.perf_counter()
                c.out = c.fn()
                synchronize(device)
                c.timing = Timing([(time.perf_counter() - t0) * c.scale], 1, True, c.scale, 0)
            else:
                t_est = math.inf
                k = 0
                # at least two calls for cheap functions: the first one (tracing, caches, lazy
                # initialization) says nothing about the per-call time that sets ``n_inner``
                while k < max(1, policy.warmup) or (k < 2 and t_est < 1.0):
                    synchronize(device)
                    t0 = time.perf_counter()
                    c.out = c.fn()
                    synchronize(device)
                    t_est = min(t_est, time.perf_counter() - t0)
                    k += 1
                c.n_inner = max(1, min(policy.max_inner, math.ceil(policy.min_sample_s / max(t_est, 1e-7))))
                c.timing = Timing([], c.n_inner, False, c.scale, max(1, policy.warmup))
        except Exception as e:  # noqa: BLE001 - reported by the caller
            c.error = e
        if on_warm:
            on_warm(i)
    live = [c for c in cands if c.error is None and not c.once]
    for r in range(max(1, policy.repeat)):
        gc.collect()
        for c in live:
            if c.error is not None:
                continue
            if len(c.timing.samples) >= policy.min_repeat and c.spent > policy.budget_s:
                continue
            gc_was = gc.isenabled()
            gc.disable()
            try:
                # an untimed call first: after another method ran, caches, branch predictors and the
                # allocator's free lists are cold (a tiny call then costs several times its warm time, a
                # large one pays page faults for memory the previous method returned to the OS); users
                # call one method in a loop, so the steady state is what is measured
                c.fn()
                synchronize(device)
                t0 = time.perf_counter()
                for _ in range(c.n_inner):
                    c.out = c.fn()
                synchronize(device)
                dt = time.perf_counter() - t0
            except Exception as e:  # noqa: BLE001
                c.error = e
                continue
            finally:
                if gc_was:
                    gc.enable()
            c.spent += dt
            c.timing.samples.append(dt / c.n_inner * c.scale)
        if on_round:
            on_round(r)


# ----------------------------------------------------------------------------- memory


def _status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


@dataclass
class PeakMemory:
    """Peak memory above the level before the call, in bytes, and how it was measured."""

    peak_bytes: int
    how: str
    notes: list[str] = field(default_factory=list)


def cpu_peak_rss(fn: Callable[[], object]) -> PeakMemory:
    """Peak resident memory of one call of ``fn`` above the resident memory just before it.

    Meant to run in a fresh process per method (see ``_memprobe``): the caller warms ``fn`` up first so
    one-time costs (tracing, caches) are not counted. With the peak mark reset through
    ``/proc/self/clear_refs`` the high-water mark covers only this call; otherwise ``ru_maxrss`` (the
    process-lifetime peak) is used.
    """
    gc.collect()
    if _reset_peak_rss():
        base = _status_kib("VmRSS")
        fn()
        peak = _status_kib("VmHWM")
        if base is not None and peak is not None:
            return PeakMemory(max(0, peak - base) * 1024, "VmHWM-VmRSS")
    base = _status_kib("VmRSS") or 0
    fn()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return PeakMemory(max(0, peak_kib - base) * 1024, "ru_maxrss-VmRSS")


def cuda_peak(fn: Callable[[], object], device: torch.device) -> PeakMemory:
    """Peak CUDA memory allocated by one call of ``fn`` above what was allocated before it."""
    gc.collect()
    synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return PeakMemory(max(0, peak - base), "cuda.max_memory_allocated")


def memprobe_env() -> dict:
    """Environment of a memory-probe subprocess: glibc returns large blocks to the OS at once, so the
    resident size follows the live allocations instead of the allocator's retained heap."""
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    env.setdefault("MALLOC_TRIM_THRESHOLD_", "131072")
    return env

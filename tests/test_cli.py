"""The ``torchderiv bench`` command: a tiny scenario end to end, JSON, PNG, --model, failures, usage errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torchderiv
from _harness import sampled
from torchderiv.__main__ import main
from torchderiv.bench import SCENARIOS, Method, Scenario
from torchderiv.bench import _methods as M
from torchderiv.bench._peers import compile_available
from torchderiv.bench._runner import compare, probe_memory_subprocess

TESTS = Path(__file__).parent
QUICK = ["--quick", "--repeat", "2"]


@pytest.fixture
def factory_path(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.chdir(TESTS)


def test_version(capsys):
    assert main(["--version"]) == 0
    assert torchderiv.__version__ in capsys.readouterr().out


@pytest.mark.slow  # a fresh interpreter importing torch
def test_python_dash_m_entry_point():
    p = subprocess.run([sys.executable, "-m", "torchderiv", "--version"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and "torchderiv" in p.stdout


def test_tiny_quick_run_json_and_plot(tmp_path, capsys):
    js, png = tmp_path / "out" / "bench.json", tmp_path / "plots" / "speedups.png"
    rc = main(["bench", "tiny-mlp", *QUICK, "--json", str(js), "--plot", str(png)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "torchderiv.jacobian" in out and "plain forward" in out and "FPE" in out
    doc = json.loads(js.read_text())
    meta = doc["metadata"]
    for key in ("date", "torch_version", "torchderiv_version", "python", "platform", "cpu_model",
                "torch_num_threads", "device", "gpu_name"):
        assert key in meta
    assert doc["all_agreed"] is True
    (sc,) = doc["scenarios"]
    assert sc["name"] == "tiny-mlp" and sc["batch"] == 8 and sc["forward"]["median_s"] > 0
    names = {m["name"] for m in sc["methods"]}
    assert {"torchderiv.jacobian", "vmap(jacrev)", "autograd.grad loop over outputs"} <= names
    for m in sc["methods"]:
        for key in ("time", "fpe", "speedup", "peak_memory_mib", "max_abs_err", "max_rel_err", "agreed",
                    "status", "timed_once", "scaled_from_batch"):
            assert key in m
        t = m["time"]
        assert t["median_s"] > 0 and t["min_s"] <= t["median_s"] <= t["max_s"]
        assert len(t["samples_s"]) >= 1 and t["q1_s"] <= t["q3_s"]
        assert m["agreed"] and m["status"] == "ok" and m["max_abs_err"] < 1e-4
        assert m["fpe"] == pytest.approx(t["median_s"] / sc["forward"]["median_s"])
    base = next(m for m in sc["methods"] if m["kind"] == "baseline")
    assert base["speedup"] == pytest.approx(1.0)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _wrong(s):
    good = M.tf_jacobian("jacrev")(s)
    return lambda: (good()[0] * 1.01,)


def _raises(s):
    def run():
        raise RuntimeError("boom")

    return run


@pytest.fixture
def tiny_with(monkeypatch):
    def add(*extra: Method, name="tiny-test"):
        base = SCENARIOS["tiny-mlp"]
        sc = Scenario(name, "tiny test scenario with extra methods", base.make, list(base.methods) + list(extra),
                      baseline=base.baseline, reference=base.reference, op="jacobian", hidden=True)
        monkeypatch.setitem(SCENARIOS, name, sc)
        return name

    return add


def test_wrong_method_fails_the_run(tiny_with, tmp_path, capsys):
    name = tiny_with(Method("deliberately wrong", _wrong))
    js = tmp_path / "b.json"
    rc = main(["bench", name, *QUICK, "--json", str(js)])
    out = capsys.readouterr().out
    assert rc == 1
    assert "FAIL" in out and "deliberately wrong" in out
    doc = json.loads(js.read_text())
    m = next(m for m in doc["scenarios"][0]["methods"] if m["name"] == "deliberately wrong")
    assert m["status"] == "FAIL" and m["agreed"] is False and m["max_rel_err"] > 1e-3
    assert doc["all_agreed"] is False


def test_raising_method_is_an_error(tiny_with, capsys):
    name = tiny_with(Method("raises", _raises))
    assert main(["bench", name, *QUICK]) == 1
    out = capsys.readouterr().out
    assert "ERROR" in out and "boom" in out


def test_slow_and_sub_batch_methods_are_marked(tiny_with, tmp_path, capsys):
    name = tiny_with(Method("slow one", M.ag_jacobian, slow=True),
                     Method("sub-batched", M.tf_jacobian("jacfwd"), quick_sub_batch=4))
    js = tmp_path / "b.json"
    assert main(["bench", name, *QUICK, "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "timed once" in out and "scaled from B=4" in out
    ms = {m["name"]: m for m in json.loads(js.read_text())["scenarios"][0]["methods"]}
    assert ms["slow one"]["timed_once"] and len(ms["slow one"]["time"]["samples_s"]) == 1
    assert ms["sub-batched"]["scaled_from_batch"] == 4 and ms["sub-batched"]["time"]["scale"] == 2.0


@pytest.mark.parametrize("op", sampled(["jacobian", "hessian", "partials:0,00,12"], 2))  # fast tier: 2 of 3
def test_model_factory(factory_path, op, capsys, tmp_path):
    js = tmp_path / "m.json"
    rc = main(["bench", *QUICK, "--model", "bench_factory:make", "--op", op, "--batch", "12", "--json", str(js)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "Recommendation:" in out
    sc = json.loads(js.read_text())["scenarios"][0]
    assert sc["batch"] == 12
    kinds = {m["kind"] for m in sc["methods"]}
    assert {"torchderiv", "peer", "baseline"} <= kinds
    assert all(m["agreed"] for m in sc["methods"])


@pytest.mark.parametrize("factory,op", sampled([("make_scalar", "laplacian"), ("make_scalar", "biharmonic"),
                                                ("make_square", "divergence"), ("make_square", "jacobian_diagonal")],
                                               3, multi=True))  # fast tier: one of each factory
def test_model_factory_ops(factory_path, factory, op, capsys):
    rc = main(["bench", *QUICK, "--model", f"bench_factory:{factory}", "--op", op])
    out = capsys.readouterr().out
    assert rc == 0, out


def test_unknown_scenario(capsys):
    assert main(["bench", "no-such-scenario", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "unknown scenario" in err and "no-such-scenario" in err and "seed002" in err


@pytest.mark.parametrize("argv,needle", [
    (["--model", "no_colon_here", "--op", "jacobian"], "MODULE:FACTORY"),
    (["--model", "a:b:c", "--op", "jacobian"], "MODULE:FACTORY"),
    (["--model", "no_such_module_xyz:make", "--op", "jacobian"], "cannot import"),
    (["--model", "bench_factory:missing", "--op", "jacobian"], "no callable"),
    (["--model", "bench_factory:make"], "--op"),
    (["--model", "bench_factory:make", "--op", "curl"], "--op must be one of"),
    (["--model", "bench_factory:make", "--op", "partials"], "needs a spec"),
    (["--model", "bench_factory:make", "--op", "partials:0,x1"], "bad multi-index"),
    (["--model", "bench_factory:make", "--op", "partials:0,7"], "coordinate"),
    (["--op", "jacobian"], "only used with --model"),
    (["tiny-mlp", "--repeat", "0"], "--repeat"),
])
def test_usage_errors(factory_path, argv, needle, capsys):
    assert main(["bench", "--quick", *argv]) == 2
    assert needle in capsys.readouterr().err


def test_factory_returning_garbage_is_a_usage_error(factory_path, capsys):
    assert main(["bench", *QUICK, "--model", "bench_factory:not_a_pair", "--op", "jacobian"]) == 2
    assert "factory must return (module, example_input)" in capsys.readouterr().err


def test_parse_spec():
    assert M.parse_spec("0,00,011") == [(0,), (0, 0), (0, 1, 1)]
    assert M.parse_spec(",1") == [(), (1,)]
    with pytest.raises(ValueError):
        M.parse_spec("0,a")


def test_compare():
    r = (torch.ones(4, 2),)
    assert compare((torch.ones(4, 2) * (1 + 1e-5),), r, 1e-3)[2]
    assert not compare((torch.ones(4, 2) * 1.1,), r, 1e-3)[2]
    assert not compare((torch.full((4, 2), float("nan")),), r, 1e-3)[2]
    assert not compare((torch.ones(4, 3),), r, 1e-3)[2]
    assert compare((torch.ones(2, 2),), r, 1e-3)[2]  # a sub-batch against the reference's first rows


@pytest.mark.slow  # a fresh interpreter importing torch
def test_memory_probe_subprocess():
    peak, how = probe_memory_subprocess({"scenario": "tiny-mlp", "method": "vmap(jacrev)"}, timeout=120)
    assert peak is not None and peak >= 0, how


def test_device_auto_resolves_to_what_torch_sees(monkeypatch):
    from torchderiv.bench._cli import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"
    assert resolve_device("cpu") == "cpu"


@pytest.mark.slow  # inductor: compiles C++ kernels
@pytest.mark.skipif(not compile_available(), reason="torch.compile needs a C++ compiler for inductor on CPU")
def test_compiled_pinn_step_agrees_and_skips_memory(monkeypatch, tmp_path, capsys):
    """The pinn-poisson scenario's torch.compile row: same Laplacian and parameter gradients as the autograd
    loop, its compilation reported as a note (not timed), and no memory probe (it would recompile)."""
    from torchderiv.bench._peers import lap_autograd, pinn_step, pinn_step_compiled
    from torchderiv.bench._scenarios import _seeded, mlp

    base = "autograd.grad loop (create_graph) + backward"
    name = "tiny-pinn-compiled"
    sc = Scenario(name, "tiny PINN step with a compiled row",
                  _seeded(lambda: M.Setup(mlp(3, 8, 8, 1), torch.rand(16, 3))),
                  [Method(base, pinn_step(lap_autograd)),
                   Method("compiled", pinn_step_compiled, kind="torchderiv", memory=False)],
                  baseline=base, reference=base, op="laplacian+backward", hidden=True)
    monkeypatch.setitem(SCENARIOS, name, sc)
    js = tmp_path / "b.json"
    assert main(["bench", name, *QUICK, "--memory", "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "compiled: set-up (compilation, first call)" in out
    m = {m["name"]: m for m in json.loads(js.read_text())["scenarios"][0]["methods"]}["compiled"]
    assert m["agreed"] is True and m["max_rel_err"] < 1e-5
    assert m["memory_method"] == "not measured for this method" and m["peak_memory_bytes"] is None


def _unavailable(s):
    raise M.MethodUnavailable("no compiler here")


def test_unavailable_method_is_left_out_with_a_note(tiny_with, tmp_path, capsys):
    name = tiny_with(Method("needs a compiler", _unavailable))
    js = tmp_path / "b.json"
    assert main(["bench", name, *QUICK, "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "needs a compiler: left out (no compiler here)" in out
    names = [m["name"] for m in json.loads(js.read_text())["scenarios"][0]["methods"]]
    assert "needs a compiler" not in names and len(names) == 3

"""The test harness itself: the primitive twin behind the references, the references against finite differences,
and a suite that notices when the Taylor engine is switched off."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchderiv as td
from _harness import Case, PrimitiveTwin, close, disable_engine, fd_partial, pick, restricted
from conftest import ZOO_BY_NAME

DT = torch.float64


def _x(*shape, seed=0):
    return torch.randn(*shape, dtype=DT, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- the primitive twin


def _layer_norm_module():
    ln = nn.LayerNorm(4).to(DT)
    with torch.no_grad():
        ln.weight.copy_(1 + 0.3 * _x(4, seed=1))
        ln.bias.copy_(0.2 * _x(4, seed=2))
    return ln


TWIN_OPS = {
    "prod_dim": lambda t: t.prod(-1),
    "torch_prod_keepdim": lambda t: torch.prod(t, 1, keepdim=True),
    "prod_all": lambda t: t.prod(),
    "cumprod": lambda t: torch.cumprod(t, -1),
    "cumprod_dim0_method": lambda t: t.cumprod(0),
    "layer_norm_module": _layer_norm_module(),
    "layer_norm_functional_2d": lambda t: F.layer_norm(t, (3, 4)),
}


@pytest.mark.parametrize("name", list(TWIN_OPS))
def test_twin_replaces_the_op_and_keeps_its_value(name):
    fn = TWIN_OPS[name]
    x = _x(2, 3, 4)
    mode = PrimitiveTwin()
    with mode:
        y = fn(x)
    assert mode.replaced >= 1, f"{name}: the twin did not replace the op"
    close(y, fn(x), name, atol=1e-13, rtol=1e-12)


# the functions of test_rules.py whose references go through the twin (the fresh-clone failure was
# prod_keepdim_pre: torch's prod backward divides by an entry of about 3e-4)
TWIN_RULE_CASES = ["prod", "prod_keepdim_pre", "prod_odd_inner_dim", "cumprod", "cumprod_pre", "layer_norm_pre"]


@pytest.mark.parametrize("name", TWIN_RULE_CASES)
def test_twin_references_agree_with_finite_differences(name):
    """Orders 3 and 4 of the twin reference against nested central differences of the ORIGINAL function (a loose
    check of the reference itself: third differences are good to about 1e-6 here, fourth to about 1e-4)."""
    from test_rules import CASES

    c = next(c for c in CASES if c.name == name)
    x = c.x()
    for k, key, h, tol in [(3, (0, 1, 2), 1e-3, 1e-5), (3, (1, 1, 0), 1e-3, 1e-5), (4, (0, 0, 1, 2), 5e-3, 2e-4)]:
        coords = sorted(set(key))
        ref = pick(restricted(c.fn, x, k, coords), key, coords)
        fd = fd_partial(c.fn, x, key, h)
        scale = max(1.0, ref.abs().max().item())
        torch.testing.assert_close(ref, fd, atol=tol * scale, rtol=tol, msg=lambda m: f"{name} {key}: {m}")
    got = td.partials(c.fn, x, [(0, 1, 2)])[(0, 1, 2)]
    close(got, pick(restricted(c.fn, x, 3, [0, 1, 2]), (0, 1, 2), [0, 1, 2]), f"{name}: torchderiv vs twin")


def test_zoo_layer_norm_reference_agrees_with_finite_differences():
    """The main zoo's LayerNorm net: its twin reference at order 3 against central differences."""
    case = ZOO_BY_NAME["residual_layernorm"]
    model, ref, x = case.build()
    key = (0, 1, 1)
    got = case.partial(key)
    torch.testing.assert_close(got, fd_partial(model, x, key, 1e-3), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- the suite sees the engine


def _operator_calls(case: Case):
    model, _, x = case.build()
    calls = {
        "jacobian_forward": (lambda: td.jacobian(model, x, method="forward"), case.jacobian),
        "jacobian_reverse": (lambda: td.jacobian(model, x, method="reverse"), case.jacobian),
        "hessian_forward": (lambda: td.hessian(model, x, method="forward"), case.hessian),
        "hessian_reverse": (lambda: td.hessian(model, x, method="reverse"), case.hessian),
        "hessian_diagonal": (lambda: td.hessian_diagonal(model, x), case.hessian_diagonal),
        "laplacian": (lambda: td.laplacian(model, x), case.laplacian),
        "partials": (lambda: td.partials(model, x, [(0, 1, 1)])[(0, 1, 1)], lambda: case.partial((0, 1, 1))),
        "biharmonic": (lambda: td.biharmonic(model, x, dims=[0, 1]), lambda: case.biharmonic([0, 1])),
    }
    if case.square():
        calls["jacobian_diagonal"] = (lambda: td.jacobian_diagonal(model, x), case.jacobian_diagonal)
        calls["divergence"] = (lambda: td.divergence(model, x), lambda: case.jacobian_diagonal().flatten(1).sum(-1))
    return calls


@pytest.mark.parametrize("name", ["tanh_mlp", "pointwise"])
def test_every_operator_warns_when_the_engine_is_disabled(name, monkeypatch):
    """With the capture patched to fail, every operator still returns the right numbers (through the torch.func
    fallback) and says so with a FallbackWarning, which this suite turns into an error."""
    case = ZOO_BY_NAME[name]
    expected = {op: ref() for op, (_, ref) in _operator_calls(case).items()}
    td.clear_cache()  # no cached graph or fast path may answer for the disabled engine
    assert disable_engine(monkeypatch.setattr) > 0
    try:
        for op, (call, _) in _operator_calls(case).items():
            td.reset_fallback_warnings()
            with pytest.warns(td.FallbackWarning, match="could not be traced"):
                got = call()
            close(got, expected[op], f"{name} {op} through the fallback")
    finally:
        monkeypatch.undo()
        td.clear_cache()


def test_fallback_warns_once_per_reason_and_function(monkeypatch):
    case = ZOO_BY_NAME["tanh_mlp"]
    model, _, x = case.build()
    other = nn.Sequential(nn.Linear(3, 4), nn.Tanh()).to(DT)
    td.clear_cache()
    disable_engine(monkeypatch.setattr)
    try:
        with pytest.warns(td.FallbackWarning) as rec:
            td.jacobian(model, x, method="forward")
            td.laplacian(model, x)  # the same f and reason: no second warning
            td.jacobian(other, x, method="forward")  # another f: warns again
        assert len(rec) == 2
        td.reset_fallback_warnings()
        with pytest.warns(td.FallbackWarning):
            td.jacobian(model, x, method="forward")
    finally:
        monkeypatch.undo()
        td.clear_cache()


ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ["tests/test_zoo.py", "-k", "tanh_mlp or residual_layernorm or attention or conv1d"]


def _run_sample(*extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                        "--deselect", "tests/test_zoo.py::test_reference_methods_agree", *extra, *SAMPLE],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-2000:]
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|error)", tail)}
    assert counts, f"no pytest summary:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return counts


@pytest.mark.slow
def test_zoo_sample_fails_with_the_engine_disabled():
    """A sample of the zoo (every operator, four architectures) in a fresh pytest with --engine-disabled: the
    fallback's FallbackWarning is an error, so the tests that call torchderiv must fail (all but the few that
    expect an error before any derivative is computed)."""
    off = _run_sample("--engine-disabled")
    total = sum(off.values())
    assert off.get("failed", 0) >= 0.9 * total, f"the suite did not notice the engine switched off: {off}"

"""The benchmark scenarios: the seeds' questions and the PDE operators of the issues, with their methods.

``SCENARIOS`` is a plain dict ``name -> Scenario``; tests (and users) may add entries. A scenario builds
its :class:`~torchderiv.bench._methods.Setup` deterministically (fixed seed), so a memory-probe subprocess
rebuilds exactly the same network and inputs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from . import _dde
from . import _methods as M
from . import _stochastic as S
from ._methods import Builder, Runner, Setup
from ._peers import (
    af_jacobian_diagonal,
    backward_sampling,
    compile_available,
    dde_available,
    dde_jacobian,
    dde_jet,
    dde_laplacian,
    jet_to_dense,
    lap_autograd,
    lap_dde,
    lap_torchderiv,
    lap_vmap_hessian,
    pinn_step,
    pinn_step_compiled,
    seed001_loop,
    td_jet,
)


@dataclass
class Method:
    name: str
    build: Builder
    kind: str = "peer"  # "torchderiv", "peer" (the baseline is named by the scenario)
    slow: bool = False  # timed once, without warm-up (the seeds' full Jacobians)
    quick_once: bool = False  # like slow, but only in --quick mode
    quick_sub_batch: int | None = None  # in --quick mode: time on the first rows, scale linearly
    memory: bool = True  # measure its peak memory (False: a compiled method would recompile in the probe)
    # lays the method's own result out like the reference for the agreement check (not timed)
    standardize: Callable[[tuple], tuple] | None = None
    # a randomized estimator: reported by its relative RMS error over repeated calls, not checked to rtol
    stochastic: bool = False


@dataclass
class Target:
    """An issue's figure: ``method`` within ``max_fpe`` FPE, or at least ``min_speedup`` x faster than
    ``versus`` (the baseline when None)."""

    method: str
    max_fpe: float | None = None
    min_speedup: float | None = None
    versus: str | None = None

    def describe(self) -> str:
        if self.max_fpe is not None:
            return f"{self.method} <= {self.max_fpe:g} FPE"
        return f"{self.method} >= {self.min_speedup:g}x faster than {self.versus or 'baseline'}"


@dataclass
class Scenario:
    name: str
    description: str
    make: Callable[[], Setup]  # float32 setup on CPU; the runner moves it to the device
    methods: list[Method]
    baseline: str  # name of the method the speed-ups are measured against (the seed's own method)
    reference: str  # name of the method run once in float64 as the reference for agreement
    rtol: float = 1e-3  # agreement: max |err| <= rtol * max |reference| (per output tensor)
    no_grad: bool = False  # run everything under torch.no_grad() (inference)
    targets: list[Target] = field(default_factory=list)
    hidden: bool = False  # not part of the default run (tests, examples)
    reference_rows: int | None = None  # compute the float64 reference on the first rows only
    forward: Callable[[Setup], Runner] | None = None  # the plain forward of FPE; default f(x)
    op: str = ""
    notes: list[str] = field(default_factory=list)
    error_reps: int = 100  # calls of each stochastic method for its relative RMS error (10 with --quick)


SCENARIOS: dict[str, Scenario] = {}


def register(s: Scenario) -> Scenario:
    SCENARIOS[s.name] = s
    return s


# ----------------------------------------------------------------------------- networks


class NetX(nn.Module):
    """The network of seeds 000 and 002: 1 -> 20 -> 20 -> m, tanh."""

    def __init__(self, m: int = 4):
        super().__init__()
        self.fc1 = nn.Linear(1, 20)
        self.fc2 = nn.Linear(20, 20)
        self.out = nn.Linear(20, m)

    def forward(self, x):
        x = torch.tanh(self.fc1(x))
        x = torch.tanh(self.fc2(x))
        return self.out(x)


def mlp(*sizes: int) -> nn.Sequential:
    """A tanh MLP with the given layer widths."""
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


class PointwiseMap(nn.Module):
    """The elementwise map of issue 16: ``tanh(z) z^2 + sin(z)``, a diagonal Jacobian."""

    def forward(self, z):
        return torch.tanh(z) * z**2 + torch.sin(z)


class Conv1dMap(nn.Module):
    """Two width-5 convolutions over the positions of a 1-D signal ``[B, L] -> [B, L]``: bandwidth 9."""

    def __init__(self, channels: int = 16):
        super().__init__()
        self.c1 = nn.Conv1d(1, channels, 5, padding=2)
        self.c2 = nn.Conv1d(channels, 1, 5, padding=2)

    def forward(self, x):
        return self.c2(torch.tanh(self.c1(x.unsqueeze(1)))).squeeze(1)


class GridConv(nn.Module):
    """Two 3 x 3 convolutions on a ``side x side`` grid, flattened ``[B, side^2] -> [B, side^2]``."""

    def __init__(self, side: int = 32, channels: int = 8):
        super().__init__()
        self.side = side
        self.c1 = nn.Conv2d(1, channels, 3, padding=1)
        self.c2 = nn.Conv2d(channels, 1, 3, padding=1)

    def forward(self, x):
        h = x.unflatten(-1, (1, self.side, self.side))
        return self.c2(torch.tanh(self.c1(h))).flatten(1)


def _to_dense(r: tuple) -> tuple:
    return tuple(t.to_dense() for t in r)


def _sparse_scenarios() -> None:
    """Issue 16: structured maps, dense against colored (sparse) torchderiv."""
    no_peer = ("no PyTorch library detects and colors sparsity patterns: the peer row is torch.func's "
               "vmap(jacfwd), which builds the whole per-sample Jacobian")
    register(Scenario(
        "pointwise-diag", "jacobian_diagonal of tanh(z) z^2 + sin(z), n=1000, B=1024",
        _seeded(lambda: Setup(PointwiseMap(), torch.randn(1024, 1000))),
        [Method("torchderiv.jacobian_diagonal (dense)", M.td_op("jacobian_diagonal", "forward", sparsity=False),
                kind="torchderiv", slow=True, quick_sub_batch=16),
         Method("torchderiv.jacobian_diagonal (sparse)", M.td_op("jacobian_diagonal", sparsity=True),
                kind="torchderiv"),
         Method("vmap(jacfwd) diagonal", M._diag_of(M.tf_jacobian("jacfwd"), False), slow=True,
                quick_sub_batch=16)],
        baseline="vmap(jacfwd) diagonal", reference="vmap(jacfwd) diagonal", reference_rows=8,
        op="jacobian_diagonal",
        targets=[Target("torchderiv.jacobian_diagonal (sparse)", max_fpe=3)],
        notes=[no_peer, "pointwise-diag: the dense rows build [B, 1000, 1000] (4 GB at B=1024): timed once"]))
    register(Scenario(
        "conv1d-jacobian", "jacobian of two width-5 Conv1d layers (1->16->1, tanh) over 1000 positions, B=32",
        _seeded(lambda: Setup(Conv1dMap(), torch.randn(32, 1000))),
        [Method("torchderiv.jacobian (dense)", M.td_op("jacobian", "forward", sparsity=False),
                kind="torchderiv", slow=True, quick_sub_batch=4),
         Method("torchderiv.jacobian (sparse)", M.td_op("jacobian", sparsity=True), kind="torchderiv"),
         Method("vmap(jacfwd)", M.tf_jacobian("jacfwd"), slow=True, quick_sub_batch=4)],
        baseline="vmap(jacfwd)", reference="vmap(jacfwd)", reference_rows=4, op="jacobian",
        targets=[Target("torchderiv.jacobian (sparse)", min_speedup=30, versus="torchderiv.jacobian (dense)")],
        notes=[no_peer]))
    register(Scenario(
        "grid-conv-jacobian", "jacobian of two 3x3 Conv2d layers (1->8->1, tanh) on a 32 x 32 grid, B=8",
        _seeded(lambda: Setup(GridConv(), torch.randn(8, 32 * 32))),
        [Method("torchderiv.jacobian (dense)", M.td_op("jacobian", "forward", sparsity=False),
                kind="torchderiv"),
         Method("torchderiv.jacobian (sparse)", M.td_op("jacobian", sparsity=True), kind="torchderiv"),
         Method("torchderiv.jacobian (sparse, layout=sparse_coo)",
                M.td_op("jacobian", sparsity=True, layout=torch.sparse_coo), kind="torchderiv",
                standardize=_to_dense),
         Method("vmap(jacfwd)", M.tf_jacobian("jacfwd"))],
        baseline="vmap(jacfwd)", reference="vmap(jacfwd)", reference_rows=2, op="jacobian",
        notes=[no_peer, "grid-conv-jacobian: the sparse_coo row returns 8 x 1024 x 25 stored entries instead of "
               "8 x 1024 x 1024; its agreement is checked on .to_dense() (untimed)"]))


def _seeded(fn: Callable[[], Setup]) -> Callable[[], Setup]:
    def make() -> Setup:
        torch.manual_seed(0)
        return fn()

    return make


# ----------------------------------------------------------------------------- the scenarios


def dde_rows(problem: str) -> list[Method]:
    """The two rows of a DeepXDE training step: DeepXDE alone, and with torchderiv.deepxde switched on."""
    return [Method("deepxde dde.grad", _dde.step(problem, False)),
            Method("deepxde + torchderiv.deepxde", _dde.step(problem, True), kind="torchderiv")]


def _jacobian_methods(slow: bool, dde: bool) -> list[Method]:
    """Methods of seeds 000 and 002; with ``slow`` (400 outputs) the seed's full Jacobian is timed once,
    and the other per-output loops once in --quick mode."""
    ms = [
        Method("torchderiv.jacobian", M.td_op("jacobian"), kind="torchderiv"),
        Method("autograd.functional.jacobian + diagonal", af_jacobian_diagonal(False), slow=slow),
        Method("autograd.functional.jacobian(vectorize=True) + diagonal", af_jacobian_diagonal(True),
               quick_once=slow),
        Method("autograd.grad loop over outputs", M.ag_jacobian, quick_once=slow),
        Method("backward + sampling vectors (seed 002)", backward_sampling, quick_once=slow),
        Method("torch.func.jvp", M.tf_jvp),
        Method("vmap(jacfwd)", M.tf_jacobian("jacfwd")),
        Method("vmap(jacrev)", M.tf_jacobian("jacrev")),
    ]
    if dde:
        ms.append(Method("deepxde dde.grad.jacobian", dde_jacobian))
    return ms


def build_registry() -> None:
    dde = dde_available()
    note = [] if dde else ["DeepXDE: not installed (pip install deepxde to add it as a peer); the dde-* "
                           "training-step scenarios are left out"]

    register(Scenario(
        "seed000", "seed 000: per-sample dy/dx, net_x 1->20->20->4 tanh, B=10",
        _seeded(lambda: Setup(NetX(4), torch.rand(10, 1))),
        _jacobian_methods(False, dde), baseline="autograd.functional.jacobian + diagonal",
        reference="vmap(jacrev)", op="jacobian", notes=list(note)))

    register(Scenario(
        "seed002", "seed 002: per-sample dy/dx, net_x 1->20->20->400 tanh, B=100",
        _seeded(lambda: Setup(NetX(400), torch.rand(100, 1))),
        _jacobian_methods(True, dde), baseline="autograd.functional.jacobian + diagonal",
        reference="vmap(jacrev)", op="jacobian",
        targets=[Target("torchderiv.jacobian", max_fpe=3.5),
                 Target("torchderiv.jacobian", min_speedup=3, versus="torch.func.jvp")],
        notes=list(note)))

    seed001 = [
        Method("seed 001 loop (autograd.grad, create_graph)", seed001_loop, quick_once=True),
        Method("vmap(hessian) (+J as aux)", M.tf_hessian("hessian", with_jacobian=True)),
        Method("vmap(jacfwd(jacfwd)) (+J as aux)", M.tf_hessian("jacfwd(jacfwd)", with_jacobian=True)),
        Method("torchderiv.partials (orders 1,2)", td_jet(spec_pairs=True), kind="torchderiv",
               standardize=jet_to_dense),
        Method("torchderiv.jacobian + hessian", td_jet(spec_pairs=False), kind="torchderiv"),
    ]
    if dde:
        seed001.append(Method("deepxde dde.grad.jacobian/hessian", dde_jet))
    register(Scenario(
        "seed001", "seed 001: Jacobian + Hessian, 2->64->64->64->150 tanh, B=1000",
        _seeded(lambda: Setup(mlp(2, 64, 64, 64, 150), torch.randn(1000, 2))),
        seed001, baseline="seed 001 loop (autograd.grad, create_graph)",
        reference="vmap(jacfwd(jacfwd)) (+J as aux)", op="jacobian+hessian",
        targets=[Target("torchderiv.partials (orders 1,2)", max_fpe=10),
                 Target("torchderiv.partials (orders 1,2)", min_speedup=4, versus="vmap(jacfwd(jacfwd)) (+J as aux)")],
        notes=list(note) + ["torchderiv.partials (orders 1,2): timed is the one call a user writes; its 5 "
                            "tensors hold every entry of J and H, laid out densely for the check untimed"]))

    lap = [
        Method("autograd.grad nested loop", M.ag_laplacian, quick_once=True),
        Method("vmap(hessian) trace", M.tf_laplacian("hessian")),
        Method("vmap(jacrev(jacrev)) trace", M.tf_laplacian("jacrev(jacrev)")),
        Method("torchderiv.laplacian", M.td_op("laplacian"), kind="torchderiv"),
    ]
    if dde:
        lap.append(Method("deepxde dde.grad.hessian", dde_laplacian))
    D = 50
    register(Scenario(
        "laplacian-d50", f"Laplacian, {D}->768->768->512->512->1 tanh, B=256, under torch.no_grad",
        _seeded(lambda: Setup(mlp(D, 768, 768, 512, 512, 1), torch.randn(256, D))),
        lap, baseline="autograd.grad nested loop", reference="vmap(hessian) trace", no_grad=True, op="laplacian",
        targets=[Target("torchderiv.laplacian", min_speedup=2, versus="vmap(hessian) trace"),
                 Target("torchderiv.laplacian", max_fpe=1.2 * (D + 2))],
        notes=list(note) + ["vmap(hessian) is torch.func's forward-over-reverse, jacfwd(jacrev)"]))

    pinn = [
        Method("autograd.grad loop (create_graph) + backward", pinn_step(lap_autograd)),
        Method("vmap(hessian) trace + backward", pinn_step(lap_vmap_hessian)),
        Method("torchderiv.laplacian + backward", pinn_step(lap_torchderiv), kind="torchderiv"),
    ]
    compiled = compile_available()
    if compiled:
        # informational: no target (the figure is the eager one, above)
        pinn.append(Method("torchderiv.laplacian + backward, torch.compile", pinn_step_compiled,
                           kind="torchderiv", memory=False))
    if dde:
        pinn.append(Method("deepxde dde.grad.hessian + backward", pinn_step(lap_dde)))
    register(Scenario(
        "pinn-poisson", "PINN step: loss = mean(laplacian^2), loss.backward(), 3->64->64->64->1 tanh, B=2048",
        _seeded(lambda: Setup(mlp(3, 64, 64, 64, 1), torch.rand(2048, 3))),
        pinn, baseline="autograd.grad loop (create_graph) + backward",
        reference="autograd.grad loop (create_graph) + backward", op="laplacian+backward",
        targets=[Target("torchderiv.laplacian + backward", min_speedup=2)],
        notes=list(note) + ["pinn-poisson: times include the backward to the parameters; "
                            "FPE is relative to the plain forward"]
        + (["pinn-poisson: the torch.compile row compiles the torchderiv loss (forward and backward); it has "
            "no target: the issue's figure is the eager row. The autograd loop cannot be compiled (double "
            "backward)"] if compiled else
           ["pinn-poisson: no torch.compile row (no C++ compiler for inductor, or TORCHDERIV_BENCH_NO_COMPILE)"])))

    register(Scenario(
        "biharmonic-d5", "biharmonic, 5->768->768->512->512->1 tanh, B=64, under torch.no_grad",
        _seeded(lambda: Setup(mlp(5, 768, 768, 512, 512, 1), torch.randn(64, 5))),
        [Method("vmap(jacfwd(jacfwd(jacrev(jacrev)))) trace", M.tf_biharmonic, quick_once=True),
         Method("autograd.grad nested loop", M.ag_biharmonic, quick_sub_batch=16, quick_once=True),
         Method("torchderiv.biharmonic", M.td_op("biharmonic"), kind="torchderiv")],
        baseline="vmap(jacfwd(jacfwd(jacrev(jacrev)))) trace", reference="autograd.grad nested loop",
        reference_rows=8, rtol=1e-2, no_grad=True, op="biharmonic",
        targets=[Target("torchderiv.biharmonic", min_speedup=3)]))

    _random_scenarios()

    kdv_spec = ["", "x", "xxx"]
    kdv_idx = [(), (1,), (1, 1, 1)]
    register(Scenario(
        "kdv", "KdV terms u, u_x, u_xxx of u(t, x), 2->64->64->64->1 tanh, B=1024",
        _seeded(lambda: Setup(mlp(2, 64, 64, 64, 1), torch.rand(1024, 2))),
        [Method("autograd.grad nested loop", M.ag_partials(kdv_idx)),
         Method("torch.func nested jvp", M.tf_partials_jvp(kdv_idx)),
         Method("torch.func nested jacrev", M.tf_partials_rev(kdv_idx)),
         Method("torchderiv.partials", M.td_op("partials", spec=kdv_spec, coords="tx"), kind="torchderiv")],
        baseline="autograd.grad nested loop", reference="autograd.grad nested loop", op="partials",
        rtol=2e-3))

    _sparse_scenarios()

    if dde:
        for problem, what in (("burgers", "Burgers 1-D + t, 2->20x3->1, 2540 points"),
                              ("kovasznay", "Kovasznay 2-D, 2->50x4->3, 3000 points"),
                              ("euler-beam", "Euler beam, 4th order by nested calls, 1->20x3->1, 200 points"),
                              ("navier-stokes-3d", "3-D unsteady Navier-Stokes, 4->50x4->4, 2000 points")):
            register(Scenario(
                f"dde-{problem}", f"DeepXDE training step (residual, clear, backward): {what}",
                _dde.make(problem), dde_rows(problem), baseline="deepxde dde.grad", reference="deepxde dde.grad",
                op="deepxde step", rtol=2e-3,
                notes=[f"dde-{problem}: the same DeepXDE-style step, with and without torchderiv.deepxde.enable(); "
                       "times include dde.grad.clear() and the backward to the parameters"]))

    register(Scenario(
        "tiny-mlp", "tiny test scenario: Jacobian, 2->16->16->3 tanh, B=8",
        _seeded(lambda: Setup(mlp(2, 16, 16, 3), torch.randn(8, 2))),
        [Method("torchderiv.jacobian", M.td_op("jacobian"), kind="torchderiv"),
         Method("vmap(jacrev)", M.tf_jacobian("jacrev")),
         Method("autograd.grad loop over outputs", M.ag_jacobian)],
        baseline="autograd.grad loop over outputs", reference="vmap(jacrev)", op="jacobian", hidden=True))

    from ._training import register_training

    register_training(register, Scenario, Method)


def _random_scenarios() -> None:
    """Issue 14: randomized (stochastic Taylor) Laplacian and divergence against the exact operators."""
    K = 16
    D = 1000
    lap = [Method("torchderiv.laplacian (exact)", M.td_op("laplacian"), kind="torchderiv", quick_once=True)]
    for est in ("rademacher", "gaussian", "coordinates"):
        lap.append(Method(f"torchderiv.laplacian {est} K={K}", S.td_random("laplacian", est, K),
                          kind="torchderiv", stochastic=True))
    lap.append(Method(f"torchderiv.laplacian rademacher K={K} shared", S.td_random("laplacian", "rademacher", K,
                                                                                  shared=True),
                      kind="torchderiv", stochastic=True))
    lap.append(Method(f"torch.func vmap(jvp(jvp)) Hutchinson K={K}", S.tf_hutchinson_laplacian(K), stochastic=True))
    notes = ["directions are drawn inside every timed call, per sample unless the row says shared; rel RMS err: "
             "sqrt(mean (estimate - exact)^2) / sqrt(mean exact^2) over the repeated calls, against the "
             "float64 exact Laplacian"]
    jet_row = f"jet-for-pytorch randomized Laplacian K={K}"
    if S.jet_available():
        lap.append(Method(jet_row, S.jet_laplacian(K), stochastic=True))
        notes.append(f"jet-for-pytorch {S.jet_version()}: a local peer, per-sample Rademacher directions by "
                     f"vmap(randomness='different') over its per-point laplacian(randomization=('rademacher', {K})); "
                     "on Python 3.11 installed with --ignore-requires-python and one PEP 695 alias patched "
                     "(docs/high_dim.md)")
    else:
        notes.append("jet-for-pytorch: not installed (its 1.0.0 wheel declares Python >= 3.12; a local install "
                     "for comparison is described in docs/high_dim.md); its row and the 1.5x target against it "
                     "are left out")
    rad = f"torchderiv.laplacian rademacher K={K}"
    register(Scenario(
        "laplacian-d1000-random",
        f"randomized Laplacian, {D}->256->256->256->1 tanh, B=128, K={K}, under torch.no_grad",
        _seeded(lambda: Setup(mlp(D, 256, 256, 256, 1), torch.randn(128, D))),
        lap, baseline="torchderiv.laplacian (exact)", reference="torchderiv.laplacian (exact)", no_grad=True,
        op="laplacian", notes=notes,
        targets=[Target(rad, max_fpe=25), Target(rad, min_speedup=10)]
        + ([Target(rad, min_speedup=1.5, versus=jet_row)] if S.jet_available() else [])))

    Dc, H = 256, 512
    div = [
        Method("autograd.grad vjp Hutchinson K=1 (FFJORD)", S.ag_hutchinson_divergence(1), stochastic=True),
        Method("torchderiv.divergence (exact)", M.td_op("divergence"), kind="torchderiv"),
        Method("vmap(jacrev) diagonal", M._diag_of(M.tf_jacobian("jacrev"), True)),
    ]
    for est in ("rademacher", "gaussian", "coordinates"):
        div.append(Method(f"torchderiv.divergence {est} K=1", S.td_random("divergence", est, 1),
                          kind="torchderiv", stochastic=True))
    div.append(Method("torch.func vmap(jvp) Hutchinson K=1", S.tf_hutchinson_divergence(1), stochastic=True))
    register(Scenario(
        "divergence-ffjord",
        f"divergence of a CNF vector field, {Dc}->{H}->{H}->{Dc} softplus, B=256, K=1 (the FFJORD estimator)",
        _seeded(lambda: Setup(S.CNFField(Dc, H), torch.randn(256, Dc))),
        div, baseline="autograd.grad vjp Hutchinson K=1 (FFJORD)", reference="vmap(jacrev) diagonal",
        op="divergence", notes=["directions drawn inside every timed call, per sample; rel RMS err against the "
                                "float64 exact divergence"]))


build_registry()


# ----------------------------------------------------------------------------- user models (--model)


class ModelSpecError(ValueError):
    """A --model / --op string that cannot be used."""


def load_factory(spec: str) -> Callable:
    if spec.count(":") != 1 or not all(spec.split(":")):
        raise ModelSpecError(f"--model must look like MODULE:FACTORY (e.g. my_pkg.nets:make), got {spec!r}")
    mod_name, attr = spec.split(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ModelSpecError(f"--model {spec}: cannot import module {mod_name!r} ({e}); is it on sys.path "
                             f"(run from its directory or set PYTHONPATH)?") from e
    fac = getattr(mod, attr, None)
    if fac is None or not callable(fac):
        raise ModelSpecError(f"--model {spec}: module {mod_name!r} has no callable {attr!r}")
    return fac


def parse_op(op: str) -> tuple[str, list[tuple[int, ...]] | None]:
    base, _, rest = op.partition(":")
    allowed = [o.split(":")[0] for o in M.OPS]
    if base not in allowed:
        raise ModelSpecError(f"--op must be one of {', '.join(M.OPS)}, got {op!r}")
    if base == "partials":
        if not rest:
            raise ModelSpecError("--op partials needs a spec, e.g. partials:0,00,011 for d/dx0, d2/dx0^2, "
                                 "d3/dx0 dx1^2")
        try:
            return base, M.parse_spec(rest)
        except ValueError as e:
            raise ModelSpecError(f"--op {op}: {e}") from e
    if rest:
        raise ModelSpecError(f"--op {base} takes no spec, got {op!r}")
    return base, None


def model_scenario(model: str, op: str, batch: int | None) -> Scenario:
    """A scenario for a user's factory ``MODULE:FACTORY`` returning ``(module, example_input)``."""
    fac = load_factory(model)
    base, spec = parse_op(op)

    def make() -> Setup:
        torch.manual_seed(0)
        try:
            res = fac()
        except Exception as e:  # noqa: BLE001 - the user's code: say where it failed
            raise ModelSpecError(f"--model {model}: the factory raised {type(e).__name__}: {e}") from e
        if not (isinstance(res, tuple) and len(res) == 2 and isinstance(res[1], torch.Tensor)):
            raise ModelSpecError(f"--model {model}: the factory must return (module, example_input), got "
                                 f"{type(res).__name__}")
        f, x = res
        if not callable(f):
            raise ModelSpecError(f"--model {model}: the first returned item must be callable")
        x = x.detach()
        if batch is not None:
            x = x[torch.arange(batch) % x.shape[0]].clone()
        extra = {}
        if spec is not None:
            n = x[0].numel()
            bad = [a for a in spec if any(i >= n for i in a)]
            if bad:
                raise ModelSpecError(f"--op {op}: multi-index {bad[0]} names a coordinate >= {n}, the number "
                                     f"of input coordinates of the example input")
            extra = {"spec": spec, "spec_idx": spec}
        return Setup(f, x, extra)

    make()  # fail early, as a usage error, on a factory or spec that cannot work
    builders, baseline, reference = M.generic_methods(base)
    methods = [Method(name, b, kind="torchderiv" if name.startswith("torchderiv") else "peer")
               for name, b in builders]
    return Scenario(f"model:{model}", f"--model {model} --op {op}" + (f" --batch {batch}" if batch else ""),
                    make, methods, baseline=baseline, reference=reference, op=op,
                    rtol=1e-3 if base in ("jacobian", "jacobian_diagonal", "divergence") else 5e-3)

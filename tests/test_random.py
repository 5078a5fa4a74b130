"""Randomized estimators (issue 14): unbiasedness as statistical tests against the exact operators, the
standard error against the empirical spread, shared and per-sample directions, parameter gradients,
reproducibility, the random-seed graph against torch.func, the cache key, and every bad input.

Statistical tests replicate a few points ``R`` times in one batch: with per-sample directions the rows are
``R`` independent estimates, so one call gives the mean and its standard error. A test fails when the
mean is more than ``Z`` standard errors from the exact value (fixed seeds: deterministic).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import torchderiv
from _harness import sampled
from torchderiv._random import reference_directional

F64 = torch.float64
Z = 4.5


# ----------------------------------------------------------------------------- models


class Residual(nn.Module):
    """Two residual blocks with softplus; ``out`` outputs (``out=None``: the input width, a vector field)."""

    def __init__(self, d: int, out: int | None = 1, h: int = 12):
        super().__init__()
        self.inp = nn.Linear(d, h)
        self.blocks = nn.ModuleList([nn.Linear(h, h) for _ in range(2)])
        self.out = nn.Linear(h, d if out is None else out)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        for b in self.blocks:
            h = h + nn.functional.softplus(b(h))
        return self.out(h)


class ConvNet(nn.Module):
    """Input ``[B, 1, 3, 3]``; scalar output, or a field of the input's shape."""

    def __init__(self, field: bool = False):
        super().__init__()
        self.field = field
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 1, 3, padding=1) if field else None
        self.lin = None if field else nn.Linear(36, 1)

    def forward(self, x):
        h = torch.tanh(self.c1(x))
        if self.field:
            return self.c2(h)
        return self.lin(h.flatten(1))


class Attention(nn.Module):
    """Single-head self-attention over 3 tokens of width 2 (input ``[B, 3, 2]``)."""

    def __init__(self, field: bool = False):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(2, 4), nn.Linear(2, 4), nn.Linear(2, 4)
        self.o = nn.Linear(4, 2 if field else 1)
        self.field = field

    def forward(self, x):
        a = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / 2.0, -1)
        h = torch.tanh(a @ self.v(x))
        y = self.o(h)
        return y if self.field else y.sum(1)


def mlp(d: int, out: int = 1, h: int = 16) -> nn.Module:
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh(), nn.Linear(h, out))


def make(kind: str, field: bool = False):
    """(net, points [3, *in]) in float64, seeded."""
    torch.manual_seed({"mlp": 0, "res": 1, "conv": 2, "attn": 3}[kind])
    g = torch.Generator().manual_seed(10)
    if kind == "mlp":
        net, ins = mlp(4, 4 if field else 2), (4,)
    elif kind == "res":
        net, ins = Residual(4, None if field else 1), (4,)
    elif kind == "conv":
        net, ins = ConvNet(field), (1, 3, 3)
    else:
        net, ins = Attention(field), (3, 2)
    return net.double(), torch.randn(3, *ins, generator=g, dtype=F64)


def replicate(x, R):
    return x.repeat(R, *([1] * (x.dim() - 1)))


def assert_unbiased(est, exact, R, z=Z):
    """``est [R * B, ...]`` independent estimates of ``exact [B, ...]``."""
    e = est.detach().reshape(R, *exact.shape)
    mean, se = e.mean(0), e.std(0) / math.sqrt(R)
    assert bool((se > 0).all()), "an estimator with zero spread: the test would not test anything"
    zs = (mean - exact.detach()).abs() / se
    assert float(zs.max()) < z, f"mean {mean} vs exact {exact} (z = {zs})"


OPS = {
    "laplacian": (torchderiv.laplacian, ("rademacher", "gaussian", "coordinates")),
    "divergence": (torchderiv.divergence, ("rademacher", "gaussian", "coordinates")),
    "biharmonic": (torchderiv.biharmonic, ("gaussian",)),
}
CASES = [(op, est, kind) for op, (_, ests) in OPS.items() for est in ests
         for kind in ("mlp", "res", "conv", "attn") if not (op == "biharmonic" and kind in ("conv", "attn"))]


# ----------------------------------------------------------------------------- unbiasedness


@pytest.mark.parametrize("op,est,kind", sampled(CASES, 3, multi=True))  # fast tier: every third
def test_unbiased(op, est, kind):
    fn = OPS[op][0]
    net, x = make(kind, field=op == "divergence")
    if op == "biharmonic":  # order 4 on a 3-D input: a small net keeps it quick
        torch.manual_seed(5)
        net = (mlp(3, 1, 8) if kind == "mlp" else Residual(3, 1, 6)).double()
        x = x[:, :3]
    exact = fn(net, x)
    R = 300
    g = torch.Generator().manual_seed(7)
    est_ = fn(net, replicate(x, R), estimator=est, samples=2, generator=g)
    assert est_.shape == replicate(exact, R).shape
    assert_unbiased(est_, exact, R)


def test_unbiased_with_dims_and_indefinite_weights():
    net, x = make("mlp")
    C = torch.tensor([[1.0, 0.5, 0.0], [0.5, -2.0, 0.3], [0.0, 0.3, 0.5]], dtype=F64)
    dims = [0, 2, 3]
    exact = torchderiv.laplacian(net, x, dims=dims, weights=C)
    R = 400
    for i, est in enumerate(("rademacher", "gaussian")):
        g = torch.Generator().manual_seed(i)
        assert_unbiased(torchderiv.laplacian(net, replicate(x, R), dims=dims, weights=C, estimator=est, samples=2,
                                             generator=g), exact, R)
    # coordinates of the eigenbasis: 1 of the 2 positive directions, the only negative one always
    g = torch.Generator().manual_seed(3)
    assert_unbiased(torchderiv.laplacian(net, replicate(x, R), dims=dims, weights=C, estimator="coordinates",
                                         samples=1, generator=g), exact, R)
    # dims alone
    exact = torchderiv.laplacian(net, x, dims=[1, 3])
    g = torch.Generator().manual_seed(4)
    assert_unbiased(torchderiv.laplacian(net, replicate(x, R), dims=[1, 3], estimator="gaussian", samples=1,
                                         generator=g), exact, R)


def test_coordinates_with_all_coordinates_is_exact():
    net, x = make("res")
    for est in ("coordinates",):
        r = torchderiv.laplacian(net, x, estimator=est, samples=4, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(r, torchderiv.laplacian(net, x), atol=1e-12, rtol=1e-10)
    fnet, fx = make("res", field=True)
    r, s = torchderiv.divergence(fnet, fx, estimator="coordinates", samples=4, return_stderr=True)
    torch.testing.assert_close(r, torchderiv.divergence(fnet, fx), atol=1e-12, rtol=1e-10)
    assert float(s.abs().max()) == 0.0


# ----------------------------------------------------------------------------- the seed graph vs torch.func


@pytest.mark.parametrize("kind", ["mlp", "conv", "attn"])
def test_user_directions_match_torch_func(kind):
    """The generated graph with dense seeds as an input against nested torch.func.jvp, per sample."""
    net, x = make(kind)
    g = torch.Generator().manual_seed(1)
    V = torch.randn(x.shape[0], 3, *x.shape[1:], generator=g, dtype=F64)  # [B, K, *in]
    ref = reference_directional(net, x, V.movedim(0, 1), 2, True)  # [K, B, *out]
    torch.testing.assert_close(torchderiv.laplacian(net, x, directions=V), ref.mean(0), atol=1e-10, rtol=1e-8)
    Vs = torch.randn(3, *x.shape[1:], generator=g, dtype=F64)  # [K, *in], shared
    ref = reference_directional(net, x, Vs.unsqueeze(1), 2, True)
    est, se = torchderiv.laplacian(net, x, directions=Vs, return_stderr=True)
    torch.testing.assert_close(est, ref.mean(0), atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(se, ref.std(0) / math.sqrt(3), atol=1e-10, rtol=1e-8)


def test_biharmonic_directions_match_torch_func():
    torch.manual_seed(0)
    net = mlp(3, 2, 8).double()
    x = torch.randn(4, 3, dtype=F64)
    V = torch.randn(4, 2, 3, dtype=F64)
    ref = reference_directional(net, x, V.movedim(0, 1), 4, True)
    torch.testing.assert_close(torchderiv.biharmonic(net, x, directions=V), ref.mean(0) / 3, atol=1e-9, rtol=1e-7)


def test_divergence_directions_match_torch_func():
    net, x = make("conv", field=True)
    V = torch.randn(x.shape[0], 2, *x.shape[1:], dtype=F64, generator=torch.Generator().manual_seed(0))
    J = reference_directional(net, x, V.movedim(0, 1), 1, True)  # [K, B, *in]: J v
    ref = (J * V.movedim(0, 1)).flatten(2).sum(-1).mean(0)
    torch.testing.assert_close(torchderiv.divergence(net, x, directions=V), ref, atol=1e-10, rtol=1e-8)


def test_identity_directions_give_the_exact_value():
    net, x = make("attn")
    D = 6
    V = torch.eye(D, dtype=F64).reshape(D, 3, 2) * math.sqrt(D)  # mean_k v_k^T H v_k = tr H
    torch.testing.assert_close(torchderiv.laplacian(net, x, directions=V), torchderiv.laplacian(net, x),
                               atol=1e-10, rtol=1e-8)


# ----------------------------------------------------------------------------- standard error


@pytest.mark.parametrize("op,est", [("laplacian", "rademacher"), ("laplacian", "gaussian"),
                                    ("laplacian", "coordinates"), ("divergence", "gaussian"),
                                    ("divergence", "coordinates"), ("biharmonic", "gaussian")])
def test_stderr_matches_empirical_spread(op, est):
    """E[stderr^2] = Var(estimate) (ddof 1; the finite-population factor 1 - K/D for coordinates):
    the mean reported variance against the variance of independent estimates."""
    fn = OPS[op][0]
    torch.manual_seed(0)
    D = 5
    net = (mlp(D, D if op == "divergence" else 1, 8)).double()
    x = torch.randn(2, D, dtype=F64)
    R = 3000 if op != "biharmonic" else 1500
    g = torch.Generator().manual_seed(11)
    est_, se = fn(net, replicate(x, R), estimator=est, samples=3, generator=g, return_stderr=True)
    assert est_.shape == se.shape
    e = est_.detach().reshape(R, -1)
    var_emp = e.var(0)
    var_rep = (se.detach() ** 2).reshape(R, -1).mean(0)
    ratio = var_rep / var_emp
    # relative sd of a variance estimate from R samples is about sqrt(2 / R) (heavier tails: a wider band)
    assert bool(((ratio - 1).abs() < 0.15).all()), ratio
    # the estimate itself is the same as without the stderr (same directions: same generator state)
    g = torch.Generator().manual_seed(11)
    torch.testing.assert_close(fn(net, replicate(x, R), estimator=est, samples=3, generator=g), est_,
                               atol=1e-10, rtol=1e-8)


def test_stderr_with_indefinite_weights():
    torch.manual_seed(0)
    net = mlp(3, 1, 8).double()
    x = torch.randn(2, 3, dtype=F64)
    C = torch.tensor([[1.0, 0.8, 0.0], [0.8, -1.0, 0.0], [0.0, 0.0, 0.5]], dtype=F64)
    R = 3000
    est_, se = torchderiv.laplacian(net, replicate(x, R), weights=C, estimator="gaussian", samples=2,
                                    generator=torch.Generator().manual_seed(2), return_stderr=True)
    e = est_.reshape(R, -1)
    ratio = (se**2).reshape(R, -1).mean(0) / e.var(0)
    assert bool(((ratio - 1).abs() < 0.15).all()), ratio
    assert_unbiased(est_, torchderiv.laplacian(net, x, weights=C), R)


# ----------------------------------------------------------------------------- shared / per sample


def test_shared_vs_per_sample():
    net, x0 = make("mlp")
    x = replicate(x0[:1], 6)  # six identical rows
    g = torch.Generator().manual_seed(0)
    shared = torchderiv.laplacian(net, x, estimator="rademacher", samples=2, generator=g, shared=True)
    # shared directions: identical rows, identical estimates (to rounding: the rows go through one matmul)
    torch.testing.assert_close(shared, shared[:1].expand_as(shared), atol=1e-14, rtol=1e-12)
    per = torchderiv.laplacian(net, x, estimator="rademacher", samples=2, generator=g)
    spread = (per - per[:1]).abs().max()
    assert float(spread) > 1e-6, "per-sample directions: independent estimates"
    # shared directions are unbiased too (over calls)
    exact = torchderiv.laplacian(net, x0)
    R = 200
    ests = torch.cat([torchderiv.laplacian(net, x0, estimator="gaussian", samples=2, generator=g, shared=True)
                      for _ in range(R)])
    assert_unbiased(ests, exact, R)


def test_shared_directions_equal_user_directions():
    net, x = make("res")
    g = torch.Generator().manual_seed(5)
    a = torchderiv.laplacian(net, x, estimator="gaussian", samples=3, generator=g, shared=True)
    g = torch.Generator().manual_seed(5)
    V = torch.randn((3, 1, 4), generator=g, dtype=F64).squeeze(1)
    torch.testing.assert_close(a, torchderiv.laplacian(net, x, directions=V), atol=1e-12, rtol=1e-10)


# ----------------------------------------------------------------------------- gradients, training


@pytest.mark.parametrize("op", ["laplacian", "divergence"])
def test_parameter_gradients_are_unbiased(op):
    fn = OPS[op][0]
    net, x = make("res", field=op == "divergence")
    params = list(net.parameters())
    def flat(loss):  # one ordinary backward; parameters that the operator does not see get zeros
        gs = torch.autograd.grad(loss, params, allow_unused=True)
        return torch.cat([(torch.zeros_like(p) if t is None else t).reshape(-1) for p, t in zip(params, gs)])

    exact = flat(fn(net, x).sum())
    g = torch.Generator().manual_seed(0)
    M, R = 40, 25
    grads = []
    for _ in range(M):
        loss = fn(net, replicate(x, R), estimator="rademacher", samples=2, generator=g).sum() / R
        grads.append(flat(loss))
    G = torch.stack(grads)
    mean, se = G.mean(0), G.std(0) / math.sqrt(M)
    live = se > 1e-12
    assert int(live.sum()) > exact.numel() // 2
    zs = (mean - exact).abs()[live] / se[live]
    assert float(zs.max()) < 5.0, float(zs.max())


def test_training_steps_with_an_estimate():
    """A PINN-style loss with two independent estimates: one ordinary backward per step, loss falls."""
    torch.manual_seed(0)
    net = mlp(6, 1, 16).double()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 6, generator=g, dtype=F64)
    target = torch.full((64, 1), 6.0, dtype=F64)  # Δu = 6
    losses = []
    for _ in range(40):
        opt.zero_grad()
        e1 = torchderiv.laplacian(net, x, estimator="rademacher", samples=2, generator=g)
        e2 = torchderiv.laplacian(net, x, estimator="rademacher", samples=2, generator=g)
        loss = ((e1 - target) * (e2 - target)).mean()
        loss.backward()
        opt.step()
        losses.append(float(((torchderiv.laplacian(net, x) - target) ** 2).mean()))
    assert losses[-1] < 0.5 * losses[0], losses


# ----------------------------------------------------------------------------- reproducibility, cache


def test_reproducible_with_a_generator():
    net, x = make("conv")
    for op, est in (("laplacian", "coordinates"), ("divergence", "rademacher"), ("biharmonic", "gaussian")):
        fn = OPS[op][0]
        n, xx = (make("conv", field=True) if op == "divergence" else (net, x))
        a = fn(n, xx, estimator=est, samples=2, generator=torch.Generator().manual_seed(3))
        b = fn(n, xx, estimator=est, samples=2, generator=torch.Generator().manual_seed(3))
        c = fn(n, xx, estimator=est, samples=2, generator=torch.Generator().manual_seed(4))
        assert torch.equal(a, b), op
        assert not torch.equal(a, c), op
    # without a generator: the global RNG, reproducible with torch.manual_seed
    torch.manual_seed(9)
    a = torchderiv.laplacian(net, x, estimator="gaussian", samples=2)
    torch.manual_seed(9)
    assert torch.equal(a, torchderiv.laplacian(net, x, estimator="gaussian", samples=2))


def test_cache_never_mixes_exact_and_random():
    torchderiv.clear_cache()
    net, x = make("mlp")
    exact = torchderiv.laplacian(net, x)
    n0 = torchderiv.cache_info()["entries"]
    g = torch.Generator().manual_seed(0)
    r1 = torchderiv.laplacian(net, x, estimator="rademacher", samples=1, generator=g)
    assert not torch.allclose(r1, exact)
    n1 = torchderiv.cache_info()["entries"]
    assert n1 == n0 + 1
    r2 = torchderiv.laplacian(net, x, estimator="rademacher", samples=1, generator=g)  # new draw, same graph
    assert not torch.equal(r1, r2)
    assert torchderiv.cache_info()["entries"] == n1
    torchderiv.laplacian(net, x, estimator="rademacher", samples=1, generator=g, shared=True)  # [K, 1, *in] seeds
    torchderiv.laplacian(net, x, estimator="rademacher", samples=2, generator=g)
    torchderiv.laplacian(net, x, estimator="rademacher", samples=2, generator=g, return_stderr=True)
    assert torchderiv.cache_info()["entries"] == n1 + 3
    torch.testing.assert_close(torchderiv.laplacian(net, x), exact, atol=0, rtol=0)
    # biharmonic exact after a random one
    bx = x[:, :3]
    torch.manual_seed(0)
    bnet = mlp(3, 1, 6).double()
    rb = torchderiv.biharmonic(bnet, bx, estimator="gaussian", samples=1, generator=g)
    eb = torchderiv.biharmonic(bnet, bx)
    assert not torch.allclose(rb, eb)
    torch.testing.assert_close(torchderiv.biharmonic(bnet, bx), eb, atol=0, rtol=0)


def test_untraceable_f_falls_back_to_torch_func():
    net, x = make("mlp")

    def f(z):
        if float(z.sum()) > -1e9:  # data-dependent control flow: not traceable
            return net(z)
        return -net(z)

    V = torch.randn(2, 4, dtype=F64)
    with pytest.warns(UserWarning, match="torch.func"):
        r = torchderiv.laplacian(f, x, directions=V)
    torch.testing.assert_close(r, torchderiv.laplacian(net, x, directions=V), atol=1e-10, rtol=1e-8)


def test_chunk_size_splits_directions():
    net, x = make("res")
    V = torch.randn(5, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    a = torchderiv.laplacian(net, x, directions=V)
    b = torchderiv.laplacian(net, x, directions=V, chunk_size=2)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    a = torchderiv.laplacian(net, x, directions=V, return_stderr=True)
    b = torchderiv.laplacian(net, x, directions=V, return_stderr=True, chunk_size=2)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_unbatched():
    net, x = make("mlp")
    g = torch.Generator().manual_seed(0)
    R = 400
    ests = torch.stack([torchderiv.laplacian(net, x[0], batched=False, estimator="rademacher", samples=2,
                                             generator=g) for _ in range(R)])
    assert ests.shape == (R, 2)
    assert_unbiased(ests, torchderiv.laplacian(net, x[:1])[0], R)


@pytest.mark.slow  # inductor compiles C++ kernels: tens of seconds on 2 cores
def test_torch_compile_with_directions_drawn_outside():
    from torchderiv.bench._peers import compile_available

    if not compile_available():
        pytest.skip("no C++ compiler for inductor on this machine")
    net, x = make("mlp")
    net = net.float()
    x = x.float()
    V = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))

    def loss_fn(x, V):
        return (torchderiv.laplacian(net, x, directions=V) ** 2).mean()

    eager = loss_fn(x, V)
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn)
    torch.testing.assert_close(compiled(x, V), eager, atol=1e-5, rtol=1e-5)
    V2 = torch.randn(4, 4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(compiled(x, V2), loss_fn(x, V2), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- bad input


def _err(match, fn=torchderiv.laplacian, exc=ValueError, **kw):
    net, x = make("mlp", field=fn is torchderiv.divergence)
    with pytest.raises(exc, match=match):
        fn(net, x, **kw)


def test_bad_inputs():
    cpu_gen = torch.Generator()
    _err(r"laplacian: estimator must be None \(exact\) or one of", estimator="hutchinson", samples=2)
    _err(r"divergence: estimator must be", fn=torchderiv.divergence, estimator="normal", samples=2)
    _err(r"needs samples=K", estimator="gaussian")
    _err(r"samples must be an int >= 1", estimator="gaussian", samples=0)
    _err(r"samples must be an int >= 1", estimator="gaussian", samples=2.0)
    _err(r"samples must be an int >= 1", estimator="gaussian", samples=True)
    _err(r"samples given without an estimator", samples=4)
    _err(r"generator given without an estimator", generator=cpu_gen)
    _err(r"return_stderr given without an estimator", return_stderr=True)
    _err(r"shared given without an estimator", shared=True)
    _err(r"draws samples=5 of the D=4 coordinates", estimator="coordinates", samples=5)
    _err(r"draws samples=3 of the D=2 coordinates", estimator="coordinates", samples=3, dims=[0, 1])
    _err(r"draws samples=5 of the D=4", fn=torchderiv.divergence, estimator="coordinates", samples=5)
    _err(r"biharmonic: estimator='rademacher' is not available: only 'gaussian'", fn=torchderiv.biharmonic,
         estimator="rademacher", samples=2)
    _err(r"biharmonic: estimator='coordinates' is not available", fn=torchderiv.biharmonic,
         estimator="coordinates", samples=2)
    _err(r"return_stderr=True needs samples >= 2", estimator="gaussian", samples=1, return_stderr=True)
    _err(r"return_stderr=True needs at least 2 directions", directions=torch.randn(1, 4, dtype=F64),
         return_stderr=True)
    _err(r"directions must have shape \[K, 4\] or \[3, K, 4\]", directions=torch.randn(2, 5, dtype=F64))
    _err(r"directions must have shape", directions=torch.randn(4, 2, 4, dtype=F64))
    _err(r"directions must have shape", fn=torchderiv.divergence, directions=torch.randn(2, 2, 2, dtype=F64))
    _err(r"directions must be a tensor", exc=TypeError, directions=[[1.0, 0, 0, 0]])
    _err(r"directions must be floating point", exc=TypeError, directions=torch.ones(2, 4, dtype=torch.long))
    _err(r"either estimator= .* or directions=", estimator="gaussian", samples=2,
         directions=torch.randn(2, 4, dtype=F64))
    _err(r"samples=3 but directions= holds K=2", samples=3, directions=torch.randn(2, 4, dtype=F64))
    _err(r"dims= and weights= cannot be combined", dims=[0, 1], directions=torch.randn(2, 4, dtype=F64))
    _err(r"method='reverse' cannot be combined", estimator="gaussian", samples=2, method="reverse")
    _err(r"generator must be a torch.Generator", exc=TypeError, estimator="gaussian", samples=2, generator=3)
    _err(r"weights must be symmetric", estimator="gaussian", samples=2, weights=torch.triu(torch.ones(4, 4)))
    _err(r"return_stderr must be True or False", exc=TypeError, estimator="gaussian", samples=2,
         return_stderr="yes")
    net, x = make("mlp")
    with pytest.raises(ValueError, match="shared=True shares directions across the batch, but batched=False"):
        torchderiv.laplacian(net, x[0], batched=False, estimator="gaussian", samples=2, shared=True)
    with pytest.raises(ValueError, match="divergence: needs a map whose per-sample output shape"):
        torchderiv.divergence(net, x, estimator="gaussian", samples=2)


def test_generator_on_the_wrong_device():
    net, x = make("mlp")
    xm = torch.empty(x.shape, dtype=F64, device="meta")  # refused before f runs: any second device type will do
    with pytest.raises(ValueError, match=r"generator is on cpu but x is on meta; create it with "
                                         r"torch.Generator\(device=x.device\)"):
        torchderiv.laplacian(net, xm, estimator="gaussian", samples=2, generator=torch.Generator())
    with pytest.raises(ValueError, match=r"directions are on cpu but x is on meta"):
        torchderiv.laplacian(net, xm, directions=torch.randn(2, 4, dtype=F64))
    if torch.cuda.is_available():
        g = torch.Generator(device="cuda")
        with pytest.raises(ValueError, match=r"generator is on cuda.* but x is on cpu"):
            torchderiv.laplacian(net, x, estimator="gaussian", samples=2, generator=g)


# ----------------------------------------------------------------------------- examples/high_dim_pde.py


def test_high_dim_example_source_and_a_few_steps():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import high_dim_pde as ex

    c = ex.coefficients(7, F64, "cpu")
    x = ex.sample_ball(6, 7, torch.Generator().manual_seed(0), F64, "cpu")
    assert bool((x.norm(dim=1) < 1).all())
    u, g = ex.solution_and_source(x, c)
    # the closed-form source against the exact collapsed Laplacian of the closed-form solution
    lap = torchderiv.laplacian(lambda z: ex.solution_and_source(z, c)[0], x)
    torch.testing.assert_close(lap, g, atol=1e-10, rtol=1e-10)
    n = torch.get_num_threads()
    try:
        r = ex.main(["--dim", "12", "--steps", "300", "--points", "32", "--samples", "4", "--width", "16",
                     "--test-points", "200", "--eval-every", "100", "--lr", "1e-2", "--float64"])
    finally:
        torch.set_num_threads(n)
    assert r["finite"] and r["rel_l2"] < 0.2 * r["rel_l2_init"], r  # it learns (the net starts at zero: 1.0)


# ----------------------------------------------------------------------------- bench rows


def test_bench_stochastic_rows_report_rel_rms(monkeypatch, tmp_path, capsys):
    """A stochastic bench row is not checked to rtol: it gets a relative RMS error over repeated calls,
    and a wrong estimator shows up there (a scaled copy has the scale's error)."""
    import json

    from torchderiv.__main__ import main
    from torchderiv.bench import SCENARIOS, Method, Scenario
    from torchderiv.bench import _methods as M
    from torchderiv.bench import _stochastic as S
    from torchderiv.bench._scenarios import mlp as bench_mlp

    def twice(s):
        r = S.td_random("laplacian", "coordinates", 6)(s)
        return lambda: (2 * r()[0],)

    def make():
        torch.manual_seed(0)
        return M.Setup(bench_mlp(6, 8, 1), torch.randn(8, 6))

    sc = Scenario("tiny-random", "tiny randomized Laplacian", make,
                  [Method("exact", M.td_op("laplacian"), kind="torchderiv"),
                   Method("rademacher K=3", S.td_random("laplacian", "rademacher", 3), stochastic=True),
                   Method("coordinates K=6 (exact)", S.td_random("laplacian", "coordinates", 6), stochastic=True),
                   Method("twice", twice, stochastic=True),
                   Method("vmap(jvp(jvp)) K=3", S.tf_hutchinson_laplacian(3), stochastic=True)],
                  baseline="exact", reference="exact", op="laplacian", hidden=True, error_reps=20)
    monkeypatch.setitem(SCENARIOS, "tiny-random", sc)
    js = tmp_path / "r.json"
    assert main(["bench", "tiny-random", "--quick", "--repeat", "2", "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "rel RMS err" in out
    ms = {m["name"]: m for m in json.loads(js.read_text())["scenarios"][0]["methods"]}
    assert ms["exact"]["rel_rms_err"] < 1e-5 and not ms["exact"]["stochastic"]
    assert ms["coordinates K=6 (exact)"]["rel_rms_err"] < 1e-5  # K = D coordinates: the exact value
    assert abs(ms["twice"]["rel_rms_err"] - 1.0) < 1e-5
    for name in ("rademacher K=3", "vmap(jvp(jvp)) K=3"):
        assert ms[name]["stochastic"] and ms[name]["status"] == "ok"
        assert 1e-4 < ms[name]["rel_rms_err"] < 10


# ----------------------------------------------------------------------------- sparse one-hot seeds


class Ball(nn.Module):
    """``(1 - |x|^2) N(c x)``: the ansatz of examples/high_dim_pde.py (``x * x``, a scaled linear layer)."""

    def __init__(self, d: int, field: bool = False):
        super().__init__()
        self.n = mlp(d, d if field else 1, 8)

    def forward(self, x):
        return (1 - (x * x).sum(-1, keepdim=True)) * self.n(x * 1.7)


@pytest.mark.parametrize("kind", ["ball", "mlp", "res", "conv", "attn"])
def test_coordinate_seeds_match_dense_one_hot_directions(kind):
    """``"coordinates"`` passes its one-hot seeds to the generated graph as int64 coordinates, kept sparse
    where the ops allow (first linear layer, input scaling, ``x * x``, ``sum``) and written out elsewhere:
    the same values as the dense one-hot seeds, at every order, collapsed or per direction, for the
    parameter gradients too."""
    from torchderiv._random import directional, onehot_dense

    if kind == "ball":
        torch.manual_seed(4)
        net, x = Ball(5).double(), torch.randn(3, 5, dtype=F64, generator=torch.Generator().manual_seed(1))
    else:
        net, x = make(kind)
    n = x[0].numel()
    g = torch.Generator().manual_seed(2)
    for lead in (x.shape[0], 1):  # per sample, shared
        idx = torch.rand((lead, n), generator=g).argsort(-1)[:, :3].T.contiguous()  # [K, lead]
        V = onehot_dense(idx, x, True)
        assert V.shape == (3, lead, *x.shape[1:]) and torch.equal(V.flatten(2).sum(-1), torch.ones(3, lead, dtype=F64))
        for order in (1, 2, 4) if kind in ("ball", "mlp") else (1, 2):
            for w in (None, (0.5, -1.0, 2.0)):
                a = directional("laplacian", net, x, idx, order, True, w)
                b = directional("laplacian", net, x, V, order, True, w)
                torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
        ga, gb = (torch.autograd.grad(directional("laplacian", net, x, seeds, 2, True, (1.0, 2.0, 3.0)).sum(),
                                      list(net.parameters()), allow_unused=True) for seeds in (idx, V))
        assert sum(s is not None for s in ga) >= 3
        for s, t in zip(ga, gb):
            assert (s is None) == (t is None)
            if s is not None:
                torch.testing.assert_close(s, t, atol=1e-12, rtol=1e-10)


def test_coordinate_seeds_stay_sparse_in_the_generated_graph():
    """No tensor of the generated graph holds ``K x B x D`` entries: the first layer selects weight rows.
    (Per-direction second-order rows of ``x * x``, ``return_stderr``'s plan, are written out: ``[K, B, D]``.)"""
    from torchderiv._cache import derivative_graph
    from torchderiv._random import _plan

    torch.manual_seed(0)
    D, B, K = 50, 4, 3
    for net, plans in ((Ball(D), [(1.0, 1.0, 1.0)]), (mlp(D, 1, 8), [None, (1.0, 1.0, 1.0)])):
        x = torch.randn(B, D, dtype=F64)
        net = net.double()
        for w in plans:
            e = derivative_graph(net, x, _plan(K, 2, w), list(range(K)), True, "laplacian", outputs=(2,),
                                 seed_shape=(K, B), seed_index=True)
            sizes = [n.meta["val"].numel() for n in e.gm.graph.nodes
                     if isinstance(n.meta.get("val"), torch.Tensor)]
            assert sizes and max(sizes) < K * B * D, max(sizes)
            dense = derivative_graph(net, x, _plan(K, 2, w), list(range(K)), True, "laplacian", outputs=(2,),
                                     seed_shape=(K, B, D))
            assert max(n.meta["val"].numel() for n in dense.gm.graph.nodes
                       if isinstance(n.meta.get("val"), torch.Tensor)) >= K * B * D  # the test can fail


def test_coordinates_divergence_and_unbatched_with_index_seeds():
    net, x = make("res", field=True)
    g = torch.Generator().manual_seed(0)
    est, se = torchderiv.divergence(net, x, estimator="coordinates", samples=2, generator=g, return_stderr=True)
    g = torch.Generator().manual_seed(0)
    idx = torch.rand((x.shape[0], 4), generator=g, dtype=F64).topk(2, largest=False).indices  # the same draw
    V = torch.zeros(x.shape[0], 2, 4, dtype=F64).scatter_(2, idx.unsqueeze(-1), 2.0)  # sqrt(D) e_i
    torch.testing.assert_close(est, torchderiv.divergence(net, x, directions=V), atol=1e-12, rtol=1e-10)
    R = 400
    net1, x1 = make("mlp")
    exact = torchderiv.laplacian(net1, x1[:1])[0]
    ests = torch.stack([torchderiv.laplacian(net1, x1[0], batched=False, estimator="coordinates", samples=2,
                                             generator=g) for _ in range(R)])
    assert_unbiased(ests, exact, R)


# ----------------------------------------------------------------------------- jet-for-pytorch peer row


def test_jet_row_left_out_with_a_note_when_jet_is_absent(monkeypatch):
    """jet-for-pytorch is a local peer only (never a dependency): without it, the scenario has no jet row and
    no target against it, and says so; its builder refuses cleanly."""
    from torchderiv.bench import SCENARIOS
    from torchderiv.bench import _scenarios as SC
    from torchderiv.bench import _stochastic as S
    from torchderiv.bench._methods import MethodUnavailable, Setup

    for name in ("laplacian-d1000-random", "divergence-ffjord"):
        monkeypatch.setitem(SCENARIOS, name, SCENARIOS[name])  # restored after the test
    monkeypatch.setattr(S, "jet_available", lambda: False)
    SC._random_scenarios()
    sc = SCENARIOS["laplacian-d1000-random"]
    assert not any("jet-for-pytorch" in m.name for m in sc.methods)
    assert not any(t.versus and "jet" in t.versus for t in sc.targets)
    assert any("jet-for-pytorch: not installed" in n for n in sc.notes)
    with pytest.raises(MethodUnavailable, match="not installed"):
        S.jet_laplacian(4)(Setup(mlp(3), torch.randn(2, 3)))


def test_jet_row_agrees_with_the_exact_laplacian_when_installed():
    """Where jet-for-pytorch is installed (a local comparison, see docs/high_dim.md), its randomized Laplacian
    row (per-sample Rademacher directions via vmap) is an unbiased estimate with independent rows."""
    pytest.importorskip("jet", reason="jet-for-pytorch is an optional local benchmark peer")
    from torchderiv.bench import _stochastic as S
    from torchderiv.bench._methods import Setup

    net, x = make("mlp")  # tanh: jet 1.0.0 has no rule for softplus
    exact = torchderiv.laplacian(net, x)
    R = 200
    torch.manual_seed(0)
    run = S.jet_laplacian(2)(Setup(net, replicate(x, R)))
    with torch.no_grad():
        est = run()[0]
    assert est.shape == replicate(exact, R).shape
    assert_unbiased(est, exact, R)

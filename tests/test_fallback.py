"""The torch.func fallback (``torchderiv._fallback``): only the requested partials, nested directional
derivatives, chunked under a memory budget. Float64 against independent references (nested ``jacrev`` /
nested ``autograd.grad`` on reference twins, written-out formulas, finite differences)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jacrev

import torchderiv as td
import torchderiv._cache as cache
from conftest import ZOO_BY_NAME, assert_close, ref_biharmonic, ref_laplacian, ref_partials
from test_zoo import mixed_spec
from torchderiv._fallback import _chunks, _Runner, fallback_partials
from torchderiv._requests import biharmonic_directions

DT = torch.float64
MODELS = ["tanh_mlp", "attention", "conv1d", "conv2d", "residual_layernorm", "multi_output"]


def _x(*shape, seed=0):
    return torch.randn(*shape, dtype=DT, generator=torch.Generator().manual_seed(seed))


def _check(fname, model, ref, x, spec, combos, ref_combos, **kw):
    y, parts, sums = fallback_partials(fname, model, x, spec, combos, True, **kw)
    expected = ref_partials(ref, x, spec)
    assert_close(y, ref(x).detach(), msg=f"{fname} value")
    assert parts.shape == (len(spec), *y.shape)
    for i, key in enumerate(spec):
        assert_close(parts[i].detach(), expected[key], msg=f"{fname} partial {key}")
    for c, r in enumerate(ref_combos):
        assert_close(sums[c].detach(), r, msg=f"{fname} combo {c}")


@pytest.mark.parametrize("name", MODELS)
def test_partials_and_collapsed_combos(name):
    """Orders 0-4, repeated and mixed coordinates; a Laplacian over some dims and a weighted mixed combo."""
    case = ZOO_BY_NAME[name]
    model, ref, x = case.build()
    spec = mixed_spec(case.n)
    dims = case.dims
    a, b = dims[0], dims[-1]
    combos = [[((i, i), 1.0) for i in dims], [((a, b), 2.5), ((b, b, b), -0.5), ((), 3.0)]]
    P = ref_partials(ref, x, [(a, b), (b, b, b)])
    refs = [ref_laplacian(ref, x, dims=dims), 2.5 * P[(a, b)] - 0.5 * P[(b, b, b)] + 3.0 * ref(x).detach()]
    _check(name, model, ref, x, spec, combos, refs)


@pytest.mark.parametrize("name", ["tanh_mlp", "conv2d", "residual_layernorm"])
def test_biharmonic_along_directions(name):
    """Univariate Taylor requests: fourth derivatives along the sparse directions e_i +- e_j, collapsed."""
    case = ZOO_BY_NAME[name]
    model, ref, x = case.build()
    dims = case.dims
    directions, combo = biharmonic_directions(dims)
    y, parts, sums = fallback_partials("biharmonic", model, x, [(0, 0), ()], [combo], True, directions=directions)
    assert_close(sums[0].detach(), ref_biharmonic(ref, x, dims=dims))
    # items index the directions too: (0, 0) is the second derivative along directions[0]
    i = directions[0][0][0]
    assert_close(parts[0].detach(), ref_partials(ref, x, [(i, i)])[(i, i)])
    assert_close(parts[1], y)


def test_unbatched_point():
    """batched=False: x is one point (several dims), orders 1-3 against nested jacrev of f itself."""
    W = _x(4, 6, seed=1)

    def f(X):  # [2, 3] -> [4], mixing every entry
        return torch.tanh(W @ X.reshape(-1)) * X.sum()

    X = _x(2, 3, seed=2)
    spec = [(), (1,), (0, 5), (2, 2), (1, 3, 4)]
    y, parts, sums = fallback_partials("partials", f, X, spec, [[((0, 0), 1.0), ((4, 4), 2.0)]], False)
    J3 = jacrev(jacrev(jacrev(f)))(X).reshape(4, 6, 6, 6)
    J2 = jacrev(jacrev(f))(X).reshape(4, 6, 6)
    J1 = jacrev(f)(X).reshape(4, 6)
    assert_close(y, f(X))
    assert_close(parts[1], J1[:, 1])
    assert_close(parts[2], J2[:, 0, 5])
    assert_close(parts[3], J2[:, 2, 2])
    assert_close(parts[4], J3[:, 1, 3, 4])
    assert_close(sums[0], J2[:, 0, 0] + 2 * J2[:, 4, 4])


def _branchy(x):
    # data-dependent control flow, decided per sample: vmap cannot run it, make_fx cannot trace it
    if x[0, 0] > 0:
        return torch.sin(x) * x.sum(-1, keepdim=True)
    return torch.cos(2 * x) + x[:, :1] ** 3


def _branch_ref(x):
    pos = (x[:, :1] > 0).to(x.dtype)
    return pos * torch.sin(x) * x.sum(-1, keepdim=True) + (1 - pos) * (torch.cos(2 * x) + x[:, :1] ** 3)


def test_untraceable_f_per_sample_branches():
    """Rows take different branches: the fallback loops over samples and stays exact, orders 1-4."""
    x = _x(4, 3, seed=3)
    assert (x[:, 0] > 0).any() and (x[:, 0] <= 0).any()
    spec = [(), (1,), (0, 2), (0, 0, 0), (0, 1, 2), (1, 1, 2, 2), (0, 0, 0, 0)]
    with pytest.warns(UserWarning, match="could not be traced"):
        got = td.partials(lambda x: _branchy(x), x, spec)
    expected = ref_partials(_branch_ref, x, spec)
    for key in spec:
        assert_close(got[key], expected[key], msg=str(key))
    with pytest.warns(UserWarning, match="could not be traced"):
        lap = td.laplacian(lambda x: _branchy(x), x, dims=[0, 2], weights=[[1.0, 0.5], [0.5, 3.0]])
    assert_close(lap, ref_laplacian(_branch_ref, x, [0, 2], [[1.0, 0.5], [0.5, 3.0]]))
    with pytest.warns(UserWarning, match="could not be traced"):
        bih = td.biharmonic(lambda x: _branchy(x), x)
    assert_close(bih, ref_biharmonic(_branch_ref, x))


# ----------------------------------------------------------------------------- ops torch gets wrong


def _fd_second(f, x, i, j, h=1e-4):
    """d2 f / dx_i dx_j per sample by central differences of the (correct) first derivative by autograd."""
    def grad_i(z):
        z = z.detach().requires_grad_(True)
        return torch.autograd.grad(f(z).sum(), z)[0][:, i]

    e = torch.zeros_like(x)
    e[:, j] = h
    return (grad_i(x + e) - grad_i(x - e)) / (2 * h)


NORMS = {
    "layer_norm": lambda: nn.Sequential(nn.Linear(3, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 1)),
    "functional_layer_norm": lambda: _Lambda(lambda h: torch.tanh(torch.layer_norm(h, (6,), None, None, 1e-5))
                                             .sum(-1, keepdim=True)),
    "instance_norm": lambda: nn.Sequential(nn.Linear(3, 6), nn.Unflatten(-1, (2, 3)), nn.InstanceNorm1d(2, affine=True),
                                           nn.Tanh(), nn.Flatten(), nn.Linear(6, 1)),
    "batch_norm_batch_stats": lambda: nn.Sequential(nn.Linear(3, 6), nn.Unflatten(-1, (2, 3)),
                                                    _Lambda(lambda h: F.batch_norm(h, None, None, training=True),
                                                            nn.Identity()),
                                                    nn.Tanh(), nn.Flatten(), nn.Linear(6, 1)),
}


class _Lambda(nn.Module):
    def __init__(self, fn, pre=None):
        super().__init__()
        self.fn, self.pre = fn, pre or nn.Linear(3, 6)

    def forward(self, x):
        return self.fn(self.pre(x))


@pytest.mark.parametrize("name", list(NORMS))
def test_normalizations_against_finite_differences(name):
    """torch's forward-over-forward derivative of layer_norm and of batch-statistics batch_norm is wrong at
    order 2 (torch 2.13): the fallback writes them out. Second derivatives against finite differences of the
    first derivative, third against finite differences of the second."""
    torch.manual_seed(5)
    net = NORMS[name]().to(DT)
    x = _x(3, 3, seed=4)
    keys = [(0, 0), (0, 2), (1, 2), (0, 1, 2)]
    _, parts, _ = fallback_partials("partials", net, x, keys, [], True)
    per_sample = lambda z: torch.cat([net(z[b : b + 1]) for b in range(z.shape[0])])  # noqa: E731
    for k, (i, j) in enumerate(keys[:3]):
        assert_close(parts[k, :, 0].detach(), _fd_second(per_sample, x, i, j), atol=1e-6, rtol=1e-5,
                     msg=f"{name} {i, j}")
    h = 1e-3
    e = torch.zeros_like(x)
    e[:, 2] = h
    _, p2, _ = fallback_partials("partials", net, torch.cat([x + e, x - e]), [(0, 1)], [], True)
    fd3 = (p2[0, :3] - p2[0, 3:]) / (2 * h)
    assert_close(parts[3].detach(), fd3.detach(), atol=1e-5, rtol=1e-4, msg=f"{name} third")


def test_cdist_without_forward_derivative():
    """torch's cdist has no forward derivative: written out (as the capture does), orders 1-3."""
    P = _x(5, 3, seed=6)

    def f(x):
        return torch.exp(-torch.cdist(x, P) ** 2).sum(-1, keepdim=True) + torch.cdist(x, P, p=1.5)[:, :1]

    def twin(x):
        d = x.unsqueeze(-2) - P
        return (torch.exp(-(d * d).sum(-1)).sum(-1, keepdim=True)
                + (d.abs() ** 1.5).sum(-1)[:, :1] ** (1 / 1.5))

    x = _x(3, 3, seed=7)
    spec = [(0,), (0, 1), (2, 2), (0, 1, 2)]
    _, parts, _ = fallback_partials("partials", f, x, spec, [], True)
    expected = ref_partials(twin, x, spec)
    for i, key in enumerate(spec):
        assert_close(parts[i], expected[key], msg=str(key))


class _Volume(nn.Module):
    """Trilinear features of a 3-D volume (grid_sampler_3d: no forward-mode derivative in torch)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("vol", torch.randn(1, 2, 5, 5, 5, dtype=DT, generator=torch.Generator().manual_seed(8)))
        self.out = nn.Linear(2, 2).to(DT)

    def forward(self, x):  # [B, 3]
        feat = F.grid_sample(self.vol, torch.tanh(x).view(1, -1, 1, 1, 3), align_corners=True)
        return self.out(torch.sin(feat.reshape(2, -1).t()))


def test_op_without_forward_derivative_uses_reverse_nesting():
    net = _Volume()
    x = _x(4, 3, seed=9) * 0.5
    spec = [(), (0,), (2,), (0, 1), (2, 2), (0, 1, 2)]
    with pytest.raises(NotImplementedError, match="forward AD"):  # what the forward nesting meets
        torch.func.jvp(net, (x,), (torch.ones_like(x),))
    y, parts, sums = fallback_partials("partials", net, x, spec, [[((i, i), 1.0) for i in range(3)]], True)

    def ref(i, j=None, k=None):  # per-sample nested autograd, one sample at a time
        out = []
        for b in range(x.shape[0]):
            z = x[b : b + 1].detach().requires_grad_(True)
            rows = []
            for o in range(2):
                d = net(z)[0, o]
                for c in [c for c in (i, j, k) if c is not None]:
                    d = torch.autograd.grad(d, z, create_graph=True)[0][0, c]
                rows.append(d)
            out.append(torch.stack(rows))
        return torch.stack(out).detach()

    assert_close(y.detach(), net(x).detach())
    for p, key in enumerate(spec[1:], 1):
        assert_close(parts[p].detach(), ref(*key), msg=str(key))
    assert_close(sums[0].detach(), ref(0, 0) + ref(1, 1) + ref(2, 2))


# ----------------------------------------------------------------------------- chunking and memory


def test_chunks_cover_every_key_once():
    keys = sorted(itertools.combinations_with_replacement(range(12), 2))
    for size in (1, 5, 16, 40, 1000):
        chunks = _chunks(keys, size)
        assert sorted(a for c in chunks for a in c) == keys
        assert all(0 < len(c) <= size for c in chunks)
    # a small chunk size: groups that share their prefix, large enough, get chunks of their own
    chunks = _chunks(keys, 16)
    assert [(0, j) for j in range(12)] in chunks
    assert any(len({a[0] for a in c}) > 1 for c in chunks)  # the small groups go together


def test_memory_budget_bounds_the_chunks_and_keeps_the_result():
    case = ZOO_BY_NAME["attention"]
    model, ref, x = case.build()
    spec = [(0, 0), (0, 1), (0, 2), (3, 4), (0, 1, 2), (1, 1, 2, 2), (8, 8, 8, 8)]
    combos = [[((i, i), 1.0) for i in range(9)]]
    y0, p0, s0 = fallback_partials("partials", model, x, spec, combos, True)
    runner = _Runner("partials", model, x, True, None, 4096)
    cost = runner._unit_cost(4)
    assert cost >= 2**4 * x[0].numel() * 8  # at least the 16 nested copies of x itself
    assert runner._sizes(4, 9) == (max(1, 4096 // cost), 1)  # samples chunked too, one direction at a time
    big = _Runner("partials", model, x, True, None, 1 << 30)
    assert big._sizes(2, 9) == (x.shape[0], 9)
    y1, p1, s1 = fallback_partials("partials", model, x, spec, combos, True, memory_budget=4096)
    assert_close(p1.detach(), p0.detach())
    assert_close(s1.detach(), s0.detach())
    assert_close(s0[0].detach(), ref_laplacian(ref, x))
    y2, p2, s2 = fallback_partials("partials", model, x, spec, combos, True, chunk_size=2)
    assert _Runner("partials", model, x, True, None, 1 << 30, 2)._sizes(2, 9) == (x.shape[0], 2)
    assert_close(p2.detach(), p0.detach())
    assert_close(s2.detach(), s0.detach())
    with pytest.raises(ValueError, match="memory_budget"):
        fallback_partials("partials", model, x, spec, combos, True, memory_budget=0)


def test_parameter_gradients_through_the_fallback():
    """The fallback's result is differentiable w.r.t. the parameters, as the engine's is."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1)).to(DT)
    x = _x(5, 2, seed=10)
    _, _, sums = fallback_partials("laplacian", net, x, [], [[((0, 0), 1.0), ((1, 1), 1.0)]], True)
    params = list(net.parameters())
    g_fb = torch.autograd.grad(sums[0].square().sum(), params, allow_unused=True, materialize_grads=True)
    g_engine = torch.autograd.grad(td.laplacian(net, x).square().sum(), params, allow_unused=True,
                                   materialize_grads=True)
    assert g_fb[0].abs().max() > 0
    for a, b in zip(g_fb, g_engine):
        assert_close(a, b)


_MEMORY_SCRIPT = textwrap.dedent("""
    import itertools, json, warnings
    import torch, torchderiv as td, torchderiv._cache as cache
    from conftest import ZOO_BY_NAME, ref_partials_autograd

    def refuse(f, x):
        raise td.TraceError("capture disabled")

    cache.capture = refuse
    model, ref, x = ZOO_BY_NAME["attention"].build()
    spec = list(itertools.combinations_with_replacement(range(9), 4))  # every fourth-order partial: 495
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = td.partials(model, x, spec)
    # VmHWM: this process image's peak resident set, in KiB. Not ru_maxrss: that one survives exec and
    # starts from the pytest worker's own peak at the fork (4 GiB late in a full test run)
    peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    some = spec[::50]
    expected = ref_partials_autograd(ref, x, some)
    err = max(float((got[k] - expected[k]).abs().max()) for k in some)
    print(json.dumps({"peak_kib": peak, "err": err, "n": len(got),
                      "fell_back": any("could not be traced" in str(m.message) for m in w)}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status (Linux)")
def test_attention_order4_through_the_fallback_stays_under_2GiB():
    """Every fourth-order partial of the attention zoo model with capture disabled (the old fallback built
    whole derivative tensors and went past 24 GiB): peak resident memory of the process under 2 GiB."""
    here = os.path.dirname(__file__)
    # a fresh interpreter that sees only the tests and the installed package: nothing the pytest worker
    # loaded or put on its sys.path
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "PYTHON"))}
    env.update(PYTHONPATH=here, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, env=env,
                       timeout=600, cwd=here)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["fell_back"] and out["n"] == 495
    assert out["err"] < 1e-8
    assert out["peak_kib"] < 2 * 1024 * 1024, f"peak {out['peak_kib'] / 2**20:.2f} GiB"


def test_capture_disabled_is_what_the_memory_test_measures(monkeypatch):
    """The patch of the memory test does send a traceable model through the fallback."""
    def refuse(f, x):
        raise td.TraceError("capture disabled")

    monkeypatch.setattr(cache, "capture", refuse)
    model, ref, x = ZOO_BY_NAME["tanh_mlp"].build()  # a shared model: earlier tests may have cached its trace
    td.clear_cache()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = td.partials(model, x, [(0, 1)])
    assert any("could not be traced" in str(m.message) for m in w)
    assert_close(got[(0, 1)], ref_partials(ref, x, [(0, 1)])[(0, 1)])


def test_docstring_example_runs():
    import doctest

    import torchderiv._fallback as module

    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 1 and result.failed == 0


def test_scalar_samples_and_a_scalar_point():
    """x of shape [B] (one scalar per sample) and a 0-d point with batched=False, orders 1-4."""
    def f(x):
        return torch.sin(x) * x

    x = torch.linspace(0.1, 1.0, 5, dtype=DT)
    s, c = torch.sin(x), torch.cos(x)
    d = [s * x, c * x + s, -s * x + 2 * c, -c * x - 3 * s, s * x - 4 * c]
    y, parts, _ = fallback_partials("partials", f, x, [(), (0,), (0, 0), (0, 0, 0), (0, 0, 0, 0)], [], True)
    for k in range(5):
        assert_close(parts[k], d[k], msg=str(k))
    p = torch.tensor(0.7, dtype=DT)
    _, parts, sums = fallback_partials("partials", f, p, [(0, 0, 0)], [[((0, 0), 2.0)]], False)
    s, c = torch.sin(p), torch.cos(p)
    assert_close(parts[0], -c * p - 3 * s)
    assert_close(sums[0], 2 * (-s * p + 2 * c))


def test_fused_attention_is_written_out():
    """nn.MultiheadAttention / scaled_dot_product_attention run torch's fused CPU kernel, whose backward has no
    derivative (forward mode needs one): written out, against a hand-written twin, orders 1-3."""
    from test_zoo_unseen import TorchMHA

    torch.manual_seed(11)
    mha = TorchMHA().to(DT).eval()
    x = _x(2, 2, 4, seed=12)
    spec = [(0,), (1, 6), (2, 2), (0, 3, 7)]
    _, parts, _ = fallback_partials("partials", mha, x, spec, [], True)
    expected = ref_partials(mha.reference, x, spec)
    for i, key in enumerate(spec):
        assert_close(parts[i].detach(), expected[key], msg=f"mha {key}")

    def sdpa(z):  # [B, 6] -> [B, 2, 3] as queries, keys and values of one causal attention
        q = z.reshape(-1, 2, 3)
        return F.scaled_dot_product_attention(q, 0.5 * q, torch.tanh(q), is_causal=True)

    def twin(z):
        q = z.reshape(-1, 2, 3)
        s = (q @ (0.5 * q).transpose(-2, -1)) / 3**0.5
        s = s.masked_fill(~torch.ones(2, 2, dtype=torch.bool).tril(), float("-inf"))
        return torch.softmax(s, -1) @ torch.tanh(q)

    z = _x(3, 6, seed=13)
    spec = [(0,), (1, 5), (2, 2), (0, 3, 4)]
    _, parts, _ = fallback_partials("partials", sdpa, z, spec, [], True)
    expected = ref_partials(twin, z, spec)
    for i, key in enumerate(spec):
        assert_close(parts[i], expected[key], msg=f"sdpa {key}")


def test_expanded_x_and_an_f_that_runs_autograd_inside():
    """An expanded x cannot carry a tangent (made contiguous); an f calling torch.autograd.grad on an x it
    makes require grad cannot run under forward mode (switched to reverse nesting)."""
    torch.manual_seed(14)
    energy = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 1)).to(DT)

    def field(x):  # the symplectic field (dH/dp, -dH/dq)
        with torch.enable_grad():
            x = x if x.requires_grad else x.requires_grad_(True)
            g = torch.autograd.grad(energy(x).sum(), x, create_graph=True)[0]
        return torch.stack([g[:, 1], -g[:, 0]], -1)

    x = _x(3, 1, seed=15).expand(3, 2)
    spec = [(), (0,), (1,), (0, 1), (1, 1)]
    y, parts, _ = fallback_partials("partials", field, x, spec, [], True)

    def twin(z):  # the same field by torch.func, no autograd inside
        return torch.func.vmap(torch.func.grad(lambda zi: energy(zi[None])[0, 0]))(z) @ torch.tensor(
            [[0.0, -1.0], [1.0, 0.0]], dtype=DT)

    expected = ref_partials(twin, x.contiguous(), spec)
    for i, key in enumerate(spec):
        assert_close(parts[i].detach(), expected[key], msg=str(key))


def test_random_directions_fallback_through_layer_norm():
    """The estimators' own torch.func fallback (nested jvp along user directions) runs under the same
    written-out layer_norm: against the engine on the traceable twin."""
    torch.manual_seed(16)
    net = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 1)).to(DT)

    def f(z):
        if float(z.sum()) > -1e9:  # data-dependent control flow: not traceable
            return net(z)
        return -net(z)

    x = _x(3, 4, seed=17)
    V = _x(2, 4, seed=18)
    with pytest.warns(UserWarning, match="could not be traced"):
        r = td.laplacian(f, x, directions=V)
    assert_close(r, td.laplacian(net, x, directions=V))

"""torch.compile of losses that call torchderiv (_compile.py): many model families, closures and batch sizes in
one process, caches filled and emptied in between; values and parameter gradients against eager; a bounded
number of compilations (torch._dynamo counters); no recompile-limit warning; no guard on torchderiv's caches."""

from __future__ import annotations

import gc
import logging
import warnings

import pytest
import torch
from torch import nn

import torchderiv as td
from conftest import DTYPE, ZOO_BY_NAME, assert_close, mlp

BATCHES = (4, 7, 11)


def _w(r):
    """Fixed weights for a result: a loss that is not symmetric in the entries."""
    return torch.cos(1.7 * torch.arange(r[0].numel(), dtype=r.dtype)).reshape(r.shape[1:])


# each: (zoo model or factory, loss of (f, x)); every operator appears
FAMILIES = {
    "tanh_mlp/laplacian": ("tanh_mlp", lambda f, x: (td.laplacian(f, x) * _w(td.laplacian(f, x))).square().mean()),
    "siren/partials": ("siren", lambda f, x: _burgers(f, x)),
    "gelu_mlp/jacobian": ("gelu_mlp", lambda f, x: (td.jacobian(f, x) * _w(td.jacobian(f, x))).sum().square()),
    "silu_softplus/hessian": ("silu_softplus_mlp", lambda f, x: td.hessian(f, x).square().mean()),
    "residual_layernorm/hessian_diagonal": ("residual_layernorm",
                                            lambda f, x: td.hessian_diagonal(f, x).square().mean()),
    "fourier/biharmonic": ("fourier_features", lambda f, x: td.biharmonic(f, x).square().mean()),
    "multi_output/laplacian_weights": ("multi_output", lambda f, x: td.laplacian(
        f, x, weights=[[2.0, 0.5], [0.5, 1.0]]).square().mean()),
    "pointwise/divergence": ("pointwise", lambda f, x: td.divergence(f, x).square().mean()),
    "sigmoid_exp_sqrt/partials": ("sigmoid_exp_sqrt",
                                           lambda f, x: td.partials(f, x, [(0,), (1, 2)])[(1, 2)].square().mean()),
    "conv1d/laplacian_dims": ("conv1d", lambda f, x: td.laplacian(f, x, dims=[1, 6]).square().mean()),
    "rational_log/hessian": ("rational_log", lambda f, x: td.hessian(f, x).square().mean()),
    "pointwise/jacobian_diagonal": ("pointwise", lambda f, x: td.jacobian_diagonal(f, x).square().mean()),
}
# graphs whose every op has a shape-generic vmap batching rule: the batch dimension stays dynamic after the
# first change; the others (cat, convolution: functorch's batching rules specialize the batch size) compile
# once per batch size
DYNAMIC = {"tanh_mlp/laplacian", "siren/partials", "multi_output/laplacian_weights",
           "residual_layernorm/hessian_diagonal", "pointwise/divergence", "pointwise/jacobian_diagonal"}


def _burgers(f, x):
    d = td.partials(f, x, ["", "t", "x", "xx"], coords="tx")
    return (d["t"] + d[""] * d["x"] - 0.05 * d["xx"]).square().mean()


def _model(name):
    model, _, _ = ZOO_BY_NAME[name].build()
    return model


def _x(name, B, seed):
    g = torch.Generator().manual_seed(seed)
    return 0.8 * torch.randn(B, *ZOO_BY_NAME[name].in_shape, dtype=DTYPE, generator=g)


def _grads(loss, params):
    return loss, (torch.autograd.grad(loss, params, materialize_grads=True) if params else ())


def _check_family(fname, name, loss_of, backend="aot_eager"):
    model = _model(name)
    params = list(model.parameters())

    def loss(x):
        return loss_of(model, x)

    compiled = torch.compile(loss, backend=backend, fullgraph=True)
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for i, B in enumerate(BATCHES):
        x = _x(name, B, 100 + i)
        lc, gc_ = _grads(compiled(x), params)
        le, ge = _grads(loss(x), params)
        assert_close(lc, le, msg=f"{fname} B={B} loss")
        for a, b in zip(gc_, ge):
            assert_close(a, b, msg=f"{fname} B={B} dtheta")
        td.clear_cache()  # the compiled graph must not depend on torchderiv's caches (nor guard on them)
        gc.collect()
    # one graph for the first batch size, one (dynamic batch) after the first change, none after that
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - before
    assert graphs <= (2 if fname in DYNAMIC and backend == "aot_eager" else len(BATCHES)), (fname, graphs)


@pytest.fixture
def no_recompile_limit(caplog):
    torch._dynamo.reset()
    with caplog.at_level(logging.WARNING):
        yield
    torch._dynamo.reset()
    bad = [r.getMessage() for r in caplog.records if "recompile" in r.getMessage().lower()
           or "cache_size_limit" in r.getMessage()]
    assert not bad, bad


def test_many_families_one_process(no_recompile_limit):
    """Ten model families, every operator, three batch sizes each, in one process: aot_eager, fullgraph."""
    for fname, (name, loss_of) in FAMILIES.items():
        torch._dynamo.reset()  # dynamo's own per-code-object limit is not torchderiv's to spend
        _check_family(fname, name, loss_of)


def test_two_models_without_reset(no_recompile_limit):
    """Two models, one compiled loss each, interleaved, caches emptied in between: at most two graphs each."""
    a, b = mlp([2, 10, 10, 1], nn.Tanh).to(DTYPE), mlp([2, 12, 3], nn.Softplus).to(DTYPE)

    def la(x):
        return td.laplacian(a, x).square().mean()

    def lb(x):
        return _burgers(b, x)

    ca, cb = torch.compile(la, backend="aot_eager", fullgraph=True), torch.compile(lb, backend="aot_eager",
                                                                                   fullgraph=True)
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for rnd in range(2):
        for B in BATCHES:
            x = _x("siren", B, 7 * B + rnd)
            for c, e in ((ca, la), (cb, lb)):
                assert_close(c(x), e(x))
            td.clear_cache()
            gc.collect()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before <= 4


def test_one_loss_code_over_nets_of_other_input_sizes(no_recompile_limit):
    """One loss function (a closure factory: one code object) compiled for nets of input sizes 2, 2, 4, 3 in
    one process, no reset: after the first recompile dynamo's automatic dynamic shapes makes x's feature
    dimension symbolic; torchderiv must still plan with constants (fullgraph, no graph break)."""
    def make(din, seed):
        torch.manual_seed(seed)
        net = mlp([din, 9, 9, 1], nn.Tanh).to(DTYPE)

        def loss(x):
            return (td.laplacian(net, x) + td.partials(net, x, [(0,), (0, 0)])[(0, 0)]).square().mean()

        return loss

    for i, (din, B) in enumerate([(2, 5), (2, 6), (4, 7), (3, 5), (4, 9)]):
        loss = make(din, i)
        x = torch.randn(B, din, dtype=DTYPE, generator=torch.Generator().manual_seed(i))
        assert_close(torch.compile(loss, backend="aot_eager", fullgraph=True)(x), loss(x))


def test_closures_and_bound_methods(no_recompile_limit):
    torch.manual_seed(0)
    net = mlp([2, 8, 1], nn.Tanh).to(DTYPE)
    W = torch.randn(2, 6, dtype=DTYPE, requires_grad=True)

    class Field:
        def __init__(self):
            self.net = mlp([2, 8, 2], nn.SiLU).to(DTYPE)

        def u(self, x):
            return self.net(x) * x[:, :1]

    field = Field()

    def closure(x):
        return torch.sin(x @ W).sum(-1, keepdim=True) + net(x)

    def loss(x):
        return (td.laplacian(closure, x).square().mean() + td.jacobian(field.net, x).square().mean()
                + td.laplacian(field.u, x).square().mean())

    params = [W, *net.parameters(), *field.net.parameters()]
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    for B in BATCHES:
        x = _x("siren", B, B)
        lc, gc_ = _grads(compiled(x), params)
        le, ge = _grads(loss(x), params)
        assert_close(lc, le)
        for p, q in zip(gc_, ge):
            assert_close(p, q)


def test_parameter_updates_and_mode_are_seen(no_recompile_limit):
    model = _model("gelu_mlp")

    def loss(x):
        return td.laplacian(model, x).sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    x = _x("gelu_mlp", 5, 1)
    assert_close(compiled(x), loss(x))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.3)  # an optimizer step: in place
    assert_close(compiled(x), loss(x))


def test_batch_mixing_model_still_refused(no_recompile_limit):
    net = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).to(DTYPE).train()
    with pytest.raises(Exception, match="rows"):
        torch.compile(lambda x: td.laplacian(net, x).sum(), backend="aot_eager", fullgraph=True)(_x("siren", 5, 0))


def test_untraceable_f_graph_breaks(no_recompile_limit):
    """An f the engine cannot trace runs eagerly (torch.func fallback) through a graph break: correct."""
    def f(x):
        if float(x.sum()) > 1e9:
            return x
        return torch.sin(x).sum(-1, keepdim=True)

    x = _x("siren", 4, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's warning (tested in test_autograd_method.py)
        got = torch.compile(lambda z: td.laplacian(f, z), backend="aot_eager")(x)
    assert_close(got, -torch.sin(x).sum(-1, keepdim=True))


def test_function_made_inside_the_region_graph_breaks(no_recompile_limit):
    model = _model("tanh_mlp")

    def loss(x):
        return td.laplacian(lambda z: model(z)[:, :1] ** 2, x).sum()

    x = _x("tanh_mlp", 5, 0)
    assert_close(torch.compile(loss, backend="aot_eager")(x), loss(x))


def test_double_backward_through_compiled_loss_says_so(no_recompile_limit):
    """aot_autograd cannot differentiate a compiled graph twice; torch says so clearly (docs/training.md:
    Hessian-vector products of the loss need the eager path)."""
    model = _model("tanh_mlp")
    params = list(model.parameters())
    loss = torch.compile(lambda x: td.laplacian(model, x).square().mean(), backend="aot_eager", fullgraph=True)
    g = torch.autograd.grad(loss(_x("tanh_mlp", 4, 0)), params, create_graph=True, materialize_grads=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(sum(t.sum() for t in g), params)


@pytest.mark.slow
@pytest.mark.parametrize("fname", ["tanh_mlp/laplacian", "siren/partials"])
def test_inductor(fname, no_recompile_limit):
    name, loss_of = FAMILIES[fname]
    _check_family(fname, name, loss_of, backend="inductor")

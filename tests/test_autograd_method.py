"""method="autograd" (nested torch.autograd.grad, _autograd.py): every operator on the zoo against per-sample
torch.func references in float64, parameter gradients (once and twice) against the Taylor engine, the ops whose
nested autograd torch gets wrong (layer_norm at order 3, prod/cumprod), the number of reverse passes, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchderiv as td
from _harness import params, sampled
from conftest import (
    DTYPE,
    ZOO,
    ZOO_BY_NAME,
    assert_close,
    fd_derivative,
    mlp,
    ref_biharmonic,
    ref_hessian,
    ref_jacobian,
    ref_laplacian,
    ref_partials,
    ref_value,
)
from torchderiv._autograd import MAX_UNROLL, AutogradUnavailable, autograd_available

zoo = pytest.mark.parametrize("case", ZOO, ids=[c.name for c in ZOO])
light = [c for c in ZOO if not c.heavy]
light_zoo = pytest.mark.parametrize("case", light, ids=[c.name for c in light])
# orders 3-4 on the wide-input (heavy) architectures: the slow tier (as test_zoo.py's zoo_high)
zoo_high = pytest.mark.parametrize("case", params(ZOO, slow=lambda c: c.heavy))


def _square(case):
    model, _, x = case.build()
    return tuple(ref_value(model, x).shape[1:]) == tuple(x.shape[1:])


SQUARE = [c for c in ZOO if _square(c)]


@zoo
def test_jacobian(case):
    model, ref, x = case.build()
    assert_close(td.jacobian(model, x, method="autograd"), ref_jacobian(ref, x), msg=case.name)


@pytest.mark.parametrize("case", SQUARE, ids=[c.name for c in SQUARE])
def test_jacobian_diagonal_and_divergence(case):
    model, ref, x = case.build()
    J = ref_jacobian(ref, x).reshape(x.shape[0], case.n, case.n)
    diag = J.diagonal(dim1=-2, dim2=-1)
    assert_close(td.jacobian_diagonal(model, x, method="autograd"), diag.reshape(x.shape), msg=case.name)
    assert_close(td.divergence(model, x, method="autograd"), diag.sum(-1), msg=case.name)


@light_zoo
def test_hessian(case):
    model, ref, x = case.build()
    assert_close(td.hessian(model, x, method="autograd"), ref_hessian(ref, x), msg=case.name)


@zoo
def test_hessian_diagonal(case):
    model, ref, x = case.build()
    n = case.n
    dims = list(range(n))
    P = ref_partials(ref, x, [(i, i) for i in dims])
    want = torch.stack([P[(i, i)] for i in dims], -1).reshape(*P[(0, 0)].shape, *x.shape[1:])
    assert_close(td.hessian_diagonal(model, x, method="autograd"), want, msg=case.name)


@zoo
def test_laplacian(case):
    model, ref, x = case.build()
    dims = case.dims
    assert_close(td.laplacian(model, x, dims=dims, method="autograd"), ref_laplacian(ref, x, dims), msg=case.name)
    g = torch.Generator().manual_seed(5)
    C = torch.randn(len(dims), len(dims), dtype=DTYPE, generator=g)
    C = C + C.T
    assert_close(td.laplacian(model, x, dims=dims, weights=C, method="autograd"),
                 ref_laplacian(ref, x, dims, C), msg=f"{case.name} weighted")


@zoo_high
def test_partials_mixed_orders(case):
    model, ref, x = case.build()
    n = case.n
    a, b, c = 0, 1 % n, 2 % n
    spec = list(dict.fromkeys([(), (a,), (b,), (a, b), (b, b), (a, b, c), (c, a, a), (a, a, b, b), (b, b, b, b)]))
    got = td.partials(model, x, spec, method="autograd")
    want = ref_partials(ref, x, spec)  # orders >= 3 on `ref` (layer norms written out): exact
    for k in spec:
        assert_close(got[k], want[k], msg=f"{case.name} {k}")


@light_zoo
def test_biharmonic(case):
    model, ref, x = case.build()
    assert_close(td.biharmonic(model, x, dims=case.dims, method="autograd"),
                 ref_biharmonic(ref, x, case.dims), msg=case.name)


def test_unbatched_and_named_coords():
    case = ZOO_BY_NAME["tanh_mlp"]
    model, ref, x = case.build()
    x0 = x[1]
    J = td.jacobian(model, x0, batched=False, method="autograd")
    assert_close(J, torch.func.jacrev(model)(x0))
    H = td.hessian(model, x0, batched=False, method="autograd")
    assert_close(H, torch.func.jacrev(torch.func.jacrev(model))(x0))
    d = td.partials(model, x, ["", "t", "xy", "yyt"], coords="txy", method="autograd")
    want = ref_partials(ref, x, [(), (0,), (1, 2), (0, 2, 2)])
    for k, w in zip(["", "t", "xy", "yyt"], want.values()):
        assert_close(d[k], w, msg=k)


# ----------------------------------------------------------------------------- parameters


def _param_grads(model, fn):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(fn(), params, materialize_grads=True)


OPS = {
    "jacobian": lambda m, x, meth: td.jacobian(m, x, method=meth),
    "hessian": lambda m, x, meth: td.hessian(m, x, method=meth),
    "hessian_diagonal": lambda m, x, meth: td.hessian_diagonal(m, x, method=meth),
    "laplacian": lambda m, x, meth: td.laplacian(m, x, dims=[0, 1], method=meth),
    "partials": lambda m, x, meth: torch.stack(list(td.partials(m, x, [(0,), (1, 1), (0, 1, 1)],
                                                                method=meth).values())),
    "biharmonic": lambda m, x, meth: td.biharmonic(m, x, dims=[0, 1], method=meth),
}


@pytest.mark.parametrize("name", sampled(["tanh_mlp", "residual_layernorm", "fourier_features", "multi_output",
                                          "sigmoid_exp_sqrt"], 2))  # fast tier: every other model, every op
@pytest.mark.parametrize("op", list(OPS))
def test_parameter_gradients_match_forward(name, op):
    """d/dtheta of a weighted sum of the result: the autograd method against the Taylor engine (itself checked
    against torch.func in test_zoo*.py); and the gradient of that gradient (Hessian-vector product)."""
    model, _, x = ZOO_BY_NAME[name].build()
    model.train(False)
    g = torch.Generator().manual_seed(7)
    R = None

    def loss(meth):
        nonlocal R
        r = OPS[op](model, x, meth)
        if R is None:
            R = torch.randn(r.shape, dtype=DTYPE, generator=g)
        return (r * R).sum() + (r ** 2).sum()

    ga = _param_grads(model, lambda: loss("autograd"))
    gf = _param_grads(model, lambda: loss("forward"))
    for a, f in zip(ga, gf):
        assert_close(a, f, msg=f"{name} {op} dtheta")
    if op in ("hessian", "biharmonic"):
        return  # second parameter derivatives of order-4 quantities: covered by the cheaper operators
    params = [p for p in model.parameters()]
    v = [torch.randn(p.shape, dtype=DTYPE, generator=g) for p in params]

    def hvp(meth):
        gr = torch.autograd.grad(loss(meth), params, create_graph=True, materialize_grads=True)
        return torch.autograd.grad(sum((a * b).sum() for a, b in zip(gr, v)), params, materialize_grads=True)

    for a, f in zip(hvp("autograd"), hvp("forward")):
        assert_close(a, f, msg=f"{name} {op} Hessian-vector product")


def test_no_graph_without_need_and_input_gradient():
    model, _, x = ZOO_BY_NAME["tanh_mlp"].build()
    with torch.no_grad():
        L = td.laplacian(model, x, method="autograd")
    assert not L.requires_grad
    # the zoo's model is shared by every test of the process (test_compile.py differentiates its parameters):
    # frozen here, unfrozen after
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        assert not td.laplacian(model, x, method="autograd").requires_grad
        xg = x.clone().requires_grad_()
        a = torch.autograd.grad(td.laplacian(model, xg, method="autograd").sum(), xg)[0]
        b = torch.autograd.grad(td.laplacian(model, xg, method="forward").sum(), xg)[0]
        assert_close(a, b)
    finally:
        for p in model.parameters():
            p.requires_grad_(True)


# ----------------------------------------------------------------------------- exactness where torch's is not


class ProdNet(nn.Module):
    """prod and cumprod over features (whose backward in torch divides by the input)."""

    def __init__(self, prod=torch.prod, cumprod=torch.cumprod):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.prod, self.cumprod = prod, cumprod

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        return torch.stack([self.prod(h, -1), self.cumprod(h, -1)[:, 2], self.prod(h[:, :2] * x[:, 1:], -1)], -1)


def _mul_prod(h, dim):
    r = h.select(dim, 0)
    for i in range(1, h.shape[dim]):
        r = r * h.select(dim, i)
    return r


def _mul_cumprod(h, dim):
    out = [h.select(dim, 0)]
    for i in range(1, h.shape[dim]):
        out.append(out[-1] * h.select(dim, i))
    return torch.stack(out, dim)


def test_prod_cumprod_exact():
    """Inputs near zero (where torch's prod backward loses digits): against a multiply-only twin."""
    torch.manual_seed(3)
    model = ProdNet().to(DTYPE)
    twin = ProdNet(_mul_prod, _mul_cumprod).to(DTYPE)
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        model.lin.bias.copy_(torch.tensor([1e-4, -2e-4, 0.3, 0.5]))
        twin.lin.bias.copy_(model.lin.bias)
    g = torch.Generator().manual_seed(4)
    x = 1e-4 * torch.randn(4, 3, dtype=DTYPE, generator=g)
    spec = [(), (0,), (0, 1), (0, 1, 2), (1, 1, 2), (0, 0, 1, 2)]
    got = td.partials(model, x, spec, method="autograd")
    want = ref_partials(twin, x, spec)
    for k in spec:
        assert_close(got[k], want[k], atol=1e-12, rtol=1e-10, msg=str(k))


def test_layer_norm_third_order_against_finite_differences():
    """torch's nested autograd through native_layer_norm is wrong at order 3; the method writes it out."""
    model, _, x = ZOO_BY_NAME["residual_layernorm"].build()
    got = td.partials(model, x, [(0, 0, 1)], method="autograd")[(0, 0, 1)]
    second = lambda z: td.partials(model, z, [(0, 0)], method="forward")[(0, 0)]  # noqa: E731
    fd = fd_derivative(second, x, 1, h=1e-3)
    assert_close(got, fd, atol=1e-6, rtol=1e-5)


def test_long_products_refused():
    f = lambda x: torch.tanh(x).repeat(1, 40).prod(-1, keepdim=True)  # noqa: E731
    x = torch.randn(3, 2, dtype=DTYPE)
    assert MAX_UNROLL < 80
    with pytest.raises(AutogradUnavailable, match="method='forward'"):
        td.laplacian(f, x, method="autograd")
    assert not autograd_available(f, x, True, "laplacian")
    td.laplacian(f, x, method="forward")  # the Taylor engine has no such limit


# ----------------------------------------------------------------------------- how many reverse passes


@pytest.mark.parametrize("spec, outs, passes", [
    ([(), (0,), (1,), (1, 1)], 1, 2),              # Burgers u, u_t, u_x, u_xx: the gradient, then one more
    ([(0, 0), (1, 1), (0, 1)], 1, 3),             # three second partials: two rows of the Hessian
    ([(0,), (1,), (1, 1)], 3, 3 * 2),              # per output component
    ([(0, 0, 0), (0, 0, 1), (0, 1, 1)], 1, 4),     # orders share their prefixes: (), (0,), (0, 0), (0, 1)
])
def test_reverse_pass_count(monkeypatch, spec, outs, passes):
    torch.manual_seed(0)
    model = mlp([2, 8, outs], nn.Tanh).to(DTYPE)
    x = torch.randn(5, 2, dtype=DTYPE)
    calls = []
    orig = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or orig(*a, **k))
    td.partials(model, x, spec, method="autograd")
    assert len(calls) == passes


@pytest.mark.parametrize("op, passes", [("laplacian", 1 + 3), ("hessian", 1 + 3), ("biharmonic", 2 * (1 + 3))])
def test_reverse_pass_count_operators(monkeypatch, op, passes):
    torch.manual_seed(0)
    model = mlp([3, 8, 1], nn.Tanh).to(DTYPE)
    x = torch.randn(5, 3, dtype=DTYPE)
    calls = []
    orig = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or orig(*a, **k))
    getattr(td, op)(model, x, method="autograd")
    assert len(calls) == passes


# ----------------------------------------------------------------------------- errors and other paths


@pytest.mark.parametrize("op", ["jacobian", "jacobian_diagonal", "hessian", "hessian_diagonal", "laplacian",
                                "divergence", "biharmonic"])
def test_bad_method(op):
    x = torch.randn(3, 2, dtype=DTYPE)
    with pytest.raises(ValueError, match="method"):
        getattr(td, op)(torch.sin, x, method="autograd2")


@pytest.mark.parametrize("method", ["reverse", "backward", "Forward"])
def test_bad_method_partials(method):
    x = torch.randn(3, 2, dtype=DTYPE)
    with pytest.raises(ValueError, match="method"):
        td.partials(torch.sin, x, [(0,)], method=method)
    with pytest.raises(ValueError, match="method"):
        td.biharmonic(torch.sin, x, method=method)


def test_rows_that_mix_are_refused():
    f = lambda x: torch.tanh(x - x.mean(0))  # noqa: E731
    with pytest.raises(td.BatchMixingError):
        td.laplacian(f, torch.randn(4, 2, dtype=DTYPE), method="autograd")


def test_untraceable_f_falls_back_per_sample():
    def f(x):
        if float(x.sum()) > 1e9:  # data-dependent control flow: cannot be traced
            return x
        return torch.sin(x).sum(-1, keepdim=True)

    x = torch.randn(4, 2, dtype=DTYPE)
    with pytest.warns(UserWarning, match="could not be traced"):
        L = td.laplacian(f, x, method="autograd")
    assert_close(L, -torch.sin(x).sum(-1, keepdim=True))


def test_repeated_calls_use_the_fast_path_and_see_parameter_updates():
    model, ref, x = ZOO_BY_NAME["gelu_mlp"].build()
    a = td.laplacian(model, x, method="autograd")
    assert_close(td.laplacian(model, x, method="autograd"), a)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.9)
    assert_close(td.laplacian(model, x, method="autograd"), ref_laplacian(model, x))


def test_under_torch_compile_graph_break():
    """An explicit method='autograd' inside a compiled function runs eagerly through a graph break."""
    torch._dynamo.reset()
    model, _, x = ZOO_BY_NAME["tanh_mlp"].build()

    def loss(z):
        return td.laplacian(model, z, method="autograd").square().mean()

    got = torch.compile(loss, backend="aot_eager")(x)
    assert_close(got, loss(x))
    torch._dynamo.reset()

"""The one dispatch path: every operator builds a Request and hands it to ``_dispatch.dispatch``; the fast-path
key is the whole request; the method and fallback policy are the same for every operator."""

import pytest
import torch

import torchderiv
from torchderiv import _api
from torchderiv._requests import Request

OPS = {
    "jacobian": lambda f, x, **k: torchderiv.jacobian(f, x, **k),
    "jacobian_diagonal": lambda f, x, **k: torchderiv.jacobian_diagonal(f, x, **k),
    "hessian": lambda f, x, **k: torchderiv.hessian(f, x, **k),
    "hessian_diagonal": lambda f, x, **k: torchderiv.hessian_diagonal(f, x, **k),
    "laplacian": lambda f, x, **k: torchderiv.laplacian(f, x, **k),
    "divergence": lambda f, x, **k: torchderiv.divergence(f, x, **k),
    "biharmonic": lambda f, x, **k: torchderiv.biharmonic(f, x, **k),
    "partials": lambda f, x, **k: torchderiv.partials(f, x, [(0,)], **k),
}


def _net(seed=0):
    g = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return net


def _x(seed=1, shape=(4, 3)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("op", sorted(OPS))
def test_every_operator_goes_through_dispatch(op, monkeypatch):
    seen = []
    real = _api.dispatch

    def spy(req, f, x):
        seen.append(req)
        return real(req, f, x)

    monkeypatch.setattr(_api, "dispatch", spy)
    OPS[op](_net(), _x())
    assert [r.op for r in seen] == [op]


@pytest.mark.parametrize("op", sorted(OPS))
def test_unknown_method_names_the_argument(op):
    with pytest.raises(ValueError, match=rf"{op}: method must be one of"):
        OPS[op](_net(), _x(), method="sideways")


@pytest.mark.parametrize("op", ["partials", "biharmonic"])
def test_reverse_is_refused_where_it_means_nothing(op):
    with pytest.raises(ValueError, match="method must be one of"):
        OPS[op](_net(), _x(), method="reverse")


def test_key_holds_every_option():
    x = _x()
    base = Request("laplacian", True, "auto", None, (("dims", [0, 1]), ("weights", None)))
    others = [
        Request("laplacian", True, "auto", None, (("dims", [0, 2]), ("weights", None))),
        Request("laplacian", True, "auto", None, (("dims", (0, 1)), ("weights", None))),
        Request("laplacian", True, "auto", None, (("dims", [0, 1]), ("weights", [[1.0, 0.0], [0.0, 1.0]]))),
        Request("laplacian", True, "forward", None, (("dims", [0, 1]), ("weights", None))),
        Request("laplacian", True, "auto", 2, (("dims", [0, 1]), ("weights", None))),
        Request("laplacian", False, "auto", None, (("dims", [0, 1]), ("weights", None))),
        Request("hessian_diagonal", True, "auto", None, (("dims", [0, 1]), ("weights", None))),
    ]
    keys = [base.key(x)] + [r.key(x) for r in others]
    assert None not in keys
    assert len(set(keys)) == len(keys)
    assert base.key(x) != base.key(x.float())
    assert base.key(x) != base.key(_x(shape=(5, 3)))


def test_tensor_options_take_no_fast_path():
    """A tensor option could change in place between calls: it is never part of a key, so the call is
    recomputed and sees the change."""
    w = torch.eye(3, dtype=torch.float64)
    assert Request("laplacian", options=(("weights", w),)).key(_x()) is None
    net, x = _net(), _x()
    a = torchderiv.laplacian(net, x, weights=w)
    w[0, 0] = 3.0
    b = torchderiv.laplacian(net, x, weights=w)
    H = torchderiv.hessian(net, x, method="reverse")
    expect = 3 * H[..., 0, 0] + H[..., 1, 1] + H[..., 2, 2]
    torch.testing.assert_close(b, expect)
    assert not torch.allclose(a, b)


def test_list_options_are_compared_by_value():
    net, x = _net(), _x()
    dims = [0, 1]
    a = torchderiv.laplacian(net, x, dims=dims)
    dims[1] = 2  # the same list object, changed: a different request
    b = torchderiv.laplacian(net, x, dims=dims)
    H = torchderiv.hessian(net, x, method="reverse")
    torch.testing.assert_close(a, H[..., 0, 0] + H[..., 1, 1])
    torch.testing.assert_close(b, H[..., 0, 0] + H[..., 2, 2])


def _grid3d_field():
    g = torch.Generator().manual_seed(3)
    vol = torch.randn(1, 3, 4, 4, 4, generator=g, dtype=torch.float64)

    def field(x):  # x: [B, 3] in [-1, 1]^3 -> 3 features
        grid = x.reshape(1, -1, 1, 1, 3)
        out = torch.nn.functional.grid_sample(vol, grid, align_corners=True, mode="bilinear")
        return out.reshape(3, -1).T * x.sum(-1, keepdim=True)

    return field, torch.rand(5, 3, generator=g, dtype=torch.float64) * 1.6 - 0.8


@pytest.mark.parametrize("op", ["jacobian", "jacobian_diagonal", "divergence"])
def test_auto_takes_reverse_when_an_op_has_no_forward_derivative(op):
    """grid_sampler_3d has no forward-mode derivative in torch: every operator with a reverse form takes
    it under method="auto" (the same policy for all), and method="forward" raises."""
    field, x = _grid3d_field()
    with pytest.warns(torchderiv.FallbackWarning, match="method=.auto. used reverse mode"):
        got = OPS[op](field, x)
    ref = OPS[op](field, x, method="reverse")
    torch.testing.assert_close(got, ref)
    with pytest.raises(NotImplementedError, match="method='reverse'"):
        OPS[op](field, x, method="forward")


@pytest.mark.parametrize("op", ["hessian", "hessian_diagonal", "laplacian"])
def test_auto_at_second_order_through_an_op_without_forward_derivative(op):
    """Second order through grid_sampler_3d: no forward rule, and torch's reverse over reverse fails under
    vmap; auto goes on to nested autograd, which is right: checked against central differences of the
    reverse-mode Jacobian. method="forward" and method="reverse" raise."""
    field, x = _grid3d_field()
    with pytest.warns(torchderiv.FallbackWarning, match="autograd"):
        got = OPS[op](field, x)
    h = 1e-6
    cols = []
    for i in range(3):
        e = torch.zeros_like(x)
        e[:, i] = h
        Jp = torchderiv.jacobian(field, x + e, method="reverse")
        Jm = torchderiv.jacobian(field, x - e, method="reverse")
        cols.append((Jp - Jm) / (2 * h))  # [B, 3, 3]: d J[b, o, :] / d x_i
    H = torch.stack(cols, -1)  # [B, out, in, in]
    ref = {"hessian": H, "hessian_diagonal": H.diagonal(dim1=-2, dim2=-1),
           "laplacian": H.diagonal(dim1=-2, dim2=-1).sum(-1)}[op]
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    with pytest.raises(NotImplementedError):
        OPS[op](field, x, method="forward")

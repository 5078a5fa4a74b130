"""Property tests: random MLPs against the torch.func / autograd references."""

from __future__ import annotations

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from torch import nn

import torchderiv as td
from conftest import assert_close, ref_hessian, ref_jacobian, ref_laplacian, ref_partials

pytestmark = pytest.mark.slow  # property tests: dozens of generated networks each

DT = torch.float64

ACTS = {
    "tanh": nn.Tanh,
    "sin": None,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "softplus": nn.Softplus,
    "sigmoid": nn.Sigmoid,
}


class Sin(nn.Module):
    def forward(self, x):
        return torch.sin(x)


@st.composite
def mlps(draw):
    d_in = draw(st.integers(1, 4))
    d_out = draw(st.integers(1, 3))
    depth = draw(st.integers(1, 3))
    widths = [draw(st.integers(2, 12)) for _ in range(depth)]
    acts = [draw(st.sampled_from(sorted(ACTS))) for _ in range(depth)]
    batch = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    prev = d_in
    for w, a in zip(widths, acts):
        layers += [nn.Linear(prev, w), Sin() if a == "sin" else ACTS[a]()]
        prev = w
    layers.append(nn.Linear(prev, d_out))
    net = nn.Sequential(*layers).to(DT)
    x = torch.randn(batch, d_in, dtype=DT)
    return net, x


# fixed seed (derandomize) and no shrinking: every example builds new graphs, shrinking a failure would take minutes
PROPS = settings(max_examples=15, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate])


@PROPS
@given(mlps(), st.sampled_from(["forward", "reverse", "auto"]))
def test_jacobian(nx, method):
    net, x = nx
    assert_close(td.jacobian(net, x, method=method), ref_jacobian(net, x))


@PROPS
@given(mlps(), st.sampled_from(["forward", "reverse"]))
def test_hessian(nx, method):
    net, x = nx
    H = ref_hessian(net, x)
    assert_close(td.hessian(net, x, method=method), H)
    assert_close(td.hessian_diagonal(net, x, method=method), H.diagonal(dim1=-2, dim2=-1))


@PROPS
@given(mlps(), st.data())
def test_laplacian(nx, data):
    net, x = nx
    n = x.shape[1]
    assert_close(td.laplacian(net, x), ref_laplacian(net, x))
    dims = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True))
    assert_close(td.laplacian(net, x, dims=dims), ref_laplacian(net, x, dims=dims))
    m = len(dims)
    A = torch.tensor(data.draw(st.lists(st.floats(-2, 2), min_size=m * m, max_size=m * m)), dtype=DT).reshape(m, m)
    diag = torch.tensor(data.draw(st.lists(st.floats(0.25, 2), min_size=m, max_size=m)), dtype=DT)
    C = A + A.T  # symmetric; a non-zero diagonal keeps the all-zero matrix (test_errors.py) out of this test
    C.diagonal().copy_(diag)
    assert_close(td.laplacian(net, x, dims=dims, weights=C), ref_laplacian(net, x, dims=dims, weights=C))


@PROPS
@given(mlps(), st.data())
def test_high_order_partial(nx, data):
    net, x = nx
    n = x.shape[1]
    order = data.draw(st.integers(3, 4))
    key = tuple(data.draw(st.lists(st.integers(0, n - 1), min_size=order, max_size=order)))
    spec = [key, (), (0,)]
    got = td.partials(net, x, spec)
    expected = ref_partials(net, x, spec)
    for k in spec:
        assert_close(got[k], expected[k], msg=f"partial {k}")

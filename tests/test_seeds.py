"""The four user questions in /work/shared/seeds, reproduced faithfully, each answered by one torchderiv call."""

from __future__ import annotations

import pytest
import torch
import torch.autograd as autograd
import torch.nn as nn
from torch.func import functional_call, jacrev, vmap

import torchderiv

TOL = {torch.float32: {"atol": 1e-6, "rtol": 1e-5}, torch.float64: {"atol": 1e-12, "rtol": 1e-10}}
dtypes = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])


def close(a, b, dtype):
    torch.testing.assert_close(a, b, **TOL[dtype])


class net_x(nn.Module):  # noqa: N801 - the seeds' name
    """Seeds 000 and 002: Linear(1, 20) - tanh - Linear(20, 20) - tanh - Linear(20, n_out)."""

    def __init__(self, n_out=4):
        super().__init__()
        self.fc1 = nn.Linear(1, 20)
        self.fc2 = nn.Linear(20, 20)
        self.out = nn.Linear(20, n_out)

    def forward(self, x):
        x = torch.tanh(self.fc1(x))
        x = torch.tanh(self.fc2(x))
        x = self.out(x)
        return x


def make_net_x(n_out, dtype, seed=0):
    torch.manual_seed(seed)
    return net_x(n_out).to(dtype)


# ============================================================================ seed 000


@dtypes
def test_seed000_solution1_full_jacobian_then_diagonal(dtype):
    nx = make_net_x(4, dtype)
    x = torch.rand(10, 1, dtype=dtype, requires_grad=True)
    jacobian = torch.autograd.functional.jacobian(nx, x)  # (10, 4, 10, 1)
    diag_gradients = torch.diagonal(jacobian, dim1=0, dim2=2).squeeze(-1)
    # as written in the answer this is (4, 1, 10), not the (10, 4) its comment claims: [o, 0, b] = dy[b,o]/dx[b]
    assert diag_gradients.shape == (4, 1, 10)
    ours = torchderiv.jacobian(nx, x)[..., 0]  # (10, 4): one call, no full Jacobian
    assert ours.shape == (10, 4)
    close(ours, diag_gradients[:, 0, :].T, dtype)
    close(torchderiv.jacobian(nx, x).squeeze(-1), diag_gradients[:, 0, :].T, dtype)


@dtypes
def test_seed000_solution2_grad_with_identity_grad_outputs(dtype):
    """The answer's grad_outputs=eye idea, made runnable (is_grads_batched=True; the original passes a Size to
    torch.eye and an [40, 40] cotangent for a [40] output)."""
    nx = make_net_x(4, dtype)
    x = torch.rand(10, 1, dtype=dtype, requires_grad=True)
    y = nx(x)
    y_flat = y.flatten()
    grad_outputs = torch.eye(y_flat.numel(), dtype=dtype)
    grads = torch.autograd.grad(y_flat, x, grad_outputs=grad_outputs, is_grads_batched=True)[0]  # [40, 10, 1]
    diag_indices = torch.arange(y_flat.numel()) // y.shape[1]
    diag_grads = grads[torch.arange(y_flat.numel()), diag_indices, 0].view(y.shape)
    close(torchderiv.jacobian(nx, x)[..., 0], diag_grads, dtype)


@dtypes
def test_seed000_solution3_vmap(dtype):
    nx = make_net_x(4, dtype)
    params = dict(nx.named_parameters())
    x = torch.rand(10, 1, dtype=dtype)

    def single_input_grad(params, x_single):
        return jacrev(lambda xs: functional_call(nx, params, xs))(x_single)

    batch_jacobian = vmap(single_input_grad, in_dims=(None, 0))(params, x)  # (10, 4, 1)
    diag_gradients = batch_jacobian.squeeze(-1)
    close(torchderiv.jacobian(nx, x).squeeze(-1), diag_gradients, dtype)
    close(torchderiv.jacobian(nx, x, method="reverse").squeeze(-1), diag_gradients, dtype)


# ============================================================================ seed 002


@dtypes
def test_seed002_diagonal_of_diagonal_picks_each_output_vector(dtype):
    nx = make_net_x(4, dtype)
    t = torch.tensor([1.0, 2.0, 3.2], dtype=dtype, requires_grad=True)
    t = torch.reshape(t, (3, 1))
    dx_full = torch.autograd.functional.jacobian(lambda t_: nx(t_), t)  # (3, 4, 3, 1)
    ours = torchderiv.jacobian(nx, t)  # (3, 4, 1)
    for k in range(4):  # "first vector" ... "4th vector"
        dx = torch.diagonal(torch.diagonal(dx_full, k, -1), 0)[0]
        assert dx.shape == (3,)
        close(ours[:, k, 0], dx, dtype)
    close(ours.squeeze(-1), torch.stack([torch.diagonal(torch.diagonal(dx_full, k, -1), 0)[0] for k in range(4)], 1),
          dtype)


@dtypes
def test_seed002_400_outputs_full_jacobian(dtype):
    """Update 1 of the question: 400 outputs (fewer points here: the full Jacobian is val x 400 x val)."""
    nx = make_net_x(400, dtype)
    val = 10
    t = torch.reshape(torch.rand(val, dtype=dtype, requires_grad=True), (val, 1))
    dx_full = torch.autograd.functional.jacobian(lambda t_: nx(t_), t, vectorize=True)
    J = torchderiv.jacobian(nx, t)
    for k in (0, 1, 2, 3, 399):
        close(J[:, k, 0], torch.diagonal(torch.diagonal(dx_full, k, -1), 0)[0], dtype)


@dtypes
def test_seed002_backward_with_sampling_vector(dtype):
    """The accepted answer: out.backward(m) with m[:, k] = 1 samples output k's derivative (val = 100 points)."""
    nx = make_net_x(400, dtype)
    val = 100
    a = torch.rand(val, dtype=dtype, requires_grad=True)  # input vector
    t = torch.reshape(a, (val, 1))  # reshape for batch
    out = nx(t)
    m = torch.zeros((val, 400), dtype=dtype)
    m[:, 0] = 1
    out.backward(m)
    J = torchderiv.jacobian(nx, t)  # every vector at once: [100, 400, 1]
    assert J.shape == (val, 400, 1)
    close(J[:, 0, 0], a.grad, dtype)
    for k in (1, 137, 399):
        a.grad = None
        m = torch.zeros((val, 400), dtype=dtype)
        m[:, k] = 1
        nx(torch.reshape(a, (val, 1))).backward(m)
        close(J[:, k, 0], a.grad, dtype)
    # "the gradients accumulate every time you call backward"; torchderiv has no such state
    close(torchderiv.jacobian(nx, t), J, dtype)


# ============================================================================ seed 001


def _seed001_net(dtype):
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                         nn.Linear(64, 150)).to(dtype)


def continuous_diff(x, y):
    torch.set_grad_enabled(True)
    x.requires_grad_(True)
    # x in [N,nvarin]
    # y in [N,nvarout]
    # dy in [N,nvarin]
    dy_dx = torch.autograd.grad(y, x, torch.ones_like(y), retain_graph=True, create_graph=True)[0]
    return dy_dx


def seed001_loop(net, x):
    """The question's loop, verbatim apart from returning the first derivatives too."""
    x.requires_grad_(True)
    output = net(x)
    output_grad1 = []
    output_grad2 = []
    for k in range(output.shape[1]):
        y = output[:, k]
        dx = continuous_diff(x, y)
        # hardcoded for nvarin = 2 here
        dxx = continuous_diff(x, dx[:, 0])
        dyy = continuous_diff(x, dx[:, 1])
        grad2 = torch.concatenate([dxx, dyy], dim=-1)
        output_grad1.append(dx)
        output_grad2.append(grad2)
    output_grad2 = torch.stack(output_grad2, dim=-1)
    return torch.stack(output_grad1, dim=-1), output_grad2


@dtypes
def test_seed001_first_and_second_derivatives_of_150_outputs(dtype):
    net = _seed001_net(dtype)
    N = 6
    x = torch.randn(N, 2, dtype=dtype)
    grad1, grad2 = seed001_loop(net, x.clone())
    assert grad1.shape == (N, 2, 150) and grad2.shape == (N, 4, 150)  # [N, (dxx_x, dxx_y, dyy_x, dyy_y), out]
    xd = x.detach()

    # one call: the full per-sample Hessian of all 150 outputs, [N, 150, 2, 2]
    H = torchderiv.hessian(net, xd)
    close(H.reshape(N, 150, 4).permute(0, 2, 1), grad2, dtype)
    # one call for the Jacobian
    J = torchderiv.jacobian(net, xd)
    close(J.permute(0, 2, 1), grad1, dtype)
    # one call for exactly the entries of the loop, first and second order together
    d = torchderiv.partials(net, xd, ["x", "y", "xx", "xy", "yy"], coords="xy")
    close(torch.stack([d["x"], d["y"]], 1), grad1, dtype)
    close(torch.stack([d["xx"], d["xy"], d["xy"], d["yy"]], 1), grad2, dtype)
    d = torchderiv.partials(net, xd, [(0, 0), (0, 1), (1, 0), (1, 1)])
    close(torch.stack([d[(0, 0)], d[(0, 1)], d[(1, 0)], d[(1, 1)]], 1), grad2, dtype)
    # the diagonal alone
    close(torchderiv.hessian_diagonal(net, xd).permute(0, 2, 1), grad2[:, [0, 3]], dtype)
    # and the Laplacian of every output
    close(torchderiv.laplacian(net, xd), grad2[:, 0] + grad2[:, 3], dtype)


# ============================================================================ seed 003


@dtypes
def test_seed003_example1_grad_of_sum(dtype):
    x = torch.rand(3, 4, dtype=dtype).requires_grad_(True)
    y = torch.sum(x)
    grads = autograd.grad(outputs=y, inputs=x)[0]
    close(grads, torch.ones(3, 4, dtype=dtype), dtype)
    # the sum over the whole tensor couples the rows: x is one point
    close(torchderiv.jacobian(torch.sum, x, batched=False), grads, dtype)
    # or per-row sums, per sample
    close(torchderiv.jacobian(lambda x: x.sum(-1), x), grads, dtype)
    with pytest.raises(torchderiv.BatchMixingError):
        torchderiv.jacobian(torch.sum, x)


@dtypes
def test_seed003_example2_grad_of_vector_function(dtype):
    x = torch.rand(3, 4, dtype=dtype).requires_grad_(True)
    y = x[:, 0] + x[:, 1]
    grads = autograd.grad(outputs=y, inputs=x, grad_outputs=torch.ones_like(y))[0]
    close(grads, torch.tensor([[1.0, 1.0, 0.0, 0.0]] * 3, dtype=dtype), dtype)
    close(torchderiv.jacobian(lambda x: x[:, 0] + x[:, 1], x), grads, dtype)
    close(torchderiv.jacobian(lambda x: x[:, 0] + x[:, 1], x, method="reverse"), grads, dtype)


@dtypes
def test_seed003_example3_second_derivative(dtype):
    x = torch.rand(3, 4, dtype=dtype).requires_grad_(True)
    y = x**2
    grads = autograd.grad(outputs=y, inputs=x, grad_outputs=torch.ones_like(y), create_graph=True)[0]
    grads2 = autograd.grad(outputs=grads, inputs=x, grad_outputs=torch.ones_like(grads))[0]
    close(grads2, torch.full((3, 4), 2.0, dtype=dtype), dtype)
    f = lambda x: x**2  # noqa: E731
    # grads2[b, i] = sum_o d2 y[b, o] / dx[b, i]^2
    close(torchderiv.hessian_diagonal(f, x).sum(1), grads2, dtype)
    # y is elementwise, so that is the diagonal of the per-sample Hessian diagonal
    close(torchderiv.hessian_diagonal(f, x).diagonal(dim1=1, dim2=2), grads2, dtype)
    d = torchderiv.partials(f, x, [(i, i) for i in range(4)])
    close(torch.stack([d[(i, i)][:, i] for i in range(4)], 1), grads2, dtype)
    # and the first derivative: the Jacobian diagonal
    close(torchderiv.jacobian_diagonal(f, x), grads, dtype)

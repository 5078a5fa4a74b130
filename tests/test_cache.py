"""The graph cache: freshness after parameter updates, lifetime, bounded size; differentiability of results."""

from __future__ import annotations

import gc
import tracemalloc
import weakref

import pytest
import torch
from torch import nn

import torchderiv as td
from _harness import nested_partial
from conftest import (
    FourierNet,
    ResidualLN,
    assert_close,
    ref_biharmonic,
    ref_hessian,
    ref_jacobian,
    ref_laplacian,
    ref_partials,
)
from torchderiv._cache import _PER_F

DT = torch.float64


def make_mlp(seed=0, d_in=2, width=12, d_out=2):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                         nn.Linear(width, d_out)).to(DT)


def _x(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, dtype=DT, generator=g) * 2 - 1


SPEC = [(), (0,), (1, 1), (0, 1, 1)]


def all_results(f, x):
    return {
        "jacobian_fwd": td.jacobian(f, x, method="forward"),
        "jacobian_rev": td.jacobian(f, x, method="reverse"),
        "hessian": td.hessian(f, x, method="forward"),
        "hessian_diagonal": td.hessian_diagonal(f, x),
        "laplacian": td.laplacian(f, x),
        "laplacian_w": td.laplacian(f, x, dims=[0, 1], weights=[[1.0, 0.25], [0.25, 2.0]]),
        "partials": td.partials(f, x, SPEC),
        "biharmonic": td.biharmonic(f, x),
    }


def check_against_reference(f, x, ref=None, msg=""):
    ref = ref or f
    r = all_results(f, x)
    J = ref_jacobian(ref, x)
    assert_close(r["jacobian_fwd"], J, msg=f"{msg} jacobian forward")
    assert_close(r["jacobian_rev"], J, msg=f"{msg} jacobian reverse")
    H = ref_hessian(ref, x)
    assert_close(r["hessian"], H, msg=f"{msg} hessian")
    assert_close(r["hessian_diagonal"], H.diagonal(dim1=-2, dim2=-1), msg=f"{msg} hessian_diagonal")
    assert_close(r["laplacian"], ref_laplacian(ref, x), msg=f"{msg} laplacian")
    assert_close(r["laplacian_w"], ref_laplacian(ref, x, [0, 1], torch.tensor([[1.0, 0.25], [0.25, 2.0]], dtype=DT)),
                 msg=f"{msg} weighted laplacian")
    P = ref_partials(ref, x, SPEC)
    for k in SPEC:
        assert_close(r["partials"][k], P[k], msg=f"{msg} partial {k}")
    assert_close(r["biharmonic"], ref_biharmonic(ref, x), msg=f"{msg} biharmonic")


# ============================================================================ freshness


def test_optimizer_steps_are_seen():
    net = make_mlp()
    x = _x(4, 2)
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    check_against_reference(net, x, msg="before")
    for step in range(3):
        loss = (td.laplacian(net, x) ** 2).mean() + td.jacobian(net, x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()  # in-place update of the parameters
        check_against_reference(net, x, msg=f"after step {step}")


def test_in_place_parameter_edit_is_seen():
    net = make_mlp()
    x = _x(3, 2)
    before = td.jacobian(net, x)
    with torch.no_grad():
        net[0].weight.mul_(-2.0)
        net[2].bias.add_(0.5)
    after = td.jacobian(net, x)
    assert not torch.allclose(before, after)
    check_against_reference(net, x)


def test_parameter_reassignment_is_seen():
    net = make_mlp()
    x = _x(3, 2)
    check_against_reference(net, x, msg="original")
    torch.manual_seed(42)
    net[0].weight = nn.Parameter(torch.randn(12, 2, dtype=DT))  # a new Parameter object
    check_against_reference(net, x, msg="weight replaced")
    net[2] = nn.Linear(12, 12).to(DT)  # a new submodule
    check_against_reference(net, x, msg="layer replaced")


def test_load_state_dict_is_seen():
    net, other = make_mlp(0), make_mlp(1)
    x = _x(3, 2)
    td.laplacian(net, x)
    net.load_state_dict(other.state_dict())
    assert_close(td.laplacian(net, x), ref_laplacian(other, x))
    check_against_reference(net, x)


def test_buffer_reassignment_is_seen():
    torch.manual_seed(0)
    net = FourierNet().to(DT)
    x = _x(3, 2)
    check_against_reference(net, x, msg="original buffer")
    net.B = 2.0 * net.B.clone()  # a new buffer tensor
    check_against_reference(net, x, msg="buffer replaced")
    with torch.no_grad():
        net.B.mul_(0.5)  # in place
    check_against_reference(net, x, msg="buffer edited in place")


def test_closure_constant_updated_in_place_is_seen():
    W = torch.randn(2, 5, dtype=DT)
    f = lambda x: torch.tanh(x @ W)  # noqa: E731
    x = _x(3, 2)
    td.hessian(f, x)
    with torch.no_grad():
        W.mul_(3.0)
    assert_close(td.hessian(f, x), ref_hessian(f, x))
    assert_close(td.jacobian(f, x), ref_jacobian(f, x))


def test_closure_variable_rebinding_is_seen():
    """f reads a closure variable that is rebound to a new tensor (not updated in place)."""
    W = torch.randn(2, 4, dtype=DT)

    def f(x):
        return torch.tanh(x @ W)

    x = _x(3, 2)
    assert_close(td.jacobian(f, x), ref_jacobian(f, x))
    W = 2.0 * torch.randn(2, 4, dtype=DT)  # noqa: F841 - read by f
    assert_close(td.jacobian(f, x), ref_jacobian(f, x), msg="after rebinding W")
    assert_close(td.laplacian(f, x), ref_laplacian(f, x), msg="after rebinding W")


class _Scaled(nn.Module):
    """A net with plain Python attributes that change during training (SIREN's w0, an annealed temperature,
    a switch)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 3)
        self.w0 = 1.0
        self.use_sin = True

    def forward(self, x):
        h = self.lin(x) * self.w0
        return torch.sin(h) if self.use_sin else torch.tanh(h)


def test_module_python_attribute_change_is_seen():
    torch.manual_seed(0)
    net = _Scaled().to(DT)
    x = _x(3, 2)
    assert_close(td.laplacian(net, x), ref_laplacian(net, x))
    net.w0 = 3.0
    assert_close(td.laplacian(net, x), ref_laplacian(net, x), msg="after w0 = 3")
    assert_close(td.jacobian(net, x), ref_jacobian(net, x), msg="after w0 = 3")
    net.use_sin = False
    assert_close(td.laplacian(net, x), ref_laplacian(net, x), msg="after use_sin = False")


class _ScalarBuffer(nn.Module):
    """Reads a buffer as a Python number (``self.k.item()``, ``float(self.k * 2)``): the trace bakes the
    number in, so an in-place change of the buffer must be seen."""

    def __init__(self, how: str):
        super().__init__()
        self.lin = nn.Linear(2, 3)
        self.register_buffer("k", torch.tensor(1.5))
        self.how = how

    def forward(self, x):
        c = self.k.item() if self.how == "item" else float(self.k * 2) if self.how == "derived" else int(self.k)
        return torch.tanh(self.lin(x) * c)


@pytest.mark.parametrize("how", ["item", "derived", "int"])
@pytest.mark.parametrize("method", ["forward", "reverse"])
def test_values_read_as_python_numbers_are_checked(how, method):
    torch.manual_seed(0)
    net = _ScalarBuffer(how).to(DT)
    x = _x(3, 2)
    assert_close(td.hessian(net, x, method=method), ref_hessian(net, x))
    with torch.no_grad():
        net.k.fill_(2.5)  # in place: same tensor object, new value
    assert_close(td.hessian(net, x, method=method), ref_hessian(net, x), msg="after k = 2.5")
    assert_close(td.jacobian(net, x, method=method), ref_jacobian(net, x), msg="after k = 2.5")
    assert_close(td.laplacian(net, x), ref_laplacian(net, x), msg="after k = 2.5")


def test_closure_tensor_read_as_python_number_is_checked():
    s = torch.tensor(2.0, dtype=DT)
    W = torch.randn(2, 4, dtype=DT)
    f = lambda x: torch.sin(x @ W * float(s))  # noqa: E731
    x = _x(3, 2)
    assert_close(td.laplacian(f, x), ref_laplacian(f, x))
    s.fill_(-0.5)
    assert_close(td.laplacian(f, x), ref_laplacian(f, x), msg="after s = -0.5")


class _Private(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 3)
        self._w0 = 1.0  # a private attribute, changed between calls

    def forward(self, x):
        return torch.sin(self.lin(x) * self._w0)


def test_private_python_attribute_change_is_seen():
    torch.manual_seed(0)
    net = _Private().to(DT)
    x = _x(3, 2)
    assert_close(td.laplacian(net, x), ref_laplacian(net, x))
    net._w0 = 3.0
    assert_close(td.laplacian(net, x), ref_laplacian(net, x), msg="after _w0 = 3")
    assert_close(td.jacobian(net, x, method="reverse"), ref_jacobian(net, x), msg="after _w0 = 3")


def test_forward_hooks_added_and_removed_are_seen():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
    x = _x(3, 2)
    assert_close(td.hessian(net, x), ref_hessian(net, x))
    h = net[1].register_forward_hook(lambda mod, inp, out: out * out)
    assert_close(td.hessian(net, x), ref_hessian(net, x), msg="after a forward hook")
    h.remove()
    p = net[0].register_forward_pre_hook(lambda mod, inp: (inp[0] * 2.0,))
    assert_close(td.hessian(net, x), ref_hessian(net, x), msg="after a forward pre-hook")
    p.remove()
    assert_close(td.hessian(net, x), ref_hessian(net, x), msg="after removing the hooks")


_GAIN = 1.0  # module-level setting read by _GlobalGain.forward


class _GlobalGain(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 3)

    def forward(self, x):
        return torch.tanh(self._body(x))

    def _body(self, x):
        return self.lin(x) * _GAIN


def test_module_global_rebinding_is_seen():
    """A global that a module's own methods read (here through a helper method) is rebound."""
    global _GAIN
    torch.manual_seed(0)
    net = _GlobalGain().to(DT)
    x = _x(3, 2)
    try:
        assert_close(td.laplacian(net, x), ref_laplacian(net, x))
        _GAIN = 2.5
        assert_close(td.laplacian(net, x), ref_laplacian(net, x), msg="after _GAIN = 2.5")
        assert_close(td.jacobian(net, x), ref_jacobian(net, x), msg="after _GAIN = 2.5")
    finally:
        _GAIN = 1.0


class _Wrapper:
    """A plain (non-Module) callable class around a net, as some training codes write it."""

    def __init__(self, net, scale):
        self.net, self.scale = net, scale

    def __call__(self, x):
        return torch.sin(self.net(x) * self.scale)

    def u(self, x):
        return torch.tanh(self.net(x)) * self.scale


def test_callable_object_and_bound_method_state_is_seen():
    torch.manual_seed(0)
    w = _Wrapper(nn.Linear(2, 2).to(DT), 1.0)
    x = _x(3, 2)
    for f in (w, w.u):
        w.scale = 1.0
        assert_close(td.laplacian(f, x), ref_laplacian(f, x))
        w.scale = 3.0
        assert_close(td.laplacian(f, x), ref_laplacian(f, x), msg="after scale = 3")
    w.net = nn.Linear(2, 2).to(DT)
    assert_close(td.jacobian(w, x), ref_jacobian(w, x), msg="after replacing the net")


def test_partial_state_is_seen():
    import functools

    def g(x, net, s):
        return torch.sin(net(x) * s)

    torch.manual_seed(0)
    net = nn.Linear(2, 2).to(DT)
    f = functools.partial(g, net=net, s=1.0)
    x = _x(3, 2)
    assert_close(td.jacobian(f, x), ref_jacobian(f, x))
    net.weight = nn.Parameter(torch.randn(2, 2, dtype=DT))
    assert_close(td.jacobian(f, x), ref_jacobian(f, x), msg="after replacing the weight")


def test_train_eval_switch():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 1)).to(DT)
    x = _x(5, 2)
    with pytest.raises(td.BatchMixingError):
        td.jacobian(net, x)
    net.eval()
    assert_close(td.jacobian(net, x), ref_jacobian(net, x))
    assert_close(td.laplacian(net, x), ref_laplacian(net, x))
    net.train()
    with pytest.raises(td.BatchMixingError):
        td.jacobian(net, x)
    with pytest.raises(td.BatchMixingError):
        td.laplacian(net, x)
    net.eval()
    assert_close(td.laplacian(net, x), ref_laplacian(net, x))


def test_dropout_eval_mode_is_deterministic_and_correct():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 1)).to(DT).eval()
    x = _x(4, 2)
    assert_close(td.hessian(net, x), ref_hessian(net, x))
    assert_close(td.laplacian(net, x), td.laplacian(net, x), atol=0, rtol=0)


def test_new_shapes_and_dtypes_get_their_own_graphs():
    net = make_mlp()
    for B in (1, 2, 5):
        x = _x(B, 2, seed=B)
        assert_close(td.jacobian(net, x), ref_jacobian(net, x), msg=f"B={B}")
    net32 = make_mlp().float()
    x32 = _x(3, 2).float()
    J = td.jacobian(net32, x32)
    assert J.dtype == torch.float32
    torch.testing.assert_close(J, ref_jacobian(net32, x32), atol=1e-5, rtol=1e-4)


# ============================================================================ lifetime and size


def _owners():
    return td.cache_info()["owners"]


def _wrap(net):
    return lambda x: net(x)


def _short_lived(i):
    W = torch.full((2, 3), 0.1 * i, dtype=DT)
    return lambda x: torch.tanh(x @ W)


@pytest.mark.parametrize("kind", ["module", "bound_method", "lambda_over_module"])
def test_cache_does_not_keep_module_alive(kind):
    gc.collect()
    owners0 = _owners()
    net = make_mlp()
    f = {"module": net, "bound_method": net.forward, "lambda_over_module": _wrap(net)}[kind]
    x = _x(3, 2)
    td.jacobian(f, x, method="forward")
    td.laplacian(f, x)
    td.partials(f, x, SPEC)
    assert _owners() == owners0 + 1
    r = weakref.ref(net)
    del net, f
    gc.collect()
    assert r() is None, "the cache keeps the module alive"
    assert _owners() == owners0


def test_bound_method_takes_the_fast_path():
    """``model.forward`` / another method as f is traced like the module (no fallback warning)."""
    net = make_mlp()
    x = _x(3, 2)
    J = td.jacobian(net.forward, x, method="forward")  # a FallbackWarning is an error in this suite
    assert_close(J, ref_jacobian(net, x))


def test_clear_cache():
    net = make_mlp()
    x = _x(3, 2)
    td.jacobian(net, x)
    assert td.cache_info()["entries"] > 0
    td.clear_cache()
    assert td.cache_info() == {"owners": 0, "entries": 0}
    assert_close(td.jacobian(net, x), ref_jacobian(net, x))  # rebuilt on demand


def test_cache_bounded_per_function():
    net = make_mlp()
    td.clear_cache()
    for B in range(1, 45):
        td.jacobian(net, _x(B, 2, seed=B), method="forward")
    assert td.cache_info()["owners"] == 1
    # 44 shapes, each a captured graph and a derivative graph: the slot is full and held at its bound
    assert td.cache_info()["entries"] == _PER_F
    x = _x(7, 2, seed=99)
    assert_close(td.jacobian(net, x), ref_jacobian(net, x))


@pytest.mark.slow  # 2000 steps (fast tier: the other bounds below)
def test_cache_flat_over_2000_training_steps():
    net = make_mlp(d_out=1)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    x = _x(8, 2)

    def step():
        lap = td.laplacian(net, x)
        loss = (lap**2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(20):
        step()
    gc.collect()
    info0 = td.cache_info()
    tracemalloc.start()
    try:
        snap0 = tracemalloc.take_snapshot()
        for _ in range(2000):
            step()
        gc.collect()
        snap1 = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    assert td.cache_info() == info0
    growth = sum(s.size_diff for s in snap1.compare_to(snap0, "filename"))
    assert growth < 2_000_000, f"python heap grew by {growth} bytes over 2000 steps"
    assert_close(td.laplacian(net, x), ref_laplacian(net, x))


def test_many_short_lived_functions_do_not_accumulate():
    gc.collect()
    owners0 = _owners()
    x = _x(3, 2)
    for i in range(30):
        td.laplacian(_short_lived(i), x)
    gc.collect()
    assert _owners() <= owners0 + 1


# ============================================================================ differentiability w.r.t. parameters


def _nested_grad_jacobian(net, x):
    """The classic loop: one create_graph=True autograd.grad per output component."""
    x = x.detach().requires_grad_(True)
    y = net(x)
    cols = [torch.autograd.grad(y[:, o].sum(), x, create_graph=True)[0] for o in range(y.shape[1])]
    return x, y, torch.stack(cols, 1)  # [B, out, in]


def _nested_grad_laplacian(net, x):
    x, y, J = _nested_grad_jacobian(net, x)
    lap = 0
    for i in range(x.shape[1]):
        lap = lap + torch.stack([torch.autograd.grad(J[:, o, i].sum(), x, create_graph=True)[0][:, i]
                                 for o in range(y.shape[1])], 1)
    return lap


def _param_grads(net, loss):
    """Parameter gradients, zeros for parameters a derivative does not depend on (e.g. the last bias)."""
    params = list(net.parameters())
    gs = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]


def _losses(what, net, ref, x, R):
    """(torchderiv loss, nested autograd.grad loss) for one kind of request."""
    if what == "jacobian_fwd":
        return (td.jacobian(net, x, method="forward") * R).sum(), (_nested_grad_jacobian(ref, x)[2] * R).sum()
    if what == "jacobian_rev":
        return (td.jacobian(net, x, method="reverse") * R).sum(), (_nested_grad_jacobian(ref, x)[2] * R).sum()
    if what in ("laplacian", "laplacian_rev"):
        lap = td.laplacian(net, x, method="reverse" if what == "laplacian_rev" else "forward")
        return (lap**2).sum(), (_nested_grad_laplacian(ref, x) ** 2).sum()
    if what in ("hessian", "hessian_rev"):
        H = td.hessian(net, x, method="reverse" if what == "hessian_rev" else "forward")
        return (H[:, :, 0, 1].pow(2).sum() + H[:, :, 2, 2].sum(),
                nested_partial(ref, x, (0, 1)).pow(2).sum() + nested_partial(ref, x, (2, 2)).sum())
    if what == "partials":
        keys = [(0,), (1, 2), (0, 2, 2)]
        d = td.partials(net, x, keys)
        return (sum((d[k] * (i + 1)).sum() for i, k in enumerate(keys)),
                sum((nested_partial(ref, x, k) * (i + 1)).sum() for i, k in enumerate(keys)))
    raise AssertionError(what)


@pytest.mark.parametrize("what", ["jacobian_fwd", "jacobian_rev", "laplacian", "laplacian_rev", "hessian",
                                  "hessian_rev", "partials"])
@pytest.mark.parametrize("net_name", ["mlp", "residual_layernorm"])
def test_results_are_differentiable_wrt_parameters(net_name, what):
    """The parameter gradient of a loss built from a torchderiv result equals the one of the same loss
    built with the nested ``autograd.grad(create_graph=True)`` loop."""
    if net_name == "mlp":
        net = make_mlp(d_in=3)
        ref = net
    else:
        # the nested-grad side runs on the manual-LayerNorm twin (same parameters): torch's own double
        # backward of layer_norm is unreliable at total order >= 3
        torch.manual_seed(0)
        net = ResidualLN(d_in=3).to(DT)
        ref = net.reference
    x = _x(4, 3)
    g = torch.Generator().manual_seed(3)
    R = torch.randn(4, 2, 3, dtype=DT, generator=g)
    ours, theirs = _losses(what, net, ref, x, R)
    assert_close(ours, theirs, atol=1e-9, rtol=1e-7, msg="loss value")
    for p, a, b in zip(net.parameters(), _param_grads(net, ours), _param_grads(net, theirs)):
        assert_close(a, b, atol=1e-9, rtol=1e-7, msg=f"{net_name} {what} grad of {tuple(p.shape)}")


def test_biharmonic_is_differentiable_wrt_parameters():
    net = make_mlp(d_in=2, width=6, d_out=1)
    x = _x(3, 2)
    ours = td.biharmonic(net, x).pow(2).sum()
    theirs = sum(nested_partial(net, x, (i, i, j, j)) for i in range(2) for j in range(2)).pow(2).sum()
    for a, b in zip(_param_grads(net, ours), _param_grads(net, theirs)):
        assert_close(a, b, atol=1e-9, rtol=1e-7)


def test_results_are_differentiable_wrt_x():
    """With x requiring grad, d/dx of a Jacobian entry is the matching Hessian entry."""
    net = make_mlp(d_in=2, d_out=1)
    x = _x(3, 2).requires_grad_(True)
    J = td.jacobian(net, x, method="forward")  # [B, 1, 2]
    g = torch.autograd.grad(J[:, 0, 0].sum(), x)[0]
    assert_close(g, ref_hessian(net, x.detach())[:, 0, 0, :])


def test_training_a_pinn_loss_matches_nested_autograd():
    """Two identical nets trained a few Adam steps, one with torchderiv, one with the nested-grad loop."""
    a, b = make_mlp(d_out=1), make_mlp(d_out=1)
    x = _x(16, 2)
    oa = torch.optim.Adam(a.parameters(), lr=1e-2)
    ob = torch.optim.Adam(b.parameters(), lr=1e-2)
    for _ in range(5):
        la = ((td.laplacian(a, x) + 1) ** 2).mean()
        lb = ((_nested_grad_laplacian(b, x) + 1) ** 2).mean()
        assert_close(la, lb, atol=1e-9, rtol=1e-7)
        oa.zero_grad()
        la.backward()
        oa.step()
        ob.zero_grad()
        lb.backward()
        ob.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert_close(p.detach(), q.detach(), atol=1e-9, rtol=1e-7)


# ============================================================================ grad modes


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_under_no_grad(mode):
    net = make_mlp()
    x = _x(3, 2)
    ctx = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with ctx():
        r = all_results(net, x)
    for name, v in r.items():
        vals = v.values() if isinstance(v, dict) else [v]
        for t in vals:
            assert not t.requires_grad, name
    assert_close(r["jacobian_fwd"], ref_jacobian(net, x))
    assert_close(r["jacobian_rev"], ref_jacobian(net, x))
    assert_close(r["hessian"], ref_hessian(net, x))
    assert_close(r["laplacian"], ref_laplacian(net, x))
    P = ref_partials(net, x, SPEC)
    for k in SPEC:
        assert_close(r["partials"][k], P[k])
    # and the cached graphs still give gradients afterwards
    lap = td.laplacian(net, x)
    assert lap.requires_grad
    lap.sum().backward()
    assert net[0].weight.grad is not None and net[2].weight.grad is not None
    assert_close(net[0].weight.grad, _param_grads(net, _nested_grad_laplacian(net, x).sum())[0])

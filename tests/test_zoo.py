"""Every public operator on every zoo architecture, against per-sample torch.func references (float64)."""

from __future__ import annotations

import pytest
import torch

import torchderiv as td
from conftest import (
    ZOO,
    ZOO_IDS,
    assert_close,
    ref_biharmonic,
    ref_hessian,
    ref_jacobian,
    ref_laplacian,
    ref_partials,
    ref_partials_autograd,
    ref_restricted,
    ref_value,
)

zoo = pytest.mark.parametrize("case", ZOO, ids=ZOO_IDS)
light_zoo = pytest.mark.parametrize("case", [c for c in ZOO if not c.heavy], ids=[c.name for c in ZOO if not c.heavy])


def _out_shape(model, x):
    return tuple(ref_value(model, x).shape[1:])


def _is_square(model, x):
    return _out_shape(model, x) == tuple(x.shape[1:])


def mixed_spec(n: int) -> list[tuple[int, ...]]:
    """Orders 0..4 with repeated and mixed coordinates, adapted to the input size ``n``."""
    a, b, c = 0, 1 % n, 2 % n
    spec = [(), (a,), (b,), (n - 1,), (b, b), (a, b), (n - 1, a), (a, b, c), (b, b, b), (c, a, a),
            (a, a, b, b), (a, b, b, b), (c, c, c, c), (a, b, c, n - 1)]
    seen, out = set(), []
    for s in spec:
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


@zoo
@pytest.mark.parametrize("method", ["forward", "reverse", "auto"])
def test_jacobian_batched(case, method):
    model, ref, x = case.build()
    J = td.jacobian(model, x, method=method)
    assert J.shape == (x.shape[0], *_out_shape(model, x), *x.shape[1:])
    assert_close(J, ref_jacobian(ref, x), msg=f"{case.name} jacobian {method}")


@zoo
@pytest.mark.parametrize("method", ["forward", "reverse"])
def test_jacobian_unbatched(case, method):
    """batched=False treats the whole x as one point: cross-sample blocks are zero."""
    model, ref, x = case.build()
    x = x[:2]
    J = td.jacobian(model, x, batched=False, method=method)
    expected = torch.func.jacrev(ref)(x)
    assert_close(J, expected, msg=f"{case.name} jacobian batched=False {method}")


@zoo
def test_jacobian_repeated_call_is_stable(case):
    """The second identical call (cached graph / fast path) returns the same numbers, also at a new x."""
    model, ref, x = case.build()
    J1 = td.jacobian(model, x, method="forward")
    J2 = td.jacobian(model, x, method="forward")
    assert_close(J2, J1, atol=0, rtol=0)
    x2 = x + 0.1
    assert_close(td.jacobian(model, x2, method="forward"), ref_jacobian(ref, x2), msg=f"{case.name} new x")


@zoo
@pytest.mark.parametrize("method", ["forward", "reverse"])
def test_jacobian_diagonal_and_divergence(case, method):
    model, ref, x = case.build()
    if not _is_square(model, x):
        with pytest.raises(ValueError, match="jacobian_diagonal"):
            td.jacobian_diagonal(model, x, method=method)
        return
    n = case.n
    B = x.shape[0]
    J = ref_jacobian(ref, x).reshape(B, n, n)
    diag = J.diagonal(dim1=-2, dim2=-1)
    assert_close(td.jacobian_diagonal(model, x, method=method), diag.reshape(x.shape), msg=f"{case.name} jacdiag")
    assert_close(td.divergence(model, x, method=method), diag.sum(-1), msg=f"{case.name} divergence")


@zoo
@pytest.mark.parametrize("method", ["forward", "reverse", "auto"])
def test_hessian(case, method):
    model, ref, x = case.build()
    H = td.hessian(model, x, method=method)
    ins = tuple(x.shape[1:])
    assert H.shape == (x.shape[0], *_out_shape(model, x), *ins, *ins)
    assert_close(H, ref_hessian(ref, x), msg=f"{case.name} hessian {method}")


@pytest.mark.parametrize("method", ["reverse", "auto"])
def test_hessian_reverse_silu_no_grad(method):
    """The reverse Hessian needs no forward-mode formula: under no_grad ``silu_backward`` has none (auto picks
    reverse for 6 inputs and one output). A second call at a new x takes the fast path."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.SiLU(), torch.nn.Linear(16, 1)).double()
    for _ in range(2):
        x = torch.randn(5, 6, dtype=torch.float64)
        with torch.no_grad():
            H = td.hessian(net, x, method=method)
        assert_close(H, ref_hessian(net, x), msg=f"silu hessian {method} no_grad")


@zoo
@pytest.mark.parametrize("method", ["forward", "reverse"])
def test_hessian_diagonal(case, method):
    model, ref, x = case.build()
    n = case.n
    H = ref_hessian(ref, x)
    lead = H.shape[: H.dim() - 2 * len(case.in_shape)]
    expected = H.reshape(*lead, n, n).diagonal(dim1=-2, dim2=-1).reshape(*lead, *case.in_shape)
    assert_close(td.hessian_diagonal(model, x, method=method), expected, msg=f"{case.name} hessian_diagonal")


@zoo
@pytest.mark.parametrize("method", ["forward", "reverse"])
def test_laplacian(case, method):
    model, ref, x = case.build()
    lap = td.laplacian(model, x, method=method)
    assert lap.shape == (x.shape[0], *_out_shape(model, x))
    assert_close(lap, ref_laplacian(ref, x), msg=f"{case.name} laplacian {method}")


@zoo
@pytest.mark.parametrize("method", ["forward", "reverse"])
def test_laplacian_dims_and_weights(case, method):
    model, ref, x = case.build()
    dims = case.lap_dims
    assert_close(td.laplacian(model, x, dims=dims, method=method), ref_laplacian(ref, x, dims=dims),
                 msg=f"{case.name} laplacian dims")
    m = len(dims)
    g = torch.Generator().manual_seed(7)
    A = torch.randn(m, m, dtype=x.dtype, generator=g)
    C = A @ A.T + 0.5 * (A + A.T)  # symmetric, off-diagonal entries non-zero
    assert_close(td.laplacian(model, x, dims=dims, weights=C, method=method),
                 ref_laplacian(ref, x, dims=dims, weights=C), msg=f"{case.name} laplacian weights")


@zoo
def test_partials_mixed_orders(case):
    model, ref, x = case.build()
    spec = mixed_spec(case.n)
    got = td.partials(model, x, spec)
    assert list(got) == spec
    expected = ref_partials(ref, x, spec)
    for key in spec:
        assert_close(got[key], expected[key], msg=f"{case.name} partial {key}")


@zoo
def test_partials_each_order_alone(case):
    """A request of a single high-order entry plans only its closure (different graph than the mixed one)."""
    model, ref, x = case.build()
    b = 1 % case.n
    for key in [(b, b, 0), (0, b, b, b)]:
        got = td.partials(model, x, [key])
        assert_close(got[key], ref_partials(ref, x, [key])[key], msg=f"{case.name} partial {key}")


@zoo
def test_biharmonic(case):
    model, ref, x = case.build()
    dims = case.lap_dims
    bd = td.biharmonic(model, x, dims=dims)
    assert bd.shape == (x.shape[0], *_out_shape(model, x))
    assert_close(bd, ref_biharmonic(ref, x, dims=dims), msg=f"{case.name} biharmonic dims={dims}")
    if not case.heavy:
        assert_close(td.biharmonic(model, x), ref_biharmonic(ref, x), msg=f"{case.name} biharmonic")


@light_zoo
def test_reference_methods_agree(case):
    """The two reference implementations (nested jacrev, nested autograd.grad) agree at orders 3 and 4."""
    _, ref, x = case.build()
    coords = sorted({0, 1 % case.n, case.n - 1})
    pos = {c: i for i, c in enumerate(coords)}
    for k in (3, 4):
        T = ref_restricted(ref, x, coords, k)
        keys = [key for key in mixed_spec(case.n) if len(key) == k]
        got = ref_partials_autograd(ref, x, keys)
        for key in keys:
            if set(key) <= set(coords):
                assert_close(got[key], T[(..., *[pos[i] for i in key])], msg=f"{case.name} reference {key}")

"""Every public operator on every zoo architecture, against per-sample references (float64, tests/_harness.py)."""

from __future__ import annotations

import pytest
import torch

import torchderiv as td
from _harness import Case, close, mixed_spec, params, restricted, sampled, sym_weights
from conftest import ZOO
from torchderiv._taylor import direction_groups, normalized

zoo = pytest.mark.parametrize("case", params(ZOO))
# orders 3-4 on the wide-input (heavy) architectures: the slow tier
zoo_high = pytest.mark.parametrize("case", params(ZOO, slow=lambda c: c.heavy))
light_zoo = pytest.mark.parametrize("case", params([c for c in ZOO if not c.heavy]))
# variants of an operator checked on every architecture above (batched=False, a repeated call, restricted dims and
# weights, the Hessian's diagonal): every other architecture in the fast tier, all of them in make test
zoo_sampled = pytest.mark.parametrize("case", sampled(params(ZOO), 2))


def _dims(case: Case) -> list[int]:
    return case.dims if case.dims is not None else [0, 1]


@zoo
@pytest.mark.parametrize("method", ["forward", "reverse", "auto"])
def test_jacobian_batched(case, method):
    model, _, x = case.build()
    J = td.jacobian(model, x, method=method)
    assert J.shape == (x.shape[0], *case.out_shape(), *x.shape[1:])
    close(J, case.jacobian(), f"{case.name} jacobian {method}")


@zoo_sampled
@pytest.mark.parametrize("method", ["forward", "reverse"])
def test_jacobian_unbatched(case, method):
    """batched=False treats the whole x as one point: cross-sample blocks are zero."""
    model, ref, x = case.build()
    x = x[:2]
    J = td.jacobian(model, x, batched=False, method=method)
    expected = torch.func.jacrev(ref)(x)
    close(J, expected, f"{case.name} jacobian batched=False {method}")


@zoo_sampled
def test_jacobian_repeated_call_is_stable(case):
    """The second identical call (cached graph / fast path) returns the same numbers, also at a new x."""
    model, ref, x = case.build()
    J1 = td.jacobian(model, x, method="forward")
    J2 = td.jacobian(model, x, method="forward")
    close(J2, J1, atol=0, rtol=0)
    x2 = x + 0.1
    J = restricted(ref, x2, 1)
    close(td.jacobian(model, x2, method="forward"), J.reshape(*J.shape[:-1], *x.shape[1:]), f"{case.name} new x")


@zoo
@pytest.mark.parametrize("method", ["forward", "reverse"])
def test_jacobian_diagonal_and_divergence(case, method):
    model, _, x = case.build()
    if not case.square():
        with pytest.raises(ValueError, match="jacobian_diagonal"):
            td.jacobian_diagonal(model, x, method=method)
        return
    diag = case.jacobian_diagonal()
    close(td.jacobian_diagonal(model, x, method=method), diag, f"{case.name} jacdiag")
    close(td.divergence(model, x, method=method), diag.flatten(1).sum(-1), f"{case.name} divergence")


@zoo
@pytest.mark.parametrize("method", ["forward", "reverse", "auto"])
def test_hessian(case, method):
    model, _, x = case.build()
    H = td.hessian(model, x, method=method)
    ins = tuple(x.shape[1:])
    assert H.shape == (x.shape[0], *case.out_shape(), *ins, *ins)
    close(H, case.hessian(), f"{case.name} hessian {method}")


@pytest.mark.parametrize("method", ["reverse", "auto"])
def test_hessian_reverse_silu_no_grad(method):
    """The reverse Hessian needs no forward-mode formula: under no_grad ``silu_backward`` has none (auto picks
    reverse for 6 inputs and one output). A second call at a new x takes the fast path."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.SiLU(), torch.nn.Linear(16, 1)).double()
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        x = torch.randn(5, 6, dtype=torch.float64, generator=g)
        with torch.no_grad():
            H = td.hessian(net, x, method=method)
        expected = restricted(net, x, 2)
        close(H, expected.reshape(5, 1, 6, 6), f"silu hessian {method} no_grad")


@zoo_sampled
@pytest.mark.parametrize("method", ["forward", "reverse"])
def test_hessian_diagonal(case, method):
    model, _, x = case.build()
    close(td.hessian_diagonal(model, x, method=method), case.hessian_diagonal(), f"{case.name} hessian_diagonal")


@zoo
@pytest.mark.parametrize("method", ["forward", "reverse"])
def test_laplacian(case, method):
    model, _, x = case.build()
    lap = td.laplacian(model, x, method=method)
    assert lap.shape == (x.shape[0], *case.out_shape())
    close(lap, case.laplacian(), f"{case.name} laplacian {method}")


@zoo_sampled
@pytest.mark.parametrize("method", ["forward", "reverse"])
def test_laplacian_dims_and_weights(case, method):
    model, _, x = case.build()
    dims = _dims(case)
    close(td.laplacian(model, x, dims=dims, method=method), case.laplacian(dims), f"{case.name} laplacian dims")
    C = sym_weights(len(dims), seed=7)
    close(td.laplacian(model, x, dims=dims, weights=C, method=method), case.laplacian(dims, C),
          f"{case.name} laplacian weights")


@zoo_high
def test_partials_mixed_orders(case):
    model, _, x = case.build()
    spec = mixed_spec(case.n)
    got = td.partials(model, x, spec)
    assert list(got) == spec
    expected = case.partials(spec)
    for key in spec:
        close(got[key], expected[key], f"{case.name} partial {key}")


@zoo_high
def test_partials_each_order_alone(case):
    """A request of a single high-order entry plans only its closure (different graph than the mixed one)."""
    model, _, x = case.build()
    b = 1 % case.n
    for key in [(b, b, 0), (0, b, b, b)]:
        got = td.partials(model, x, [key])
        close(got[key], case.partial(key), f"{case.name} partial {key}")


@pytest.mark.parametrize("case", sampled(params([c for c in ZOO if c.n >= 2]), 2))
def test_partials_of_independent_groups(case):
    """Directions that no requested partial mixes are propagated group by group in one graph (u_t with u_xx:
    torchderiv._taylor.direction_groups); every entry against the per-sample reference."""
    model, _, x = case.build()
    a, b, c = 0, 1, case.n - 1
    spec = [(), (a,), (b, b)] + ([(c, c, c)] if c > b else [(b, b, b)])
    items, combos = normalized([k for k in spec], [])
    assert direction_groups(items, combos) is not None, "the request must take the grouped path"
    got = td.partials(model, x, spec)
    expected = case.partials(spec)
    for key in spec:
        close(got[key], expected[key], f"{case.name} partial {key} (grouped)")


@zoo_high
def test_biharmonic(case):
    model, _, x = case.build()
    dims = _dims(case)
    bd = td.biharmonic(model, x, dims=dims)
    assert bd.shape == (x.shape[0], *case.out_shape())
    close(bd, case.biharmonic(dims), f"{case.name} biharmonic dims={dims}")
    if not case.heavy:
        close(td.biharmonic(model, x), case.biharmonic(), f"{case.name} biharmonic")


@pytest.mark.slow  # checks the references, not torchderiv
@light_zoo
def test_reference_methods_agree(case):
    """The two reference implementations (nested autograd.grad, the default at orders 3-4, and nested jacrev under
    vmap) agree at orders 3-4."""
    _, ref, x = case.build()
    coords = sorted({0, 1 % case.n, case.n - 1})
    for k in (3, 4):
        close(case.tensor(k, coords), restricted(ref, x, k, coords, via="jacrev"), f"{case.name} references order {k}")

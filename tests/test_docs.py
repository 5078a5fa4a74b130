"""The docstring examples run, and the generated coverage table is up to date."""

import doctest
from pathlib import Path

import torchderiv
from torchderiv import _api, _coverage, _dispatch, _warnings

ROOT = Path(__file__).resolve().parents[1]


def test_docstring_examples_run():
    for mod, at_least in ((_api, 8), (_dispatch, 1), (_warnings, 1)):
        result = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.attempted >= at_least, mod.__name__
        assert result.failed == 0, mod.__name__


def test_coverage_table_is_generated_from_the_registry():
    assert (ROOT / "docs" / "coverage.md").read_text() == _coverage.markdown(), (
        "docs/coverage.md is stale: run `python -m torchderiv._coverage > docs/coverage.md`"
    )


def test_public_names():
    for name in torchderiv.__all__:
        assert getattr(torchderiv, name).__doc__, name


def test_readme_several_inputs_pattern():
    """README "Several inputs": partials of net(x, t) through the stacked coordinates equal torch.func's
    per-input derivatives (argnums), in float64."""
    import torch
    from torch.func import jacrev, vmap

    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

        def forward(self, x, t):
            return self.body(torch.cat([x, t], 1))

    net = Net().double()
    x = torch.rand(5, 2, dtype=torch.float64)
    t = torch.rand(5, 1, dtype=torch.float64)
    d = torchderiv.partials(lambda z: net(z[:, :2], z[:, 2:]), torch.cat([x, t], 1), ["t", "xx", "yy"],
                            coords="xyt")

    def u(xi, ti):
        return net(xi[None], ti[None])[0, 0]

    u_t = vmap(jacrev(u, argnums=1))(x, t)[:, 0]
    H = vmap(jacrev(jacrev(u, argnums=0), argnums=0))(x, t)
    torch.testing.assert_close(d["t"][:, 0], u_t, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(d["xx"][:, 0], H[:, 0, 0], atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(d["yy"][:, 0], H[:, 1, 1], atol=1e-10, rtol=1e-8)

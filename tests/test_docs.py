"""The docstring examples run, and the generated coverage table is up to date."""

import doctest
from pathlib import Path

import torchderiv
from torchderiv import _api, _coverage

ROOT = Path(__file__).resolve().parents[1]


def test_docstring_examples_run():
    result = doctest.testmod(_api, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 8
    assert result.failed == 0


def test_coverage_table_is_generated_from_the_registry():
    assert (ROOT / "docs" / "coverage.md").read_text() == _coverage.markdown(), (
        "docs/coverage.md is stale: run `python -m torchderiv._coverage > docs/coverage.md`"
    )


def test_public_names():
    for name in torchderiv.__all__:
        assert getattr(torchderiv, name).__doc__, name

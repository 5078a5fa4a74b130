"""The op coverage table, generated from the rule registry (``python -m torchderiv._coverage``)."""

from __future__ import annotations

from ._rules import RULES, kind_of


def _kind(op) -> str:
    """The kind declared with the op's rule in :mod:`torchderiv._rules`."""
    kind = kind_of(op)
    if kind is None:
        raise AssertionError(f"{op} has a rule but no declared kind")
    return kind


def markdown() -> str:
    rows = sorted(((_kind(op), str(op)) for op in RULES), key=lambda r: (r[0], r[1]))
    lines = [
        "# Op coverage",
        "",
        "Generated from the rule registry by `python -m torchderiv._coverage > docs/coverage.md`",
        "(a test checks that this file is up to date).",
        "",
        "Every rule below is built from the order-generic jet combinators, so it supports **every order**",
        "(1, 2, 3, 4 and beyond) and the collapsed (Laplacian / biharmonic) streams. Piecewise-linear functions",
        "(relu, abs, clamp, hardtanh, leaky_relu, maximum, minimum) have zero derivatives of order >= 2",
        "away from their kinks, as in PyTorch.",
        "",
        "Ops without a rule are first **decomposed** with `torch._decomp` into ops that have one (exact at",
        "every order, e.g. `elu` variants, `hardswish`, `mish`, `logit`, pooling). An op with neither goes",
        "through the **generic fallback**: forward-mode AD of that op alone, correct at order 1 and reported",
        "once with a warning naming the op; at order >= 2 it raises `NotImplementedError` naming the op",
        "and the order.",
        "",
        "| kind | ATen op | orders | implementation |",
        "|---|---|---|---|",
    ]
    for kind, name in rows:
        lines.append(f"| {kind} | `{name}` | any | rule |")
    lines += [
        "| (any other with a torch._decomp decomposition) | | any | decomposition |",
        "| (any other) | | 1 | generic forward-mode fallback (warns once) |",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(markdown(), end="")

"""The op coverage table, generated from the rule registry (``python -m torchderiv._coverage``)."""

from __future__ import annotations

from ._rules import _UNARY, RULES

_KINDS = {
    "linear algebra": {"mm", "addmm", "bmm", "baddbmm", "convolution", "_fft_r2c", "_fft_c2r", "_fft_c2c",
                       "linalg_inv_ex", "_linalg_det", "_linalg_slogdet", "_linalg_solve_ex", "_trilinear"},
    "arithmetic": {"add", "sub", "rsub", "mul", "div", "neg", "pow", "where", "maximum", "minimum", "atan2",
                   "clamp", "clamp_min", "clamp_max", "complex", "view_as_real", "view_as_complex", "_conj",
                   "_conj_physical"},
    "shape": {"t", "transpose", "permute", "view", "_unsafe_view", "reshape", "expand", "unsqueeze", "squeeze",
              "clone", "alias", "contiguous", "lift_fresh_copy", "_to_copy", "detach", "slice", "select",
              "index_select", "constant_pad_nd", "cat", "stack", "split", "split_with_sizes", "unbind", "unfold",
              "scatter", "scatter_add", "scatter_reduce"},
    "reduction": {"sum", "mean", "var", "var_mean", "logsumexp", "prod", "cumprod", "logcumsumexp",
                  "linalg_vector_norm", "sort", "topk", "kthvalue", "median", "cummax", "cummin"},
    "normalization / softmax": {"native_layer_norm", "_softmax", "_log_softmax", "native_batch_norm",
                                "_native_batch_norm_legit_no_training"},
}


def _kind(op) -> str:
    if op in _UNARY or op.__name__.split(".")[0] == "gelu":
        return "elementwise"
    base = op.__name__.split(".")[0]
    for kind, names in _KINDS.items():
        if base in names:
            return kind
    return "other"


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

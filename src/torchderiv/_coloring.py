"""Colorings of sparsity patterns: which input coordinates may share one propagated direction.

A color ``c`` stands for the direction ``s_c = sum_{i: color(i) = c} e_i``. Forward Taylor mode along ``s_c``
gives ``J s_c`` (order 1) and ``s_a^T H_o s_b`` (order 2, for each output entry ``o``); a coloring is valid
when every needed entry can be read off these compressed values directly (no substitution):

* Jacobian (column compression, Curtis-Powell-Reid 1974; Gebremedhin, Manne & Pothen, SIAM Review 2005):
  no two columns of one color share a row, so ``J[o, i] = (J s_{color(i)})[o]`` for every nonzero.
* Jacobian diagonal: ``J[i, i] = (J s_{color(i)})[i]`` needs ``J[i, k] = 0`` for every other ``k`` of
  ``i``'s color: ``i`` and ``k`` conflict when ``J[i, k]`` or ``J[k, i]`` is nonzero (a pointwise map has no
  conflicts: one color).
* Hessian: every nonzero ``H_o[i, j]`` must be the ONLY nonzero of ``H_o`` in its block
  ``(color(i), color(j))``; then ``H_o[i, j] = s_{color(i)}^T H_o s_{color(j)}``. We color the columns of
  the row-support pattern ``R[o, i] = any_j H_o[i, j] != 0`` with the Jacobian rule: colors are then
  injective on every ``H_o``'s support, which implies the block condition (``hessian_valid`` checks the
  condition itself). It serves ``hessian_diagonal`` too (blocks ``(c, c)`` only).

The greedy order is the natural order of the coordinates, which is optimal for banded patterns
(``bandwidth`` colors) and for pointwise maps (one color).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor


def _greedy(adj_ptr: Tensor, adj_idx: Tensor, n: int) -> Tensor:
    """Greedy graph coloring in natural order of a graph in CSR form (self loops ignored)."""
    ptr = adj_ptr.tolist()
    idx = adj_idx.tolist()
    colors = [-1] * n
    for i in range(n):
        used = {colors[k] for k in idx[ptr[i] : ptr[i + 1]] if k != i and colors[k] >= 0}
        c = 0
        while c in used:
            c += 1
        colors[i] = c
    return torch.tensor(colors, dtype=torch.long)


def _csr(rows: Tensor, cols: Tensor, n: int) -> tuple[Tensor, Tensor]:
    order = torch.argsort(rows * n + cols)
    rows, cols = rows[order], cols[order]
    ptr = torch.zeros(n + 1, dtype=torch.long)
    ptr[1:] = torch.bincount(rows, minlength=n).cumsum(0)
    return ptr, cols


def _column_conflicts(P: Tensor) -> tuple[Tensor, Tensor]:
    """Pairs of columns of the bool pattern ``P [m, n]`` that share a row (both orders)."""
    m, n = P.shape
    if n <= 4096:
        Pf = P.to(torch.float32)
        return ((Pf.T @ Pf) > 0).nonzero().unbind(1)
    S = P.to_sparse().to(torch.float32)
    with warnings.catch_warnings():  # torch.sparse.mm of COO tensors warns that sparse CSR support is in beta
        warnings.simplefilter("ignore")
        C = torch.sparse.mm(S.t(), S).coalesce()  # [n, n]: columns sharing a row
    i, k = C.indices()
    return i, k


def color_columns(P: Tensor) -> Tensor:
    """Distance-1 column coloring of a bool pattern ``[m, n]``: ``colors [n]`` with no two columns of one
    color sharing a row."""
    n = P.shape[1]
    i, k = _column_conflicts(P.cpu())
    ptr, idx = _csr(i, k, n)
    return _greedy(ptr, idx, n)


def color_diagonal(P: Tensor) -> Tensor:
    """Coloring for the diagonal of a square pattern ``[n, n]``: ``i`` and ``k`` share a color only when
    ``P[i, k]`` and ``P[k, i]`` are both zero."""
    n = P.shape[0]
    i, k = P.cpu().nonzero().unbind(1)
    rows, cols = torch.cat([i, k]), torch.cat([k, i])
    ptr, idx = _csr(rows, cols, n)
    return _greedy(ptr, idx, n)


def columns_valid(P: Tensor, colors: Tensor) -> bool:
    """No row of ``P`` has two nonzero columns of one color."""
    o, i = P.cpu().nonzero().unbind(1)
    key = o * (int(colors.max()) + 1 if colors.numel() else 1) + colors[i]
    return bool(torch.unique(key).numel() == key.numel())


def diagonal_valid(P: Tensor, colors: Tensor) -> bool:
    """Every row ``i`` of the square ``P`` sees no other column of ``i``'s color."""
    o, i = P.cpu().nonzero().unbind(1)
    off = o != i
    return bool(not (colors[o[off]] == colors[i[off]]).any())


def hessian_valid(T: Tensor, colors: Tensor) -> bool:
    """Every nonzero ``H_o[i, j]`` (triples ``T [3, nnz]``) is the only nonzero of ``H_o`` in its block
    ``(color(i), color(j))``."""
    o, i, j = T
    p = int(colors.max()) + 1 if colors.numel() else 1
    key = (o * p + colors[i]) * p + colors[j]
    return bool(torch.unique(key).numel() == key.numel())

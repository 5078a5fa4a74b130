"""The calibrated cost model behind ``method="auto"``.

Every method is predicted to take

    t_m = c0 + c1 * ops * u_m + c2 * B * flops * u_m + c3 * B * elems * u_m   seconds,

where, read off ``f``'s traced graph at ``x``: ``ops`` is the number of ATen ops, ``flops`` the multiply-adds
per sample of one forward pass (matmuls and convolutions), ``elems`` the number of values the other ops
write per sample; ``B`` is the batch size, and ``u_m`` the method's number of forward-pass-sized passes for
the request:

* ``forward`` (Taylor): ``1 + sum_k k * rows_k``, the coefficient rows of order ``k`` that the plan
  propagates (a collapsed Laplacian is one row of order 2), weighted by order (a row of order ``k``
  meets about ``k`` product terms in every nonlinearity);
* ``autograd`` (nested ``torch.autograd.grad``): ``1 + 2 m sum_p (1 + |p|)`` over the distinct proper
  prefixes ``p`` of the requested multi-indices, ``m`` outputs per sample (one reverse pass per prefix,
  through a graph that grows with the depth);
* ``reverse`` (vectorized vjps): ``1 + 2 m`` for a Jacobian, ``1 + 4 m n`` for reverse-over-reverse
  Hessians over ``n`` inputs.

The constants ``c0..c3`` are fitted per method and per grad mode (whether the result will be
differentiated w.r.t. the parameters afterwards) by ``torchderiv calibrate`` over a designed sample of
networks and requests, and shipped as ``calibration.json`` next to this module. The choice is a pure
function of the request, the traced graph, ``x``'s shape / dtype / device, the grad mode, whether
torch.compile is tracing, and that table: no timing happens inside a user's call.
"""

from __future__ import annotations

import json
import math
import weakref
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import fx

TABLE_PATH = Path(__file__).with_name("calibration.json")

_MATMUL = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "convolution", "_convolution", "einsum"}
_FREE = {"view", "_unsafe_view", "reshape", "expand", "permute", "t", "transpose", "squeeze", "unsqueeze",
         "slice", "select", "alias", "detach", "split", "split_with_sizes", "unbind", "as_strided"}


@dataclass(frozen=True)
class GraphCost:
    ops: int
    flops: float  # multiply-adds per sample
    elems: float  # values written per sample by ops other than views and matmuls


_COSTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def graph_cost(gm: fx.GraphModule, batch: int) -> GraphCost:
    """Size of one forward pass of a traced graph, per sample of a batch of ``batch`` (cached per graph)."""
    per = _COSTS.setdefault(gm, {})
    if batch not in per:
        per[batch] = _graph_cost(gm, batch)
    return per[batch]


def _graph_cost(gm: fx.GraphModule, batch: int) -> GraphCost:
    ops, flops, elems = 0, 0.0, 0.0
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        name = getattr(getattr(n.target, "_schema", None), "name", str(n.target)).split("::")[-1]
        val = n.meta.get("val")
        out = val.numel() if isinstance(val, torch.Tensor) else 0
        if name in _FREE:
            continue
        ops += 1
        if name in _MATMUL:
            flops += out * _inner(n, name)
        else:
            elems += out
    b = max(batch, 1)
    return GraphCost(ops, flops / b, elems / b)


def _inner(n: fx.Node, name: str) -> int:
    """The contracted length of a matmul-like node (from its operands' traced shapes)."""
    vals = [a.meta.get("val") for a in n.args if isinstance(a, fx.Node)]
    vals = [v for v in vals if isinstance(v, torch.Tensor)]
    try:
        if name in ("mm", "matmul", "bmm"):
            return int(vals[0].shape[-1])
        if name in ("addmm", "baddbmm"):
            return int(vals[1].shape[-1])
        if name == "linear":
            return int(vals[0].shape[-1])
        if name in ("convolution", "_convolution"):
            w = vals[1]
            return int(math.prod(w.shape[1:]))
    except (IndexError, AttributeError):
        pass
    return 1


# ----------------------------------------------------------------------------- per method


def forward_units(plan) -> float:
    """``1 + sum_k k * rows_k`` for a :class:`~torchderiv._plan.Plan`."""
    return 1.0 + sum((k + 1) * (len(o.individual) + len(o.combos)) for k, o in enumerate(plan.orders))


def autograd_units(indices, m: int) -> float:
    """``1 + 2 m sum_p (1 + |p|)`` over the distinct proper prefixes ``p`` of the multi-indices ``indices``
    (coordinates) of a request with ``m`` outputs: one reverse pass per prefix, a pass at depth ``|p|``
    going back through a graph about ``1 + |p|`` times the forward's size."""
    prefixes = {tuple(sorted(a))[:j] for a in indices for j in range(len(a))}
    return 1.0 + 2.0 * m * sum(1 + len(p) for p in prefixes)


def reverse_units(kind: str, m: int, n: int) -> float:
    return 1.0 + (2.0 * m if kind == "jacobian" else 4.0 * m * n)


# ----------------------------------------------------------------------------- the table


# used until `torchderiv calibrate` has written calibration.json: the old FPE model (every method one
# unit per pass, no fixed cost)
_DEFAULT = {m: {g: [0.0, 0.0, 1e-9, 1e-9] for g in ("nograd", "grad")} for m in ("forward", "reverse", "autograd")}


@lru_cache(maxsize=1)
def _shipped() -> dict:
    try:
        return json.loads(TABLE_PATH.read_text())
    except (OSError, ValueError):
        return {}


def table() -> dict:
    """The fitted constants ``{method: {"grad"|"nograd": [c0, c1, c2, c3]}}`` (read once)."""
    return _shipped().get("constants", _DEFAULT)


def margins() -> dict:
    """The fitted decision margins ``{method: factor}``: a method is chosen only where its predicted time times
    its factor is the least (see :func:`fit_margins`); 1 for a method not listed."""
    return _shipped().get("margins", {})


def predict(method: str, units: float, cost: GraphCost, batch: int, grad: bool, constants: dict | None = None
            ) -> float:
    c = (constants or table()).get(method, _DEFAULT[method])["grad" if grad else "nograd"]
    return c[0] + units * (c[1] * cost.ops + c[2] * batch * cost.flops + c[3] * batch * cost.elems)


def cheapest(times: dict[str, float], factors: dict | None = None) -> str:
    """The method of least predicted time in ``times`` (``{method: seconds}``), each time weighed by its
    decision margin (``factors``, default the shipped :func:`margins`); ties go to the first in the order
    forward, reverse, autograd."""
    factors = margins() if factors is None else factors
    order = [m for m in ("forward", "reverse", "autograd") if m in times]
    return min(order, key=lambda m: times[m] * factors.get(m, 1.0))


def fit(rows: list[dict]) -> dict:
    """Least-squares constants (non-negative, error in ratio) per method and grad mode from calibration
    rows ``{"method", "grad", "units", "ops", "flops", "elems", "batch", "seconds"}``."""
    out: dict = {}
    for m in ("forward", "reverse", "autograd"):
        out[m] = {}
        for g in ("nograd", "grad"):
            sel = [r for r in rows if r["method"] == m and ("grad" if r["grad"] else "nograd") == g]
            if len(sel) < 4:
                out[m][g] = _DEFAULT[m][g]
                continue
            A = torch.tensor([[1.0, r["units"] * r["ops"], r["units"] * r["batch"] * r["flops"],
                               r["units"] * r["batch"] * r["elems"]] for r in sel], dtype=torch.float64)
            t = torch.tensor([r["seconds"] for r in sel], dtype=torch.float64)
            out[m][g] = _nnls_relative(A, t)
    return out


def _nnls_relative(A: torch.Tensor, t: torch.Tensor, rounds: int = 8) -> list[float]:
    """Non-negative constants ``c`` with ``A c`` close to ``t`` in ratio, over- and under-prediction alike:
    least squares of ``(A c - t) / min(t, A c)`` by reweighting, i.e. ``pred / t - 1`` over and ``t / pred - 1``
    under. (A plain relative error caps the cost of an under-prediction at 1 and so favours predicting far too
    little for the large cases; dividing by ``max(t, A c)`` caps both sides at 1 and let the fit over-predict
    the small calls 3-10x for free: fixed costs of 1.6 ms per call where 0.2 ms are measured, and a 4x slower
    method chosen for seed 000's 10-point Jacobian.)"""
    scale = t.clone()
    c = _nnls_weighted(A, t, scale)
    for _ in range(rounds):
        pred = A @ torch.tensor(c, dtype=A.dtype)
        scale = torch.minimum(t, pred).clamp_min(1e-3 * float(t.min()))
        c = _nnls_weighted(A, t, scale)
    return c


def _nnls_weighted(A: torch.Tensor, t: torch.Tensor, scale: torch.Tensor) -> list[float]:
    """argmin_{c >= 0} sum ((A c - t) / scale)^2 over all active sets (4 unknowns: 15 subsets)."""
    W = A / scale[:, None]
    b = t / scale
    best, best_c = math.inf, [0.0] * A.shape[1]
    k = A.shape[1]
    for mask in range(1, 1 << k):
        cols = [i for i in range(k) if mask >> i & 1]
        sol = torch.linalg.lstsq(W[:, cols], b[:, None]).solution[:, 0]
        if (sol < 0).any():
            continue
        err = float(((W[:, cols] @ sol - b) ** 2).sum())
        if err < best:
            best = err
            best_c = [0.0] * k
            for i, v in zip(cols, sol.tolist()):
                best_c[i] = v
    return best_c

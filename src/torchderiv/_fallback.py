"""The torch.func path, for an ``f`` that cannot be traced to a static graph: only the requested partials, by
nested directional derivatives, memory-bounded; independent of the Taylor engine.

Used when ``f`` cannot be traced to a static graph (data-dependent Python control flow, ...). For each
requested multi-index ``(i1, ..., ik)`` the mixed partial ``d^k f / dv_i1 ... dv_ik`` is ``k`` nested
forward-mode directional derivatives (``torch.func.jvp``) along the direction vectors ``v`` (one-hot input
coordinates, or the sparse ``directions`` of univariate Taylor requests such as the biharmonic); nothing
else is formed, unlike a nested ``jacrev`` that builds the whole order-``k`` derivative tensor and then
picks entries.

Work and memory:

* Directions go through in chunks under ``vmap``. A level whose tangent is the same for every
  multi-index of a chunk is not batched, so ``vmap`` computes it once: a large group of multi-indices
  with a common prefix (``(0, 1, 1)``, ``(0, 1, 2)``, ... share the inner levels ``0, 1``) gets chunks of
  its own, which halves the work per member (see :func:`_chunks`).
* Samples go through ``vmap`` (each row as its own batch of one, ``f(x[b:b+1])``), or a loop where
  ``vmap`` cannot run ``f``; directions likewise.
* Chunk sizes come from a memory budget (``memory_budget`` bytes, default :data:`DEFAULT_MEMORY_BUDGET`)
  and a per-sample cost measured by one probe pass of ``f`` that sums the bytes of every tensor its
  operators produce; ``k`` nested forward levels keep ``2^k`` copies of each intermediate. Peak memory is
  then about the result plus one chunk. (When autograd records for a later backward through the
  parameters, the saved tensors of every chunk are kept alive: that is the price of differentiability.)

Known torch gaps handled here:

* torch's forward-over-forward derivative of ``layer_norm`` and of ``batch_norm`` with batch statistics
  (``instance_norm`` as well) is wrong from order 2 on (torch 2.13, checked against the written-out
  formula and finite differences); ``cdist`` has no forward derivative, nor has the backward of the fused
  CPU kernel of ``scaled_dot_product_attention`` a derivative (which its forward-mode derivative needs):
  while the fallback runs, these functions are replaced by their formulas in elementary ops
  (:class:`_WrittenOut`; ``multi_head_attention_forward`` is sent down its explicit softmax path, as a
  torch function mode does not see the calls made inside a function it intercepted).
* An operator without any forward-mode derivative (``grid_sampler_3d``) makes the forward nesting raise
  ``NotImplementedError``; the request is then recomputed with reverse nesting: each directional
  derivative ``J v`` as the derivative of the linear map ``u -> J^T u`` (a double vector-Jacobian
  product), which needs the operator's double backward only.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from ._cache import check_output
from ._capture import _cdist as _capture_cdist
from ._errors import f_error
from ._warnings import warn_fallback

MultiIndex = tuple[int, ...]
Combo = Sequence[tuple[MultiIndex, float]]
Direction = tuple[tuple[int, float], ...]

DEFAULT_MEMORY_BUDGET = 1 << 30
"""Bytes that one chunk of the fallback may use (1 GiB): bounds how many directions and samples go through
at once. Pass ``memory_budget=`` to :func:`fallback_partials` to change it per call."""

__all__ = ["DEFAULT_MEMORY_BUDGET", "fallback_partials", "map_samples", "per_sample", "probe_output",
           "traced_fallback", "written_out"]


# ----------------------------------------------------------------------------- shared with the reverse paths


def probe_output(fname: str, f, x: Tensor, batched: bool):
    """Run ``f`` once (no graph) and check its output; an error of ``f`` itself is re-raised with the same type,
    the operator's name and ``x``'s shape in front of its message."""
    try:
        with torch.no_grad():
            y = f(x)
    except Exception as e:  # noqa: BLE001 - f's own error, reported with the operator and the shape
        raise f_error(fname, x, e, batched=batched) from e
    check_output(fname, y, x, batched)
    return y


def map_samples(g: Callable, x: Tensor) -> Tensor:
    """``vmap(g)(x)``, or a loop over the samples where vmap cannot run ``g`` (data-dependent control flow)."""
    try:
        return torch.func.vmap(g)(x)
    except Exception:  # noqa: BLE001 - any vmap failure: the loop is always correct
        return torch.stack([g(x[b]) for b in range(x.shape[0])])


def per_sample(f: Callable, batched: bool) -> Callable:
    if not batched:
        return f
    return lambda xi: f(xi.unsqueeze(0)).squeeze(0)


def traced_fallback(fname, f, x, items, combos, batched, err, directions=None, chunk_size=None):
    """The whole request through :func:`fallback_partials`, after a failed trace (``err``), with a warning."""
    probe_output(fname, f, x, batched)  # an error of f itself is reported as such, not as a fallback
    warn_fallback("untraceable", f"{fname}: f could not be traced to a static graph ({err}); falling back to "
                  f"torch.func (correct, much slower). Avoid data-dependent Python control flow in f to get the "
                  f"fast path.", f)
    return fallback_partials(fname, f, x, items, combos, batched, directions=directions, chunk_size=chunk_size)


# ----------------------------------------------------------------------------- public entry


def fallback_partials(fname: str, f: Callable[[Tensor], Tensor], x: Tensor, items: Sequence[MultiIndex],
                      combos: Sequence[Combo], batched: bool, *, directions: Sequence[Direction] | None = None,
                      memory_budget: int | None = None, chunk_size: int | None = None,
                      ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Partial derivatives of ``f`` at ``x`` without a trace: only the requested entries, memory-bounded.

    Args:
        fname: the public operator's name, for error messages.
        f: the function (``[B, *in] -> [B, *out]`` with ``batched``, rows not interacting).
        x: the input, ``[B, *in]`` (or one point ``[*in]`` with ``batched=False``).
        items: multi-indices: tuples of flattened per-sample input coordinates (of direction indices with
            ``directions``); ``()`` is the value itself. Order does not matter within a multi-index.
        combos: collapsed combinations, each a list of ``(multi-index, weight)``; the result is the
            weighted sum of those partials (a Laplacian is ``[((i, i), 1.0) for i in dims]``).
        batched: ``True``: per-sample derivatives, each row as its own batch of one, ``f(x[b:b+1])``.
        directions: optional sparse direction vectors ``((coord, value), ...)`` over the flattened
            per-sample input coordinates; multi-indices then index these directions (univariate Taylor
            along chosen directions, as the biharmonic uses).
        memory_budget: bytes one chunk may use (default :data:`DEFAULT_MEMORY_BUDGET`).
        chunk_size: at most this many multi-indices per chunk (the operators' ``chunk_size``), on top of the
            memory budget.

    Returns:
        ``(y, parts, sums)``: ``y = f(x)``; ``parts`` is ``[len(items), *y.shape]`` (``None`` without items),
        ``parts[i]`` the partial of ``items[i]``; ``sums`` is ``[len(combos), *y.shape]`` (``None`` without
        combos). Differentiable w.r.t. the parameters of ``f``.

    Example:
        >>> import torch
        >>> from torchderiv._fallback import fallback_partials
        >>> f = lambda x: x[:, :1] ** 2 * x[:, 1:] ** 3                     # u(s, t) = s^2 t^3
        >>> x = torch.tensor([[1.0, 2.0]])
        >>> y, parts, sums = fallback_partials("demo", f, x, [(0,), (0, 1, 1)], [[((0, 0), 1.0), ((1, 1), 1.0)]],
        ...                                    batched=True)
        >>> parts[:, 0, 0].tolist(), sums[0, 0, 0].item()                   # d_s, d_s d_t^2, Laplacian
        ([16.0, 24.0], 28.0)
    """
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else int(memory_budget)
    if budget < 1:
        raise ValueError(f"{fname}: memory_budget must be a positive number of bytes, got {memory_budget!r}")
    items = [tuple(sorted(a)) for a in items]
    combos = [[(tuple(sorted(a)), float(w)) for a, w in c] for c in combos]
    runner = _Runner(fname, f, x, batched, directions, budget, chunk_size)
    try:
        return runner.run(items, combos)
    except Exception as e:  # noqa: BLE001 - f ran eagerly before, so its derivatives failed: try reverse mode
        forward_error = e
    # an operator without a forward-mode derivative (grid_sampler_3d), or an f that needs x to require grad
    # (torch.autograd.grad inside f): reverse nesting (double vjp) instead
    runner = _Runner(fname, f, x, batched, directions, budget, chunk_size, reverse=True)
    try:
        return runner.run(items, combos)
    except Exception:
        if _no_forward_derivative(forward_error):
            raise  # reverse mode's own failure says more than "no forward derivative"
        raise forward_error from forward_error.__cause__


# ----------------------------------------------------------------------------- ops torch gets wrong


def _layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, *_):
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    dims = tuple(range(-len(normalized_shape), 0))
    c = input - input.mean(dims, keepdim=True)
    out = c * torch.rsqrt((c * c).mean(dims, keepdim=True) + eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


def _channel_view(t, input):
    return t.reshape((1, -1) + (1,) * (input.dim() - 2))


def _batch_stats_norm(input, dims, weight, bias, eps):
    c = input - input.mean(dims, keepdim=True)
    out = c * torch.rsqrt((c * c).mean(dims, keepdim=True) + eps)
    if weight is not None:
        out = out * _channel_view(weight, input)
    if bias is not None:
        out = out + _channel_view(bias, input)
    return out


def _batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                eps=1e-5, *_):
    if not training and running_mean is not None and running_var is not None:
        # fixed statistics: an affine map, whose derivatives torch gets right
        return F.batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps)
    # batch statistics; the running statistics are not updated while derivatives are taken
    return _batch_stats_norm(input, (0,) + tuple(range(2, input.dim())), weight, bias, eps)


def _instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True,
                   momentum=0.1, eps=1e-5, *_):
    if not use_input_stats:
        return F.instance_norm(input, running_mean, running_var, weight, bias, False, momentum, eps)
    return _batch_stats_norm(input, tuple(range(2, input.dim())), weight, bias, eps)


def _cdist(x1, x2, p=2.0, compute_mode=None):
    return _capture_cdist(x1, x2, p, compute_mode)  # the capture's own decomposition


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """``scaled_dot_product_attention`` as softmax(q k^T * scale + mask) v: torch's fused CPU kernel has no
    derivative of its backward, which its forward-mode derivative needs."""
    if enable_gqa:
        key = key.repeat_interleave(query.shape[-3] // key.shape[-3], -3)
        value = value.repeat_interleave(query.shape[-3] // value.shape[-3], -3)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    s = query @ key.transpose(-2, -1) * scale
    if is_causal:
        L, S = query.shape[-2], key.shape[-2]
        s = s.masked_fill(~torch.ones(L, S, dtype=torch.bool, device=s.device).tril(), float("-inf"))
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
    a = torch.softmax(s, -1)
    if dropout_p > 0:
        a = torch.dropout(a, dropout_p, True)
    return a @ value


_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


def _multi_head_attention(*args, **kwargs):
    """``multi_head_attention_forward`` on its explicit softmax path (taken when the weights are asked for)
    rather than the fused attention kernel; the weights are dropped again when they were not asked for."""
    bound = _MHA_SIGNATURE.bind(*args, **kwargs)
    need = bound.arguments.get("need_weights", _MHA_SIGNATURE.parameters["need_weights"].default)
    bound.arguments["need_weights"] = True
    out, weights = F.multi_head_attention_forward(*bound.args, **bound.kwargs)
    return out, (weights if need else None)


_REWRITES = {
    F.layer_norm: _layer_norm,
    torch.layer_norm: _layer_norm,
    F.batch_norm: _batch_norm,
    torch.batch_norm: lambda input, weight, bias, rm, rv, training, momentum, eps, *_: _batch_norm(
        input, rm, rv, weight, bias, training, momentum, eps),
    F.instance_norm: _instance_norm,
    torch.instance_norm: lambda input, weight, bias, rm, rv, use_input_stats, momentum, eps, *_: _instance_norm(
        input, rm, rv, weight, bias, use_input_stats, momentum, eps),
    torch.cdist: _cdist,
    F.scaled_dot_product_attention: _sdpa,
    F.multi_head_attention_forward: _multi_head_attention,
}


class _WrittenOut(TorchFunctionMode):
    """Runs ``f`` with the functions of :data:`_REWRITES` replaced by their formulas in elementary ops."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        impl = _REWRITES.get(func)
        return (impl or func)(*args, **(kwargs or {}))


def written_out() -> TorchFunctionMode:
    """A context in which the functions torch differentiates wrongly or not at all (:data:`_REWRITES`) run as
    their formulas in elementary ops; for every torch.func path that runs ``f`` itself."""
    return _WrittenOut()


# ----------------------------------------------------------------------------- cost probe


class _OutputBytes(TorchDispatchMode):
    """Sums the bytes of every tensor the operators of one call produce (views excluded)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not getattr(func, "is_view", False):
            for t in pytree.tree_leaves(out):
                if isinstance(t, Tensor):
                    self.total += t.numel() * t.element_size()
        return out


def _bytes_per_sample(f: Callable, x: Tensor, batched: bool) -> int:
    """Bytes of the intermediates of ``f`` on one sample, from one probe pass (an upper bound of its peak)."""
    rows = x.shape[0] if batched and x.dim() else 1
    fallback = 64 * x.element_size() * max(1, x.numel() // rows)
    try:
        with torch.no_grad(), _WrittenOut(), _OutputBytes() as m:
            f(x)
    except Exception:  # noqa: BLE001 - f runs outside the probe, where its own errors are reported
        return fallback
    return max(fallback, m.total // rows)


# ----------------------------------------------------------------------------- the nesting


def _no_forward_derivative(e: BaseException) -> bool:
    return isinstance(e, NotImplementedError) and "forward AD" in str(e)


def _directional(h: Callable, t: Tensor, reverse: bool) -> Callable:
    """``z -> J_h(z) t``: forward mode, or reverse mode as the vjp of the linear map ``u -> J_h(z)^T u``."""
    if not reverse:
        return lambda z: torch.func.jvp(h, (z,), (t,))[1]

    def d(z):
        y, pull = torch.func.vjp(h, z)
        return torch.func.vjp(lambda u: pull(u)[0], torch.zeros_like(y))[1](t)[0]

    return d


def _nested(g: Callable, tangents: Sequence[Tensor], reverse: bool) -> Callable:
    for t in tangents:  # the first tangent innermost: chunks share their leading levels
        g = _directional(g, t, reverse)
    return g


class _Runner:
    """One fallback request: the per-sample function, the direction vectors, the chunking and the
    vmap-or-loop decisions (remembered once ``vmap`` has failed)."""

    def __init__(self, fname, f, x, batched, directions, budget, chunk_size=None, reverse=False):
        # an expanded x (one memory location for several entries) cannot carry a tangent
        self.fname, self.f, self.x, self.batched, self.budget = fname, f, x.contiguous(), batched, budget
        self.chunk_size = chunk_size
        self.directions = directions
        self.ins = tuple(x.shape[1:]) if batched else tuple(x.shape)
        self.n = math.prod(self.ins)
        self.reverse = reverse
        self.vmap_samples = batched
        self.vmap_dirs = True
        self.cost = None
        self.g = per_sample(f, batched)

    # ------------------------------------------------------------- directions

    def _vectors(self, used: list[int]) -> Tensor:
        """Dense direction vectors ``[len(used), *in]`` for the direction indices ``used``."""
        V = torch.zeros(len(used), self.n, dtype=self.x.dtype, device=self.x.device)
        for r, d in enumerate(used):
            if self.directions is None:
                if not 0 <= d < self.n:
                    raise ValueError(f"{self.fname}: input coordinate {d} out of range [0, {self.n})")
                V[r, d] = 1.0
            else:
                for c, v in self.directions[d]:
                    V[r, c] += v
        return V.reshape((len(used), *self.ins))

    # ------------------------------------------------------------- chunk sizes

    def _unit_cost(self, k: int) -> int:
        if self.cost is None:
            self.cost = _bytes_per_sample(self.f, self.x, self.batched)
        return self.cost * (4 if self.reverse else 2) ** k

    def _sizes(self, k: int, m: int) -> tuple[int, int]:
        """(samples, directions) per chunk for ``m`` multi-indices of order ``k``."""
        B = self.x.shape[0] if self.batched else 1
        c = self._unit_cost(k)
        m = min(m, self.chunk_size or m)
        if B * c <= self.budget:
            return B, max(1, min(m, self.budget // (B * c)))
        return max(1, self.budget // c), 1

    # ------------------------------------------------------------- evaluation

    def _call_f(self, fn: Callable, *args):
        try:
            return fn(*args)
        except NotImplementedError as e:
            if _no_forward_derivative(e):
                raise
            raise _f_error(self.fname, self.x, self.batched, e) from e
        except Exception as e:  # noqa: BLE001 - reported with the operator and the shape
            raise _f_error(self.fname, self.x, self.batched, e) from e

    def _dirs(self, xi: Tensor, tangents: list[Tensor], shared: list[bool]) -> Tensor:
        """``[m, *out]``: the nested directional derivatives of one sample (or the unbatched point)."""
        def one(z, *ts):
            return _nested(self.g, ts, self.reverse)(z)

        m = max((t.shape[0] for t, s in zip(tangents, shared) if not s), default=0)
        if m == 0:
            return self._call_f(one, xi, *tangents).unsqueeze(0)
        if self.vmap_dirs:
            try:
                in_dims = (None, *[None if s else 0 for s in shared])
                return torch.func.vmap(one, in_dims=in_dims)(xi, *tangents)
            except Exception as e:  # noqa: BLE001 - vmap cannot run f: loop over the directions
                if _no_forward_derivative(e):
                    raise
                self.vmap_dirs = False
        return torch.stack([self._call_f(one, xi, *[t if s else t[j] for t, s in zip(tangents, shared)])
                            for j in range(m)])

    def _samples(self, xc: Tensor, tangents: list[Tensor], shared: list[bool]) -> Tensor:
        """``[b, m, *out]`` over the samples of ``xc`` (``[m, *out]`` unbatched)."""
        if not self.batched:
            return self._dirs(xc, tangents, shared)
        if self.vmap_samples:
            try:
                return torch.func.vmap(lambda xi: self._dirs(xi, tangents, shared))(xc)
            except Exception as e:  # noqa: BLE001 - vmap cannot run f: loop over the samples
                if _no_forward_derivative(e):
                    raise
                self.vmap_samples = False
                self.vmap_dirs = True  # the failure may have come from the sample level only
        return torch.stack([self._dirs(xc[b], tangents, shared) for b in range(xc.shape[0])])

    def run(self, items: list[MultiIndex], combos: list[list[tuple[MultiIndex, float]]]):
        with _WrittenOut(), warnings.catch_warnings():
            # torch's notes on vmap batching rules it lacks (slow, not wrong) say nothing to the user
            warnings.filterwarnings("ignore", message="There is a performance drop")
            return self._run(items, combos)

    def _run(self, items, combos):
        x, batched = self.x, self.batched
        # where each distinct multi-index goes: item slots and (combo, weight) pairs
        dest: dict[MultiIndex, tuple[list[int], list[tuple[int, float]]]] = {}
        for i, a in enumerate(items):
            dest.setdefault(a, ([], []))[0].append(i)
        for c, combo in enumerate(combos):
            for a, w in combo:
                dest.setdefault(a, ([], []))[1].append((c, w))
        used = sorted({i for a in dest for i in a})
        V = self._vectors(used)
        pos = {d: r for r, d in enumerate(used)}
        B = x.shape[0] if batched else 1
        xs = x if batched else x.unsqueeze(0)
        # the value, in sample chunks
        bc, _ = self._sizes(0, 1)
        if batched:
            y = torch.cat([self._samples(xs[s : s + bc], [], [])[:, 0] for s in range(0, B, bc)])
        else:
            y = self._samples(x, [], [])[0]
        parts: list = [None] * len(items)
        sums: list = [None] * len(combos)
        for i in dest.get((), ([], []))[0]:
            parts[i] = y
        for c, w in dest.get((), ([], []))[1]:
            sums[c] = w * y if sums[c] is None else sums[c] + w * y
        by_order: dict[int, list[MultiIndex]] = {}
        for a in dest:
            if a:
                by_order.setdefault(len(a), []).append(a)
        for k in sorted(by_order):
            keys = sorted(by_order[k])
            bc, mc = self._sizes(k, len(keys))
            for chunk in _chunks(keys, mc):
                shared = [len({a[j] for a in chunk}) == 1 for j in range(k)]
                tangents = [V[pos[chunk[0][j]]] if shared[j] else V[[pos[a[j]] for a in chunk]] for j in range(k)]
                if batched:
                    R = torch.cat([self._samples(xs[s : s + bc], tangents, shared) for s in range(0, B, bc)])
                    R = R.movedim(1, 0)  # [m, B, *out]
                else:
                    R = self._samples(x, tangents, shared)  # [m, *out]
                for j, a in enumerate(chunk):
                    slots, weighted = dest[a]
                    for i in slots:
                        parts[i] = R[j]
                    for c, w in weighted:
                        sums[c] = w * R[j] if sums[c] is None else sums[c] + w * R[j]
        zero = torch.zeros_like(y)
        return (y, torch.stack(parts) if items else None,
                torch.stack([zero if s is None else s for s in sums]) if combos else None)


def _chunks(keys: list[MultiIndex], size: int) -> list[list[MultiIndex]]:
    """Chunks of at most ``size`` multi-indices (sorted). A large group of multi-indices that differ in their
    last index only gets chunks of its own (its inner levels are then computed once); the rest go together.
    Large means at least 8 and a quarter of a chunk: each chunk costs a fixed overhead of ``vmap`` and
    ``jvp`` calls, which dominates the arithmetic on small networks (measured: 495 fourth-order partials
    of a 9-input attention block, 4.5 s in one chunk, 33 s in 165 prefix-shared ones)."""
    groups: dict[MultiIndex, list[MultiIndex]] = {}
    for a in keys:
        groups.setdefault(a[:-1], []).append(a)
    large = max(8, size // 4)
    out, loose = [], []
    for g in groups.values():
        if len(g) < large:
            loose.extend(g)
            continue
        out.extend(g[s : s + size] for s in range(0, len(g), size))
    out.extend(loose[s : s + size] for s in range(0, len(loose), size))
    return out


# ----------------------------------------------------------------------------- errors of f


def _f_error(fname: str, x: Tensor, batched: bool, e: BaseException) -> BaseException:
    # f itself ran on x before: what failed is f on one sample, or torch.func differentiating it
    return f_error(fname, x, e, batched=batched, what="the torch.func fallback (f on one sample, differentiated "
                                                       "by nested jvp / vjp) raised an error")

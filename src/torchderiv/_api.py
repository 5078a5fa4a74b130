"""The public derivative operators."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import combinations_with_replacement

import torch
from torch import Tensor

from ._capture import TraceError
from ._core import (
    _probe_output,
    in_shape,
    map_samples,
    numel,
    per_sample,
    taylor,
    traceable,
    validate,
)
from ._engine import NoForwardDerivative, fast_call, output_shape, reverse_function
from ._warnings import warn_fallback

__all__ = [
    "choose_method",
    "jacobian",
    "jacobian_diagonal",
    "hessian",
    "hessian_diagonal",
    "laplacian",
    "divergence",
    "partials",
    "biharmonic",
]


# ----------------------------------------------------------------------------- cost model


def choose_method(kind: str, n_in: int, n_out: int) -> str:
    """The documented cost model of ``method="auto"``, in forward-pass equivalents (FPE).

    Forward Taylor mode costs about one FPE per propagated coefficient stream. A reverse (vector-Jacobian)
    pass costs about 3 FPE (forward plus backward), vectorized over output directions.

    * ``jacobian``: forward ``1 + n_in`` against reverse ``1 + 3 n_out``.
    * ``hessian``: forward ``1 + n_in + n_in (n_in + 1) / 2`` against reverse-over-reverse
      ``3 n_out (1 + n_in)``.
    * everything else (collapsed Laplacian, partials, biharmonic): forward.
    """
    if kind == "jacobian":
        return "forward" if 1 + n_in <= 1 + 3 * n_out else "reverse"
    if kind == "hessian":
        fwd = 1 + n_in + n_in * (n_in + 1) / 2
        rev = 3 * n_out * (1 + n_in)
        return "forward" if fwd <= rev else "reverse"
    return "forward"


def _out_size(f, x: Tensor, batched: bool, fname: str) -> int:
    """Per-sample output size of ``f``, read off the traced graph (``f`` itself is not run)."""
    try:
        shape = output_shape(f, x, batched, fname)
    except TraceError:
        return 1  # untraceable f: the torch.func fallback is used whatever the method
    if shape is None:
        return 1
    return numel(shape[1:] if batched else shape)


def _resolve(kind, method, x, batched, f, fname):
    if method != "auto":
        return method
    return choose_method(kind, numel(in_shape(x, batched)), _out_size(f, x, batched, fname))


def _fast_key(fname, x, batched, method, chunk_size, extra=None):
    if type(x) is not Tensor and not isinstance(x, Tensor):
        return None
    return (fname, x.shape, x.dtype, x.device, batched, method, chunk_size, extra)


# ----------------------------------------------------------------------------- reverse paths


def _batched_vjp_jacobian(g, x, chunk_size):
    """Per-sample Jacobians ``[B, *out, *in]`` of a batched ``g`` whose rows do not interact: one vjp per
    output component with that component's cotangent in every row."""
    y, vjp_fn = torch.func.vjp(g, x)
    out = tuple(y.shape[1:])
    m = numel(out)
    cot = torch.eye(m, dtype=y.dtype, device=y.device).reshape((m, 1, *out)).expand(m, *y.shape)
    J = torch.func.vmap(lambda c: vjp_fn(c)[0], chunk_size=chunk_size)(cot)  # [m, B, *in]
    return J.movedim(0, 1).reshape((*y.shape, *x.shape[1:]))


def _jacobian_reverse(fname, f, x, batched, chunk_size):
    if not traceable(fname, f, x, batched):  # checks f's output and that rows do not interact
        if not batched:
            return torch.func.jacrev(f, chunk_size=chunk_size)(x)
        return map_samples(torch.func.jacrev(per_sample(f, batched), chunk_size=chunk_size), x)
    g = reverse_function(f, x, batched, fname)
    if not batched:
        return torch.func.jacrev(g, chunk_size=chunk_size)(x)
    return _batched_vjp_jacobian(g, x, chunk_size)


def _hessian_reverse(fname, f, x, batched, chunk_size):
    """Reverse over reverse: needs no forward-mode formula (``silu_backward`` has none under ``no_grad``)
    and was measured faster than forward over reverse (docs/design.md, method="auto")."""
    jrr = lambda h: torch.func.jacrev(torch.func.jacrev(h, chunk_size=chunk_size), chunk_size=chunk_size)  # noqa: E731
    if not traceable(fname, f, x, batched):  # checks f's output and that rows do not interact
        H = jrr(per_sample(f, batched))
        return map_samples(H, x) if batched else H(x)
    g = reverse_function(f, x, batched, fname)
    x = x.contiguous()  # an expanded x (one memory location for several entries): one entry per row to differentiate
    if not batched:
        return jrr(g)(x)
    # rows do not interact: the cotangent e_o in every row gives each row's gradient of output o, and a
    # second vjp with e_i in every row differentiates it along each row's own x[b]
    ins = tuple(x.shape[1:])
    n = numel(ins)
    out = output_shape(f, x, batched, fname)[1:]
    m = numel(out)
    C = torch.eye(m, dtype=x.dtype, device=x.device).reshape((m, 1, *out)).expand(m, x.shape[0], *out)
    T = torch.eye(n, dtype=x.dtype, device=x.device).reshape((n, 1, *ins)).expand(n, *x.shape)

    def rows(c):
        _, vjp2 = torch.func.vjp(lambda z: torch.func.vjp(g, z)[1](c)[0], x)
        return torch.func.vmap(lambda t: vjp2(t)[0], chunk_size=chunk_size)(T)  # [n, B, *in]

    H = torch.func.vmap(rows, chunk_size=chunk_size)(C)  # [m, n, B, *in]
    return H.movedim(2, 0).reshape((x.shape[0], *out, *ins, *ins))


# ----------------------------------------------------------------------------- public API


def jacobian(f: Callable[[Tensor], Tensor], x: Tensor, *, batched: bool = True, method: str = "auto",
             chunk_size: int | None = None) -> Tensor:
    """Per-sample Jacobians of ``f`` at ``x``.

    Args:
        f: an ``nn.Module`` or function mapping ``x`` of shape ``[B, *in]`` to ``[B, *out]`` whose rows do
            not interact (the contract of ``batched=True``, checked on the traced graph).
        x: floating-point input ``[B, *in]`` (or ``[*in]`` with ``batched=False``).
        batched: ``False`` treats ``x`` as one point.
        method: ``"forward"`` (Taylor mode, one generated forward pass), ``"reverse"`` (vector-Jacobian
            products vectorized over output directions) or ``"auto"`` (cost model: forward when the
            input side is smaller, see :func:`torchderiv.choose_method`; reverse when ``f`` uses an op that
            PyTorch cannot differentiate in forward mode).
        chunk_size: propagate at most this many directions at once (bounds memory).

    Returns:
        ``[B, *out, *in]`` with ``J[b, o, i] = d f(x)[b, o] / d x[b, i]`` (``[*out, *in]`` unbatched).
        Differentiable w.r.t. the parameters of ``f`` with one ordinary backward.

    Example:
        >>> import torch, torchderiv
        >>> net = torch.nn.Sequential(torch.nn.Linear(1, 20), torch.nn.Tanh(), torch.nn.Linear(20, 4))
        >>> x = torch.rand(10, 1)
        >>> torchderiv.jacobian(net, x).shape
        torch.Size([10, 4, 1])
    """
    fname = "jacobian"
    key = _fast_key(fname, x, batched, method, chunk_size)
    r = fast_call(f, key, x) if key is not None else None
    if r is not None:
        return r
    validate(fname, f, x, batched, method, chunk_size)
    if _resolve("jacobian", method, x, batched, f, fname) == "reverse":
        return _jacobian_reverse(fname, f, x, batched, chunk_size)
    ins = in_shape(x, batched)
    n = numel(ins)
    try:
        return taylor(fname, f, x, [(i,) for i in range(n)], [], batched, chunk_size,
                      assemble=lambda y, parts, _: parts.movedim(0, -1).reshape((*y.shape, *ins)), fast_key=key)
    except NoForwardDerivative as e:
        if method != "auto":
            raise
        # an op PyTorch cannot differentiate in forward mode (grid_sampler_3d): "auto" takes reverse mode
        warn_fallback("auto: reverse", f"{fname}: an op of f has no forward-mode derivative ({e}); method='auto' "
                      f"uses reverse mode instead. Pass method='reverse' to choose it explicitly.", f)
        return _jacobian_reverse(fname, f, x, batched, chunk_size)


def jacobian_diagonal(f: Callable[[Tensor], Tensor], x: Tensor, *, batched: bool = True,
                      method: str = "auto", chunk_size: int | None = None) -> Tensor:
    """Diagonal of the per-sample Jacobian, ``d f(x)[b, i] / d x[b, i]``, for maps with equal per-sample
    input and output shapes.

    Returns ``[B, *in]`` (``[*in]`` unbatched). Other arguments as in :func:`jacobian`.

    Example:
        >>> import torch, torchderiv
        >>> torchderiv.jacobian_diagonal(torch.sin, torch.zeros(3, 2))
        tensor([[1., 1.],
                [1., 1.],
                [1., 1.]])
    """
    fname = "jacobian_diagonal"
    validate(fname, f, x, batched, method, chunk_size)
    ins = in_shape(x, batched)
    n = numel(ins)
    J = jacobian(f, x, batched=batched, method=method, chunk_size=chunk_size)
    outs = tuple(J.shape[(1 if batched else 0) : J.dim() - len(ins)])
    if outs != ins:
        raise ValueError(
            f"{fname}: needs a map whose per-sample output shape equals its input shape, but f maps "
            f"{ins} to {outs}; use torchderiv.jacobian for the full per-sample Jacobian"
        )
    lead = (x.shape[0],) if batched else ()
    return J.reshape((*lead, n, n)).diagonal(dim1=-2, dim2=-1).reshape((*lead, *ins))


def hessian(f: Callable[[Tensor], Tensor], x: Tensor, *, batched: bool = True, method: str = "auto",
            chunk_size: int | None = None) -> Tensor:
    """Per-sample Hessians ``[B, *out, *in, *in]`` of every output component.

    Forward mode propagates ``1 + n + n(n+1)/2`` coefficient streams in one generated pass (only the
    pairs ``i <= j``); ``method="reverse"`` uses reverse-over-reverse (torch.func).

    Example:
        >>> import torch, torchderiv
        >>> f = lambda x: (x ** 3).sum(-1, keepdim=True)
        >>> torchderiv.hessian(f, torch.ones(2, 2))[0, 0]
        tensor([[6., 0.],
                [0., 6.]])
    """
    fname = "hessian"
    key = _fast_key(fname, x, batched, method, chunk_size)
    r = fast_call(f, key, x) if key is not None else None
    if r is not None:
        return r
    validate(fname, f, x, batched, method, chunk_size)
    if _resolve("hessian", method, x, batched, f, fname) == "reverse":
        return _hessian_reverse(fname, f, x, batched, chunk_size)
    ins = in_shape(x, batched)
    n = numel(ins)
    pairs = list(combinations_with_replacement(range(n), 2))
    pos = {p: r for r, p in enumerate(pairs)}
    idx = torch.tensor([pos[(min(i, j), max(i, j))] for i in range(n) for j in range(n)], device=x.device)

    def assemble(y, parts, _):
        H = parts.index_select(0, idx)  # [n*n, *y]
        H = H.movedim(0, -1)
        if not ins:  # a scalar input: the single entry
            return H.squeeze(-1)
        return H.unflatten(-1, (*ins, *ins))  # a view: no strided copy

    return taylor(fname, f, x, pairs, [], batched, chunk_size, assemble=assemble, fast_key=key)


def hessian_diagonal(f: Callable[[Tensor], Tensor], x: Tensor, *, batched: bool = True,
                     method: str = "auto", chunk_size: int | None = None) -> Tensor:
    """Diagonal second derivatives ``d2 f(x)[b, o] / d x[b, i]^2`` as ``[B, *out, *in]``.

    Example:
        >>> import torch, torchderiv
        >>> torchderiv.hessian_diagonal(lambda x: (x ** 3).sum(-1, keepdim=True), torch.ones(1, 2))
        tensor([[[6., 6.]]])
    """
    fname = "hessian_diagonal"
    validate(fname, f, x, batched, method, chunk_size)
    ins = in_shape(x, batched)
    n = numel(ins)
    if method == "reverse":
        H = _hessian_reverse(fname, f, x, batched, chunk_size)
        lead = H.shape[: H.dim() - 2 * len(ins)]
        return H.reshape((*lead, n, n)).diagonal(dim1=-2, dim2=-1).reshape((*lead, *ins))
    return taylor(fname, f, x, [(i, i) for i in range(n)], [], batched, chunk_size,
                  assemble=lambda y, parts, _: parts.movedim(0, -1).reshape((*y.shape, *ins)))


def _check_dims(fname: str, dims, n: int) -> list[int]:
    if dims is None:
        return list(range(n))
    if isinstance(dims, (str, bytes)) or not isinstance(dims, (Sequence, range)):
        raise TypeError(f"{fname}: dims must be a sequence of input coordinates such as [0, 2], got "
                        f"{dims!r}; for one coordinate write dims=[{dims!r}]")
    dims = list(dims)
    for d in dims:
        if not isinstance(d, int) or isinstance(d, bool) or not 0 <= d < n:
            raise ValueError(f"{fname}: dims must hold input coordinates in [0, {n}), got {dims}")
    if len(set(dims)) != len(dims):
        raise ValueError(f"{fname}: dims has duplicates: {dims}")
    return dims


def _laplace_combo(fname, n, dims, weights, device=None):
    dims = _check_dims(fname, dims, n)
    for d in dims:
        if not isinstance(d, int) or not 0 <= d < n:
            raise ValueError(f"{fname}: dims must hold input coordinates in [0, {n}), got {dims}")
    if len(set(dims)) != len(dims):
        raise ValueError(f"{fname}: dims has duplicates: {dims}")
    if weights is None:
        return [((d, d), 1.0) for d in dims]
    C = torch.as_tensor(weights, dtype=torch.float64).cpu()
    if C.shape != (len(dims), len(dims)):
        raise ValueError(f"{fname}: weights must be a [{len(dims)}, {len(dims)}] matrix (one row per "
                         f"coordinate in dims), got shape {tuple(C.shape)}")
    if not torch.allclose(C, C.T):
        raise ValueError(f"{fname}: weights must be symmetric; pass (C + C.T) / 2 for the same operator")
    combo = []
    for a in range(len(dims)):
        for b in range(a, len(dims)):
            w = float(C[a, b]) * (1 if a == b else 2)
            if w != 0:
                combo.append(((dims[a], dims[b]), w))
    return combo


def laplacian(f: Callable[[Tensor], Tensor], x: Tensor, *, dims: Sequence[int] | None = None,
              weights=None, batched: bool = True, method: str = "auto",
              chunk_size: int | None = None) -> Tensor:
    """Per-sample Laplacian ``sum_i d2 f / dx_i^2`` of every output component, ``[B, *out]``.

    Computed collapsed (Forward Laplacian, Li et al. 2023; collapsed Taylor mode, Dangel et al. 2025):
    the second-order coefficients are never formed per direction, so the cost is about ``D + 2``
    forward passes for ``D`` coordinates.

    Args:
        dims: restrict the sum to these (flattened) input coordinates, e.g. space but not time.
        weights: a fixed symmetric matrix ``C`` over ``dims``; gives ``sum_ij C_ij d2f/dx_i dx_j``
            (anisotropic diffusion), collapsed as well.

    Example:
        >>> import torch, torchderiv
        >>> f = lambda x: (x ** 2).sum(-1, keepdim=True)          # Laplacian = 2 * dim
        >>> torchderiv.laplacian(f, torch.randn(4, 3)).squeeze(-1)
        tensor([6., 6., 6., 6.])
    """
    fname = "laplacian"
    wkey = None if weights is not None else ()
    try:
        dkey = tuple(dims) if dims is not None else None
    except TypeError:
        dkey, wkey = None, None  # not a sequence: validated (and refused) below
    key = _fast_key(fname, x, batched, method, chunk_size, (dkey, wkey))
    r = fast_call(f, key, x) if key is not None and wkey is not None else None
    if r is not None:
        return r
    validate(fname, f, x, batched, method, chunk_size)
    n = numel(in_shape(x, batched))
    combo = _laplace_combo(fname, n, dims, weights)
    if not combo:  # all-zero weights: the zero operator
        return torch.zeros_like(_probe_output(fname, f, x, batched))
    if method == "reverse":
        H = hessian(f, x, batched=batched, method="reverse", chunk_size=chunk_size)
        lead = H.shape[: H.dim() - 2 * len(in_shape(x, batched))]
        H = H.reshape((*lead, n, n))
        return sum(w * H[..., a, b] for (a, b), w in combo)
    return taylor(fname, f, x, [], [combo], batched, chunk_size, stacked=False,
                  assemble=lambda y, _, sums: sums[0], fast_key=key if wkey is not None else None)


def divergence(f: Callable[[Tensor], Tensor], x: Tensor, *, batched: bool = True, method: str = "auto",
               chunk_size: int | None = None) -> Tensor:
    """Per-sample divergence ``sum_i d f_i / d x_i`` of a map with equal input and output shapes: ``[B]``.

    Example:
        >>> import torch, torchderiv
        >>> torchderiv.divergence(lambda x: 2 * x, torch.randn(5, 3))
        tensor([6., 6., 6., 6., 6.])
    """
    d = jacobian_diagonal(f, x, batched=batched, method=method, chunk_size=chunk_size)
    return d.reshape(d.shape[0], -1).sum(-1) if batched else d.sum()


def biharmonic(f: Callable[[Tensor], Tensor], x: Tensor, *, dims: Sequence[int] | None = None,
               batched: bool = True, chunk_size: int | None = None) -> Tensor:
    """Per-sample biharmonic ``sum_ij d4 f / dx_i^2 dx_j^2`` of every output component, ``[B, *out]``.

    One generated forward pass propagates the partials up to order 3 that the result needs and the
    fourth-order part collapsed into a single stream.

    Example:
        >>> import torch, torchderiv
        >>> f = lambda x: (x ** 2).sum(-1, keepdim=True) ** 2     # |x|^4: biharmonic = 8 d (d + 2)
        >>> torchderiv.biharmonic(f, torch.randn(2, 3)).squeeze(-1)
        tensor([120., 120.])
    """
    fname = "biharmonic"
    try:
        key = _fast_key(fname, x, batched, "forward", chunk_size, tuple(dims) if dims is not None else None)
    except TypeError:
        key = None  # not a sequence: validated (and refused) below
    r = fast_call(f, key, x) if key is not None else None
    if r is not None:
        return r
    validate(fname, f, x, batched, "forward", chunk_size)
    n = numel(in_shape(x, batched))
    dd = _check_dims(fname, dims, n)
    directions, combo = biharmonic_directions(dd)
    ref = [((i, i, i, i), 1.0) for i in dd] + [((i, i, j, j), 2.0) for a, i in enumerate(dd) for j in dd[a + 1 :]]
    try:
        output_shape(f, x, batched, fname)
    except TraceError:  # untraceable f: the torch.func fallback, on the whole combination at once
        return taylor(fname, f, x, [], [ref], batched, None, stacked=False, assemble=lambda y, _, sums: sums[0])
    return taylor(fname, f, x, [], [combo], batched, chunk_size, stacked=False,
                  assemble=lambda y, _, sums: sums[0], fast_key=key, directions=directions,
                  reference_combos=[ref])


def biharmonic_directions(dims: list[int]):
    """Directions and weights with sum_ij d4/dx_i^2 dx_j^2 = sum_r w_r D^4_(v_r).

    From (a + b)^4 + (a - b)^4 = 2 (a^4 + 6 a^2 b^2 + b^4): with v = e_i +- e_j,
    d_i^2 d_j^2 = (D^4_(e_i+e_j) + D^4_(e_i-e_j) - 2 D^4_(e_i) - 2 D^4_(e_j)) / 12, so the biharmonic is
    sum_i (1 - (d-1)/3) D^4_(e_i) + (1/6) sum_(i<j) (D^4_(e_i+e_j) + D^4_(e_i-e_j)): d^2 directions of pure
    fourth-order Taylor coefficients (univariate Taylor mode with interpolation, Griewank, Utke & Walther
    2000), the fourth order collapsed into one stream. Measured faster than multivariate coefficients over
    the mixed third-order partials (docs/design.md).
    """
    d = len(dims)
    directions, weights = [], []
    for i in dims:
        directions.append(((i, 1.0),))
        weights.append(1.0 - (d - 1) / 3.0)
    for a, i in enumerate(dims):
        for j in dims[a + 1 :]:
            directions.append(((i, 1.0), (j, 1.0)))
            weights.append(1.0 / 6.0)
            directions.append(((i, 1.0), (j, -1.0)))
            weights.append(1.0 / 6.0)
    combo = [((r, r, r, r), w) for r, w in enumerate(weights) if w != 0.0]
    return tuple(directions), combo


def _parse_spec(fname: str, spec, coords, n: int) -> list[tuple[object, tuple[int, ...]]]:
    if isinstance(spec, (str, tuple)) or not isinstance(spec, Sequence):
        raise TypeError(f"{fname}: spec must be a list of multi-indices such as [(), (0,), (1, 1)] "
                        f"or, with coords='txy', strings such as ['', 't', 'xx'], got {spec!r}")
    if coords is not None:
        if not isinstance(coords, (str, Sequence)) or len(coords) != n:
            raise ValueError(f"{fname}: coords must name each of the {n} input coordinates once "
                             f"(e.g. coords={'txyz'[:n]!r}), got {coords!r} of length "
                             f"{len(coords) if hasattr(coords, '__len__') else '?'}")
        names = list(coords)
        if len(set(names)) != len(names):
            raise ValueError(f"{fname}: coords has duplicate names: {coords!r}")
        cpos = {c: i for i, c in enumerate(names)}
    out, seen = [], set()
    for key in spec:
        if isinstance(key, str):
            if coords is None:
                raise ValueError(f"{fname}: spec entry {key!r} is a string; pass coords= to name the "
                                 f"input coordinates (e.g. coords='txy')")
            bad = [c for c in key if c not in cpos]
            if bad:
                raise ValueError(f"{fname}: spec entry {key!r} uses unknown coordinate name(s) {bad}; "
                                 f"known names are {names}")
            alpha = tuple(cpos[c] for c in key)
        elif isinstance(key, tuple) and all(isinstance(i, int) and not isinstance(i, bool) for i in key):
            bad = [i for i in key if not 0 <= i < n]
            if bad:
                raise ValueError(f"{fname}: spec entry {key!r} has index out of range {bad}; input "
                                 f"coordinates are 0..{n - 1}")
            alpha = key
        else:
            raise TypeError(f"{fname}: malformed spec entry {key!r}: use a tuple of ints such as (0, 1) "
                            f"or a string of coordinate names")
        if key in seen:
            raise ValueError(f"{fname}: duplicate spec entry {key!r}")
        seen.add(key)
        out.append((key, tuple(sorted(alpha))))
    return out


def partials(f: Callable[[Tensor], Tensor], x: Tensor, spec, *, coords=None, batched: bool = True,
             chunk_size: int | None = None) -> dict:
    """Arbitrary partial derivatives of ``f``, all in one generated forward pass.

    Args:
        spec: a list of multi-indices: tuples of (flattened) input coordinates such as ``()``, ``(0,)``,
            ``(1, 1)``, ``(0, 0, 1, 1)``; or, with ``coords``, strings such as ``""``, ``"t"``, ``"xx"``.
            ``()`` / ``""`` is the value itself.
        coords: one name per input coordinate, e.g. ``"txy"``.

    Returns:
        a dict with the keys of ``spec`` as given, each ``[B, *out]``.

    Example:
        >>> import torch, torchderiv
        >>> u = lambda tx: tx[:, :1] * tx[:, 1:] ** 3            # u(t, x) = t x^3
        >>> d = torchderiv.partials(u, torch.tensor([[2.0, 1.0]]), ["", "t", "xx", "xxx"], coords="tx")
        >>> [float(d[k]) for k in ["", "t", "xx", "xxx"]]
        [2.0, 1.0, 12.0, 12.0]
    """
    fname = "partials"
    try:
        skey = (tuple(spec), coords if coords is None or isinstance(coords, str) else tuple(coords))
        hash(skey)
    except TypeError:
        skey = None
    key = _fast_key(fname, x, batched, "forward", chunk_size, skey) if skey is not None else None
    r = fast_call(f, key, x) if key is not None else None
    if r is not None:
        return r
    validate(fname, f, x, batched, "forward", chunk_size)
    n = numel(in_shape(x, batched))
    entries = _parse_spec(fname, spec, coords, n)
    if not entries:
        return {}
    keys = [k for k, _ in entries]
    return taylor(fname, f, x, [a for _, a in entries], [], batched, chunk_size, stacked=False,
                  assemble=lambda y, parts, _: dict(zip(keys, parts)), fast_key=key)

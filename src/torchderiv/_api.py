"""The public derivative operators: each is its docstring plus the :class:`~torchderiv._requests.Request`
it hands to the one dispatch path (:func:`torchderiv._dispatch.dispatch`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ._dispatch import choose_method, dispatch
from ._requests import Request

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


def jacobian(f: Callable[[Tensor], Tensor], x: Tensor, *, batched: bool = True, method: str = "auto",
             chunk_size: int | None = None, sparsity: bool | None = None, layout=None) -> Tensor:
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
        sparsity: exploit the per-sample sparsity pattern detected on the traced graph
            (:func:`torchderiv.sparsity`): one forward stream per color of a column coloring instead of one
            per input coordinate (docs/sparsity.md). ``None``: when the cost model says it pays; ``True``:
            always (forward mode); ``False``: never.
        layout: ``torch.strided`` (default) or ``torch.sparse_coo``: a sparse COO tensor of the same shape
            holding the detected pattern's entries (for large ``n``, where a dense ``[B, m, n]`` would not
            fit); differentiable w.r.t. the parameters of ``f`` as well.

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
    return dispatch(Request("jacobian", batched, method, chunk_size,
                            (("sparsity", sparsity), ("layout", layout))), f, x)


def jacobian_diagonal(f: Callable[[Tensor], Tensor], x: Tensor, *, batched: bool = True,
                      method: str = "auto", chunk_size: int | None = None, sparsity: bool | None = None) -> Tensor:
    """Diagonal of the per-sample Jacobian, ``d f(x)[b, i] / d x[b, i]``, for maps with equal per-sample
    input and output shapes.

    Returns ``[B, *in]`` (``[*in]`` unbatched). Other arguments as in :func:`jacobian`; with ``sparsity``
    the coloring serves the diagonal only (coordinates ``i``, ``k`` share a stream unless ``J[i, k]`` or
    ``J[k, i]`` can be nonzero): one stream for a pointwise map.

    Example:
        >>> import torch, torchderiv
        >>> torchderiv.jacobian_diagonal(torch.sin, torch.zeros(3, 2))
        tensor([[1., 1.],
                [1., 1.],
                [1., 1.]])
    """
    return dispatch(Request("jacobian_diagonal", batched, method, chunk_size, (("sparsity", sparsity),)), f, x)


def hessian(f: Callable[[Tensor], Tensor], x: Tensor, *, batched: bool = True, method: str = "auto",
            chunk_size: int | None = None, sparsity: bool | None = None, layout=None) -> Tensor:
    """Per-sample Hessians ``[B, *out, *in, *in]`` of every output component.

    Forward mode propagates ``1 + n + n(n+1)/2`` coefficient streams in one generated pass (only the
    pairs ``i <= j``); ``method="reverse"`` uses reverse-over-reverse (torch.func). With ``sparsity``
    (as in :func:`jacobian`), ``p`` colors under which every nonzero ``H_o[i, j]`` is the only nonzero of
    its ``(color(i), color(j))`` block need ``1 + p`` plus one stream per color pair that holds a nonzero;
    ``layout=torch.sparse_coo`` returns a sparse COO tensor.

    Example:
        >>> import torch, torchderiv
        >>> f = lambda x: (x ** 3).sum(-1, keepdim=True)
        >>> torchderiv.hessian(f, torch.ones(2, 2))[0, 0]
        tensor([[6., 0.],
                [0., 6.]])
    """
    return dispatch(Request("hessian", batched, method, chunk_size,
                            (("sparsity", sparsity), ("layout", layout))), f, x)


def hessian_diagonal(f: Callable[[Tensor], Tensor], x: Tensor, *, batched: bool = True,
                     method: str = "auto", chunk_size: int | None = None, sparsity: bool | None = None) -> Tensor:
    """Diagonal second derivatives ``d2 f(x)[b, o] / d x[b, i]^2`` as ``[B, *out, *in]``.

    ``sparsity`` as in :func:`hessian` (one order-2 stream per color; one for a pointwise map).

    Example:
        >>> import torch, torchderiv
        >>> torchderiv.hessian_diagonal(lambda x: (x ** 3).sum(-1, keepdim=True), torch.ones(1, 2))
        tensor([[[6., 6.]]])
    """
    return dispatch(Request("hessian_diagonal", batched, method, chunk_size, (("sparsity", sparsity),)), f, x)


def laplacian(f: Callable[[Tensor], Tensor], x: Tensor, *, dims: Sequence[int] | None = None,
              weights=None, batched: bool = True, method: str = "auto",
              chunk_size: int | None = None, estimator: str | None = None, samples: int | None = None,
              generator: torch.Generator | None = None, return_stderr: bool = False, shared: bool = False,
              directions: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Per-sample Laplacian ``sum_i d2 f / dx_i^2`` of every output component, ``[B, *out]``.

    Computed collapsed (Forward Laplacian, Li et al. 2023; collapsed Taylor mode, Dangel et al. 2025):
    the second-order coefficients are never formed per direction, so the cost is about ``D + 2``
    forward passes for ``D`` coordinates.

    With ``estimator=``, an unbiased randomized estimate instead, at about ``K + 2`` forward passes for
    ``K = samples`` directions whatever ``D`` (Hutchinson; stochastic dimension sampling, Hu et al. 2023;
    STDE, Shi et al. 2024): ``K`` first-order streams and one collapsed second-order stream. See
    docs/high_dim.md.

    Args:
        dims: restrict the sum to these (flattened) input coordinates, e.g. space but not time.
        weights: a fixed symmetric matrix ``C`` over ``dims``; gives ``sum_ij C_ij d2f/dx_i dx_j``
            (anisotropic diffusion), collapsed as well. With an estimator, ``C`` may be indefinite:
            ``C = S+ S+^T - S- S-^T`` and ``samples`` directions are drawn for each part.
        estimator: ``None`` (exact), ``"rademacher"`` or ``"gaussian"`` (``E[v^T H v] = tr H``), or
            ``"coordinates"`` (``samples`` of the ``D = len(dims)`` coordinates without replacement,
            scaled by ``D / samples``; with non-diagonal ``weights``, columns of ``S+-``).
        samples: ``K``, the number of random directions (required with ``estimator``).
        generator: a ``torch.Generator`` on ``x``'s device for reproducible draws.
        return_stderr: also return the standard error of the estimate over its ``K`` terms (sample
            standard deviation / sqrt(K), times sqrt(1 - K/D) for ``"coordinates"``); needs ``K >= 2``
            and costs ``K`` separate second-order streams instead of one collapsed stream.
        shared: one set of directions for the whole batch (cheaper first layer; the errors of the rows
            are then correlated) instead of independent directions per sample.
        directions: your own directions, ``[K, *in]`` (shared) or ``[B, K, *in]``; the estimate is
            ``mean_k v_k^T H v_k``, unbiased when ``E[v v^T] = I``. Under ``torch.compile``, draw them
            outside the compiled region and pass them here.

    Returns:
        ``[B, *out]``, or ``(estimate, stderr)`` with ``return_stderr=True``. Differentiable w.r.t. the
        parameters of ``f`` with one ordinary backward (for an estimate: an unbiased estimate of the
        exact operator's gradient).

    Example:
        >>> import torch, torchderiv
        >>> f = lambda x: (x ** 2).sum(-1, keepdim=True)          # Laplacian = 2 * dim
        >>> torchderiv.laplacian(f, torch.randn(4, 3)).squeeze(-1)
        tensor([6., 6., 6., 6.])
        >>> g = torch.Generator().manual_seed(0)
        >>> torchderiv.laplacian(f, torch.randn(4, 3), estimator="rademacher", samples=2, generator=g).squeeze(-1)
        tensor([6., 6., 6., 6.])
    """
    return dispatch(Request("laplacian", batched, method, chunk_size,
                            (("dims", dims), ("weights", weights), *_random_options(
                                estimator, samples, generator, return_stderr, shared, directions))), f, x)


def _random_options(estimator, samples, generator, return_stderr, shared, directions) -> tuple:
    """The estimator options of a request: none for an exact call (its key stays what it was)."""
    opts = (("estimator", estimator), ("samples", samples), ("generator", generator),
            ("return_stderr", return_stderr), ("shared", shared), ("directions", directions))
    return () if all(v is None or v is False for _, v in opts) else opts


def divergence(f: Callable[[Tensor], Tensor], x: Tensor, *, batched: bool = True, method: str = "auto",
               chunk_size: int | None = None, sparsity: bool | None = None, estimator: str | None = None,
               samples: int | None = None, generator: torch.Generator | None = None, return_stderr: bool = False,
               shared: bool = False, directions: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Per-sample divergence ``sum_i d f_i / d x_i`` of a map with equal input and output shapes: ``[B]``.

    ``sparsity`` as in :func:`jacobian_diagonal` (exact calls). With ``estimator=`` (``"rademacher"``,
    ``"gaussian"``, ``"coordinates"``), the unbiased Hutchinson estimate ``mean_k v_k^T J v_k`` of the trace
    of the Jacobian (the FFJORD estimator) from ``K = samples`` first-order streams; ``generator``,
    ``return_stderr`` (free here), ``shared`` and ``directions`` as in :func:`laplacian`.

    Example:
        >>> import torch, torchderiv
        >>> torchderiv.divergence(lambda x: 2 * x, torch.randn(5, 3))
        tensor([6., 6., 6., 6., 6.])
        >>> g = torch.Generator().manual_seed(0)
        >>> torchderiv.divergence(lambda x: 2 * x, torch.randn(5, 3), estimator="rademacher", samples=1, generator=g)
        tensor([6., 6., 6., 6., 6.])
    """
    return dispatch(Request("divergence", batched, method, chunk_size, (("sparsity", sparsity),) + _random_options(
        estimator, samples, generator, return_stderr, shared, directions)), f, x)


def biharmonic(f: Callable[[Tensor], Tensor], x: Tensor, *, dims: Sequence[int] | None = None,
               batched: bool = True, method: str = "auto", chunk_size: int | None = None,
               estimator: str | None = None, samples: int | None = None,
               generator: torch.Generator | None = None, return_stderr: bool = False, shared: bool = False,
               directions: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Per-sample biharmonic ``sum_ij d4 f / dx_i^2 dx_j^2`` of every output component, ``[B, *out]``.

    One generated forward pass propagates the partials up to order 3 that the result needs and the
    fourth-order part collapsed into a single stream.

    With ``estimator="gaussian"`` (the only unbiased one: Rademacher directions give
    ``3 Δ²f - 2 sum_i d_i^4 f``), the estimate ``mean_k D^4_(v_k) f / 3`` for standard normal ``v_k``
    over ``dims`` (``E[D^4_v f] = 3 Δ²f``, Isserlis; STDE, Shi et al. 2024): ``3 K`` streams of orders
    1..3 and one collapsed fourth-order stream.

    Args:
        dims: restrict both sums to these (flattened) input coordinates.
        method: ``"forward"`` (Taylor mode) or ``"auto"`` (the same).
        batched, chunk_size: as in :func:`jacobian`.
        estimator, samples, generator, return_stderr, shared, directions: as in :func:`laplacian`
            (``directions`` should have standard normal moments up to order 4).

    Example:
        >>> import torch, torchderiv
        >>> f = lambda x: (x ** 2).sum(-1, keepdim=True) ** 2     # |x|^4: biharmonic = 8 d (d + 2)
        >>> torchderiv.biharmonic(f, torch.randn(2, 3)).squeeze(-1)
        tensor([120., 120.])
    """
    return dispatch(Request("biharmonic", batched, method, chunk_size, (("dims", dims), *_random_options(
        estimator, samples, generator, return_stderr, shared, directions))), f, x)


def partials(f: Callable[[Tensor], Tensor], x: Tensor, spec, *, coords=None, batched: bool = True,
             method: str = "auto", chunk_size: int | None = None) -> dict:
    """Arbitrary partial derivatives of ``f``, all in one generated forward pass.

    Args:
        spec: a list of multi-indices: tuples of (flattened) input coordinates such as ``()``, ``(0,)``,
            ``(1, 1)``, ``(0, 0, 1, 1)``; or, with ``coords``, strings such as ``""``, ``"t"``, ``"xx"``.
            ``()`` / ``""`` is the value itself.
        coords: one name per input coordinate, e.g. ``"txy"``.
        method: ``"forward"`` (Taylor mode) or ``"auto"`` (the same: partials have no reverse-mode form).
        batched, chunk_size: as in :func:`jacobian`.

    Returns:
        a dict with the keys of ``spec`` as given, each ``[B, *out]``.

    Example:
        >>> import torch, torchderiv
        >>> u = lambda tx: tx[:, :1] * tx[:, 1:] ** 3            # u(t, x) = t x^3
        >>> d = torchderiv.partials(u, torch.tensor([[2.0, 1.0]]), ["", "t", "xx", "xxx"], coords="tx")
        >>> [float(d[k]) for k in ["", "t", "xx", "xxx"]]
        [2.0, 1.0, 12.0, 12.0]
    """
    return dispatch(Request("partials", batched, method, chunk_size, (("spec", spec), ("coords", coords))), f, x)

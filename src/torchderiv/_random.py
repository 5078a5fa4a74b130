"""Randomized (stochastic Taylor) estimators of the Laplacian, the divergence and the biharmonic.

The exact operators propagate one coefficient stream per input coordinate. In high dimensions the
estimators here propagate ``K`` random directions ``v_k`` instead and return an unbiased estimate:

* Laplacian (Hutchinson): ``E[v^T H v] = tr H`` when ``E[v v^T] = I`` (Rademacher or standard normal
  ``v``); ``K`` first-order streams plus ONE collapsed second-order stream ``sum_k w_k D^2_(v_k) f``
  (the collapsed Taylor trick applied to random directions). With ``weights=C``,
  ``C = S+ S+^T - S- S-^T`` (eigendecomposition) and ``v = S+ z``, ``v = S- z`` are weighted +1 / -1.
* ``"coordinates"``: ``K`` of the ``D`` coordinates drawn without replacement, scaled by ``D / K``
  (stochastic dimension sampling, Hu et al. 2023; sparse STDE jets, Shi et al., NeurIPS 2024).
* Divergence (the FFJORD estimator): ``E[v^T J v] = tr J``, ``K`` first-order streams.
* Biharmonic: ``E[D^4_v f] = 3 sum_ij d_i^2 d_j^2 f`` for standard normal ``v`` (Isserlis); the stream
  holds derivatives, not normalized Taylor coefficients, so the estimate is the collapsed fourth-order
  stream over ``3 K``.

Random directions enter the generated graph as a tensor INPUT ``[K, B, *in]`` (``[K, 1, *in]`` when
shared by the batch), so one cached graph serves every call: only ``K``, the batch layout, the weights
of the collapsed stream and the orders read are part of its cache key.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from ._cache import check_output, derivative_graph, fast_call, register_fast
from ._capture import TraceError
from ._fallback import per_sample, written_out
from ._jet import full
from ._onehot import OneHot
from ._plan import Plan
from ._requests import Request, check_dims, check_weights, in_shape

ESTIMATORS = ("rademacher", "gaussian", "coordinates")
_OPTS = ("estimator", "samples", "generator", "return_stderr", "shared", "directions")


def numel(shape) -> int:
    return math.prod(shape)


def is_random(req: Request) -> bool:
    """Whether a request asks for a randomized estimate (any of the estimator options set)."""
    return (req.opt("estimator") is not None or req.opt("samples") is not None or req.opt("generator") is not None
            or bool(req.opt("return_stderr")) or bool(req.opt("shared")) or req.opt("directions") is not None)


def run(req: Request, f, x: Tensor):
    """The randomized form of ``req`` (after the dispatcher's validation): every option of the request is
    read here; the generated graph is cached under its own key (see :func:`directional`), and nothing is
    registered under the request's key, as every call must draw new directions."""
    o = {k: req.opt(k) for k in _OPTS}
    for flag in ("return_stderr", "shared"):
        if o[flag] is None:
            o[flag] = False
    if req.op == "laplacian":
        return laplacian(f, x, dims=req.opt("dims"), weights=req.opt("weights"), batched=req.batched,
                         method=req.method, chunk_size=req.chunk_size, **o)
    if req.op == "divergence":
        return divergence(f, x, batched=req.batched, method=req.method, chunk_size=req.chunk_size, **o)
    if req.op == "biharmonic":
        return biharmonic(f, x, dims=req.opt("dims"), batched=req.batched, method=req.method,
                          chunk_size=req.chunk_size, **o)
    raise ValueError(f"{req.op}: has no randomized estimator")  # pragma: no cover - only these three take one


# ----------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Options:
    estimator: str | None  # None with user directions
    samples: int
    generator: torch.Generator | None
    return_stderr: bool
    shared: bool
    directions: Tensor | None  # [K, 1 or B, *in] (seed layout) when given


def check_options(fname: str, x: Tensor, batched: bool, method: str, estimator, samples, generator,
                  return_stderr, shared, directions, allowed=ESTIMATORS) -> Options:
    """Validate the estimator options; every refusal names the argument and the fix."""
    if estimator is not None and estimator not in ESTIMATORS:
        raise ValueError(f"{fname}: estimator must be None (exact) or one of {ESTIMATORS}, got {estimator!r}")
    if estimator is not None and estimator not in allowed:
        if fname == "biharmonic":
            raise ValueError(
                f"{fname}: estimator={estimator!r} is not available: only 'gaussian' is unbiased for the "
                f"biharmonic (Rademacher directions give 3 Δ²f - 2 sum_i d_i^4 f, and sampled coordinates "
                f"miss the mixed terms d_i^2 d_j^2 f); pass estimator='gaussian'")
        raise ValueError(f"{fname}: estimator must be one of {allowed}, got {estimator!r}")
    if method not in ("auto", "forward"):
        raise ValueError(f"{fname}: the randomized estimators run in forward Taylor mode; method={method!r} "
                         f"cannot be combined with estimator= / directions= (use method='auto')")
    if not isinstance(return_stderr, bool):
        raise TypeError(f"{fname}: return_stderr must be True or False, got {return_stderr!r}")
    if not isinstance(shared, bool):
        raise TypeError(f"{fname}: shared must be True or False, got {shared!r}")
    if directions is not None:
        if estimator is not None:
            raise ValueError(f"{fname}: pass either estimator= (directions drawn for you) or directions= "
                             f"(your own), not both")
        if generator is not None:
            raise ValueError(f"{fname}: generator= draws directions; with directions= given there is "
                             f"nothing to draw: drop generator=")
        if shared:
            raise ValueError(f"{fname}: with directions=, the shape says whether they are shared: [K, *in] "
                             f"for the whole batch, [B, K, *in] per sample; drop shared=")
        V = _check_directions(fname, directions, x, batched)
        K = V.shape[0]
        if samples is not None and samples != K:
            raise ValueError(f"{fname}: samples={samples!r} but directions= holds K={K} directions; "
                             f"drop samples= (K is read from directions)")
        if return_stderr and K < 2:
            raise ValueError(f"{fname}: return_stderr=True needs at least 2 directions to estimate a spread, "
                             f"got K={K}")
        return Options(None, K, None, return_stderr, V.shape[1] == 1 and batched, V)
    if estimator is None:
        given = [n for n, v in zip(_OPTS[1:], (samples, generator, return_stderr, shared)) if v]
        raise ValueError(f"{fname}: {', '.join(given)} given without an estimator; pass estimator= (one of "
                         f"{allowed}) for a randomized estimate, or drop {given[0]}= for the exact value")
    if samples is None:
        raise ValueError(f"{fname}: estimator={estimator!r} needs samples=K, the number of random directions "
                         f"(e.g. samples=16)")
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise ValueError(f"{fname}: samples must be an int >= 1, got {samples!r}")
    if return_stderr and samples < 2:
        raise ValueError(f"{fname}: return_stderr=True needs samples >= 2 to estimate a spread, got "
                         f"samples={samples}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"{fname}: generator must be a torch.Generator, got {type(generator).__name__}")
        if torch.device(generator.device).type != x.device.type or (
                x.device.type != "cpu" and generator.device.index not in (None, x.device.index)):
            raise ValueError(f"{fname}: generator is on {generator.device} but x is on {x.device}; create it "
                             f"with torch.Generator(device=x.device)")
    if shared and not batched:
        raise ValueError(f"{fname}: shared=True shares directions across the batch, but batched=False; "
                         f"drop shared=")
    return Options(estimator, samples, generator, return_stderr, shared, None)


def _check_directions(fname: str, directions, x: Tensor, batched: bool) -> Tensor:
    ins = tuple(in_shape(x, batched))
    if not isinstance(directions, Tensor):
        raise TypeError(f"{fname}: directions must be a tensor [K, *in] or [B, K, *in], got "
                        f"{type(directions).__name__}")
    if directions.device != x.device:
        raise ValueError(f"{fname}: directions are on {directions.device} but x is on {x.device}; "
                         f"move them with .to(x.device)")
    if not directions.is_floating_point():
        raise TypeError(f"{fname}: directions must be floating point, got {directions.dtype}")
    d = tuple(directions.shape)
    B = x.shape[0] if batched else None
    if d[1:] == ins and len(d) == len(ins) + 1 and d[0] >= 1:  # [K, *in]: shared
        V = directions.unsqueeze(1) if batched else directions
    elif batched and len(d) == len(ins) + 2 and d[0] == B and d[2:] == ins and d[1] >= 1:  # [B, K, *in]
        V = directions.movedim(0, 1)
    else:
        want = f"[K, {', '.join(map(str, ins))}]" + (
            f" or [{B}, K, {', '.join(map(str, ins))}]" if batched else "")
        raise ValueError(f"{fname}: directions must have shape {want} (K directions shared by the batch, or "
                         f"K per sample), got {d}")
    return V.to(x.dtype)


# ----------------------------------------------------------------------------- direction families


@dataclass
class Family:
    """Directions ``v = S z`` (``S`` None: ``z`` itself on ``dims``), weighted ``sign``."""

    dims: list[int]
    S: Tensor | None  # [len(dims), r]
    sign: float
    r: int


def families(fname: str, n: int, dims, weights) -> list[Family]:
    dims = check_dims(fname, dims, n)
    if weights is None:
        return [Family(dims, None, 1.0, len(dims))] if dims else []
    C = check_weights(fname, weights, len(dims))
    if bool((C == torch.diag(torch.diagonal(C))).all()):  # diagonal: the coordinates themselves
        lam = torch.diagonal(C)
        U = torch.eye(len(dims), dtype=torch.float64)
    else:
        lam, U = torch.linalg.eigh((C + C.T) / 2)
    tol = float(lam.abs().max()) * len(dims) * torch.finfo(torch.float64).eps if len(dims) else 0.0
    out = []
    for sign, keep in ((1.0, lam > tol), (-1.0, lam < -tol)):
        if bool(keep.any()):
            S = U[:, keep] * lam[keep].abs().sqrt()
            out.append(Family(dims, S, sign, int(keep.sum())))
    return out


def _draw(opts: Options, fam: Family, n: int, lead: int, x: Tensor) -> tuple[Tensor, int, float, float]:
    """Directions ``[K_f, lead, n]`` of one family, with ``K_f``, the per-term factor ``c`` (estimate =
    mean of ``c * D^m_v f``) and the finite-population factor of the variance."""
    K, r, g = opts.samples, fam.r, opts.generator
    dev, dt = x.device, x.dtype
    if opts.estimator == "rademacher":
        z = rademacher((K, lead, r), g, dev, dt)
        Kf, c, fpc = K, 1.0, 1.0
    elif opts.estimator == "gaussian":
        z = torch.randn((K, lead, r), generator=g, device=dev, dtype=dt)
        Kf, c, fpc = K, 1.0, 1.0
    else:  # coordinates without replacement, per row of lead
        Kf = min(K, r)
        # the Kf smallest of r iid uniforms: a uniform Kf-subset; topk, not a full argsort (1.3 s against
        # 0.02 s for 100 x 100000 on CPU); float64 draws, so that ties (which topk breaks by position) are
        # negligible
        u = torch.rand((lead, r), generator=g, device=dev, dtype=torch.float64)
        idx = u.topk(Kf, dim=-1, largest=False).indices  # [lead, Kf]
        c, fpc = float(r), (r - Kf) / r
        if fam.S is None:  # one-hot seeds, kept sparse: the flat input coordinates [Kf, lead] (int64)
            cols = idx.T
            if fam.dims != list(range(n)):
                cols = torch.tensor(fam.dims, device=dev)[cols]
            return cols.contiguous(), Kf, c, fpc
        z = torch.zeros((Kf, lead, r), device=dev, dtype=dt)
        z.scatter_(2, idx.T.unsqueeze(-1), 1.0)
    if fam.S is not None:
        z = z @ fam.S.to(device=dev, dtype=dt).T  # [Kf, lead, len(dims)]
    if len(fam.dims) == n and fam.dims == list(range(n)):
        return z, Kf, c, fpc
    V = torch.zeros((Kf, lead, n), device=dev, dtype=dt)
    V[..., fam.dims] = z
    return V, Kf, c, fpc


def rademacher(shape: tuple[int, ...], generator, device, dtype) -> Tensor:
    """Independent +-1 entries: eight from every random byte (measured about 2x faster than
    ``randint(0, 2)`` on CPU, where the draw is a visible part of a K = 16 estimate)."""
    n = 1
    for s in shape:
        n *= s
    b = torch.randint(0, 256, ((n + 7) // 8, 1), generator=generator, device=device, dtype=torch.uint8)
    bits = b.bitwise_right_shift(torch.arange(8, device=device, dtype=torch.uint8)).bitwise_and_(1)
    return bits.reshape(-1)[:n].reshape(shape).to(dtype).mul_(2).sub_(1)


@dataclass
class Draw:
    # [K_total, 1 or B, *in] (batched) or [K_total, *in]; or, for sampled coordinates, the one-hot seeds
    # as int64 flat input coordinates [K_total, 1 or B] (batched) or [K_total]: see ``onehot_dense``
    V: Tensor
    groups: list[tuple[int, float, float, float]]  # per family: (K_f, sign, c, fpc)

    def weights(self, extra: float = 1.0) -> tuple[float, ...]:
        return tuple(s * c * extra / k for k, s, c, _ in self.groups for _ in range(k))


def draw(fname: str, opts: Options, fams: list[Family], x: Tensor, batched: bool) -> Draw:
    ins = in_shape(x, batched)
    n = numel(ins)
    if opts.directions is not None:
        return Draw(opts.directions, [(opts.samples, 1.0, 1.0, 1.0)])
    lead = 1 if (opts.shared or not batched) else x.shape[0]
    Vs, groups = [], []
    for fam in fams:
        V, Kf, c, fpc = _draw(opts, fam, n, lead, x)
        Vs.append(V)
        groups.append((Kf, fam.sign, c, fpc))
    if any(v.dtype == torch.long for v in Vs) and len(Vs) > 1:  # pragma: no cover - one family only
        raise AssertionError("index seeds come from a single family of coordinates")
    V = torch.cat(Vs) if len(Vs) > 1 else Vs[0]
    V = V.reshape(V.shape[0], *([lead] if batched else []), *([] if V.dtype == torch.long else ins))
    return Draw(V, groups)


def onehot_dense(V: Tensor, x: Tensor, batched: bool) -> Tensor:
    """The seeds ``V`` written out: int64 coordinates ``[K, 1 or B]`` / ``[K]`` become one-hot directions
    ``[K, 1 or B, *in]`` / ``[K, *in]``; a floating-point ``V`` is returned as it is."""
    if V.dtype != torch.long:
        return V
    return OneHot(V, (*V.shape, *in_shape(x, batched))).dense(x.dtype)


# ----------------------------------------------------------------------------- propagation


@lru_cache(maxsize=64)
def _plan(K: int, order: int, weights: tuple[float, ...] | None) -> Plan:
    """``K`` directions; order-``order`` terms of each direction individually (``weights`` None) or
    collapsed into one stream ``sum_k w_k D^order_(v_k)``."""
    if weights is None:
        return Plan(K, [(k,) * order for k in range(K)], [])
    return Plan(K, [], [[((k,) * order, w) for k, w in enumerate(weights)]])


def directional(fname: str, f, x: Tensor, V: Tensor, order: int, batched: bool,
                weights: tuple[float, ...] | None, chunk_size: int | None = None) -> Tensor:
    """``[K, *y]`` the order-``order`` directional derivatives ``D^order_(v_k) f`` (``weights`` None), or
    ``[*y]`` their collapsed combination ``sum_k w_k D^order_(v_k) f``, in one generated forward pass per
    chunk of at most ``chunk_size`` directions. An int64 ``V`` holds one-hot directions as coordinates
    (:func:`onehot_dense`), kept sparse in the generated graph (:mod:`torchderiv._onehot`)."""
    K = V.shape[0]
    if chunk_size is not None and K > chunk_size:
        parts = [directional(fname, f, x, V[s : s + chunk_size], order, batched,
                             None if weights is None else weights[s : s + chunk_size])
                 for s in range(0, K, chunk_size)]
        return torch.cat(parts) if weights is None else sum(parts[1:], parts[0])
    # the whole call path is remembered (``fast_call``): later calls, and torch.compile tracing them, skip
    # the plan and the cache lookups and go straight to the generated graph
    index = V.dtype == torch.long
    key = ("random", fname, tuple(x.shape), x.dtype, x.device, batched, order, weights, K, tuple(V.shape), index)
    run = fast_call(f, key, x)
    if run is None:
        plan = _plan(K, order, weights)
        try:
            entry = derivative_graph(f, x, plan, list(range(K)), batched, fname, outputs=(order,),
                                     seed_shape=tuple(V.shape), seed_index=index)
        except TraceError as e:
            warnings.warn(
                f"{fname}: f could not be traced to a static graph ({e}); falling back to torch.func "
                f"(correct, much slower). Avoid data-dependent Python control flow in f to get the fast path.",
                stacklevel=4,
            )
            with written_out():  # layer_norm (forward-over-forward wrong), fused attention, cdist: written out
                D = reference_directional(f, x, onehot_dense(V, x, batched), order, batched)
            if weights is None:
                return D
            w = torch.tensor(weights, dtype=D.dtype, device=D.device)
            return (D * w.reshape(-1, *([1] * (D.dim() - 1)))).sum(0)

        def bind(xx):
            return lambda VV: _run(entry, xx, VV, order, weights is None)

        run = bind(x)
        out = run(V)
        check_output(fname, out if weights is not None else out[0], x, batched)
        register_fast(f, key, bind, entry)
        return out
    return run(V)


def _run(entry, x: Tensor, V: Tensor, order: int, individual: bool) -> Tensor:
    out = entry.gm(x.contiguous(), V.contiguous(), *entry.constants)
    X = full(out[order], out[0].shape)
    return X if individual else X[0]


def reference_directional(f, x: Tensor, V: Tensor, order: int, batched: bool) -> Tensor:
    """``[K, *y]``: ``d^order/dt^order f(x + t v_k)`` at ``t = 0`` by nested ``torch.func.jvp``, per sample
    (vmap over the batch, a loop where vmap cannot run ``f``). Independent of the Taylor engine."""
    g = per_sample(f, batched)

    def nth(xi, vi):
        h = lambda t: g(xi + t * vi)  # noqa: E731
        for _ in range(order):
            h = (lambda hh: lambda t: torch.func.jvp(hh, (t,), (torch.ones_like(t),))[1])(h)
        return h(torch.zeros((), dtype=xi.dtype, device=xi.device))

    if not batched:
        return torch.stack([nth(x, V[k]) for k in range(V.shape[0])])
    Vb = V.expand(V.shape[0], *x.shape)
    rows = []
    for k in range(V.shape[0]):
        try:
            rows.append(torch.func.vmap(nth)(x, Vb[k]))
        except Exception:  # noqa: BLE001 - vmap cannot run f: loop over samples instead
            rows.append(torch.stack([nth(x[b], Vb[k, b]) for b in range(x.shape[0])]))
    return torch.stack(rows)


# ----------------------------------------------------------------------------- estimates


def _combine(T: Tensor, d: Draw, extra: float):
    """Estimate and standard error from per-direction terms ``T [K_total, *y]``."""
    est, var, s = 0.0, 0.0, 0
    for k, sign, c, fpc in d.groups:
        t = T[s : s + k] * (c * extra)
        s += k
        est = est + sign * t.mean(0)
        if fpc > 0 and k > 1:
            var = var + t.var(0, correction=1) / k * fpc
    stderr = var.sqrt() if isinstance(var, Tensor) else torch.zeros_like(est)
    return est, stderr


def laplacian(f, x: Tensor, *, dims, weights, batched: bool, method: str, chunk_size, estimator, samples,
              generator, return_stderr, shared, directions):
    fname = "laplacian"
    opts = check_options(fname, x, batched, method, estimator, samples, generator, return_stderr, shared,
                         directions)
    n = numel(in_shape(x, batched))
    if opts.directions is not None:
        if dims is not None or weights is not None:
            raise ValueError(f"{fname}: directions= gives the full direction vectors; dims= and weights= "
                             f"cannot be combined with it (build them into the directions: v = S z with "
                             f"S S^T = C)")
        fams = []
    else:
        fams = families(fname, n, dims, weights)
        if opts.estimator == "coordinates":
            D = len(check_dims(fname, dims, n))
            if opts.samples > D:
                raise ValueError(f"{fname}: estimator='coordinates' draws samples={opts.samples} of the D={D} "
                                 f"coordinates without replacement; pass samples <= {D}")
        if not fams:  # all-zero weights or empty dims: the zero operator
            with torch.no_grad():
                y = f(x)
            z = torch.zeros_like(y)
            return (z, torch.zeros_like(y)) if opts.return_stderr else z
    d = draw(fname, opts, fams, x, batched)
    return _estimate(fname, f, x, d, 2, 1.0, batched, opts.return_stderr, chunk_size)


def _estimate(fname, f, x, d: Draw, order: int, extra: float, batched, return_stderr, chunk_size):
    if not return_stderr:
        return directional(fname, f, x, d.V, order, batched, d.weights(extra), chunk_size)
    T = directional(fname, f, x, d.V, order, batched, None, chunk_size)
    return _combine(T, d, extra)


def biharmonic(f, x: Tensor, *, dims, batched: bool, method: str, chunk_size, estimator, samples, generator,
               return_stderr, shared, directions):
    fname = "biharmonic"
    opts = check_options(fname, x, batched, method, estimator, samples, generator, return_stderr, shared,
                         directions, allowed=("gaussian",))
    n = numel(in_shape(x, batched))
    if opts.directions is not None:
        if dims is not None:
            raise ValueError(f"{fname}: directions= gives the full direction vectors; dims= cannot be combined "
                             f"with it (put zeros outside dims in the directions)")
        fams = []
    else:
        fams = families(fname, n, dims, None)
        if not fams:
            with torch.no_grad():
                y = f(x)
            z = torch.zeros_like(y)
            return (z, torch.zeros_like(y)) if opts.return_stderr else z
    d = draw(fname, opts, fams, x, batched)
    return _estimate(fname, f, x, d, 4, 1.0 / 3.0, batched, opts.return_stderr, chunk_size)


def divergence(f, x: Tensor, *, batched: bool, method: str, chunk_size, estimator, samples, generator,
               return_stderr, shared, directions):
    fname = "divergence"
    opts = check_options(fname, x, batched, method, estimator, samples, generator, return_stderr, shared,
                         directions)
    ins = in_shape(x, batched)
    n = numel(ins)
    if opts.estimator == "coordinates" and opts.samples > n:
        raise ValueError(f"{fname}: estimator='coordinates' draws samples={opts.samples} of the D={n} "
                         f"coordinates without replacement; pass samples <= {n}")
    fams = [] if opts.directions is not None else [Family(list(range(n)), None, 1.0, n)]
    d = draw(fname, opts, fams, x, batched)
    J = directional(fname, f, x, d.V, 1, batched, None, chunk_size)  # [K, *y]: J v_k
    y_shape = J.shape[1:]
    if tuple(y_shape) != tuple(x.shape):
        raise ValueError(f"{fname}: needs a map whose per-sample output shape equals its input shape, but f "
                         f"maps {tuple(ins)} to {tuple(y_shape[1:] if batched else y_shape)}")
    Jf = J.reshape(J.shape[0], *(x.shape[:1] if batched else ()), -1)
    if d.V.dtype == torch.long:  # one-hot v = e_i: v^T J v = (J v)_i
        idx = d.V.expand(Jf.shape[:-1]) if batched else d.V
        T = Jf.gather(-1, idx.unsqueeze(-1)).squeeze(-1)  # [K, B]
    else:
        V = d.V.expand(d.V.shape[0], *x.shape)
        T = (V * J).reshape(Jf.shape).sum(-1)  # [K, B]: v^T J v
    est, stderr = _combine(T, d, 1.0)
    return (est, stderr) if opts.return_stderr else est

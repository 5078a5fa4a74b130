"""Ways to compute each derivative request: torchderiv, torch.func, autograd loops, the seeds' own code.

Every builder takes a :class:`Setup` and returns a zero-argument callable that computes the request on
``setup.x`` and returns a tuple of detached tensors in the request's standard layout:

* ``jacobian``: ``([B, *out, *in],)``; ``jacobian_diagonal``: ``([B, *in],)``; ``divergence``: ``([B],)``
* ``hessian``: ``([B, *out, *in, *in],)``; ``laplacian`` and ``biharmonic``: ``([B, *out],)``
* ``partials``: one ``[B, *out]`` tensor per multi-index of the spec, in spec order.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor
from torch.func import jacfwd, jacrev, jvp, vmap

import torchderiv

Runner = Callable[[], tuple]
Builder = Callable[["Setup"], Runner]


class MethodUnavailable(RuntimeError):
    """Raised by a builder when its method cannot run on this machine (no working compiler for
    ``torch.compile``): the runner leaves the row out with a note instead of reporting an error."""


@dataclass
class Setup:
    """The function and inputs a scenario measures, plus request details (``extra``)."""

    f: Callable[[Tensor], Tensor]
    x: Tensor
    extra: dict = field(default_factory=dict)

    @property
    def B(self) -> int:
        return self.x.shape[0]

    @property
    def n(self) -> int:
        return math.prod(self.x.shape[1:])

    def cast(self, dtype: torch.dtype) -> Setup:
        """A copy in another dtype (the float64 reference); the function must be an ``nn.Module``."""
        if not isinstance(self.f, torch.nn.Module):
            raise TypeError("only an nn.Module can be cast to another dtype")
        return replace(self, f=copy.deepcopy(self.f).to(dtype), x=self.x.to(dtype))

    def rows(self, k: int) -> Setup:
        """The same request on the first ``k`` rows (rows are independent)."""
        return replace(self, x=self.x[:k])


def _leaf(x: Tensor) -> Tensor:
    return x.detach().requires_grad_(True)


def per_sample(f):
    return lambda xi: f(xi.unsqueeze(0)).squeeze(0)


def _detach(*ts) -> tuple:
    return tuple(t.detach() for t in ts)


# ----------------------------------------------------------------------------- multi-index specs


def parse_spec(text: str) -> list[tuple[int, ...]]:
    """``"0,00,011"`` -> ``[(0,), (0, 0), (0, 1, 1)]``: comma-separated multi-indices, one digit per input
    coordinate differentiated once (coordinates 0-9); an empty item (``",0"``) is the value itself."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if item and not item.isdigit():
            raise ValueError(f"bad multi-index {item!r} in partials spec {text!r}: use digits, e.g. '0,00,011'")
        out.append(tuple(int(c) for c in item))
    return out


def spec_label(alpha: tuple[int, ...], coords: str | None = None) -> str:
    if not alpha:
        return "value"
    return "d" + "".join(coords[i] if coords else str(i) for i in alpha)


# ----------------------------------------------------------------------------- torchderiv


def td_op(op: str, method: str | None = None, spec=None, coords=None, **options) -> Builder:
    """``torchderiv.<op>`` (forward Taylor mode unless ``method`` says otherwise); ``options`` are passed on
    (``sparsity=``, ``layout=``)."""

    def build(s: Setup) -> Runner:
        f, x = s.f, s.x
        kw = dict(options) if method is None else {"method": method, **options}
        if op == "partials":
            keys = spec if spec is not None else s.extra["spec"]
            return lambda: _detach(*torchderiv.partials(f, x, keys, coords=coords, **kw).values())
        fn = getattr(torchderiv, op)
        return lambda: _detach(fn(f, x, **kw))

    return build


# ----------------------------------------------------------------------------- torch.func


def tf_jacobian(kind: str) -> Builder:
    """``vmap(jacfwd)`` or ``vmap(jacrev)`` over the batch: ``[B, *out, *in]``."""
    tr = {"jacfwd": jacfwd, "jacrev": jacrev}[kind]

    def build(s: Setup) -> Runner:
        J = vmap(tr(per_sample(s.f)))
        return lambda: _detach(J(s.x))

    return build


def tf_jvp(s: Setup) -> Runner:
    """``torch.func.jvp`` along each input direction (one jvp when there is one input coordinate)."""
    f, x, n = s.f, s.x, s.n
    ins = tuple(x.shape[1:])
    if n == 1:
        t = torch.ones_like(x)
        def single():
            dy = jvp(f, (x,), (t,))[1]
            return (dy.detach().reshape(*dy.shape, *ins),)

        return single
    eye = torch.eye(n, dtype=x.dtype, device=x.device).reshape(n, 1, *ins).expand(n, *x.shape)

    def run():
        J = vmap(lambda t: jvp(f, (x,), (t,))[1])(eye)  # [n, B, *out]
        return (J.movedim(0, -1).reshape(*J.shape[1:], *ins).detach(),)

    return run


def _with_aux(g):
    def both(xi):
        d = g(xi)
        return d, d

    return both


def tf_hessian(kind: str, with_jacobian: bool = False) -> Builder:
    """Per-sample Hessians by ``vmap(hessian)`` (= jacfwd(jacrev)), ``vmap(jacfwd(jacfwd))`` or
    ``vmap(jacrev(jacrev))``; with ``with_jacobian`` the Jacobian comes along as an aux output of the
    same pass: ``(J, H)``."""
    inner, outer = {"hessian": (jacrev, jacfwd), "jacfwd(jacfwd)": (jacfwd, jacfwd),
                    "jacrev(jacrev)": (jacrev, jacrev)}[kind]

    def build(s: Setup) -> Runner:
        g = per_sample(s.f)
        if with_jacobian:
            HJ = vmap(outer(_with_aux(inner(g)), has_aux=True))

            def run():
                H, J = HJ(s.x)
                return _detach(J, H)

            return run
        H = vmap(outer(inner(g)))
        return lambda: _detach(H(s.x))

    return build


def tf_laplacian(kind: str = "hessian") -> Builder:
    """Trace of the per-sample Hessian from :func:`tf_hessian`: ``[B, *out]``."""

    def build(s: Setup) -> Runner:
        H = tf_hessian(kind)(s)
        n = s.n

        def run():
            (h,) = H()
            return (h.reshape(*h.shape[: h.dim() - 2 * (s.x.dim() - 1)], n, n).diagonal(0, -2, -1).sum(-1),)

        return run

    return build


def tf_biharmonic(s: Setup) -> Runner:
    """Trace of trace of the full per-sample fourth derivative, ``vmap(jacfwd(jacfwd(jacrev(jacrev))))``."""
    T = vmap(jacfwd(jacfwd(jacrev(jacrev(per_sample(s.f))))))
    n, k = s.n, s.x.dim() - 1

    def run():
        t = T(s.x)
        t = t.reshape(*t.shape[: t.dim() - 4 * k], n, n, n, n)
        return (torch.einsum("...iijj->...", t).detach(),)

    return run


def tf_partials_jvp(spec: Sequence[tuple[int, ...]] | None = None) -> Builder:
    """Each partial by nested ``torch.func.jvp`` along one-hot directions, vmapped over the batch."""

    def build(s: Setup) -> Runner:
        keys = spec if spec is not None else s.extra["spec_idx"]
        g = per_sample(s.f)
        n = s.n
        ins = tuple(s.x.shape[1:])
        eye = torch.eye(n, dtype=s.x.dtype, device=s.x.device).reshape(n, *ins)

        def d(h, i):
            return lambda xi: jvp(h, (xi,), (eye[i],))[1]

        fns = []
        for alpha in keys:
            h = g
            for i in alpha:
                h = d(h, i)
            fns.append(h)
        V = vmap(lambda xi: tuple(h(xi) for h in fns))
        return lambda: _detach(*V(s.x))

    return build


def tf_partials_rev(spec: Sequence[tuple[int, ...]] | None = None) -> Builder:
    """Each partial from nested ``jacrev`` (all partials of that order), vmapped over the batch."""

    def build(s: Setup) -> Runner:
        keys = spec if spec is not None else s.extra["spec_idx"]
        g = per_sample(s.f)
        n, k = s.n, s.x.dim() - 1
        orders = sorted({len(a) for a in keys})

        def all_orders(xi):
            res, h = {}, g
            for o in range(max(orders) + 1):
                if o in orders:
                    res[o] = h(xi)
                h = jacrev(h)
            return res

        V = vmap(all_orders)

        def run():
            res = V(s.x)
            out = []
            for a in keys:
                t = res[len(a)]
                t = t.reshape(*t.shape[: t.dim() - len(a) * k], *([n] * len(a)))
                out.append(t[(...,) + tuple(a)] if a else t)
            return _detach(*out)

        return run

    return build


# ----------------------------------------------------------------------------- autograd loops


def _rows_grad(out: Tensor, x: Tensor, create_graph: bool) -> Tensor:
    """Gradient of a per-row quantity ``out`` [B] w.r.t. ``x`` [B, *in], flattened to [B, n]
    (rows are independent, so the gradient of the sum gives every row's own gradient)."""
    (g,) = torch.autograd.grad(out.sum(), x, retain_graph=True, create_graph=create_graph)
    return g.reshape(g.shape[0], -1)


def ag_jacobian(s: Setup) -> Runner:
    """``torch.autograd.grad`` once per output component."""

    def run():
        with torch.enable_grad():
            x = _leaf(s.x)
            y = s.f(x)
            yf = y.reshape(y.shape[0], -1)
            cols = [_rows_grad(yf[:, k], x, False) for k in range(yf.shape[1])]
            return (torch.stack(cols, 1).reshape(*y.shape, *x.shape[1:]).detach(),)

    return run


def ag_jacobian_diagonal(s: Setup) -> Runner:
    def run():
        with torch.enable_grad():
            x = _leaf(s.x)
            yf = s.f(x).reshape(x.shape[0], -1)
            d = [_rows_grad(yf[:, k], x, False)[:, k] for k in range(yf.shape[1])]
            return (torch.stack(d, 1).reshape(x.shape).detach(),)

    return run


def ag_divergence(s: Setup) -> Runner:
    r = ag_jacobian_diagonal(s)
    return lambda: (r()[0].reshape(s.B, -1).sum(-1),)


def ag_partials(spec: Sequence[tuple[int, ...]] | None = None, create_graph_last: bool = False) -> Builder:
    """Nested ``torch.autograd.grad`` per output component: every prefix of a multi-index is
    differentiated once (``create_graph=True`` where a further order needs it)."""

    def build(s: Setup) -> Runner:
        keys = [tuple(a) for a in (spec if spec is not None else s.extra["spec_idx"])]
        need = {a[:j] for a in keys for j in range(len(a))}  # prefixes whose gradient is needed

        def run():
            with torch.enable_grad():
                x = _leaf(s.x)
                y = s.f(x)
                yf = y.reshape(y.shape[0], -1)
                per_key = {a: [] for a in keys}
                for k in range(yf.shape[1]):
                    val = {(): yf[:, k]}
                    for a in sorted(need, key=len):
                        deeper = any(a + (i,) in need for i in range(s.n))
                        g = _rows_grad(val[a], x, create_graph=deeper or create_graph_last)
                        for i in range(g.shape[1]):
                            val[a + (i,)] = g[:, i]
                    for a in keys:
                        per_key[a].append(val[a])
                outs = [torch.stack(per_key[a], 1).reshape(y.shape) for a in keys]
                return tuple(o if create_graph_last else o.detach() for o in outs)

        return run

    return build


def ag_hessian(s: Setup) -> Runner:
    n = s.n
    keys = [(i, j) for i in range(n) for j in range(n)]
    r = ag_partials(keys)(s)

    def run():
        parts = r()
        H = torch.stack(parts, -1)
        return (H.reshape(*H.shape[:-1], *s.x.shape[1:], *s.x.shape[1:]),)

    return run


def ag_laplacian_graph(x: Tensor, y: Tensor, create_graph: bool) -> Tensor:
    """Laplacian of every component of ``y`` = f(x) by nested autograd: ``[B, *out]``."""
    yf = y.reshape(y.shape[0], -1)
    laps = []
    for k in range(yf.shape[1]):
        g = _rows_grad(yf[:, k], x, create_graph=True)
        lap = sum(_rows_grad(g[:, i], x, create_graph=create_graph)[:, i] for i in range(g.shape[1]))
        laps.append(lap)
    return torch.stack(laps, 1).reshape(y.shape)


def ag_laplacian(s: Setup) -> Runner:
    """Gradient, then one more backward per input coordinate (the nested loop people write)."""

    def run():
        with torch.enable_grad():
            x = _leaf(s.x)
            return (ag_laplacian_graph(x, s.f(x), False).detach(),)

    return run


def ag_biharmonic(s: Setup) -> Runner:
    """Laplacian of the Laplacian, both by nested autograd loops."""

    def run():
        with torch.enable_grad():
            x = _leaf(s.x)
            lap = ag_laplacian_graph(x, s.f(x), True)
            return (ag_laplacian_graph(x, lap, False).detach(),)

    return run


# ----------------------------------------------------------------------------- op table


def torchderiv_methods(op: str) -> list[tuple[str, Builder]]:
    if op == "partials":
        return [("torchderiv.partials", td_op("partials")),
                ("torchderiv.partials (autograd)", td_op("partials", "autograd"))]
    out = [(f"torchderiv.{op}", td_op(op))]
    if op in ("jacobian", "jacobian_diagonal", "hessian", "laplacian", "divergence"):
        out = [(f"torchderiv.{op} (forward)", td_op(op, "forward")),
               (f"torchderiv.{op} (reverse)", td_op(op, "reverse"))]
    return out + [(f"torchderiv.{op} (autograd)", td_op(op, "autograd"))]


def _diag_of(build: Builder, reduce: bool) -> Builder:
    def b(s: Setup) -> Runner:
        r = build(s)
        n = s.n

        def run():
            (J,) = r()
            d = J.reshape(s.B, n, n).diagonal(0, -2, -1)
            return (d.sum(-1),) if reduce else (d.reshape(s.x.shape),)

        return run

    return b


def generic_methods(op: str) -> tuple[list[tuple[str, Builder]], str, str]:
    """All applicable methods for an op, the baseline name and the reference name (run in float64)."""
    td = torchderiv_methods(op)
    if op == "jacobian":
        peers = [("vmap(jacfwd)", tf_jacobian("jacfwd")), ("vmap(jacrev)", tf_jacobian("jacrev")),
                 ("torch.func.jvp", tf_jvp), ("autograd.grad loop", ag_jacobian)]
        return td + peers, "autograd.grad loop", "vmap(jacrev)"
    if op in ("jacobian_diagonal", "divergence"):
        red = op == "divergence"
        peers = [("vmap(jacfwd) diagonal", _diag_of(tf_jacobian("jacfwd"), red)),
                 ("vmap(jacrev) diagonal", _diag_of(tf_jacobian("jacrev"), red)),
                 ("autograd.grad loop", ag_divergence if red else ag_jacobian_diagonal)]
        return td + peers, "autograd.grad loop", "vmap(jacrev) diagonal"
    if op == "hessian":
        peers = [("vmap(hessian)", tf_hessian("hessian")), ("vmap(jacfwd(jacfwd))", tf_hessian("jacfwd(jacfwd)")),
                 ("autograd.grad loop", ag_hessian)]
        return td + peers, "autograd.grad loop", "vmap(hessian)"
    if op == "laplacian":
        peers = [("vmap(hessian) trace", tf_laplacian("hessian")), ("autograd.grad loop", ag_laplacian)]
        return td + peers, "autograd.grad loop", "vmap(hessian) trace"
    if op == "biharmonic":
        peers = [("vmap(jacfwd(jacfwd(jacrev(jacrev)))) trace", tf_biharmonic),
                 ("autograd.grad loop", ag_biharmonic)]
        return td + peers, "autograd.grad loop", "autograd.grad loop"
    if op == "partials":
        peers = [("torch.func nested jvp", tf_partials_jvp()), ("torch.func nested jacrev", tf_partials_rev()),
                 ("autograd.grad loop", ag_partials())]
        return td + peers, "autograd.grad loop", "torch.func nested jacrev"
    raise ValueError(f"unknown op {op!r}")


OPS = ("jacobian", "jacobian_diagonal", "hessian", "laplacian", "divergence", "biharmonic", "partials:SPEC")

"""Reverse mode: ``f``'s traced graph prepared for torch.func's reverse transforms, and the vectorized
reverse-mode Jacobian and Hessian."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import fx
from torch.fx.experimental.proxy_tensor import make_fx

from ._cache import Entry, _mode, _slot, _state, captured, output_shape
from ._capture import TraceError
from ._fallback import map_samples, per_sample, probe_output, written_out
from ._rules import _select_scatter_op, _slice_scatter_op, copy_out_of_place
from ._warnings import warn_fallback

_NORMS = ("native_layer_norm.default", "native_batch_norm.default", "_native_batch_norm_legit.default",
          "_native_batch_norm_legit.no_stats", "_native_batch_norm_legit_no_training.default",
          "native_group_norm.default")


def reverse_function(f: Callable, x: torch.Tensor, batched: bool, fname: str) -> Callable:
    """``f`` as the torch.func (reverse) paths should run it: its traced graph with normalization layers
    written out in elementary ops (torch's own higher derivatives of ``native_layer_norm`` and
    ``native_batch_norm`` are wrong in some versions: parameter gradients of Hessians, third
    derivatives), reading the live parameters. Shape-specialized to ``x``; cached like the rest."""
    slot = _slot(f)
    key = ("reverse", tuple(x.shape), x.dtype, x.device, batched, _mode(f))
    e = slot.get(key)
    if e is None or not e.fresh(f):
        cap = captured(f, x, batched, fname)
        from torch._decomp import get_decompositions

        ops = []
        for name in _NORMS:
            packet, overload = name.split(".")
            op = getattr(getattr(torch.ops.aten, packet, None), overload, None)
            if op is not None:
                ops.append(op)
        consts = cap.constants
        with torch.inference_mode(False), torch.no_grad():
            fake_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            table = get_decompositions(ops)
            table[torch.ops.aten.copy.default] = copy_out_of_place  # functional copy has no autograd formula
            gm = make_fx(cap.gm, decomposition_table=table, tracing_mode="fake",
                         _allow_non_fake_inputs=True)(fake_x, *[c.detach() for c in consts])
        _patch_for_autograd(gm)
        e = Entry(gm=gm, constants=consts, **_state(f, cap))
        slot[key] = e
    gm, consts = e.gm, e.constants
    # the graph was traced at a contiguous x: its views assume those strides (channels_last, expanded or
    # transposed inputs would fail in `view` or in an in-place write)
    return lambda xx: gm(xx.contiguous(), *consts)


def _patch_for_autograd(gm: fx.GraphModule) -> None:
    """Work around two gaps of torch's reverse mode in the traced graph (both met in slice writes such as
    an FNO's ``Y[..., :modes] = ...`` or ``buf[:, 1:] = h``): autograd has no complex formula for
    slice_scatter / select_scatter, so complex ones run on real views, as the forward rules do; and the
    backward of a slice under vmap overflows on the open end ``2**63 - 1`` of ``x[1:]``, so slice bounds
    are clamped to the dim's size."""
    aten = torch.ops.aten
    swap = {aten.slice_scatter.default: _slice_scatter_op, aten.select_scatter.default: _select_scatter_op}
    bounds = {aten.slice.Tensor: 2, aten.slice_scatter.default: 3}  # position of start (end follows)
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target in bounds and isinstance(n.args[0], fx.Node):
            i = bounds[n.target]
            args = list(n.args)
            src = n.args[0].meta.get("val")
            dim = args[i - 1] if len(args) > i - 1 else 0
            if isinstance(src, torch.Tensor) and src.dim():
                size = src.shape[dim]
                for j in (i, i + 1):
                    if j < len(args) and isinstance(args[j], int) and args[j] > size:
                        args[j] = size
                n.args = tuple(args)
        val = n.meta.get("val")
        if n.target in swap and isinstance(val, torch.Tensor) and val.is_complex():
            n.target = swap[n.target]
    gm.recompile()



def traceable(fname: str, f, x: torch.Tensor, batched: bool) -> bool:
    """Trace ``f`` (cached) and check its output and, with ``batched``, that rows do not interact.

    Returns ``False`` when ``f`` cannot be traced; its output is then checked by running it once."""
    try:
        output_shape(f, x, batched, fname)
        return True
    except TraceError as err:
        probe_output(fname, f, x, batched)
        warn_fallback("untraceable", f"{fname}: f could not be traced to a static graph ({err}); running "
                      f"torch.func on f itself (correct, slower). Avoid data-dependent Python control flow in f "
                      f"to get the fast path.", f)
        return False


def _batched_vjp_jacobian(g, x, chunk_size):
    """Per-sample Jacobians ``[B, *out, *in]`` of a batched ``g`` whose rows do not interact: one vjp per
    output component with that component's cotangent in every row."""
    y, vjp_fn = torch.func.vjp(g, x)
    out = tuple(y.shape[1:])
    m = math.prod(out)
    cot = torch.eye(m, dtype=y.dtype, device=y.device).reshape((m, 1, *out)).expand(m, *y.shape)
    J = torch.func.vmap(lambda c: vjp_fn(c)[0], chunk_size=chunk_size)(cot)  # [m, B, *in]
    return J.movedim(0, 1).reshape((*y.shape, *x.shape[1:]))


def jacobian_reverse(fname, f, x, batched, chunk_size):
    """Per-sample Jacobians ``[B, *out, *in]`` by vector-Jacobian products vectorized over outputs."""
    if not traceable(fname, f, x, batched):  # checks f's output and that rows do not interact
        with written_out():  # fused attention, cdist: torch.func cannot run them
            if not batched:
                return torch.func.jacrev(f, chunk_size=chunk_size)(x)
            return map_samples(torch.func.jacrev(per_sample(f, batched), chunk_size=chunk_size), x)
    g = reverse_function(f, x, batched, fname)
    if not batched:
        return torch.func.jacrev(g, chunk_size=chunk_size)(x)
    return _batched_vjp_jacobian(g, x, chunk_size)


def hessian_reverse(fname, f, x, batched, chunk_size):
    """Per-sample Hessians ``[B, *out, *in, *in]`` by reverse over reverse: needs no forward-mode formula
    (``silu_backward`` has none under ``no_grad``) and was measured faster than forward over reverse
    (docs/design.md, method="auto")."""
    jrr = lambda h: torch.func.jacrev(torch.func.jacrev(h, chunk_size=chunk_size), chunk_size=chunk_size)  # noqa: E731
    if not traceable(fname, f, x, batched):  # checks f's output and that rows do not interact
        H = jrr(per_sample(f, batched))
        with written_out():  # fused attention (no double backward), cdist, layer_norm: written out
            return map_samples(H, x) if batched else H(x)
    g = reverse_function(f, x, batched, fname)
    x = x.contiguous()  # an expanded x (one memory location for several entries): one entry per row to differentiate
    if not batched:
        return jrr(g)(x)
    # rows do not interact: the cotangent e_o in every row gives each row's gradient of output o, and a
    # second vjp with e_i in every row differentiates it along each row's own x[b]
    ins = tuple(x.shape[1:])
    n = math.prod(ins)
    out = output_shape(f, x, batched, fname)[1:]
    m = math.prod(out)
    C = torch.eye(m, dtype=x.dtype, device=x.device).reshape((m, 1, *out)).expand(m, x.shape[0], *out)
    T = torch.eye(n, dtype=x.dtype, device=x.device).reshape((n, 1, *ins)).expand(n, *x.shape)

    def rows(c):
        _, vjp2 = torch.func.vjp(lambda z: torch.func.vjp(g, z)[1](c)[0], x)
        return torch.func.vmap(lambda t: vjp2(t)[0], chunk_size=chunk_size)(T)  # [n, B, *in]

    H = torch.func.vmap(rows, chunk_size=chunk_size)(C)  # [m, n, B, *in]
    return H.movedim(2, 0).reshape((x.shape[0], *out, *ins, *ins))

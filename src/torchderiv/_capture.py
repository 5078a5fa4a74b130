"""Capture: trace ``f`` once to an ATen-level fx graph whose tensor constants become graph inputs.

``make_fx`` in fake mode records every ATen op ``f`` runs, without computing anything, and refuses
data-dependent Python control flow (``if x.sum() > 0``), which we report as :class:`TraceError` so
callers can fall back. Parameters, buffers and any tensor ``f`` closes over appear as ``get_attr``
constants holding the very same tensor objects; we turn them into placeholders so that the generated
derivative graph reads the live tensors at every call (an optimizer step updates them in place) and
autograd flows to them.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx
from torch._subclasses.fake_tensor import is_fake
from torch.fx.experimental.proxy_tensor import make_fx
from torch.overrides import TorchFunctionMode

from ._batchcheck import BatchMixingError, check_batch_independence  # re-exported: imported from here
from ._errors import quiet_torch_logs
from ._rules import RULES

aten = torch.ops.aten


class TraceError(RuntimeError):
    """``f`` could not be traced to a static graph (data-dependent control flow, unsupported Python)."""


@dataclass
class Captured:
    gm: fx.GraphModule
    constants: list[torch.Tensor]  # the tensors fed to placeholders 1.. at call time
    out_val: object = None  # fake value of the output (shape and dtype of f(x))
    # tensors whose values the trace read as Python numbers (``t.item()``, ``float(t)``): the numbers are
    # baked into the graph, which is valid only while these tensors keep their values
    reads: list[torch.Tensor] = field(default_factory=list)


def _cdist(x1, x2, p, compute_mode=None):
    """``_cdist_forward`` from elementwise ops: torch's kernel has no forward-mode derivative, and its backward
    is wrong under ``vmap`` (so ``jacrev`` through it is too). A zero distance gets derivative 0, as in torch."""
    diff = x1.unsqueeze(-2) - x2.unsqueeze(-3)  # [*, P, R, M]: batch dims broadcast as in cdist
    if p == 0:
        return (diff != 0).to(diff.dtype).sum(-1)
    if p == float("inf"):
        return diff.abs().amax(-1)
    if p == 1:
        return diff.abs().sum(-1)
    s = (diff * diff).sum(-1) if p == 2 else diff.abs().pow(p).sum(-1)
    pos = s > 0
    s = torch.where(pos, s, torch.ones_like(s))
    return torch.where(pos, s.sqrt() if p == 2 else s.pow(1.0 / p), torch.zeros_like(s))


def _extra_decompositions() -> dict:
    """Decompositions for ops without a rule that the core-ATen table leaves alone: our own for cdist, and
    torch's own (outside the core table) for grid_sampler_2d, which has no forward-mode derivative."""
    from torch._decomp import decomposition_table

    table = {aten._cdist_forward.default: _cdist}
    if aten.grid_sampler_2d.default in decomposition_table:
        table[aten.grid_sampler_2d.default] = decomposition_table[aten.grid_sampler_2d.default]
    return table


_TABLE: list = [None, None]  # (registration count it was made at, the table)


def _decomposition_table() -> dict:
    """The core-ATen table plus ours, made once: torch builds the core table afresh on every call by walking every
    op's registrations (about 80 ms, most of a capture's time). Made again when the number of
    CompositeImplicitAutograd registrations changes (a library registered an op since)."""
    from torch._decomp import core_aten_decompositions

    stamp = len(torch._C._dispatch_get_registrations_for_dispatch_key("CompositeImplicitAutograd"))
    if _TABLE[0] != stamp:
        _TABLE[:] = [stamp, {**core_aten_decompositions(), **_extra_decompositions()}]
    return _TABLE[1]


def _decompositions_for(gm: fx.GraphModule) -> dict:
    """Core-ATen decompositions (into ops that stay ATen, never prims) of the ops that have no rule."""
    decomposition_table = _decomposition_table()
    table = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload):
            if n.target not in RULES and n.target in decomposition_table:
                table[n.target] = decomposition_table[n.target]
    return table


def _mutating_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
            and n.target._schema.is_mutable]


_VIEW_OPS = {"slice", "select", "narrow", "view", "_unsafe_view", "as_strided", "split", "split_with_sizes",
             "chunk", "unbind", "diagonal", "expand", "transpose", "t", "permute", "unsqueeze", "squeeze",
             "alias", "unfold", "movedim", "view_as_real", "view_as_complex", "detach"}


def _writes_into_view(n: fx.Node) -> bool:
    """Whether the in-place op ``n`` mutates a tensor that aliases another value of the graph."""
    dst = n.args[0] if n.args else None
    while isinstance(dst, fx.Node) and dst.op == "call_function" and dst.target is operator.getitem:
        dst = dst.args[0]
    if not isinstance(dst, fx.Node) or dst.op != "call_function":
        return False
    return getattr(dst.target, "__name__", "").split(".")[0] in _VIEW_OPS


_SCALAR_READS = frozenset({"item", "__float__", "__int__", "__index__", "__bool__", "__complex__", "tolist"})


class _ScalarReads(TorchFunctionMode):
    """Records the tensors of ``f``'s own state (parameters, buffers, closed-over tensors) whose values
    ``f`` reads as Python numbers while it is traced (``self.scale.item()``, ``float(k)``). The trace
    bakes such a number into the graph; the cache entry must then also check the tensor's value."""

    def __init__(self):
        super().__init__()
        self.tensors: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if (getattr(func, "__name__", None) in _SCALAR_READS and args and isinstance(args[0], torch.Tensor)
                and not is_fake(args[0]) and all(args[0] is not t for t in self.tensors)):
            # values computed during the trace are fake; their sources are found in the graph (_reads)
            self.tensors.append(args[0])
        return func(*args, **(kwargs or {}))


def _reads(gm: fx.GraphModule, direct: list[torch.Tensor]) -> list[torch.Tensor]:
    """``direct`` plus the constant tensors that a value read as a Python number was computed from
    (``float(k * 2)`` leaves an ``_local_scalar_dense`` node whose inputs lead back to ``k``)."""
    out = list(direct)
    stack = [n for n in gm.graph.nodes if n.target is aten._local_scalar_dense.default]
    seen: set = set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "get_attr":
            t = getattr(gm, n.target, None)
            if isinstance(t, torch.Tensor) and all(t is not u for u in out):
                out.append(t)
        stack.extend(n.all_input_nodes)
    return out


def _trace(f, fake_x: torch.Tensor) -> tuple[fx.GraphModule, list[torch.Tensor]]:
    """``make_fx`` of ``f``, functionalized: in-place ops (also on views: ``y[:, :2].tanh_()``,
    ``y[..., 1:] = v``) become out-of-place ops and ``*_scatter``, so every value in the graph is
    computed once and rules never see a mutation. Also returns the tensors whose values the trace read
    as Python numbers (:class:`_ScalarReads`)."""
    rec = _ScalarReads()

    backward_ran = []

    def unpack(t):
        backward_ran.append(True)
        return t

    def call(x):  # one positional argument whatever f's signature (defaults, bound methods)
        # a backward pass inside f (torch.autograd.grad of an energy, a Hamiltonian vector field) unpacks saved
        # tensors; the trace records them detached, so the graph would silently drop their derivatives
        with rec, torch.autograd.graph.saved_tensors_hooks(lambda t: t, unpack):
            y = f(x)
        if backward_ran:
            raise _BackwardInside
        return y

    try:
        gm = make_fx(torch.func.functionalize(call, remove="mutations"), tracing_mode="fake",
                     _allow_non_fake_inputs=True)(fake_x)
    except _BackwardInside:
        raise
    except Exception:  # noqa: BLE001 - retry without functionalization; the engine handles plain in-place ops
        rec.tensors.clear()
        backward_ran.clear()
        gm = make_fx(call, tracing_mode="fake", _allow_non_fake_inputs=True)(fake_x)
    return gm, _reads(gm, rec.tensors)


class _BackwardInside(TraceError):
    def __init__(self):
        super().__init__("f runs a backward pass inside (torch.autograd.grad / backward); its trace would drop "
                         "the derivatives of the tensors autograd saved")


def _uncompiled(f):
    """The eager module or function behind ``torch.compile(f)``: make_fx cannot trace a dynamo-optimized one."""
    orig = getattr(f, "_orig_mod", None)  # torch._dynamo.OptimizedModule
    if isinstance(f, torch.nn.Module) and isinstance(orig, torch.nn.Module):
        return orig
    orig = getattr(f, "_torchdynamo_orig_callable", None)  # torch.compile(function)
    return f if orig is None or isinstance(f, torch.nn.Module) else orig


def capture(f, x: torch.Tensor) -> Captured:
    """Trace ``f`` at an input like ``x``; ops without a rule are decomposed where torch knows how."""
    f = _uncompiled(f)
    with torch.inference_mode(False), quiet_torch_logs():  # f's errors are raised, not logged by torch
        fake_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        return _capture(f, fake_x)


def _capture(f, fake_x: torch.Tensor) -> Captured:
    try:
        gm, reads = _trace(f, fake_x)
        for _ in range(4):  # decompose ops that have no rule, until nothing changes
            table = _decompositions_for(gm)
            if not table:
                break
            with torch.no_grad():  # already ATen-level: grad mode no longer changes what is recorded
                gm = make_fx(gm, decomposition_table=table, tracing_mode="fake",
                             _allow_non_fake_inputs=True)(fake_x)
        if _mutating_nodes(gm):
            # decompositions may write in place into views (circular padding: slices of new_empty, recurrent
            # cells: chunks of one gate tensor); functionalize once more so rules never see a mutation
            with torch.no_grad():
                gm = make_fx(torch.func.functionalize(gm, remove="mutations"), tracing_mode="fake",
                             _allow_non_fake_inputs=True)(fake_x)
    except TraceError:
        raise
    except Exception as e:  # noqa: BLE001 - any tracing failure means "not a static graph"
        raise TraceError(f"{type(e).__name__}: {e}") from e
    if any(_writes_into_view(n) for n in _mutating_nodes(gm)):
        # never silently wrong: a jet cannot follow a write through an alias; torch.func can
        raise TraceError("f writes in place into a view of an intermediate tensor, which the Taylor "
                         "transform cannot follow")
    _out_variants_as_copies(gm)
    gm.graph.eliminate_dead_code()
    # lift get_attr tensors to placeholders
    constants: list[torch.Tensor] = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    last = placeholders[-1]
    for n in list(gm.graph.nodes):
        if n.op == "get_attr":
            t = getattr(gm, n.target)
            if not isinstance(t, torch.Tensor):
                continue
            with gm.graph.inserting_after(last):
                ph = gm.graph.placeholder(f"const_{len(constants)}")
            last = ph
            ph.meta.update(n.meta)
            n.replace_all_uses_with(ph)
            gm.graph.erase_node(n)
            constants.append(t)
    gm.graph.lint()
    gm.recompile()
    return Captured(gm=gm, constants=constants, reads=reads)


def _functional_overload(op: torch._ops.OpOverload):
    """The overload of ``op``'s packet taking the same arguments without ``out=`` (``div.out`` -> ``div.Tensor``)."""
    names = [a.name for a in op._schema.arguments if not a.is_out]
    packet = getattr(aten, op._schema.name.split("::")[-1])
    for o in packet.overloads():
        cand = getattr(packet, o)
        args = cand._schema.arguments
        if not any(a.is_out for a in args) and not cand._schema.is_mutable and [a.name for a in args] == names:
            return cand
    return None


def _out_variants_as_copies(gm: fx.GraphModule) -> None:
    """Rewrite ``op(*args, out=t)`` as ``t.copy_(op(*detached args))``.

    ``out=`` variants are what a module's own bookkeeping records when it updates a buffer under
    ``torch.no_grad()`` (spectral_norm's power iteration in training mode); tracing forgets the ``no_grad``, and
    running the recorded op with arguments that require grad raises. Autograd refuses ``out=`` ops on tensors
    that require grad, so detaching the arguments changes nothing where ``f`` itself runs. A value written this
    way that depends on ``x`` would be read back as a constant (a wrong derivative): refused."""
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    from_x = {x}
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if any(a in from_x for a in n.all_input_nodes):
            from_x.add(n)
        op = n.target
        if not isinstance(op, torch._ops.OpOverload) or not any(a.is_out for a in op._schema.arguments):
            continue
        outs = [a.name for a in op._schema.arguments if a.is_out]
        functional = _functional_overload(op)
        if n in from_x or len(outs) != 1 or functional is None or not isinstance(n.kwargs.get(outs[0]), fx.Node):
            raise TraceError(f"f calls `{op}` with out=, writing a value that depends on x (or of a form "
                             "torchderiv cannot rewrite) into an existing tensor; compute it out of place")
        with gm.graph.inserting_before(n):
            def detached(a):
                return gm.graph.call_function(aten.detach.default, (a,)) if isinstance(a, fx.Node) else a

            args = tuple(detached(a) for a in n.args)
            kwargs = {k: detached(v) for k, v in n.kwargs.items() if k != outs[0]}
            val = gm.graph.call_function(functional, args, kwargs)
            new = gm.graph.call_function(aten.copy_.default, (n.kwargs[outs[0]], val))
        new.meta.update(n.meta)
        n.replace_all_uses_with(new)
        gm.graph.erase_node(n)
    gm.graph.lint()
    gm.recompile()


__all__ = ["capture", "check_batch_independence", "Captured", "TraceError", "BatchMixingError", "aten",
           "operator"]

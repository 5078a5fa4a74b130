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


def _decompositions_for(gm: fx.GraphModule) -> dict:
    """Core-ATen decompositions (into ops that stay ATen, never prims) of the ops that have no rule."""
    from torch._decomp import core_aten_decompositions

    decomposition_table = {**core_aten_decompositions(), **_extra_decompositions()}
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


# ----------------------------------------------------------------------------- batch independence

_ELEMENTWISE_SAFE = {"add", "sub", "mul", "div", "where", "pow", "maximum", "minimum", "rsub", "clamp",
                     "clamp_min", "clamp_max", "complex",
                     "eq", "ne", "gt", "ge", "lt", "le", "logical_and", "logical_or", "logical_not",
                     "masked_fill", "fill", "copy", "lerp", "addcmul", "addcdiv", "atan2", "fmod", "hypot", "copysign",
                     "xlogy", "logaddexp", "fmax", "fmin",
                     "remainder", "sign", "bitwise_and", "bitwise_or", "bitwise_not", "bitwise_xor",
                     "bitwise_left_shift", "bitwise_right_shift", "__lshift__", "__rshift__", "floor_divide",
                     "logical_xor", "heaviside"}


# ops that may carry a batch dim folded with other dims: they act on the other dims, or independently per
# index of the batch's dim (the branches below still refuse any op along that dim)
_FOLD_AWARE = {
    "view", "_unsafe_view", "reshape", "t", "transpose", "permute", "unsqueeze", "squeeze", "expand", "clone",
    "alias", "contiguous", "_to_copy", "detach", "lift_fresh_copy", "mm", "addmm", "bmm", "baddbmm",
    "sum", "mean", "amax", "amin", "var", "std", "logsumexp", "_softmax", "_log_softmax", "any", "all",
    "slice", "select", "narrow", "index_select", "split", "split_with_sizes", "unbind", "chunk", "cat", "stack",
    "native_layer_norm", "diagonal", "embedding", "constant_pad_nd", "native_batch_norm", "_native_batch_norm_legit",
    "_native_batch_norm_legit_no_training", "_native_batch_norm_legit_functional",
}

_BATCH_NORMS = ("native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
                "_native_batch_norm_legit_functional", "batch_norm")

# ops acting along one dim given by their ``dim`` argument, independently for every index of the other dims;
# their outputs keep the input's rank, or drop that dim (keepdim=False)
_ALONG_DIM = {"sort", "argsort", "topk", "kthvalue", "median", "nanmedian", "mode", "cumprod", "cummax", "cummin",
              "logcumsumexp"}

# linear algebra on the last two dims of one input; every output keeps the input's leading (batch) dims
_MATRIX_UNARY = {"_linalg_det", "linalg_det", "det", "_linalg_slogdet", "linalg_slogdet", "slogdet", "logdet",
                 "linalg_inv_ex", "linalg_inv", "inverse", "linalg_matrix_exp", "matrix_exp", "linalg_cholesky_ex",
                 "linalg_cholesky", "cholesky", "cholesky_inverse", "_linalg_eigh", "linalg_eigh", "_linalg_svd",
                 "linalg_qr", "linalg_lu_factor_ex", "linalg_lu", "linalg_eig"}

# ops on the matrices (trailing dims) of two inputs whose leading dims broadcast as batch dims
_MATRIX_BINARY = {"_linalg_solve_ex", "linalg_solve_triangular", "cholesky_solve", "_cdist_forward",
                  "_euclidean_dist"}

# per-(sample, channel) ops on the trailing spatial dims of [N, C, *spatial]; value: number of spatial dims
_SPATIAL = {"upsample_nearest1d": 1, "upsample_linear1d": 1, "_upsample_nearest_exact1d": 1,
            "upsample_nearest2d": 2, "upsample_bilinear2d": 2, "upsample_bicubic2d": 2,
            "_upsample_nearest_exact2d": 2, "_upsample_bilinear2d_aa": 2, "_upsample_bicubic2d_aa": 2,
            "upsample_nearest3d": 3, "upsample_trilinear3d": 3, "_upsample_nearest_exact3d": 3}

# same-shape ops that move values between rows without a dim argument saying where
_MIXING_UNARY = {"masked_scatter", "channel_shuffle", "native_channel_shuffle", "put", "index_reduce"}

# argument names of ops that act along a dim: an op taking one is never a plain unary map
_DIM_ARGS = {"dim", "dims", "dimension", "dim0", "dim1", "dim2", "axis"}


class BatchMixingError(ValueError):
    """``batched=True`` was asked for, but the traced graph lets rows of ``x`` interact."""


def _val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def check_batch_independence(cap: Captured, fname: str) -> None:
    """Follow the batch dimension of input 0 through the graph; raise on any op that mixes rows.

    Each value is tagged with the position of its batch dim (or ``None`` when it does not depend on the
    input). Ops whose effect on the batch dim is not known are treated as mixing, so an unknown op can
    never let a row-mixing graph through silently.
    """
    gm = cap.gm
    nodes = list(gm.graph.nodes)
    x = next(n for n in nodes if n.op == "placeholder")
    xv = _val(x)
    B = xv.shape[0]
    bd: dict = {x: 0}
    # the batch index b sits inside its dim as (o * B + b) * inner + i: views may fold it together with other
    # dims (attention heads as the fast factor, tokens as the slow one); absent means inner = 1
    inner: dict = {}
    folded_nodes: set = set()  # values whose batch dim holds more than the batch (inner or outer factors)
    bd_outs: dict = {}  # multi-output ops whose outputs carry the batch in different dims: one entry per output

    def fail(node, why):
        raise BatchMixingError(
            f"{fname}: batched=True requires that rows of x do not interact, but the traced graph "
            f"mixes them at `{node.target}` ({why}). If f really couples the samples (BatchNorm in "
            f"training mode, x.mean(0), attention across the batch ...), call {fname}(..., batched=False) "
            f"on one sample at a time, or put the module in eval mode. The check is conservative: an op "
            f"whose effect on the batch dimension it cannot follow counts as mixing, so if rows of f are "
            f"independent this is a limitation (batched=False per sample still works; please report the op)."
        )

    for n in nodes:
        if n.op != "call_function":
            continue
        ins = [a for a in n.all_input_nodes if bd.get(a) is not None]
        if not ins:
            continue
        if n.target is operator.getitem:
            src = n.args[0]
            v = _val(n)
            if src in bd_outs:
                bd[n] = bd_outs[src][n.args[1]]
                if src in folded_nodes and bd[n] is not None:
                    if inner.get(src, 1) != 1:
                        inner[n] = inner[src]
                    folded_nodes.add(n)
                continue
            bd[n] = bd.get(src) if isinstance(v, torch.Tensor) and v.dim() > 0 else None
            if src in folded_nodes and bd[n] is not None:
                if inner.get(src, 1) != 1:
                    inner[n] = inner[src]
                folded_nodes.add(n)
            elif isinstance(bd[n], int) and (bd[n] >= v.dim() or v.shape[bd[n]] != B):
                bd[n] = _find_batch(v, B)
            continue
        out = _val(n)
        name = n.target.__name__.split(".")[0] if hasattr(n.target, "__name__") else str(n.target)
        outs = out if isinstance(out, (tuple, list)) else [out]
        o0 = next((o for o in outs if isinstance(o, torch.Tensor)), None)
        if o0 is None:
            continue
        positions = []
        for a in ins:
            av = _val(a)
            positions.append((bd[a], av.dim()))
        folded = [a for a in ins if a in folded_nodes]
        if folded:
            if not (name in _FOLD_AWARE or name in _ELEMENTWISE_SAFE or name in RULES_ELEMENTWISE):
                fail(n, "the batch dimension is folded together with another dimension here")
            layouts = {(inner.get(a, 1), _val(a).shape[bd[a]]) for a in ins}
            if len(layouts) != 1:
                fail(n, "inputs fold the batch dimension differently")
            (i_in, _), = layouts
        else:
            i_in = 1

        def first_only():
            # the batch is in the first argument and in no other (the weights, statistics, a second operand)
            return bd.get(n.args[0]) is not None and not any(
                bd.get(a) is not None for a in _nodes_in((n.args[1:], n.kwargs)))

        def same_rank_pos(default_fail=True):
            # batch dim keeps its place counted from the right (broadcasting semantics)
            ps = {o0.dim() - (nd - p) for p, nd in positions}
            if len(ps) != 1:
                fail(n, "inputs carry the batch in different dimensions")
            p = ps.pop()
            size = _val(ins[0]).shape[bd[ins[0]]]
            if o0.dim() == 0 or p < 0 or o0.shape[p] != size:
                fail(n, "the batch dimension disappears")
            return p

        args = n.args
        if name in _VALUE_INDEPENDENT:
            bd[n] = None  # shape and dtype taken from the input, values not: a constant
            continue
        if name == "copy":  # copy(dst, src): the values of src, broadcast to dst's shape
            p = bd.get(args[1])
            if p is None:
                bd[n] = None
                continue
            q = o0.dim() - (_val(args[1]).dim() - p)
            if q < 0 or o0.shape[q] != B:
                fail(n, "copying broadcasts the batch dimension away")
            bd[n] = q
            continue
        if name in ("slice_scatter", "select_scatter"):
            d = _arg(n, "dim", 0) % o0.dim()
            p_in, p_src = bd.get(args[0]), bd.get(args[1])
            if p_src is not None and name == "select_scatter":
                p_src = p_src if p_src < d else p_src + 1
            ps = {p for p in (p_in, p_src) if p is not None}
            if len(ps) != 1 or d in ps:
                fail(n, "writing into a slice along the batch dimension")
            bd[n] = ps.pop()
            if o0.shape[bd[n]] != B:
                fail(n, "the batch dimension disappears")
            continue
        if name == "index_put":
            bd[n] = _index_put_batch(n, bd, B, fail)
            continue
        if name in ("mm", "addmm", "bmm", "baddbmm"):
            off = 1 if name in ("addmm", "baddbmm") else 0
            lhs, rhs = args[off], args[off + 1]
            pa, pb = bd.get(lhs), bd.get(rhs)
            nd = _val(lhs).dim()  # 2 for mm, 3 for bmm
            if nd == 3 and pa in (None, 0) and pb in (None, 0):
                bd[n] = 0  # batch of matrices along dim 0
            elif pb is None and pa == nd - 2:
                bd[n] = nd - 2  # batch along the rows of the left factor
            elif pa is None and pb == nd - 1:
                bd[n] = nd - 1  # batch along the columns of the right factor
            else:
                fail(n, "a matrix product contracts over the batch")
            if off and bd.get(args[0]) is not None:
                bias = _val(args[0])
                if o0.dim() - (bias.dim() - bd[args[0]]) != bd[n]:
                    fail(n, "the added term carries the batch in another dimension")
        elif name in ("convolution", "native_group_norm", "avg_pool2d", "max_pool2d_with_indices", "avg_pool1d",
                      "adaptive_avg_pool2d", "_adaptive_avg_pool2d", "avg_pool3d", "_adaptive_avg_pool3d"):
            if not first_only():
                fail(n, "the weights depend on the input")
            if bd[args[0]] != 0:
                fail(n, "the batch dimension is not the leading one")
            bd[n] = 0
        elif name in _SPATIAL:  # [N, C, *spatial]: each (sample, channel) slice on its own
            p = bd[args[0]]
            if not first_only() or p >= _val(args[0]).dim() - _SPATIAL[name]:
                fail(n, "the batch dimension is a spatial one")
            bd[n] = p
        elif name in _BATCH_NORMS:
            # [N, C, *]: training mode normalizes each channel over N and the rest, eval mode is elementwise
            p = bd[args[0]]
            if not first_only():
                fail(n, "normalization parameters depend on the input")
            training = name != "_native_batch_norm_legit_no_training" and _arg(n, "training", True)
            if training and p != 1:
                fail(n, "batch normalization in training mode uses batch statistics")
            bd[n] = p
            if len(outs) > 1:  # then saved (training) and updated running statistics, one entry per channel
                bd_outs[n] = [p] + [0 if training else None] * (len(outs) - 1)
        elif name in _ALONG_DIM:
            p = bd[args[0]]
            iv = _val(args[0])
            d = _arg(n, "dim", -1) % iv.dim() if _has_arg(n, "dim") else p  # no dim (median): over all dims
            if not first_only() or d == p:
                fail(n, f"{name} along the batch dimension")
            bd[n] = p if o0.dim() == iv.dim() else p - (d < p)
        elif name in ("grid_sampler_2d", "grid_sampler_3d"):
            # out[n, :, *loc] samples input[n] at grid[n, *loc]: the batch may sit in N (input and grid) or,
            # with a constant input (a feature plane of a neural field), in a location dim of the grid
            pi, pg = bd.get(args[0]), bd.get(args[1])
            last = _val(args[1]).dim() - 1
            if (pi is not None and pi != 0) or pg == last or (pi is not None and pg not in (None, 0)):
                fail(n, "sampling mixes the batch with channels, positions or coordinates")
            bd[n] = 0 if pg in (None, 0) else pg + 1
            if o0.shape[bd[n]] != B:
                fail(n, "the batch dimension disappears")
        elif name in ("view_as_real", "view_as_complex"):  # adds / removes a trailing dim of 2
            p = bd[args[0]]
            if p >= o0.dim():
                fail(n, "the batch dimension holds real and imaginary parts")
            bd[n] = p
        elif name in ("_fft_r2c", "_fft_c2r", "_fft_c2c"):  # transforms along the dims listed in args[1]
            p = bd[args[0]]
            nd = _val(args[0]).dim()
            if p in {d % nd for d in args[1]}:
                fail(n, "a Fourier transform along the batch dimension")
            bd[n] = p
        elif name == "unfold":  # unfold(x, dim, size, step): windows along dim, as a new last dim
            p = bd[args[0]]
            if args[1] % max(_val(args[0]).dim(), 1) == p:
                fail(n, "sliding windows along the batch dimension")
            bd[n] = p
        elif name in ("scatter", "scatter_add", "scatter_reduce"):
            # out[..., index[i], ...] = src[i] along dim, with every other index of i kept: self, index and src
            # have the rank of out, and a row of out only receives the same row of index and src
            d = args[1] % o0.dim()
            ps = {bd[a] for a in ins}
            if len(ps) != 1 or d in ps or any(_val(a).dim() != o0.dim() for a in ins):
                fail(n, "scattering along the batch dimension")
            bd[n] = ps.pop()
            if o0.shape[bd[n]] != B:
                fail(n, "the batch dimension disappears")
        elif name == "_trilinear":  # nn.Bilinear: inputs unsqueezed at expand_k, multiplied, summed over sumdim
            total = _val(args[0]).dim() + len(args[3])
            qs = set()
            for t, expand in zip(args[:3], args[3:6]):
                if bd.get(t) is not None:
                    new = {e % total for e in expand}
                    qs.add([i for i in range(total) if i not in new][bd[t]])
            sums = [d % total for d in args[6]]
            if len(qs) != 1 or qs & set(sums):
                fail(n, "a multilinear form sums over the batch dimension")
            q = qs.pop()
            bd[n] = q - sum(1 for d in sums if d < q)
            if o0.shape[bd[n]] != B:
                fail(n, "the batch dimension disappears")
        elif name in _MATRIX_UNARY:
            p = bd[args[0]]
            if not first_only() or p >= _val(args[0]).dim() - 2:
                fail(n, "the batch dimension is a matrix dimension here")
            for o in outs:
                if isinstance(o, torch.Tensor) and o.numel() and (o.dim() <= p or o.shape[p] != B):
                    fail(n, "the batch dimension disappears")
            bd[n] = p
        elif name in _MATRIX_BINARY:
            bd_outs[n] = _matrix_binary_batch(n, bd, outs, B, fail)
            bd[n] = next((q for q in bd_outs[n] if q is not None), None)
            if not isinstance(out, (tuple, list)):
                bd[n] = bd_outs.pop(n)[0]
        elif name in ("t", "transpose", "permute"):
            p = bd[ins[0]]
            nd = _val(ins[0]).dim()
            if name == "t":
                perm = [1, 0] if nd == 2 else list(range(nd))
            elif name == "transpose":
                perm = list(range(nd))
                d0, d1 = args[1] % nd, args[2] % nd
                perm[d0], perm[d1] = perm[d1], perm[d0]
            else:
                perm = [d % nd for d in args[1]]
            bd[n] = perm.index(p)
        elif name in ("view", "_unsafe_view", "reshape", "expand", "unsqueeze", "squeeze", "clone",
                      "alias", "contiguous", "_to_copy", "detach", "lift_fresh_copy", "flatten",
                      "constant_pad_nd", "roll", "repeat"):
            p = bd[ins[0]]
            iv = _val(ins[0])
            if name in ("view", "_unsafe_view", "reshape"):
                where = _view_batch(iv.shape, o0.shape, p, inner.get(ins[0], 1), B)
                if where is None:
                    fail(n, "a view splits the batch dimension")
                bd[n], i_out = where
                if i_out != 1:
                    inner[n] = i_out
                if i_out != 1 or o0.shape[bd[n]] != B:
                    folded_nodes.add(n)
                continue
            elif name == "unsqueeze":
                d = args[1] % o0.dim()
                bd[n] = p + 1 if d <= p else p
            elif name == "squeeze":
                bd[n] = _find_batch_keep(iv, o0, p, B)
            elif name in ("constant_pad_nd",):
                pads = args[1]
                padded = [iv.dim() - 1 - i // 2 for i in range(len(pads)) if pads[i] != 0]
                if p in padded:
                    fail(n, "padding along the batch dimension")
                bd[n] = p
            elif name == "repeat":  # tiles; the batch survives when its dim is repeated once
                reps = list(args[1])
                q = p + len(reps) - iv.dim()
                if reps[q] != 1:
                    fail(n, "repeat tiles along the batch dimension")
                bd[n] = q
            elif name == "roll":
                dims = _arg(n, "dims", [])
                dims = [dims] if isinstance(dims, int) else list(dims)
                if not dims or p in [d % iv.dim() for d in dims]:
                    fail(n, "roll moves data between rows")
                bd[n] = p
            else:
                bd[n] = o0.dim() - (iv.dim() - p)
        elif name == "embedding" or (name == "index_select" and bd.get(args[2]) is not None):
            # a constant table read at indices computed from x (a hash / dense grid encoding): the output has
            # the index's shape (embedding: plus a trailing feature dim; index_select: in place of dim)
            table, idx = (args[0], args[1]) if name == "embedding" else (args[0], args[2])
            if bd.get(table) is not None:
                fail(n, "a table that depends on x read at indices that depend on x")
            bd[n] = bd[idx] if name == "embedding" else args[1] % o0.dim()
            if o0.shape[bd[n]] != _val(idx).shape[bd[idx]]:  # the index's batch dim (maybe folded) kept whole
                fail(n, "the batch dimension disappears")
        elif name in ("slice", "select", "narrow", "index_select", "split", "split_with_sizes", "unbind",
                      "chunk"):
            p = bd[ins[0]]
            d = args[1] % _val(ins[0]).dim() if len(args) > 1 and isinstance(args[1], int) else 0
            if name in ("split", "split_with_sizes", "chunk"):
                d = _arg(n, "dim", 0) % _val(ins[0]).dim()
            if name == "index_select":
                d = args[1] % _val(ins[0]).dim()
            if name == "unbind":
                d = (args[1] if len(args) > 1 else 0) % _val(ins[0]).dim()
            if d == p:
                fail(n, "slicing or indexing along the batch dimension")
            if name in ("select", "unbind"):
                bd[n] = p - 1 if d < p else p
            else:
                bd[n] = p
        elif name in ("cat", "stack"):
            tensors = args[0]
            d = _arg(n, "dim", 0) % o0.dim()
            ps = set()
            for t in tensors:
                if bd.get(t) is not None:
                    tv = _val(t)
                    ps.add(bd[t] if name == "cat" else (bd[t] if bd[t] < d else bd[t] + 1))
                    if name == "cat" and tv.dim() != o0.dim():
                        fail(n, "concatenating tensors of different rank")
            if len(ps) != 1 or d in ps:
                fail(n, f"{name} along the batch dimension")
            bd[n] = ps.pop()
        elif name in ("sum", "mean", "amax", "amin", "var", "std", "prod", "logsumexp", "var_mean",
                      "argmax", "argmin", "max", "min", "norm", "linalg_vector_norm", "_softmax",
                      "_log_softmax", "cumsum", "any", "all", "flip"):
            p = bd[ins[0]]
            iv = _val(ins[0])
            if name == "linalg_vector_norm":
                dims = args[2] if len(args) > 2 else n.kwargs.get("dim", None)
            else:
                dims = args[1] if len(args) > 1 else n.kwargs.get("dim", None)
            if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
                dims = list(range(iv.dim()))
            if isinstance(dims, int):
                dims = [dims]
            dims = [d % iv.dim() for d in dims]
            if p in dims:
                fail(n, "a reduction over the batch dimension")
            keep = o0.dim() == iv.dim()
            bd[n] = p if keep else p - sum(1 for d in dims if d < p)
        elif name == "index" and bd.get(args[0]) is None:
            # a constant table read at indices computed from x (the decomposed grid_sample): row b of the
            # output reads only row b of the indices, which carry the batch at one place from the right
            idx = [t for t in args[1] if t is not None]
            rs = {_val(t).dim() - bd[t] for t in idx if bd.get(t) is not None}
            pos = [i for i, t in enumerate(args[1]) if t is not None]
            nb = max(_val(t).dim() for t in idx)
            if len(rs) != 1:
                fail(n, "index tensors carry the batch in different dimensions")
            first = pos[0] if pos == list(range(pos[0], pos[-1] + 1)) else 0
            bd[n] = first + nb - rs.pop()
            if o0.shape[bd[n]] != B:
                fail(n, "the batch dimension disappears")
        elif name in ("index", "gather"):
            p = bd[ins[0]]
            if name == "index":
                idx = args[1]
                if p >= len(idx) or idx[p] is not None or any(bd.get(i) is not None for i in idx if i is not None):
                    pass_ok = False
                else:
                    pos = [i for i, t in enumerate(idx) if t is not None]
                    pass_ok = pos == list(range(pos[0], pos[-1] + 1)) and (p < pos[0] or p > pos[-1])
                    if pass_ok and p > pos[-1]:
                        nd_idx = max(_val(idx[i]).dim() for i in pos)
                        p = p - len(pos) + nd_idx
                if not pass_ok or o0.shape[p] != B:
                    fail(n, "indexing along the batch dimension")
                bd[n] = p
            else:  # gather(x, dim, index): out[i] = x[i with i_dim replaced by index[i]], shaped like index
                d = args[1] % o0.dim()
                ps = {bd[a] for a in ins}
                if bd.get(args[0]) is None:  # a constant table: entry i reads index[i] only, whatever dim is
                    d = None
                if len(ps) != 1 or d in ps:
                    fail(n, "gathering along the batch dimension")
                bd[n] = ps.pop()
                if o0.shape[bd[n]] != B:
                    fail(n, "the batch dimension disappears")
        elif name == "diagonal":  # diagonal(x, offset, dim1, dim2): the diagonal becomes the last dim
            p = bd[ins[0]]
            nd = _val(ins[0]).dim()
            d1, d2 = _arg(n, "dim1", 0) % nd, _arg(n, "dim2", 1) % nd
            if p in (d1, d2):
                fail(n, "a diagonal across the batch dimension")
            bd[n] = p - sum(1 for d in (d1, d2) if d < p)
        elif name == "native_layer_norm":
            p = bd[ins[0]]
            iv = _val(ins[0])
            if p >= iv.dim() - len(args[1]):
                fail(n, "layer_norm normalizes over the batch dimension")
            bd[n] = p
        elif name in RULES_ELEMENTWISE or name in _ELEMENTWISE_SAFE:
            bd[n] = same_rank_pos()
        else:
            # unknown op: accept only when output keeps the input's shape and batch position (unary map), and
            # the op neither acts along a dim it is given (cummax, fft) nor on matrices (linalg)
            if (len(ins) == 1 and tuple(_val(ins[0]).shape) == tuple(o0.shape) and not name.endswith("_backward")
                    and not _DIM_ARGS & _arg_names(n)
                    and not name.lstrip("_").startswith("linalg_") and name not in _MIXING_UNARY):
                bd[n] = bd[ins[0]]
            else:
                fail(n, "torchderiv does not know how this op treats the batch dimension")
        if folded and bd.get(n) is not None:
            folded_nodes.add(n)
            if i_in != 1:
                inner[n] = i_in

    out = next(n for n in nodes if n.op == "output").args[0]
    if isinstance(out, fx.Node) and bd.get(out) not in (None, 0):
        raise BatchMixingError(
            f"{fname}: batched=True requires f(x)[b] to depend on x[b] only, but f moves the batch "
            f"dimension of x to dimension {bd[out]} of its output (a transpose or permute at the end?). "
            f"Return [B, *out] from f, or pass batched=False to treat x as one point."
        )


def _index_put_batch(n, bd, B, fail):
    """Batch position after ``index_put(inp, indices, values)`` with constant indices."""
    inp, indices, values = n.args[0], n.args[1], n.args[2]
    if any(bd.get(i) is not None for i in indices if isinstance(i, fx.Node)):
        fail(n, "indices that depend on the input")
    iv = _val(inp)
    pos = [i for i, t in enumerate(indices) if t is not None]
    if not pos or pos != list(range(pos[0], pos[-1] + 1)):
        fail(n, "non-adjacent advanced indices")
    idx_vals = [_val(indices[i]) for i in pos]
    if any(v.dtype == torch.bool for v in idx_vals):
        nd_idx = 1
        n_idx_dims = sum(v.dim() for v in idx_vals)
    else:
        nd_idx = max(v.dim() for v in idx_vals)
        n_idx_dims = len(pos)
    first, after = pos[0], pos[0] + n_idx_dims
    p_in = bd.get(inp)
    if p_in is not None and first <= p_in < after:
        fail(n, "indexing along the batch dimension")
    p_val = None
    if bd.get(values) is not None:
        rank = iv.dim() - n_idx_dims + nd_idx  # rank of inp[indices], which values broadcast to
        q = rank - (_val(values).dim() - bd[values])
        if q < first:
            p_val = q
        elif q >= first + nd_idx:
            p_val = q - nd_idx + n_idx_dims
        else:
            fail(n, "values carry the batch along the indexed dimensions")
        if iv.shape[p_val] != B:
            fail(n, "values broadcast along the batch dimension")
    ps = {p for p in (p_in, p_val) if p is not None}
    if len(ps) != 1:
        fail(n, "inputs carry the batch in different dimensions")
    return ps.pop()


def _nodes_in(args) -> list:
    """The graph values inside nested (tuple, list, dict) arguments."""
    found: list = []
    fx.node.map_arg(args, found.append)
    return found


def _arg(n, name, default=None):
    """Argument ``name`` of the ATen call ``n``: given positionally or by keyword, else its schema default."""
    if name in n.kwargs:
        return n.kwargs[name]
    for i, a in enumerate(n.target._schema.arguments):
        if a.name == name:
            if i < len(n.args) and not a.kwarg_only:
                return n.args[i]
            return a.default_value if a.has_default_value() else default
    return default


def _arg_names(n):
    schema = getattr(n.target, "_schema", None)
    return {a.name for a in schema.arguments} if schema is not None else set()


def _has_arg(n, name):
    return name in _arg_names(n)


def _matrix_binary_batch(n, bd, outs, B, fail):
    """Batch position of each output of an op on the trailing (matrix) dims of two inputs whose leading dims
    broadcast as batch dims: solve, triangular solve, cdist. Counted from the matrix dims, the batch must sit
    at the same distance in every input that carries it."""
    name = n.target.__name__.split(".")[0]
    a, b = n.args[0], n.args[1]
    va, vb = _val(a), _val(b)
    cores_in, cores_out = (2, 2), [2] * len(outs)
    if name == "_linalg_solve_ex":  # (result, LU, pivots, info); B is a stack of vectors or of matrices
        vector = vb.dim() == 1 or (vb.dim() == va.dim() - 1 and tuple(vb.shape) == tuple(va.shape[:-1]))
        cores_in, cores_out = (2, 1 if vector else 2), [1 if vector else 2, 2, 1, 0]
    rs = {_val(t).dim() - k - bd[t] for t, k in zip((a, b), cores_in) if bd.get(t) is not None}
    if len(rs) != 1 or min(rs) < 1:
        fail(n, "the batch dimension is a matrix dimension here")
    r = rs.pop()
    result = []
    for o, k in zip(outs, cores_out):
        q = o.dim() - k - r if isinstance(o, torch.Tensor) else -1
        if q < 0:  # no batch dims that far out: computed from an input without the batch (the LU of a constant A)
            result.append(None)
            continue
        if o.shape[q] != B:
            fail(n, "the batch dimension disappears")
        result.append(q)
    return result


def _view_batch(ishape, oshape, p, inner_in, B):
    """Where the batch lands after a view (row-major order is kept): ``(dim, inner)`` or ``None`` when
    the ``B`` consecutive blocks of the batch would straddle two output dims."""
    stride = inner_in  # distance between rows b and b + 1 in the flattened tensor
    for s in ishape[p + 1 :]:
        stride *= s
    tail = 1
    for j in range(len(oshape) - 1, -1, -1):
        if stride % tail == 0 and (tail * oshape[j]) % (stride * B) == 0:
            return j, stride // tail
        tail *= oshape[j]
    return None


def _find_batch(v, B):
    for i, s in enumerate(v.shape):
        if s == B:
            return i
    return None


def _find_batch_keep(iv, ov, p, B):
    removed = [d for d in range(iv.dim()) if iv.shape[d] == 1 and ov.dim() < iv.dim()]
    # squeeze never removes a dim of size B > 1
    return p - sum(1 for d in removed[: iv.dim() - ov.dim()] if d < p)


_VALUE_INDEPENDENT = {
    "new_zeros", "new_ones", "new_full", "new_empty", "new_empty_strided", "zeros_like", "ones_like",
    "full_like", "empty_like", "rand_like", "randn_like", "randint_like", "fill", "zero", "sym_size",
    "sym_numel", "sym_stride", "_local_scalar_dense",
}

RULES_ELEMENTWISE = {
    "tanh", "sigmoid", "exp", "expm1", "log", "log1p", "sin", "cos", "sinh", "cosh", "sqrt", "rsqrt",
    "reciprocal", "erf", "atan", "silu", "relu", "abs", "softplus", "leaky_relu", "hardtanh", "elu", "gelu",
    "neg", "square", "tan", "asin", "acos", "asinh", "acosh", "atanh", "log2", "log10", "exp2", "erfc",
    "mish", "hardswish", "hardsigmoid", "celu", "selu", "logit", "sgn", "floor", "ceil", "round", "trunc",
}

__all__ = ["capture", "check_batch_independence", "Captured", "TraceError", "BatchMixingError", "aten",
           "operator"]

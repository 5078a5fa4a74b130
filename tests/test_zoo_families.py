"""Model families outside the other zoos, and the bugs they exposed, against independent references (float64).

References (tests/_harness.py): a loop over the samples of nested ``torch.func.jacrev`` of the primitive twin
(never forward-over-forward; a loop rather than ``vmap`` because some families write with ``index_add_`` or run a
backward pass inside), restricted to the coordinates a check needs and computed once per (family, order,
coordinates).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jacrev
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

import torchderiv as td
from _harness import Case, close, params, restricted, sampled

DT = torch.float64


def loop_ref(f: Callable, x: torch.Tensor, k: int, coords: Sequence[int] | None = None) -> torch.Tensor:
    """Order-``k`` per-sample derivative tensor ``[B, *out, m, ..., m]`` w.r.t. the flattened ``coords``, by a loop
    over the samples (uncached: for the one-off models of the bug tests)."""
    return restricted(f, x, k, coords, loop=True)


# ----------------------------------------------------------------------------- the families


class DeepONet(nn.Module):
    """Branch net on fixed sensor values (a buffer), trunk net on x, dot product."""

    def __init__(self, m=5, p=4, d=2):
        super().__init__()
        self.register_buffer("u", torch.randn(1, m))
        self.branch = nn.Sequential(nn.Linear(m, 8), nn.Tanh(), nn.Linear(8, p))
        self.trunk = nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, p), nn.Tanh())

    def forward(self, x):
        return (self.branch(self.u) * self.trunk(x)).sum(-1, keepdim=True)


def bspline_basis(x, grid, k):
    """Cox-de Boor: order-0 indicators from comparisons, then k rounds of the recursion. x [..., d], grid [d, G]."""
    x = x.unsqueeze(-1)
    B = ((x >= grid[:, :-1]) & (x < grid[:, 1:])).to(x.dtype)
    for p in range(1, k + 1):
        B = ((x - grid[:, : -(p + 1)]) / (grid[:, p:-1] - grid[:, : -(p + 1)]) * B[..., :-1]
             + (grid[:, p + 1 :] - x) / (grid[:, p + 1 :] - grid[:, 1:-p]) * B[..., 1:])
    return B


class KANLayer(nn.Module):
    def __init__(self, din, dout, G=4, k=3):
        super().__init__()
        g = torch.arange(-k, G + k + 1) * (2.0 / G) - 1.0
        self.register_buffer("grid", g.expand(din, -1).contiguous())
        self.k = k
        self.coef = nn.Parameter(0.3 * torch.randn(din, dout, G + k))
        self.base = nn.Parameter(0.5 * torch.randn(din, dout))

    def forward(self, x):
        return torch.einsum("bik,iok->bo", bspline_basis(x, self.grid, self.k), self.coef) + F.silu(x) @ self.base


class KAN(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = KANLayer(2, 3), KANLayer(3, 2)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


class MoETopK(nn.Module):
    """Top-2 routing: topk over gate logits, softmax of the winners, expert outputs gathered at the indices."""

    def __init__(self, d=3, E=4, out=2):
        super().__init__()
        self.gate = nn.Linear(d, E)
        self.experts = nn.ModuleList([nn.Sequential(nn.Linear(d, 5), nn.Tanh(), nn.Linear(5, out)) for _ in range(E)])

    def forward(self, x):
        v, i = torch.topk(self.gate(x), 2, -1)
        ys = torch.stack([e(x) for e in self.experts], 1)  # [B, E, out]
        sel = torch.gather(ys, 1, i.unsqueeze(-1).expand(-1, -1, ys.shape[-1]))
        return (torch.softmax(v, -1).unsqueeze(-1) * sel).sum(1)


class RealNVP(nn.Module):
    """Two affine couplings (chunk, tanh scale, exp) and the log-density with the log-det summed."""

    def __init__(self, d=4):
        super().__init__()
        self.s = nn.ModuleList([nn.Sequential(nn.Linear(d // 2, 6), nn.Tanh(), nn.Linear(6, d // 2)) for _ in range(2)])
        self.t = nn.ModuleList([nn.Sequential(nn.Linear(d // 2, 6), nn.Tanh(), nn.Linear(6, d // 2)) for _ in range(2)])

    def forward(self, x):
        ld = 0
        for j in range(2):
            a, b = x.chunk(2, -1)
            if j:
                a, b = b, a
            s = torch.tanh(self.s[j](a))
            b = b * torch.exp(s) + self.t[j](a)
            x = torch.cat([b, a] if j else [a, b], -1)
            ld = ld + s.sum(-1)
        logp = -0.5 * (x**2).sum(-1) - 0.5 * x.shape[-1] * math.log(2 * math.pi) + ld
        return torch.cat([x, logp.unsqueeze(-1)], -1)


class NeuralODE(nn.Module):
    """Fixed-step RK4 unrolled in Python over a time-dependent vector field."""

    def __init__(self, d=2, steps=2):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d + 1, 6), nn.Tanh(), nn.Linear(6, d))
        self.steps = steps

    def f(self, t, z):
        return self.net(torch.cat([z, torch.full_like(z[:, :1], t)], -1))

    def forward(self, x):
        h, z, t = 1.0 / self.steps, x, 0.0
        for _ in range(self.steps):
            k1 = self.f(t, z)
            k2 = self.f(t + h / 2, z + h / 2 * k1)
            k3 = self.f(t + h / 2, z + h / 2 * k2)
            k4 = self.f(t + h, z + h * k3)
            z, t = z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), t + h
        return z


class GridEncoding(nn.Module):
    """instant-NGP-like encoding: floor, integer index arithmetic (dense, or hashed with xor), nn.Embedding
    lookups at the 8 cell corners, trilinear weights; two levels, then an MLP."""

    def __init__(self, hashed: bool, res=(3, 5), feat=2, T=16):
        super().__init__()
        self.res, self.hashed, self.T = res, hashed, T
        self.tables = nn.ModuleList([nn.Embedding(T if hashed else (r + 1) ** 3, feat) for r in res])
        for t in self.tables:
            nn.init.normal_(t.weight, std=0.5)
        self.mlp = nn.Sequential(nn.Linear(feat * len(res), 6), nn.Tanh(), nn.Linear(6, 1))

    def forward(self, x):
        u = torch.sigmoid(x)
        feats = []
        for r, tab in zip(self.res, self.tables):
            p = u * r
            p0 = torch.floor(p)
            w, i0 = p - p0, p0.long()
            acc = 0
            for corner in range(8):
                off = [(corner >> a) & 1 for a in range(3)]
                c = i0 + torch.tensor(off)
                if self.hashed:
                    idx = (c[:, 0] ^ (c[:, 1] * 2654435761) ^ (c[:, 2] * 805459861)) % self.T
                else:
                    idx = c[:, 0] + (r + 1) * (c[:, 1] + (r + 1) * c[:, 2])
                wt = math.prod(w[:, a] if o else 1 - w[:, a] for a, o in enumerate(off))
                acc = acc + wt.unsqueeze(-1) * tab(idx)
            feats.append(acc)
        return self.mlp(torch.cat(feats, -1))


class MambaScan(nn.Module):
    """Selective scan in closed form with cumsum / exp of masked differences: [B, T, d] -> [B, T, d]."""

    def __init__(self, d=2, N=2):
        super().__init__()
        self.inp, self.dt, self.out = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.Bp, self.Cp = nn.Linear(d, N), nn.Linear(d, N)
        self.A = nn.Parameter(-torch.rand(d, N) - 0.5)

    def forward(self, x):
        u = F.silu(self.inp(x))
        delta = F.softplus(self.dt(u))
        cum = torch.cumsum(delta.unsqueeze(-1) * self.A, 1)  # [B, T, d, N]
        T = x.shape[1]
        keep = torch.ones(T, T, dtype=torch.bool).tril()[None, :, :, None, None]
        decay = torch.exp((cum.unsqueeze(2) - cum.unsqueeze(1)).masked_fill(~keep, float("-inf")))
        inp = (delta * u).unsqueeze(-1) * self.Bp(u).unsqueeze(2)  # [B, s, d, N]
        h = (decay * inp.unsqueeze(1)).sum(2)
        return self.out((h * self.Cp(u).unsqueeze(2)).sum(-1) * F.silu(x))


class PointNet(nn.Module):
    """Shared per-point MLP on [B, N, 3], pooled by torch.max(dim) (values) and by mean."""

    def __init__(self):
        super().__init__()
        self.phi = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 6), nn.Softplus())
        self.rho = nn.Sequential(nn.Linear(12, 5), nn.Tanh(), nn.Linear(5, 2))

    def forward(self, x):
        h = self.phi(x)
        return self.rho(torch.cat([h.max(1).values, torch.min(h, dim=1)[0] + h.mean(1)], -1))


class GraphNet(nn.Module):
    """Message passing over a fixed edge list: index_select of endpoints, index_add_ / scatter_add into nodes."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.register_buffer("src", torch.tensor([0, 1, 2, 3, 0]))
        self.register_buffer("dst", torch.tensor([1, 2, 3, 0, 2]))
        self.enc, self.upd, self.out = nn.Linear(2, 4), nn.Linear(8, 4), nn.Linear(4, 1)
        self.msg = nn.Sequential(nn.Linear(8, 4), nn.Tanh())

    def forward(self, x):  # [B, nodes, 2]
        h = torch.tanh(self.enc(x))
        for _ in range(2):
            m = self.msg(torch.cat([h.index_select(1, self.src), h.index_select(1, self.dst)], -1))
            if self.mode == "index_add_":
                agg = torch.zeros_like(h).index_add_(1, self.dst, m)
            else:
                agg = torch.zeros_like(h).scatter_add(1, self.dst.view(1, -1, 1).expand_as(m), m)
            h = torch.tanh(self.upd(torch.cat([h, agg], -1)))
        return self.out(h).squeeze(-1)


class UNet1d(nn.Module):
    """MaxPool1d, Conv1d, ConvTranspose1d, linear Upsample and a skip cat: [B, 1, 6] -> [B, 1, 6]."""

    def __init__(self):
        super().__init__()
        self.e1, self.e2 = nn.Conv1d(1, 2, 3, padding=1), nn.Conv1d(2, 3, 3, padding=1)
        self.up = nn.ConvTranspose1d(3, 2, 2, stride=2)
        self.up2 = nn.Upsample(scale_factor=2, mode="linear", align_corners=False)
        self.d = nn.Conv1d(7, 1, 3, padding=1)

    def forward(self, x):
        a = torch.tanh(self.e1(x))
        b = torch.tanh(self.e2(F.max_pool1d(a, 2) + F.avg_pool1d(a, 2)))
        return self.d(torch.cat([a, self.up(b), self.up2(b)], 1))


class PixelShuffleNet(nn.Module):
    """pixel_shuffle and pixel_unshuffle between per-pixel maps (no convolutions: the order-4 references of a
    conv stack take ~20 s): [B, 1, 2, 2] -> [B, 4]."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 16)
        self.w = nn.Parameter(torch.randn(1, 4, 4))
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        h = F.pixel_shuffle(torch.tanh(self.a(x.flatten(1))).view(-1, 4, 2, 2), 2)  # [B, 1, 4, 4]
        return self.out(F.pixel_unshuffle(torch.sin(h * self.w), 2).flatten(1))


class PeriodicPowers(nn.Module):
    """Periodic inputs by remainder / fmod, polynomial features x ** arange (a tensor exponent)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("expo", torch.tensor([0.0, 1.0, 2.0, 2.5]))
        self.l = nn.Linear(12, 2)

    def forward(self, x):  # [B, 2]
        z = torch.remainder(x, 2.0) + torch.fmod(1.7 * x, torch.full_like(x, 1.5))
        feats = (z.abs() + 0.5).unsqueeze(-1) ** self.expo  # [B, 2, 4]
        return self.l(torch.cat([torch.sin(math.pi * z), z * z, feats.flatten(1)], -1))


def film_siren():
    class FiLMSiren(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("z", torch.randn(1, 3))
            self.film = nn.Linear(3, 16)
            self.l0, self.l1, self.out = nn.Linear(2, 4), nn.Linear(4, 4), nn.Linear(4, 1)

        def forward(self, x):
            g1, b1, g2, b2 = self.film(self.z).chunk(4, -1)
            h = torch.sin(3.0 * (g1 * self.l0(x) + b1))
            return self.out(torch.sin((1 + g2) * self.l1(h) + b2))

    return FiLMSiren()


SLOW = pytest.mark.slow  # the grid encodings and the RK4 ODE: the costliest references of the suite
FAMS = [
    Case("deeponet", DeepONet, (2,), scale=0.7, loop=True),
    Case("kan_bspline_cox_de_boor", KAN, (2,), scale=0.4, batch=2, loop=True),
    Case("moe_top2_gather", MoETopK, (3,), scale=0.7, loop=True),
    Case("realnvp_coupling", RealNVP, (4,), pair=(0, 3), scale=0.7, loop=True),
    Case("neural_ode_rk4", NeuralODE, (2,), scale=0.7, loop=True, marks=(SLOW,)),
    Case("film_siren", film_siren, (2,), scale=0.7, loop=True),
    Case("dense_grid_embedding", lambda: GridEncoding(False, res=(3,)), (3,), batch=2, scale=0.7, loop=True,
         marks=(SLOW,)),
    Case("hash_grid_xor", lambda: GridEncoding(True, res=(4,)), (3,), batch=2, scale=0.7, loop=True, marks=(SLOW,)),
    Case("mamba_scan_cumsum", MambaScan, (3, 2), pair=(0, 5), scale=0.7, loop=True),
    Case("pointnet_max_dim", PointNet, (3, 3), pair=(0, 4), scale=0.7, loop=True),
    Case("gnn_index_add_", lambda: GraphNet("index_add_"), (4, 2), pair=(0, 3), scale=0.7, loop=True),
    Case("gnn_scatter_add", lambda: GraphNet("scatter_add"), (4, 2), pair=(1, 6), scale=0.7, loop=True),
    Case("unet1d_pool_convtranspose", UNet1d, (1, 6), pair=(1, 4), scale=0.7, loop=True),
    Case("pixel_shuffle", PixelShuffleNet, (1, 2, 2), pair=(0, 3), batch=2, scale=0.7, loop=True),
    Case("periodic_remainder_pow_tensor", PeriodicPowers, (2,), scale=1.3, loop=True),
]


fams = pytest.mark.parametrize("fam", params(FAMS))
# orders 1-2: every other family in the fast tier, all of them in make test
fams_sampled = pytest.mark.parametrize("fam", sampled(params(FAMS), 2))


@fams_sampled
def test_first_order(fam):
    model, _, x = fam.build()
    J = fam.jacobian()
    for method in ("forward", "reverse"):
        close(td.jacobian(model, x, method=method), J, f"{fam.name} jacobian {method}")
    # batched=False: the first two samples as one point
    Jfull = jacrev(model)(x[:2])
    close(td.jacobian(model, x[:2], batched=False), Jfull, f"{fam.name} jacobian batched=False")


@fams_sampled
def test_second_order(fam):
    model, _, x = fam.build()
    for method in ("forward", "reverse"):
        close(td.hessian(model, x, method=method), fam.hessian(), f"{fam.name} hessian {method}")
        close(td.hessian_diagonal(model, x, method=method), fam.hessian_diagonal(),
              f"{fam.name} hessian_diagonal {method}")
        close(td.laplacian(model, x, method=method), fam.laplacian(), f"{fam.name} lap {method}")
        dims = list(range(fam.n))[::-2]
        A = torch.randn(len(dims), len(dims), dtype=DT, generator=torch.Generator().manual_seed(3))
        C = A @ A.T
        close(td.laplacian(model, x, dims=dims, weights=C, method=method), fam.laplacian(dims, C),
              f"{fam.name} weighted laplacian {method}")


@pytest.mark.slow  # orders 3-4 by a loop of nested jacrev per sample
@fams
def test_partials_orders_3_4_and_biharmonic(fam):
    model, _, x = fam.build()
    a, b = fam.pair
    spec = [(), (b,), (b, a), (a, a, b), (b, a, b), (b, b, b), (a, b, a, b), (b, b, b, b), (a, a, a, b)]
    got = td.partials(model, x, spec)
    coords = sorted({a, b})
    for key in spec:
        close(got[key], fam.partial(key), f"{fam.name} partial {key}")
    close(td.biharmonic(model, x, dims=coords), fam.biharmonic(coords), f"{fam.name} biharmonic {coords}")


# ----------------------------------------------------------------------------- the bugs, one test each


def test_spectral_norm_training_mode():
    """spectral_norm in training mode runs its power iteration under no_grad with out= ops on its buffers; the
    trace forgot the no_grad and the generated graph raised. Now: the buffers advance once per call, as in a
    forward, and the derivatives are those of the forward at the advanced buffers."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(DT)
    spectral_norm(net[2])
    twin = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(DT)
    spectral_norm(twin[2])
    twin.load_state_dict(net.state_dict())
    x = torch.randn(4, 3, dtype=DT)
    net.train()
    twin.train()
    lap = td.laplacian(net, x)
    with torch.no_grad():
        twin(x)  # one power iteration, as the derivative call did
    close(net[2].parametrizations.weight[0]._u, twin[2].parametrizations.weight[0]._u, "power iteration u")
    net.eval()
    H = loop_ref(net, x, 2)
    close(lap, H.diagonal(dim1=-2, dim2=-1).sum(-1), "spectral_norm train-mode laplacian")


def test_weight_norm_sees_optimizer_steps():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(DT)
    weight_norm(net[0])
    x = torch.randn(3, 3, dtype=DT)
    opt = torch.optim.SGD(net.parameters(), lr=0.2)
    for _ in range(2):
        loss = td.laplacian(net, x).pow(2).sum() + net(x).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    H = loop_ref(net, x, 2)
    close(td.laplacian(net, x), H.diagonal(dim1=-2, dim2=-1).sum(-1), "weight_norm laplacian after steps")


def test_closure_over_dict_rebinding_is_not_stale():
    """A function reading a tensor from a dict it closes over: rebinding the entry used to reuse the cached graph
    built for the old tensor (a silently wrong derivative)."""
    W = torch.randn(3, 3, dtype=DT)
    state = {"W": W}

    def f(x):
        return torch.sin(x @ state["W"])

    x = torch.randn(3, 3, dtype=DT)
    td.jacobian(f, x)
    state["W"] = 2 * W
    close(td.jacobian(f, x), loop_ref(f, x, 1), "jacobian after rebinding a dict entry")

    class Holder:
        pass

    h = Holder()
    h.W = W

    def g(x):
        return torch.sin(x @ h.W)

    td.jacobian(g, x)
    h.W = 3 * W
    close(td.jacobian(g, x), loop_ref(g, x, 1), "jacobian after rebinding an attribute of a plain object")

    dtype, device = DT, torch.device("cpu")  # closure values without a __dict__

    def k(x):
        return torch.sin(x).to(dtype).to(device)

    close(td.jacobian(k, x), loop_ref(k, x, 1), "closure over a dtype and a device")


def test_torch_compile_module_is_traced_not_fallen_back():
    torch.manual_seed(2)
    base = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(DT)
    comp = torch.compile(base, backend="aot_eager")  # traced by torchderiv, never compiled: no inductor needed
    x = torch.randn(3, 3, dtype=DT)
    lap = td.laplacian(comp, x)  # a FallbackWarning (the torch.func fallback) is an error in this suite
    close(lap, loop_ref(base, x, 2).diagonal(dim1=-2, dim2=-1).sum(-1), "compiled module laplacian")
    with torch.no_grad():
        base[0].weight.mul_(1.5)
    close(td.jacobian(comp, x), loop_ref(base, x, 1), "compiled module jacobian after an in-place update")


@pytest.mark.parametrize("layout", ["channels_last", "expanded", "transposed"])
def test_noncontiguous_x_every_method(layout):
    """Reverse-mode paths ran the graph traced at a contiguous x on the caller's strides: `view` failed for a
    channels_last x, and the jvp of the forward-over-reverse Hessian wrote into an expanded x."""
    torch.manual_seed(3)
    if layout == "channels_last":
        net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(12, 2)).to(DT)
        x = torch.randn(3, 2, 2, 2, dtype=DT).contiguous(memory_format=torch.channels_last)
    else:
        net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
        x = torch.randn(3, 1, dtype=DT).expand(3, 3) if layout == "expanded" else torch.randn(3, 3, dtype=DT).T
    assert not x.is_contiguous()
    ins = tuple(x.shape[1:])
    J, H = loop_ref(net, x, 1), loop_ref(net, x, 2)
    for method in ("forward", "reverse"):
        close(td.jacobian(net, x, method=method), J.reshape(*J.shape[:-1], *ins), f"{layout} jacobian {method}")
        close(td.hessian(net, x, method=method), H.reshape(*H.shape[:-2], *ins, *ins), f"{layout} hessian {method}")
        close(td.laplacian(net, x, method=method), H.diagonal(dim1=-2, dim2=-1).sum(-1), f"{layout} lap {method}")
    close(td.jacobian(net, x.contiguous()), J.reshape(*J.shape[:-1], *ins), f"{layout} then contiguous")


class HamiltonianField(nn.Module):
    """The symplectic field (dH/dp, -dH/dq) of an energy MLP, by torch.autograd.grad inside forward."""

    def __init__(self):
        super().__init__()
        self.H = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 1))

    def forward(self, x):
        with torch.enable_grad():
            x = x if x.requires_grad else x.requires_grad_(True)
            g = torch.autograd.grad(self.H(x).sum(), x, create_graph=True)[0]
        return torch.stack([g[:, 1], -g[:, 0]], -1)


def test_backward_inside_f_is_not_silently_wrong():
    """The trace of a backward pass records autograd's saved tensors detached, so the captured graph dropped their
    derivatives (jacobian off by 0.06, batched=False). Such an f now falls back to torch.func: correct."""
    torch.manual_seed(4)
    model = HamiltonianField().to(DT)
    x = torch.randn(3, 2, dtype=DT)
    Jref = jacrev(model)(x[:2])
    with pytest.warns(td.FallbackWarning, match="backward pass inside"):  # once per f and reason
        J = td.jacobian(model, x[:2], batched=False, method="forward")
    close(J, Jref, "field jacobian batched=False")
    Href = jacrev(jacrev(model))(x[:2])
    close(td.hessian(model, x[:2], batched=False, method="forward"), Href, "field hessian batched=False")
    # against central differences too (the references run autograd inside jacrev)
    h = 1e-5
    e = torch.zeros_like(x)
    e[:, 0] = h
    with torch.enable_grad():
        fd = (model(x + e) - model(x - e)).detach() / (2 * h)
    torch.testing.assert_close(td.jacobian(model, x)[..., 0], fd, atol=1e-7, rtol=1e-6)  # FD truncation ~h^2


def test_loss_gradient_reaches_upstream_and_net_parameters():
    """x = g(z; A, b) requires grad: the gradient of a loss on the laplacian, hessian, jacobian and a third
    partial w.r.t. both the net's and the upstream parameters equals the autograd-loop formulation's."""
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 5), nn.Softplus(), nn.Linear(5, 2)).to(DT)
    A = nn.Parameter(torch.randn(3, 3, dtype=DT))
    b = nn.Parameter(torch.randn(3, dtype=DT))
    z = torch.randn(4, 3, dtype=DT)
    params = [A, b, *net.parameters()]

    def loss_td(method):
        x = torch.tanh(z @ A + b)
        P = td.partials(net, x, [(0, 1, 1)])[(0, 1, 1)]
        return ((td.laplacian(net, x, method=method) ** 2).sum() + 0.1 * td.hessian(net, x, method=method).pow(2).sum()
                + td.jacobian(net, x, method=method).sum() + P.pow(2).sum())

    def loss_loop():
        x = torch.tanh(z @ A + b)
        y = net(x)
        total = 0
        for o in range(y.shape[1]):
            g = torch.autograd.grad(y[:, o].sum(), x, create_graph=True)[0]
            rows = [torch.autograd.grad(g[:, i].sum(), x, create_graph=True)[0] for i in range(3)]
            p = torch.autograd.grad(rows[1][:, 1].sum(), x, create_graph=True)[0][:, 0]
            total = total + sum(r[:, i] for i, r in enumerate(rows)).pow(2).sum()
            total = total + 0.1 * sum(r.pow(2).sum() for r in rows) + g.sum() + p.pow(2).sum()
        return total

    def grads(loss):
        g = torch.autograd.grad(loss, params, allow_unused=True)
        return [torch.zeros_like(p) if gi is None else gi for p, gi in zip(params, g)]

    expected = grads(loss_loop())
    for method in ("forward", "reverse"):
        for i, (got, exp) in enumerate(zip(grads(loss_td(method)), expected)):
            close(got, exp, f"{method}: gradient of parameter {i}")


def test_float32_x_with_float64_model_raises():
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    x = torch.randn(3, 3)
    for fn in (td.jacobian, td.hessian, td.laplacian):
        with pytest.raises(RuntimeError, match="dtype"):
            fn(net, x)


def test_index_select_with_indices_from_other_rows_is_mixing():
    """index_select(h, 1, idx) where idx carries the batch: out[b, j] = h[b, idx[j]] reads row j's index. The check
    followed only h and let it through."""
    def f(x):
        return torch.tanh(x).index_select(1, (x[:, 0] > 0).long())

    with pytest.raises(td.BatchMixingError, match="index_select"):
        td.jacobian(f, torch.randn(3, 3, dtype=DT))


def test_index_select_of_a_constant_table_at_per_row_indices_is_not_mixing():
    table = torch.randn(5, 2, dtype=DT)

    def f(x):
        i = torch.floor(torch.sigmoid(x[:, 0]) * 5).long()  # [B]
        return table.index_select(0, i) * torch.sin(x[:, 1:])

    x = torch.randn(4, 3, dtype=DT)
    close(td.jacobian(f, x), loop_ref(f, x, 1), "index_select of a constant table")
    close(td.hessian(f, x), loop_ref(f, x, 2), "index_select of a constant table (hessian)")


def test_gather_of_a_constant_table_at_per_row_indices_is_not_mixing():
    """gather(table, 0, idx) with a constant table and idx [B, d] computed from x: entry (b, j) reads idx[b, j]
    only; the check refused it as a gather along the batch dim (a piecewise-linear lookup table)."""
    table = torch.randn(6, 3, dtype=DT, generator=torch.Generator().manual_seed(7))

    def f(x):
        u = torch.sigmoid(x) * 4.999
        i = torch.floor(u).long()
        w = u - i
        return torch.sin((1 - w) * torch.gather(table, 0, i) + w * torch.gather(table, 0, i + 1)) * x

    x = torch.randn(4, 3, dtype=DT)
    close(td.jacobian(f, x), loop_ref(f, x, 1), "gather of a constant table")
    close(td.hessian(f, x), loop_ref(f, x, 2), "gather of a constant table (hessian)")

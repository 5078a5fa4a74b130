"""Neural fields: features interpolated from a fixed grid (``F.grid_sample``) at the input points, the
batch of points laid out along a location dim of the sampling grid. 2-D sampling is decomposed into
gathers and interpolation weights (every order, forward); 3-D sampling has no decomposition nor a
forward-mode formula in torch: reverse-mode Jacobians work, the forward path says to use them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchderiv as td
from _harness import sampled

DT = torch.float64


class FeaturePlane(nn.Module):
    """Bilinear features of a 2-D plane at x in [-1, 1]^2 (points along the grid's H dim), then an MLP."""

    def __init__(self, mode: str = "bilinear", layout: str = "H"):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("plane", torch.randn(1, 4, 8, 8, dtype=DT, generator=g))
        self.mode, self.layout = mode, layout
        self.mlp = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1)).to(DT)

    def forward(self, x):  # [B, 2]
        grid = x.view(1, -1, 1, 2) if self.layout == "H" else x.view(1, 1, -1, 2)
        feat = F.grid_sample(self.plane, grid, mode=self.mode, align_corners=True)  # [1, 4, *loc]
        return self.mlp(feat.reshape(4, -1).t())


class FeatureVolume(nn.Module):
    """Trilinear features of a 3-D volume at x in [-1, 1]^3, points along the grid's D dim."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.register_buffer("vol", torch.randn(1, 3, 5, 5, 5, dtype=DT, generator=g))
        self.out = nn.Linear(3, 2).to(DT)

    def forward(self, x):  # [B, 3]
        feat = F.grid_sample(self.vol, x.view(1, -1, 1, 1, 3), align_corners=False)  # [1, 3, B, 1, 1]
        return self.out(torch.sin(feat.reshape(3, -1).t()))


MODELS = {
    "plane_bilinear_H": lambda: FeaturePlane(),
    "plane_bilinear_W": lambda: FeaturePlane(layout="W"),
    "plane_bicubic": lambda: FeaturePlane(mode="bicubic"),
    "volume_trilinear": FeatureVolume,
}


def per_sample(f):
    return lambda xi: f(xi.unsqueeze(0)).squeeze(0)


def _loop_reference(net, x):
    """Per-sample Jacobians and Hessians by plain autograd (vmap cannot run grid_sample's backward)."""
    g = per_sample(net)
    J = torch.stack([torch.autograd.functional.jacobian(g, xi) for xi in x])
    H = torch.stack([torch.stack([torch.autograd.functional.hessian(lambda v, o=o: g(v)[o], xi)
                                  for o in range(J.shape[1])]) for xi in x])
    return J, H


@pytest.mark.parametrize("name", sampled(list(MODELS), 2))  # fast tier: every other model
def test_jacobian_and_hessian(name):
    net = MODELS[name]()
    d = 3 if name.startswith("volume") else 2
    x = torch.rand(6, d, dtype=DT, generator=torch.Generator().manual_seed(2)) * 1.6 - 0.8
    J, H = _loop_reference(net, x)
    torch.testing.assert_close(td.jacobian(net, x, method="reverse"), J)
    if name.startswith("volume"):
        # grid_sampler_3d: no rule, no decomposition, no forward-mode formula in torch (so no Hessian by
        # forward-over-reverse either): the Jacobian by reverse mode, and a clear error otherwise
        for _ in range(2):  # the failed forward build is remembered: the same error, not a retrace
            with pytest.raises(NotImplementedError, match="method='reverse'"):
                td.jacobian(net, x, method="forward")
        if td.choose_method("jacobian", net, x) == "forward":  # the cost model's pick: forward fails, then reverse
            with pytest.warns(td.FallbackWarning, match="reverse"):  # once per f
                torch.testing.assert_close(td.jacobian(net, x), J)
        torch.testing.assert_close(td.jacobian(net, x), J)
        return
    torch.testing.assert_close(td.hessian(net, x, method="reverse"), H)
    # 2-D: torch's decomposition into gathers and interpolation weights, all with rules (no fallback)
    torch.testing.assert_close(td.jacobian(net, x, method="forward"), J)  # a FallbackWarning is an error here
    torch.testing.assert_close(td.hessian(net, x, method="forward"), H)
    torch.testing.assert_close(td.laplacian(net, x), H.diagonal(dim1=-2, dim2=-1).sum(-1))


def test_points_along_the_channels_are_refused():
    plane = torch.randn(1, 4, 8, 8, dtype=DT)

    def f(x):  # the batch of x becomes the sampled plane itself: every output reads every row
        return F.grid_sample(x.view(1, -1, 1, 2).expand(1, -1, 4, 2).reshape(1, 1, -1, 8), plane[:, :1, :1, :8]
                             .reshape(1, 1, 4, 2), align_corners=True).reshape(-1, 1)[: x.shape[0]]

    with pytest.raises(td.BatchMixingError):
        td.jacobian(f, torch.rand(4, 2, dtype=DT))

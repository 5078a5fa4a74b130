"""Factories for the ``torchderiv bench --model`` tests: each returns ``(module, example_input)``."""

import torch
from torch import nn


def make():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2))
    return net, torch.randn(6, 3)


def make_scalar():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
    return net, torch.randn(5, 3)


def make_square():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 3))
    return net, torch.randn(4, 3)


def not_a_pair():
    return 42

"""Tiny models and data for the bad-input suite (CLI specs: tests/bad_models.py:NAME)."""

from __future__ import annotations

import torch
from torch import nn


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def nan_mlp() -> nn.Module:
    m = mlp()
    with torch.no_grad():
        m[2].weight[1, 3] = float("nan")
    return m


def data():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 8, generator=g) for _ in range(2)]


def wrong_shape():
    return [torch.randn(4, 5)]


def second_batch_wrong():
    return [torch.randn(4, 8), torch.randn(4, 8, 2)]


def strings():
    return [{"text": "hello", "more": "world"}]


def wrong_keys():
    return [{"inputs": torch.randn(4, 8)}]


def accuracy(model) -> float:
    with torch.no_grad():
        return float(model(data()[0]).argmax(1).float().mean())


def not_a_number(model):
    return "high"


def raises():
    raise RuntimeError("the data server is down")


def eval_data():
    """Evaluation batches apart from :func:`data` (another seed)."""
    g = torch.Generator().manual_seed(2)
    return [torch.randn(4, 8, generator=g) for _ in range(2)]


#: seconds each forward of :func:`slow_mlp` takes (so that a kill -9 lands in the middle of a run)
SLOW_FORWARD = 0.01


class _SlowMLP(nn.Sequential):
    def forward(self, x):
        import time

        time.sleep(SLOW_FORWARD)
        return super().forward(x)


def slow_mlp() -> nn.Module:
    """A 6-layer MLP (inputs as :func:`data`'s) whose every forward pass sleeps :data:`SLOW_FORWARD`
    seconds: enough layers and options for a measured search of many generations."""
    torch.manual_seed(0)
    layers = [nn.Linear(8, 32), nn.ReLU()]
    for _ in range(4):
        layers += [nn.Linear(32, 32), nn.ReLU()]
    return _SlowMLP(*layers, nn.Linear(32, 4)).eval()

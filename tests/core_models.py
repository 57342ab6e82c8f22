"""Small models and data for the core tests (also importable as CLI specs: tests/core_models.py:NAME)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, groups=4),  # depthwise
        nn.ReLU(),
        nn.Conv2d(4, 8, 3, groups=2),  # grouped
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 10),
    ).eval()


def tiny_cnn_input() -> torch.Tensor:
    return torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))


class TinyBlock(nn.Module):
    """A transformer-ish block with q/k/v and gate/up names."""

    def __init__(self, d=8):
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.gate_proj = nn.Linear(d, 2 * d)
        self.up_proj = nn.Linear(d, 2 * d)
        self.down_proj = nn.Linear(2 * d, d)

    def forward(self, x):
        a = torch.softmax(self.q_proj(x) @ self.k_proj(x).transpose(-1, -2), -1) @ self.v_proj(x)
        x = x + a
        return x + self.down_proj(torch.relu(self.gate_proj(x)) * self.up_proj(x))


class TinyLM(nn.Module):
    def __init__(self, d=8, n=2):
        super().__init__()
        self.embed = nn.Embedding(20, d)
        self.layers = nn.ModuleList([TinyBlock(d) for _ in range(n)])
        self.head = nn.Linear(d, 20)

    def forward(self, ids):
        x = self.embed(ids)
        for blk in self.layers:
            x = blk(x)
        return self.head(x)


def tiny_lm() -> nn.Module:
    torch.manual_seed(0)
    return TinyLM().eval()


def tiny_lm_input() -> torch.Tensor:
    return torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(0))


def digits_split():
    """scikit-learn digits as tensors: (x_train, y_train, x_test, y_test)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return x[:1200], y[:1200], x[1200:], y[1200:]


_DIGITS_CACHE = Path(tempfile.gettempdir()) / "mpsearch-tests-digits-mlp-v1.pt"


def digits_mlp() -> nn.Module:
    """A 4-layer MLP trained on digits (a few seconds; ~97% test accuracy).

    The weights are cached in the temp directory, so that CLI specs loading this file in the same
    test session train it once.
    """
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
        nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10),
    )
    if _DIGITS_CACHE.is_file():
        model.load_state_dict(torch.load(_DIGITS_CACHE, weights_only=True))
        return model.eval()
    xtr, ytr, _, _ = digits_split()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xtr), ytr).backward()
        opt.step()
    tmp = _DIGITS_CACHE.with_suffix(f".{os.getpid()}.tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, _DIGITS_CACHE)
    return model.eval()


def digits_calib():
    xtr, ytr, _, _ = digits_split()
    return [(xtr[:256], ytr[:256])]


def digits_loss(model) -> float:
    """Test cross-entropy of a digits model (the quality metric: lower is better)."""
    _, _, xte, yte = digits_split()
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(xte), yte))


def digits_accuracy(model) -> float:
    _, _, xte, yte = digits_split()
    with torch.no_grad():
        return float((model(xte).argmax(1) == yte).float().mean())


def not_a_module():
    return np.zeros(3)


def no_quantizable_layers() -> nn.Module:
    return nn.Sequential(nn.ReLU(), nn.Tanh())

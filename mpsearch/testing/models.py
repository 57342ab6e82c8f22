"""Tiny seeded models with calibration batches for the estimator suite (no downloads)."""

from __future__ import annotations

import torch
from torch import nn


def tiny_cnn():
    """A tiny CNN classifier (plain and grouped convolutions, a linear head) and two labelled batches."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 6 * 6, 5),
    ).eval()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(6, 1, 8, 8, generator=g), torch.randint(0, 5, (6,), generator=g)),
               (torch.randn(4, 1, 8, 8, generator=g), torch.randint(0, 5, (4,), generator=g))]
    return model, batches


class Block(nn.Module):
    """A pre-norm transformer block with q/k/v attention and a GELU MLP."""

    def __init__(self, d=8):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.act, self.down = nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)

    def forward(self, x):
        h = self.norm(x)
        a = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2) / 8**0.5, -1) @ self.v(h)
        x = x + self.o(a)
        return x + self.down(self.act(self.up(x)))


class TinyTransformer(nn.Module):
    def __init__(self, vocab=16, d=8, n=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([Block(d) for _ in range(n)])
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.embed(ids)
        for blk in self.layers:
            x = blk(x)
        return self.head(x)


def tiny_lm():
    """A tiny transformer LM and two unlabelled batches of token ids (estimators self-distil)."""
    torch.manual_seed(0)
    model = TinyTransformer().eval()
    g = torch.Generator().manual_seed(2)
    return model, [torch.randint(0, 16, (3, 5), generator=g), torch.randint(0, 16, (2, 5), generator=g)]

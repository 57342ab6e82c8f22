"""Shared loaders for the sensitivity experiments: the packaged real models through mpsearch.zoo.

- MiniLM: all-MiniLM-L6-v2 wrapped to return the L2-normalised mean-pooled sentence embedding,
  calibrated on Shakespeare passages from the calibration plays, evaluated on the held-out plays.
- Fashion CNN: the zoo's trained CNN, calibrated on training images, evaluated on test images.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HERE = Path(__file__).parent


class SentenceEncoder(nn.Module):
    """A Hugging Face encoder + masked mean pooling + L2 normalisation (the sentence embedding)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.model = encoder

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        from mpsearch.zoo import mean_pool

        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask,
                            token_type_ids=token_type_ids).last_hidden_state
        return mean_pool(hidden, attention_mask)


def minilm(n_calib: int = 16, n_eval: int = 64, max_length: int = 64):
    """``(model, calib_batches, eval_batches)`` for all-MiniLM-L6-v2."""
    from mpsearch import zoo

    encoder, tok = zoo.load_minilm()
    model = SentenceEncoder(encoder).eval()
    calib = zoo.tokenize(tok, zoo.shakespeare_lines(n_calib, split="calib"), 16, max_length)
    evals = zoo.tokenize(tok, zoo.shakespeare_lines(n_eval, split="eval"), 32, max_length)
    return model, calib, evals


def fashion(n_calib: int = 256, n_eval: int = 2000):
    """``(model, calib_batches, eval_batches)`` for the Fashion-MNIST CNN."""
    from mpsearch import zoo

    model = zoo.fashion_mnist_cnn(progress=False)
    calib = zoo.fashion_batches("train", n=n_calib, batch_size=n_calib)
    evals = zoo.fashion_batches("test", n=n_eval, batch_size=1000)
    return model, calib, evals


@torch.no_grad()
def embedding_loss(model, reference, batches) -> float:
    """1 - mean cosine between the model's sentence embeddings and the reference ones."""
    cos = []
    for ref, b in zip(reference, batches):
        cos.append(torch.nn.functional.cosine_similarity(model(**b), ref, dim=-1))
    return float(1 - torch.cat(cos).mean())


@torch.no_grad()
def ce_loss(model, batches) -> float:
    """Mean test cross-entropy."""
    total, n = 0.0, 0
    for x, y in batches:
        total += float(nn.functional.cross_entropy(model(x), y, reduction="sum"))
        n += len(y)
    return total / n


def timed(fn, repeats: int = 3):
    """Median wall time of ``fn()`` over ``repeats`` runs, and its last result."""
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def markdown_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)

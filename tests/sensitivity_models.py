"""Small models and batches for the estimator tests (no downloads; a few are random transformers)."""

from __future__ import annotations

import torch

from mpsearch.testing.models import Block, TinyTransformer  # noqa: F401
from mpsearch.testing.models import tiny_cnn as cnn_batches  # noqa: F401
from mpsearch.testing.models import tiny_lm as lm_batches  # noqa: F401


def tiny_bert():
    """A randomly initialised 2-layer BERT (transformers, default sdpa attention) and two batches."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16)
    model = BertModel(cfg, add_pooling_layer=False).eval()
    g = torch.Generator().manual_seed(3)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[2, 4:] = 0
    return model, [{"input_ids": torch.randint(0, 50, (3, 6), generator=g), "attention_mask": mask}]

"""output-distance keeps a layer's quantized weights for the next calibration batches (issue 24)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mpsearch
from mpsearch import zoo
from mpsearch.errors import MpsearchError


def _batches(n=3):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 128, (2, 16), generator=g) for _ in range(n)]


def _table(**settings):
    model = zoo.random_llama("tiny")
    est = mpsearch.get_estimator("output-distance", options="2,4,8", **settings)
    return est.estimate(model, _batches(), progress=False)


def test_kept_variants_give_the_same_table_and_are_counted():
    kept, again = _table(), _table(max_variant_mb=0)
    np.testing.assert_array_equal(kept.pivot("damage").to_numpy(), again.pivot("damage").to_numpy())  # the same tensors, bit for bit
    L, K, B = len(kept.layers), len(kept.options), 3
    assert again.metadata["cost"]["quantizations"] == B * L * K
    assert again.metadata["cost"]["quantizations_reused"] == 0
    assert kept.metadata["cost"]["quantizations"] == L * K
    assert kept.metadata["cost"]["quantizations_reused"] == (B - 1) * L * K
    assert kept.metadata["cost"]["variant_cache_mb"] > 0


def test_the_bound_is_kept():
    """A bound that holds a few layers' variants: those are reused, the rest made again per batch."""
    full = _table()
    total = full.metadata["cost"]["variant_cache_mb"]
    part = _table(max_variant_mb=total / 3)
    assert 0 < part.metadata["cost"]["variant_cache_mb"] <= total / 3
    made = part.metadata["cost"]["quantizations"]
    assert full.metadata["cost"]["quantizations"] < made < 3 * full.metadata["cost"]["quantizations"]
    np.testing.assert_array_equal(part.pivot("damage").to_numpy(), full.pivot("damage").to_numpy())


def test_a_negative_bound_is_refused_in_one_line():
    with pytest.raises(MpsearchError, match="max_variant_mb"):
        _table(max_variant_mb=-1)

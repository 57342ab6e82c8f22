"""llama.cpp's KV cache types, bit for bit, on K/V activations llama.cpp computed for SmolLM2.

``tests/fixtures/llamacpp/kv_cache.npz`` (``experiments/kv_quant_fixtures.py``): the float32 K and V
rows a ``llama-server -ctk f32 -ctv f32`` saved for layers 0, 14 and 29, and for every cache type the
bytes llama.cpp's own CPU ``from_float`` writes for them after its Walsh-Hadamard rotation (checked in
the script against the bytes a ``llama-server -ctk T -ctv T`` saved for layer 0, also kept here).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mpsearch.errors import MpsearchError
from mpsearch.kvcache import (fake_quantize_kv, fwht, interleave_heads, kv_quantize, kv_to_bytes, rotation_sizes,
                              stored_rows)

FIX = np.load(Path(__file__).resolve().parent / "fixtures" / "llamacpp" / "kv_cache.npz")
META = json.loads(bytes(FIX["meta"]).decode())


@pytest.mark.parametrize("type_name", META["types"])
@pytest.mark.parametrize("which", ["k", "v"])
def test_stored_bytes_equal_llama_cpps(type_name, which):
    rot_k, rot_v = rotation_sizes(64, 64, type_name, type_name)
    rot = rot_k if which == "k" else rot_v
    assert rot == (0 if type_name in ("f16", "bf16") else 64)
    for li in META["layers"]:
        rows = torch.from_numpy(FIX[f"{which}_f32_l{li}"].copy())
        ours = stored_rows(rows, type_name, rot).numpy()
        assert np.array_equal(ours, FIX[f"{which}_{type_name}_l{li}"]), (type_name, which, li)
    served = FIX[f"{which}_{type_name}_server_l0"]  # what llama-server's own cache held
    assert np.array_equal(stored_rows(torch.from_numpy(FIX[f"{which}_f32_l0"].copy()), type_name, rot).numpy(), served)


def test_q8_0_in_the_cache_is_not_the_weights_rounding():
    """x86's SIMD q8_0 rounds half to even; llama-quantize's reference rounds half away from zero."""
    from mpsearch.formats.ggml import to_bytes

    x = torch.tensor([[127.0] + [i + 0.5 for i in range(1, 32)]])
    cache = kv_to_bytes(x, "q8_0")[0, 2:].view(torch.int8)
    weights = to_bytes("q8_0", x)[0, 2:].view(torch.int8)
    assert cache[:4].tolist() == [127, 2, 2, 4] and weights[:4].tolist() == [127, 2, 3, 4]
    assert kv_to_bytes(x, "q8_0", backend="cuda").equal(to_bytes("q8_0", x))


def test_fwht_is_an_orthonormal_involution():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 128, generator=g)
    assert torch.allclose(fwht(fwht(x, 64), 64), x, atol=1e-6)
    h = fwht(torch.eye(64), 64)
    assert torch.allclose(h @ h.T, torch.eye(64), atol=1e-6)


def test_fake_quantize_round_trips_layout_and_rotation():
    """fake_quantize_kv = llama.cpp's view of its cache: interleave, rotate, store, read, rotate back."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 7, 64, generator=g)  # [batch, kv heads, tokens, head dim]
    assert fake_quantize_kv(x, "f32", head_dim=64) is x
    f16 = fake_quantize_kv(x, "f16", head_dim=64, interleave=True)
    assert torch.equal(f16, x.half().float())
    q = fake_quantize_kv(x, "q8_0", head_dim=64, interleave=True, rotation=64)
    rows = interleave_heads(x.transpose(1, 2).reshape(14, 192), 64)
    want = fwht(kv_quantize(fwht(rows, 64), "q8_0"), 64)
    assert torch.equal(q.transpose(1, 2).reshape(14, 192), interleave_heads(want, 64, inverse=True))
    assert 0 < (q - x).abs().max() < 0.05 * x.abs().max()
    assert (fake_quantize_kv(x, "q4_0", head_dim=64, rotation=64) - x).abs().mean() > (q - x).abs().mean()


def test_rotation_sizes_follow_llama_cpp():
    assert rotation_sizes(128, 128, "q8_0", "q4_0") == (128, 64)
    assert rotation_sizes(192, 96, "q8_0", "q8_0") == (64, 0)
    assert rotation_sizes(64, 64, "f16", "q8_0") == (0, 64)


def test_bad_kv_types_are_refused():
    with pytest.raises(MpsearchError, match="unknown KV cache type 'q3_K'"):
        kv_quantize(torch.zeros(1, 32), "q3_K")
    with pytest.raises(MpsearchError, match="multiple of 32"):
        kv_quantize(torch.zeros(1, 30), "q8_0")
    with pytest.raises(MpsearchError, match="not reproduced"):
        kv_quantize(torch.zeros(1, 32), "iq4_nl", backend="cuda")

"""llama.cpp's KV cache types as fake quantizers: K and V exactly as llama.cpp stores them.

``llama-server -ctk T -ctv T`` stores each token's K row (``head_dim x n_head_kv`` values, after
RoPE) and V row of every layer in type T with ``ggml_set_rows``, which converts with the CPU
backend's ``from_float`` of T (``ggml/src/ggml-cpu/ggml-cpu.c``, ``type_traits_cpu``). That is the
reference rounding of :mod:`mpsearch.formats.ggml` (the one ``llama-quantize`` writes weights with)
for q4_0, q4_1, q5_0 and q5_1, but **not for q8_0 and iq4_nl**: the KV path's iq4_nl
(``quantize_row_iq4_nl_ref``) takes one least-squares scale without the weights' 7-step search
(``ntry = -1``) and keeps the first pass's levels; and for q8_0 the x86 build's ``quantize_row_q8_0``
(``ggml-cpu/arch/x86/quants.c``, AVX/AVX2 and up) multiplies by ``127 / amax`` and rounds half to
even (``_mm256_round_ps``), where the reference multiplies by ``1 / (amax / 127)`` and rounds half
away from zero (``roundf``); ARM's NEON version rounds half to even with the reference multiplier;
CUDA's ``set_rows`` kernel (``ggml-cuda/cpy-utils.cuh``) is the reference for q8_0 (its iq4_nl is
yet another variant, not reproduced: ``backend="cuda"`` refuses iq4_nl). ``backend`` picks one:
``"x86"`` (the default: the build these plans are checked with), ``"arm"``, ``"cuda"``. f16 and bf16
round to nearest even; f32 is exact. The tests compare :func:`kv_to_bytes` with llama.cpp's own
``from_float`` on K/V activations llama.cpp computed for SmolLM2, and with the bytes of its KV
cache saved from a running ``llama-server`` (``experiments/kv_quant_fixtures.py``).

**Rotation.** Before a *quantized* cache type stores K (or V), this llama.cpp rotates each chunk of a
head with an orthonormal Walsh-Hadamard matrix (``attn_rot_k``/``attn_rot_v`` in
``src/llama-kv-cache.cpp``, applied in ``llm_graph_context::build_attn`` with
``llama_mul_mat_hadamard``; Q is rotated the same way, and the attention output back, so the
result is ``H deq(Q(H k))``): K in chunks of the largest power of two from 64 that divides the head
size, V in chunks of 64, when the head size is a multiple of 64 (``LLAMA_ATTN_ROT_DISABLE=1``
turns it off). The CPU computes the rotation as a fast Walsh-Hadamard transform
(``ggml_compute_forward_fwht``: scale by ``1/sqrtf(n)``, then butterflies): :func:`fwht` redoes it
in float32 to the bit. f16/bf16 caches are not rotated.

Layout: llama.cpp's blocks of 32 run along each token's row. For architectures whose converter
permutes Q/K for GGML's adjacent-pair RoPE (``llama``: ``convert_hf_to_gguf.py`` LlamaModel.permute),
a head's K values are stored interleaved (``[k0, k32, k1, k33, ...]`` for head size 64), so a block
mixes both halves of the Hugging Face layout: :func:`fake_quantize_kv` permutes first (``interleave``).
"""

from __future__ import annotations

from .errors import close_matches, MpsearchError
from .formats.ggml import (_first_absmax, _fp16, _full, _half_bytes, _iq4nl_lookup, _iq4nl_tables, _q4_0_pack,
                           _recip_or_zero, _seqsum_t, FORMATS, GROUP_MAX_EPS, IQ4NL_VALUES)

#: the KV cache types llama.cpp offers (``-ctk``/``-ctv``), nominal bits per value for plans
KV_CACHE_TYPES = {"f32": 32, "f16": 16, "bf16": 16, "q8_0": 8, "q5_1": 5, "q5_0": 5, "q4_1": 4, "iq4_nl": 4,
                  "q4_0": 4}
BACKENDS = ("x86", "arm", "cuda")
#: architectures whose converter permutes Q/K rows for GGML's adjacent-pair RoPE (LlamaModel.permute)
INTERLEAVED_ROPE = ("llama",)


def rotation_sizes(head_dim_k: int, head_dim_v: int, type_k: str, type_v: str) -> tuple[int, int]:
    """The Hadamard chunk sizes llama.cpp rotates K and V with before storing them (0: none)."""
    import os

    if os.environ.get("LLAMA_ATTN_ROT_DISABLE", "0") not in ("", "0"):
        return 0, 0
    quantized = {t for t in KV_CACHE_TYPES if t not in ("f32", "f16", "bf16")}
    nk = 0
    if type_k in quantized and head_dim_k % 64 == 0:
        nk = 64
        while head_dim_k % (nk * 2) == 0:
            nk *= 2
    nv = 64 if type_v in quantized and head_dim_v % 64 == 0 else 0
    return nk, nv


def fwht(rows, n: int):
    """ggml's CPU fast Walsh-Hadamard transform of each chunk of ``n`` values (last axis), in float32
    as ``ggml_compute_forward_fwht`` computes it: ``x * (1 / sqrtf(n))``, then butterflies
    ``(u + v, u - v)`` with spans 1, 2, 4, ... It is its own inverse (up to rounding)."""
    import numpy as np
    import torch

    scale = float(np.float32(1.0) / np.sqrt(np.float32(n), dtype=np.float32))
    shape = rows.shape
    y = rows.to(torch.float32).reshape(-1, n) * scale
    span = 1
    while span < n:
        y = y.reshape(-1, n // (2 * span), 2, span)
        u, v = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack([u + v, u - v], dim=2)
        span *= 2
    return y.reshape(shape)


def _check(type_name: str, backend: str) -> None:
    if type_name not in KV_CACHE_TYPES:
        raise MpsearchError(f"unknown KV cache type {type_name!r}{close_matches(type_name, KV_CACHE_TYPES)}; "
                            f"llama.cpp offers {', '.join(KV_CACHE_TYPES)}")
    if backend not in BACKENDS:
        raise MpsearchError(f"unknown KV backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if backend == "cuda" and type_name == "iq4_nl":
        raise MpsearchError("CUDA's iq4_nl KV rounding is not reproduced; use q4_0/q5_0/q8_0 on a GPU")


def _q8_0_simd(x, backend: str):
    """q8_0 as the x86 (``127 / amax``, half to even) or ARM (``1 / d``, half to even) CPU code."""
    import torch

    amax = x.abs().amax(dim=1)
    d = amax / _full(amax, 127)
    if backend == "x86":
        id_ = torch.where(amax != 0, _full(amax, 127) / amax, torch.zeros_like(amax))
    else:
        id_ = _recip_or_zero(d)
    q = torch.round(x * id_[:, None]).to(torch.int32)  # torch.round: half to even
    return _fp16(d), q.clamp(-128, 127)


def _iq4_nl_kv(x):
    """``quantize_row_iq4_nl_ref``: ``quantize_row_iq4_nl_impl(32, 32, ..., ntry = -1)``: levels at
    ``1 / (max / -127)``, then the least-squares scale of those levels (no search)."""
    import torch

    idx_table, level_table = _iq4nl_tables(x.device)
    mx, amax = _first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    xt = x.t().contiguous()
    w = xt * xt
    d0 = mx / _full(mx, IQ4NL_VALUES[0])
    id0 = torch.ones_like(d0) / d0
    q = _iq4nl_lookup(xt * id0, level_table)
    wq = w * q
    sumqx, sumq2 = _seqsum_t(wq * xt), _seqsum_t(wq * q)
    d = torch.where(sumq2 > 0, sumqx / sumq2, torch.zeros_like(sumqx))
    d = torch.where(zero, torch.zeros_like(d), d)
    idx = _iq4nl_lookup(x * id0[:, None], idx_table)
    idx = torch.where(zero[:, None], torch.zeros_like(idx), idx)
    return {"d": _fp16(d), "q": idx}


def _rows(x):
    import torch

    if not isinstance(x, torch.Tensor) or x.ndim < 1 or x.shape[-1] % 32:
        raise MpsearchError("KV rows must be a tensor whose last axis is a multiple of 32 values")
    return x.detach().to(torch.float32).reshape(-1, 32)


def kv_quantize(rows, type_name: str, backend: str = "x86"):
    """The values llama.cpp reads back from rows (last axis: a token's K or V row, in llama.cpp's
    element order) stored as ``type_name``."""
    import torch

    _check(type_name, backend)
    if type_name == "f32":
        return rows.to(torch.float32)
    if type_name == "f16":
        return rows.to(torch.float32).to(torch.float16).to(torch.float32)
    if type_name == "bf16":
        return rows.to(torch.float32).to(torch.bfloat16).to(torch.float32)
    x = _rows(rows)
    if type_name == "q8_0" and backend != "cuda":
        d, q = _q8_0_simd(x, backend)
        out = q.float() * d.float()[:, None]
    elif type_name == "iq4_nl" and backend != "cuda":
        f = _iq4_nl_kv(x)
        values = torch.tensor(IQ4NL_VALUES, dtype=torch.float32, device=x.device)
        out = f["d"].float()[:, None] * values[f["q"].long()]
    else:
        out = FORMATS[type_name].quantize(x)
    return out.reshape(rows.shape)


def kv_to_bytes(rows, type_name: str, backend: str = "x86"):
    """The bytes llama.cpp's cache holds for ``rows`` (``[n, row]`` -> uint8 ``[n, row bytes]``)."""
    import torch

    _check(type_name, backend)
    n = rows.shape[0]
    if type_name in ("f32", "f16", "bf16"):
        dt = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[type_name]
        return rows.to(torch.float32).to(dt).contiguous().view(torch.uint8).reshape(n, -1)
    x = _rows(rows)
    if type_name == "q8_0" and backend != "cuda":
        d, q = _q8_0_simd(x, backend)
        blocks = torch.cat([_half_bytes(d), q.to(torch.int8).view(torch.uint8)], dim=1)
        return blocks.reshape(n, -1)
    if type_name == "iq4_nl" and backend != "cuda":
        return _q4_0_pack(_iq4_nl_kv(x)).reshape(n, -1)
    return FORMATS[type_name].to_bytes(x).reshape(n, -1)


def interleave_heads(rows, head_dim: int, inverse: bool = False):
    """Hugging Face's rotate-half head layout -> llama.cpp's interleaved one (``inverse``: back)."""
    shape = rows.shape
    h = rows.reshape(*shape[:-1], shape[-1] // head_dim, head_dim)
    if inverse:
        h = h.reshape(*h.shape[:-1], head_dim // 2, 2).transpose(-1, -2)
    else:
        h = h.reshape(*h.shape[:-1], 2, head_dim // 2).transpose(-1, -2)
    return h.reshape(shape)


def stored_rows(rows, type_name: str, rotation: int = 0, backend: str = "x86"):
    """The bytes llama.cpp stores for rows in its element order: rotated first when ``rotation``."""
    return kv_to_bytes(fwht(rows, rotation) if rotation else rows, type_name, backend)


def fake_quantize_kv(x, type_name: str, *, head_dim: int, interleave: bool = False, rotation: int = 0,
                     backend: str = "x86"):
    """K or V activations of a transformers attention layer (``[batch, n_head_kv, seq, head_dim]``)
    as llama.cpp's attention sees them: each token's row of all KV heads in llama.cpp's element
    order (``interleave`` for the K of an interleaved-RoPE architecture), rotated by the Hadamard
    chunks of ``rotation`` values (see :func:`rotation_sizes`), stored as ``type_name``, read back and
    rotated back (llama.cpp rotates the query, or the output, to the same effect)."""
    if type_name in ("f32",):
        return x
    b, h, t, d = x.shape
    rows = x.transpose(1, 2).reshape(b * t, h * d)
    if interleave:
        rows = interleave_heads(rows, head_dim)
    if rotation:
        rows = fwht(rows, rotation)
    q = kv_quantize(rows, type_name, backend)
    if rotation:
        q = fwht(q, rotation)
    if interleave:
        q = interleave_heads(q, head_dim, inverse=True)
    return q.reshape(b, t, h, d).transpose(1, 2).to(x.dtype)


# ----------------------------------------------------------------------------- damage
def _cache_class(config, types: tuple[str, str], *, interleave: bool, backend: str):
    """A transformers DynamicCache that stores K and V as llama.cpp would (fake-quantized on store:
    the attention reads back the stored values of every token, the new ones included)."""
    from transformers import DynamicCache

    type_k, type_v = types
    n_head = int(getattr(config, "num_attention_heads"))
    head = int(getattr(config, "head_dim", None) or config.hidden_size // n_head)
    rot_k, rot_v = rotation_sizes(head, head, type_k, type_v)

    class LlamaCppCache(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            k = fake_quantize_kv(key_states, type_k, head_dim=head, interleave=interleave, rotation=rot_k,
                                 backend=backend)
            v = fake_quantize_kv(value_states, type_v, head_dim=head, rotation=rot_v, backend=backend)
            return super().update(k, v, layer_idx, *args, **kwargs)

    return LlamaCppCache


def measure_kv_damage(model, batches, types=("f16", "q8_0", "q5_0", "q4_0"), *, arch: str = "llama",
                      metric: str = "kl", backend: str = "x86", progress: bool = False) -> dict:
    """The damage of each KV cache type for K and for V (the other kept in float), measured as the
    output-distance estimator measures a layer: the mean ``metric`` (KL of the next-token
    distribution by default) of the model's output with that cache to its full-precision output,
    over ``batches`` (token tensors or dicts with ``input_ids``).

    Returns ``{"k": {type: damage}, "v": {...}, "metric": metric, "backend": backend, "tokens": n}``."""
    import torch

    from .data import move_batch  # start-up: keeps this module free of torch/numpy
    from .sensitivity.base import progress_bar  # start-up: keeps this module free of torch/pandas/numpy
    from .sensitivity.losses import distance  # start-up: keeps this module free of torch/pandas/numpy

    for t in types:
        _check(t, backend)
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "num_attention_heads"):
        raise MpsearchError("KV cache damage needs a transformers causal LM (its attention uses a Cache)")
    device = next(model.parameters()).device
    interleave = arch in INTERLEAVED_ROPE
    feeds = []
    for b in batches:
        b = move_batch(b, device)
        feeds.append(dict(b) if isinstance(b, dict) else {"input_ids": b})
    was = model.training
    model.eval()
    out = {"k": {}, "v": {}, "metric": metric, "backend": backend,
           "tokens": int(sum(f["input_ids"].numel() for f in feeds))}
    jobs = [("k", t) for t in types] + [("v", t) for t in types]
    import inspect

    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    try:
        with torch.no_grad():
            refs = [model(**f, use_cache=False).logits.float() for f in feeds]
            for which, t in progress_bar(jobs, enabled=progress, desc="kv cache"):
                pair = (t, "f32") if which == "k" else ("f32", t)
                cls = _cache_class(config, pair, interleave=interleave, backend=backend)
                d = [distance(model(**f, **{cache_kw: cls(config=config)}, use_cache=True).logits.float(), r,
                              metric, "logits") for f, r in zip(feeds, refs)]
                out[which][t] = float(sum(d) / max(len(d), 1))
    finally:
        model.train(was)
    return out

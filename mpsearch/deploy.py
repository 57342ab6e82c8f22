"""Plan for the machine the model will run on: llama.cpp's memory, part by part.

``--fit gpu=24GiB,ctx=32768`` or ``--fit gpu=16GiB,ram=64GiB,ctx=8192,parallel=2``: the budget is the
machine. What ``llama-server`` (the llama.cpp vendored in llama-cpp-python 0.3.36) allocates for a
model, as its own code decides it:

- **weights**: every tensor at its type (the plan's, or the base mix's for unplanned tensors:
  :mod:`mpsearch.filesize`), exact; placed by ``-ngl`` and ``--override-tensor``
  (``src/llama-model.cpp``: blocks ``il >= n_layer + 1 - ngl`` and then the output layer go to the
  GPU, the token embedding always stays on the CPU, and a tied output layer is a second copy of
  ``token_embd`` on the output layer's device);
- **KV cache** (``src/llama-kv-cache.cpp``, ``llama-kv-cache-iswa.cpp``, ``llama-context.cpp``): the
  context is padded to 256 cells; with ``-np P`` slots and no unified cache each slot holds
  ``pad(ctx / P, 256)`` cells in its own stream; each layer stores K rows of ``head_dim_k x
  n_head_kv`` and V rows of ``head_dim_v x n_head_kv`` per cell in the cache types (``ggml_row_size``:
  q8_0 is 34 bytes per 32 values...); sliding-window layers hold
  ``pad(min(cells, n_swa * (unified ? P : 1) + n_ubatch), 256)`` cells; MLA models (DeepSeek) store
  one compressed K row and no V; each layer's cache lives on its layer's device;
- **output buffer** (``llama_context::output_reserve``): ``n_vocab x P`` float32 logits, in host memory;
- **compute buffer** (``sched_reserve``): *measured*, not derived: llama.cpp sizes it by
  allocating its worst-case graph (a ubatch of 512 tokens); its log lines on one model per
  family (SmolLM2 for ``llama``, a Qwen3-MoE, a Gemma3, a dense Qwen3) fit ``n_ubatch x 4 x
  (a x n_embd + 3 x n_ff_active)`` bytes plus the f16 attention masks (``n_ubatch x 2`` bytes per
  cell of each cache) to the logged 0.04 MiB with flash attention and an f16 cache; ``a`` is 4 for
  ``llama`` and ``qwen3moe``, 3 for ``gemma3`` and ``qwen3``. Other families use ``a = 4`` (at most
  15% high on the four measured ones) and are labelled *estimated*; so is flash attention off.

Throughput (placement decisions) is an *estimate*: one generated token reads every active weight
and the KV cache once, at the GPU's and the CPU's memory bandwidth.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

from .errors import MpsearchError, close_matches

#: llama.cpp's KV cache types (``-ctk``/``-ctv``): (values per block, bytes per block)
KV_TYPES: dict[str, tuple[int, int]] = {
    "f32": (1, 4), "f16": (1, 2), "bf16": (1, 2), "q8_0": (32, 34), "q4_0": (32, 18), "q4_1": (32, 20),
    "iq4_nl": (32, 18), "q5_0": (32, 22), "q5_1": (32, 24),
}
#: the compute buffer's per-token activation widths, measured per family (see the module docstring)
COMPUTE_EMBD_FACTOR = {"llama": 4, "qwen3moe": 4, "gemma3": 3, "qwen3": 3}
_DEFAULT_EMBD_FACTOR = 4
#: llama.cpp's default sliding-window layer patterns (``load_swa_pattern``): every n-th layer is global
_SWA_PATTERN = {"gemma2": 2, "gemma3": 6, "gpt-oss": 2, "cohere2": 4}
#: the CPU backend's tensor alignment inside a buffer (``TENSOR_ALIGNMENT``)
_ALIGN = 32
#: the types a CPU build of llama.cpp repacks into a second, interleaved copy (the ``CPU_REPACK``
#: buffer; ``ggml_repack_get_optimal_repack_type`` in ggml-cpu/repack.cpp), by CPU: a weight of such a
#: type whose rows (ggml ``ne[1]``) are a multiple of 8 and that feeds a matrix multiplication (not
#: the token embedding's row lookup) is held twice, in the mapped file and in the repacked copy.
#: ``avx512`` is AVX2's list plus q2_K; ``none`` is a build or run without repacking (``--no-repack``).
#: ARM (NEON dotprod/i8mm) repacks more types (q5_K, q6_K, q8_0) and is not modelled.
REPACK = {"avx2": ("q4_0", "q4_K", "iq4_nl", "mxfp4"), "avx512": ("q4_0", "q4_K", "iq4_nl", "mxfp4", "q2_K"),
          "none": ()}


def repacked(name: str, type_name: str | None, rows: int | None, repack: str = "avx512") -> bool:
    """Whether a CPU-resident tensor is also copied into llama.cpp's ``CPU_REPACK`` buffer."""
    if repack not in REPACK:
        raise MpsearchError(f"unknown CPU {repack!r} for llama.cpp's weight repacking; use {', '.join(REPACK)}")
    if type_name is None or rows is None:
        return False
    return type_name in REPACK[repack] and rows % 8 == 0 and name != "token_embd.weight"


def kv_row_bytes(type_name: str, n: int) -> int:
    """``ggml_row_size``: bytes of ``n`` values in a KV cache type."""
    if type_name not in KV_TYPES:
        raise MpsearchError(f"unknown KV cache type {type_name!r}{close_matches(type_name, KV_TYPES)}; "
                            f"llama.cpp's -ctk/-ctv take {', '.join(KV_TYPES)}")
    block, size = KV_TYPES[type_name]
    if n % block:
        raise MpsearchError(f"a KV row of {n} values cannot be stored as {type_name} (blocks of {block})")
    return n // block * size


def _pad(n: int, m: int) -> int:
    return -(-int(n) // m) * m


@dataclass
class ArchInfo:
    """What llama.cpp's KV cache and buffers depend on, per layer where it varies."""

    arch: str
    n_layer: int
    n_embd: int
    n_vocab: int
    n_head: list
    n_head_kv: list
    head_k: list
    head_v: list
    swa: list = field(default_factory=list)
    n_swa: int = 0
    mla: bool = False
    n_ff: int = 0
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0
    n_ff_shexp: int = 0
    n_ctx_train: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d) -> ArchInfo:
        if not isinstance(d, dict):
            raise MpsearchError("the table's deployment info (metadata 'deploy') must be an object; re-estimate")
        try:
            a = cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
            n = int(a.n_layer)
            if n < 1 or any(len(v) != n for v in (a.n_head_kv, a.head_k, a.head_v)) or (a.swa and len(a.swa) != n):
                raise ValueError("per-layer lists must have n_layer entries")
            for v in (a.n_head_kv, a.head_k, a.head_v):
                if any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in v):
                    raise ValueError("per-layer sizes must be integers >= 0")
            for k in ("n_embd", "n_vocab", "n_swa", "n_ff", "n_expert", "n_expert_used", "n_ff_exp", "n_ff_shexp"):
                if isinstance(getattr(a, k), bool) or not isinstance(getattr(a, k), int) or getattr(a, k) < 0:
                    raise ValueError(f"{k} must be an integer >= 0")
        except (TypeError, ValueError, KeyError) as exc:
            raise MpsearchError(f"the table's deployment info (metadata 'deploy') is malformed ({exc}); "
                                f"re-estimate the table") from None
        return a

    # ------------------------------------------------------------------ sources
    @classmethod
    def from_gguf(cls, info: dict) -> ArchInfo:
        """From :func:`mpsearch.filesize.read_gguf` (its ``kv`` and ``tensors``)."""
        kv, arch = info["kv"], info["arch"]

        def val(key, default=None):
            return kv.get(f"{arch}.{key}", default)

        n_layer = int(val("block_count", 1))

        def per_layer(v, default):
            if v is None:
                v = default
            return [int(x) for x in v] if isinstance(v, list) else [int(v)] * n_layer

        n_embd = int(val("embedding_length", 0))
        n_head = per_layer(val("attention.head_count"), 1)
        n_head_kv = per_layer(val("attention.head_count_kv"), n_head)
        hk = int(val("attention.key_length", n_embd // max(n_head[0], 1)))
        hv = int(val("attention.value_length", hk))
        n_swa = int(val("attention.sliding_window", 0) or 0)
        swa = [False] * n_layer
        pattern = val("attention.sliding_window_pattern")
        if isinstance(pattern, list):
            swa = [bool(x) for x in pattern][:n_layer]
        elif n_swa > 0 and (pattern is not None or arch in _SWA_PATTERN):
            p = int(pattern if pattern is not None else _SWA_PATTERN[arch])
            swa = [p == 0 or (il % p < p - 1) for il in range(n_layer)]
        hk_swa = int(val("attention.key_length_swa", hk))
        hv_swa = int(val("attention.value_length_swa", hv))
        shapes = {n: s for n, s, _ in info["tensors"]}
        n_vocab = int(val("vocab_size", 0) or (len(kv.get("tokenizer.ggml.tokens") or []) or 0))
        if not n_vocab and "token_embd.weight" in shapes:
            n_vocab = int(shapes["token_embd.weight"][0])
        return cls(
            arch=arch, n_layer=n_layer, n_embd=n_embd, n_vocab=n_vocab, n_head=n_head, n_head_kv=n_head_kv,
            head_k=[hk_swa if s else hk for s in swa], head_v=[hv_swa if s else hv for s in swa], swa=swa,
            n_swa=n_swa if any(swa) else 0, mla=f"{arch}.attention.key_length_mla" in kv,
            n_ff=int(max(per_layer(val("feed_forward_length"), 0))), n_expert=int(val("expert_count", 0) or 0),
            n_expert_used=int(val("expert_used_count", 0) or 0),
            n_ff_exp=int(val("expert_feed_forward_length", 0) or 0),
            n_ff_shexp=int(val("expert_shared_feed_forward_length", 0) or 0),
            n_ctx_train=int(val("context_length", 0) or 0))

    @classmethod
    def from_config(cls, config, arch: str) -> ArchInfo:
        """From a transformers config, as ``convert_hf_to_gguf.py`` would describe the model."""
        g = getattr
        n_layer = int(g(config, "num_hidden_layers"))
        n_embd = int(g(config, "hidden_size"))
        n_head = int(g(config, "num_attention_heads"))
        n_kv = int(g(config, "num_key_value_heads", None) or n_head)
        kv_lora = g(config, "kv_lora_rank", None)
        if kv_lora:  # MLA: one compressed K row (kv_lora_rank + rope dims), no V
            hk, hv, n_kv, mla = int(kv_lora) + int(g(config, "qk_rope_head_dim", 64)), 0, 1, True
        else:
            hk = int(g(config, "head_dim", None) or n_embd // n_head)
            hv, mla = hk, False
        types = g(config, "layer_types", None)
        n_swa = int(g(config, "sliding_window", None) or 0)
        if types:
            swa = [t in ("sliding_attention", "chunked_attention") for t in types][:n_layer]
        elif n_swa and arch in _SWA_PATTERN:
            p = _SWA_PATTERN[arch]
            swa = [il % p < p - 1 for il in range(n_layer)]
        else:
            swa = [False] * n_layer
        n_expert = int(g(config, "num_experts", None) or g(config, "num_local_experts", None) or 0)
        return cls(arch=arch, n_layer=n_layer, n_embd=n_embd, n_vocab=int(g(config, "vocab_size")),
                   n_head=[n_head] * n_layer, n_head_kv=[n_kv] * n_layer, head_k=[hk] * n_layer,
                   head_v=[hv] * n_layer, swa=swa, n_swa=n_swa if any(swa) else 0, mla=mla,
                   n_ff=int(g(config, "intermediate_size", 0) or 0), n_expert=n_expert,
                   n_expert_used=int(g(config, "num_experts_per_tok", 0) or 0) if n_expert else 0,
                   n_ff_exp=int(g(config, "moe_intermediate_size", 0) or 0) if n_expert else 0,
                   n_ff_shexp=int(g(config, "shared_expert_intermediate_size", 0) or 0),
                   n_ctx_train=int(g(config, "max_position_embeddings", 0) or 0))


# ----------------------------------------------------------------------------- serving settings
@dataclass
class Serving:
    """The ``llama-server`` settings a plan is made for (``ctx`` per sequence)."""

    ctx: int
    parallel: int = 1
    type_k: str = "f16"
    type_v: str = "f16"
    n_ubatch: int = 512
    unified: bool = False
    flash_attn: bool = True

    def __post_init__(self):
        for name in ("ctx", "parallel", "n_ubatch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise MpsearchError(f"{name} must be a positive integer, got {v!r}")
        for t in (self.type_k, self.type_v):
            kv_row_bytes(t, 0)
        if self.type_v not in ("f32", "f16", "bf16") and not self.flash_attn:
            raise MpsearchError(f"a quantized V cache ({self.type_v}) needs flash attention (-fa on)")

    @property
    def n_ctx(self) -> int:
        """``-c``: the total context llama-server is given (each slot gets ``ctx``)."""
        return self.ctx * self.parallel


def kv_cells(arch: ArchInfo, s: Serving) -> tuple[int, int, int]:
    """``(cells of a full-attention layer, cells of a sliding-window layer, streams)``."""
    n_ctx = _pad(s.n_ctx, 256)
    if s.unified:
        cells, streams = n_ctx, 1
    else:
        cells, streams = _pad(n_ctx // s.parallel, 256), s.parallel
    swa_cells = cells
    if any(arch.swa):
        swa_cells = _pad(min(cells, arch.n_swa * (s.parallel if s.unified else 1) + s.n_ubatch), 256)
    return cells, swa_cells, streams


def kv_cache_bytes(arch: ArchInfo, s: Serving) -> list[dict]:
    """Per layer: ``{"layer", "cells", "k", "v"}`` bytes, as llama.cpp allocates them."""
    cells, swa_cells, streams = kv_cells(arch, s)
    out = []
    for il in range(arch.n_layer):
        n = swa_cells if (arch.swa and arch.swa[il]) else cells
        k = kv_row_bytes(s.type_k, arch.head_k[il] * arch.n_head_kv[il]) * n * streams
        v = 0 if arch.mla else kv_row_bytes(s.type_v, arch.head_v[il] * arch.n_head_kv[il]) * n * streams
        out.append({"layer": il, "cells": n, "k": _pad(k, _ALIGN), "v": _pad(v, _ALIGN)})
    return out


def output_buffer_bytes(arch: ArchInfo, s: Serving) -> int:
    """``output_reserve(n_seq_max)``: float32 logits for one token per slot (host memory)."""
    return arch.n_vocab * 4 * s.parallel


def compute_buffer_bytes(arch: ArchInfo, s: Serving) -> tuple[int, str]:
    """The compute buffer (measured per family, see the module docstring) and how it is known."""
    a = COMPUTE_EMBD_FACTOR.get(arch.arch)
    how = f"measured on the {arch.arch} family" if a is not None else "estimated (family not measured)"
    a = a if a is not None else _DEFAULT_EMBD_FACTOR
    ff = arch.n_expert_used * arch.n_ff_exp + arch.n_ff_shexp if arch.n_expert else arch.n_ff
    act = s.n_ubatch * 4 * (a * arch.n_embd + 3 * ff)
    cells, swa_cells, _ = kv_cells(arch, s)
    masks = s.n_ubatch * 2 * (cells + (swa_cells if any(arch.swa) else 0))
    if not s.flash_attn:  # the KQ matrix (float32, all heads) of the largest cache as well: estimated
        how = "estimated (flash attention off)"
        masks += s.n_ubatch * 4 * max(arch.n_head) * cells
    return act + masks + 16384, how


# ----------------------------------------------------------------------------- placement
def tensor_layer(name: str, n_layer: int) -> int:
    """The llama.cpp layer a GGUF tensor is loaded for: its block, ``n_layer`` for the output layer,
    -1 for the input (token embedding)."""
    m = re.match(r"blk\.(\d+)\.", name)
    if m:
        return int(m.group(1))
    if name.startswith(("output", "output_norm")):
        return n_layer
    return -1


@dataclass
class Placement:
    """``-ngl`` and ``--override-tensor`` (regex -> CPU) as llama.cpp applies them."""

    ngl: int
    cpu_regex: str = ""
    label: str = ""

    def on_gpu(self, name: str, n_layer: int) -> bool:
        if self.cpu_regex and re.search(self.cpu_regex, name):
            return False
        il = tensor_layer(name, n_layer)
        return il >= 0 and il >= max(n_layer + 1 - self.ngl, 0)

    def layer_on_gpu(self, il: int, n_layer: int) -> bool:
        return il >= max(n_layer + 1 - self.ngl, 0)

    def flags(self) -> list[str]:
        out = ["-ngl", str(self.ngl)]
        if self.cpu_regex:
            out += ["--override-tensor", f"{self.cpu_regex}=CPU"]
        return out


#: the usual MoE layout: routed experts in RAM, the rest on the GPU
EXPERTS_ON_CPU = r"\.ffn_(up|down|gate|gate_up)_exps\."


@dataclass
class Memory:
    """Bytes by part and device for one plan, machine and placement."""

    gpu: dict = field(default_factory=dict)
    ram: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    @property
    def gpu_total(self) -> int:
        return int(sum(self.gpu.values()))

    @property
    def ram_total(self) -> int:
        return int(sum(self.ram.values()))


def memory(arch: ArchInfo, tensor_bytes: dict, s: Serving, placement: Placement | None,
           *, tied: bool = False, tensor_types: dict | None = None, rows: dict | None = None,
           repack: str = "avx512") -> Memory:
    """What llama-server allocates for ``tensor_bytes`` (GGUF tensor -> bytes at its type).

    ``placement`` ``None``: a CPU-only machine (everything in RAM). Weights are counted as the CPU
    mmaps them (the file's tensor data, the upper end of its mapped span) and as a GPU copies them;
    CPU-resident tensors the CPU ``repack`` repacks (:data:`REPACK`; only when ``tensor_types`` and
    ``rows`` are given) count twice, as llama.cpp's ``CPU_Mapped`` and ``CPU_REPACK`` buffer lines do."""
    m = Memory()
    gpu = placement is not None and placement.ngl > 0
    types, nrows = tensor_types or {}, rows or {}
    for name, n in tensor_bytes.items():
        on = gpu and placement.on_gpu(name, arch.n_layer)
        part = "weights"
        (m.gpu if on else m.ram)[part] = (m.gpu if on else m.ram).get(part, 0) + _pad(n, _ALIGN)
        if not on and repacked(name, types.get(name), nrows.get(name), repack):
            m.ram["repacked"] = m.ram.get("repacked", 0) + _pad(n, _ALIGN)
    if tied and gpu and placement.layer_on_gpu(arch.n_layer, arch.n_layer) and "token_embd.weight" in tensor_bytes:
        m.gpu["weights"] = m.gpu.get("weights", 0) + _pad(tensor_bytes["token_embd.weight"], _ALIGN)
        m.notes.append("tied embeddings: token_embd is also copied to the GPU as the output layer")
    for row in kv_cache_bytes(arch, s):
        on = gpu and placement.layer_on_gpu(row["layer"], arch.n_layer)
        (m.gpu if on else m.ram)["kv_cache"] = (m.gpu if on else m.ram).get("kv_cache", 0) + row["k"] + row["v"]
    comp, how = compute_buffer_bytes(arch, s)
    (m.gpu if gpu else m.ram)["compute"] = comp
    m.notes.append(f"compute buffer {how}")
    if gpu and (placement.ngl < arch.n_layer + 1 or placement.cpu_regex):
        # the CPU part of a split graph gets a host compute buffer: estimated as one layer's activations
        m.ram["compute"] = s.n_ubatch * 4 * 4 * arch.n_embd
        m.notes.append("host compute buffer of a split graph: estimated")
    m.ram["output"] = output_buffer_bytes(arch, s)
    return m


def tokens_per_second(arch: ArchInfo, tensor_bytes: dict, s: Serving, placement: Placement | None,
                      gpu_bw: float, ram_bw: float) -> float:
    """Estimated decode speed of one sequence: each token reads the active weights (routed experts
    in proportion ``n_expert_used / n_expert``) and its KV cache once, at each device's bandwidth."""
    t = 0.0
    gpu = placement is not None and placement.ngl > 0
    share = arch.n_expert_used / arch.n_expert if arch.n_expert else 1.0
    for name, n in tensor_bytes.items():
        if name == "token_embd.weight":  # one row per token
            continue
        frac = share if "_exps." in name else 1.0
        on = gpu and placement.on_gpu(name, arch.n_layer)
        t += n * frac / (gpu_bw if on else ram_bw)
    for row in kv_cache_bytes(arch, s):
        on = gpu and placement.layer_on_gpu(row["layer"], arch.n_layer)
        t += (row["k"] + row["v"]) / max(s.parallel, 1) / (gpu_bw if on else ram_bw)
    return 1.0 / t if t > 0 else math.inf

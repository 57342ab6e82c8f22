"""llama.cpp's built-in quantization mixes (``llama-quantize MODEL OUT Q4_K_M``) as per-tensor types.

A pure-Python re-implementation of the per-tensor type choice of the llama.cpp vendored in
``llama-cpp-python`` 0.3.36 (llama.cpp commit 0c1e570, ``src/llama-quant.cpp``):

- ``tensor_allows_quantization``  -> :func:`allows_quantization`
- ``tensor_get_category``          -> :func:`tensor_category`
- ``init_quantize_state_counters`` -> the ``n_attention_wv`` / ``n_ffn_*`` / tied-embedding counts
- ``llama_tensor_get_type``        -> :func:`mix_types` (manual ``--tensor-type`` overrides,
  ``--token-embedding-type``, ``--output-tensor-type``, ``--pure`` included)
- ``llama_tensor_get_type_impl``   -> :func:`_get_type_impl` (the mixes; its state counters
  ``i_attention_wv``, ``i_ffn_down``... advance in llama.cpp's tensor order, see :func:`tensor_order`)
- ``tensor_type_fallback``         -> :func:`_fallback` (K-quants on a column count that is not a
  multiple of 256: q2_K/q3_K -> q4_0, q4_K -> q5_0, q5_K -> q5_1, q6_K -> q8_0; f16 last)
- ``llama_ftype_get_default_type`` -> :data:`FTYPE_DEFAULT_TYPE`

Types are named as llama.cpp's ``ggml_type_name`` names them (``q4_K``, ``q8_0``, ``f16``...), the
spelling ``--tensor-type-file`` takes. Shapes are given in torch/numpy order, ``(rows, columns)``
(``(n_expert, rows, columns)`` for stacked experts): llama.cpp's ``ne[0]`` is the *last* entry.
The tests compare :func:`mix_types` with the types the real ``llama-quantize`` wrote
(``experiments/llamacpp_fixtures.py`` makes the fixtures).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from mpsearch.errors import MpsearchError, close_matches, name_list
from mpsearch.formats.ggml import FALLBACK as GGML_FALLBACK
from mpsearch.formats.ggml_iq import FALLBACK as IQ_FALLBACK

#: ggml type name -> (elements per block, bytes per block), as ggml's type traits (ggml/src/ggml.c).
GGML_TYPES: dict[str, tuple[int, int]] = {
    "f32": (1, 4), "f16": (1, 2), "bf16": (1, 2),
    "q4_0": (32, 18), "q4_1": (32, 20), "q5_0": (32, 22), "q5_1": (32, 24), "q8_0": (32, 34),
    "q2_K": (256, 84), "q3_K": (256, 110), "q4_K": (256, 144), "q5_K": (256, 176),
    "q6_K": (256, 210),
    "iq2_xxs": (256, 66), "iq2_xs": (256, 74), "iq2_s": (256, 82), "iq3_xxs": (256, 98),
    "iq3_s": (256, 110), "iq1_s": (256, 50), "iq1_m": (256, 56), "iq4_nl": (32, 18),
    "iq4_xs": (256, 136), "tq1_0": (256, 54), "tq2_0": (256, 66), "mxfp4": (32, 17),
    "q1_0": (128, 18), "q2_0": (64, 18),
}

_FLOAT_TYPES = ("f32", "f16", "bf16")

#: llama-quantize's ftype name -> the default tensor type (``llama_ftype_get_default_type``).
#: Q3_K, Q4_K, Q5_K are llama-quantize's aliases for the _M mixes.
FTYPE_DEFAULT_TYPE: dict[str, str] = {
    "Q4_0": "q4_0", "Q4_1": "q4_1", "Q5_0": "q5_0", "Q5_1": "q5_1", "Q8_0": "q8_0",
    "F16": "f16", "BF16": "bf16", "F32": "f32", "Q1_0": "q1_0", "Q2_0": "q2_0",
    "MXFP4_MOE": "mxfp4",
    "Q2_K_S": "q2_K", "Q2_K": "q2_K", "IQ3_XS": "iq3_s",
    "Q3_K_S": "q3_K", "Q3_K_M": "q3_K", "Q3_K_L": "q3_K",
    "Q4_K_S": "q4_K", "Q4_K_M": "q4_K", "Q5_K_S": "q5_K", "Q5_K_M": "q5_K", "Q6_K": "q6_K",
    "TQ1_0": "tq1_0", "TQ2_0": "tq2_0",
    "IQ2_XXS": "iq2_xxs", "IQ2_XS": "iq2_xs", "IQ2_S": "iq2_xs", "IQ2_M": "iq2_s",
    "IQ3_XXS": "iq3_xxs", "IQ1_S": "iq1_s", "IQ1_M": "iq1_m",
    "IQ4_NL": "iq4_nl", "IQ4_XS": "iq4_xs", "IQ3_S": "iq3_s", "IQ3_M": "iq3_s",
}
_FTYPE_ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}

#: the built-in mixes whose choice is checked against the real llama-quantize by the tests.
FTYPES: tuple[str, ...] = (
    "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K",
    "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL", "IQ4_XS", "IQ3_S", "IQ3_M", "IQ3_XS",
    "IQ3_XXS", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S",
)
#: the i-quant mixes: llama-quantize writes most of them only with an imatrix
IQ_FTYPES: tuple[str, ...] = (
    "IQ4_NL", "IQ4_XS", "IQ3_M", "IQ3_S", "IQ3_XS", "IQ3_XXS", "IQ2_M", "IQ2_S", "IQ2_XS",
    "IQ2_XXS", "IQ1_M", "IQ1_S",
)
#: the mixes whose choice is also checked with ``--imatrix`` (the i-quant mixes, and those whose
#: choice depends on it: IQ3_XXS, IQ4_NL, IQ4_XS, Q4_0, Q5_0 read ``has_imatrix``)
IMATRIX_FTYPES: tuple[str, ...] = IQ_FTYPES + ("Q4_0", "Q5_0", "Q4_K_M", "Q2_K")

#: ftypes whose output tensors/embeddings become q5_K when not given explicitly.
_IQ_LOW_OUTPUT = {"IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"}
_IQ_LOW = {"IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"}


def canonical_type(name: str) -> str:
    """The ggml spelling of a tensor type name given in any case (``Q4_K`` -> ``q4_K``)."""
    for t in GGML_TYPES:
        if t.lower() == str(name).lower():
            return t
    raise MpsearchError(
        f"unknown ggml tensor type {name!r}{close_matches(str(name), GGML_TYPES)}; "
        f"use one of {name_list(GGML_TYPES, 40)}")


def canonical_ftype(ftype: str) -> str:
    """The llama-quantize spelling of a mix name given in any case (``q4_k_m`` -> ``Q4_K_M``)."""
    f = str(ftype).upper()
    f = _FTYPE_ALIASES.get(f, f)
    if f not in FTYPE_DEFAULT_TYPE:
        raise MpsearchError(
            f"unknown llama.cpp mix {ftype!r}{close_matches(f, FTYPE_DEFAULT_TYPE)}; "
            f"use one of {name_list(FTYPE_DEFAULT_TYPE, 40)}")
    return f


def type_nbytes(type_name: str, shape: Sequence[int]) -> int:
    """Bytes a tensor of ``shape`` (torch order) takes in ggml type ``type_name`` (no padding)."""
    t = canonical_type(type_name)
    block, nbytes = GGML_TYPES[t]
    ncols = int(shape[-1])
    if ncols % block:
        raise MpsearchError(
            f"a tensor with {ncols} columns cannot be stored as {t} (blocks of {block}); "
            "pick a type whose block size divides the column count")
    rows = 1
    for d in shape[:-1]:
        rows *= int(d)
    return rows * (ncols // block) * nbytes


def _layer_of(name: str) -> int:
    m = re.match(r"blk\.(\d+)\.", name)  # sscanf(name, "blk.%d.") in weight_name_comparer
    return int(m.group(1)) if m else -1


def tensor_order(names: Iterable[str]) -> list[str]:
    """llama.cpp's tensor order (``llama_model_loader::weight_name_comparer``): by block number,
    tensors outside blocks first, then by name. The mix's state counters advance in this order."""
    return sorted(names, key=lambda n: (_layer_of(n), n))


def tensor_category(name: str) -> str:
    """``tensor_get_category``: ``token_embd``, ``attn_q``, ``attn_v``, ``attn_k``, ``attn_qkv``,
    ``attn_kv_b``, ``attn_output``, ``ffn_up``, ``ffn_gate``, ``ffn_down``, ``output`` or ``other``."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"),
                     ("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"),
                     ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                     ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


_NEVER_QUANTIZED = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
    "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
    "indexer.q_proj.weight", "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight",
    "time_mix_w2.weight", "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight",
    "time_mix_a0.weight", "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight",
    "time_mix_g2.weight", "time_mix_decay_w1.weight", "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight", "attn_rel_b.weight", ".position_embd", "sam.pos_embd",
    "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook",
    "mm.a.code_embd",
)
_GLM5_NEXT_NEVER = (
    "hc_", "indexer.attn_q_b", "indexer.attn_k", "indexer.proj", "indexer_compressor_gate",
    "indexer_compressor_ape", "ssm_f_a.weight", "ssm_f_b.weight", "ssm_g_a.weight",
    "ssm_g_b.weight", "ssm_beta.weight", "attn_kv_a_mqa.weight", "attn_k_b.weight",
    "attn_v_b.weight",
)


def ggml_n_dims(shape: Sequence[int]) -> int:
    """``ggml_n_dims`` of a tensor given in torch order: its dimensions not counting the
    outermost ones of size 1 (a ``(1, 256)`` matrix, as Qwen2-MoE's ``ffn_gate_inp_shexp``, is
    1-D to ggml; a ``(1, rows, columns)`` stack of experts is 2-D)."""
    n = len(shape)
    for d in shape[:-1]:
        if int(d) != 1:
            break
        n -= 1
    return max(n, 1)


def allows_quantization(name: str, shape: Sequence[int], *, arch: str = "llama",
                        quantize_output_tensor: bool = True) -> bool:
    """``tensor_allows_quantization``: whether llama-quantize changes this tensor's type at all."""
    if ggml_n_dims(shape) < 2:
        return False
    if not name.endswith("weight"):
        return False
    if not quantize_output_tensor and name == "output.weight":
        return False
    if any(s in name for s in _NEVER_QUANTIZED):
        return False
    if name in ("position_embd.weight", "token_types.weight"):
        return False
    if arch == "glm5-next" and any(s in name for s in _GLM5_NEXT_NEVER):
        return False
    return True


def _is_70b(arch: str, n_layer: int, n_head: int, n_head_kv: int, n_expert: int) -> bool:
    """``model.type == LLM_TYPE_70B`` as the architectures' ``load_arch_hparams`` set it."""
    if arch == "llama":
        return n_expert != 8 and n_layer == 80 and n_head != n_head_kv
    if arch in ("qwen2", "deci", "olmo"):
        return n_layer == 80
    if arch == "jais2":
        return n_layer == 68
    return False


class _State:
    """``quantize_state_impl``: the counters the mixes read and advance."""

    def __init__(self, names: Sequence[str], n_layer: int, has_imatrix: bool):
        cats = [tensor_category(n) for n in names]
        self.n_attention_wv = sum(c in ("attn_v", "attn_qkv", "attn_kv_b") for c in cats)
        self.n_ffn_down = self.n_ffn_gate = self.n_ffn_up = n_layer
        self.i_attention_wv = self.i_ffn_down = self.i_ffn_gate = self.i_ffn_up = 0
        self.n_fallback = 0
        self.has_imatrix = has_imatrix
        self.has_tied_embeddings = "output" not in cats


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    # C++ integer division and modulo on non-negative operands, except (i - n/8) % 3 which
    # may be negative in C++ (truncation); only == 2 is tested, which a negative never equals.
    d = i_layer - n_layers // 8
    rem = abs(d) % 3 * (1 if d >= 0 else -1)
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or rem == 2


#: ``tensor_type_fallback``'s table: the K-quants' and i-quants' parts from
#: :data:`mpsearch.formats.ggml.FALLBACK` and :data:`mpsearch.formats.ggml_iq.FALLBACK`, plus the
#: ternary types mpsearch does not implement
_FALLBACK = {**IQ_FALLBACK, **dict.fromkeys(("q2_0", "tq1_0", "tq2_0"), "q4_0"), **GGML_FALLBACK}


def _fallback(st: _State, name: str, ncols: int, target: str) -> str:
    """``tensor_type_fallback``: a type whose block size divides ``ncols``."""
    block = GGML_TYPES[target][0]
    if ncols % block == 0:
        return target
    st.n_fallback += 1
    ret = _FALLBACK.get(target)
    if ret is None and block <= 32:
        ret = target
    elif ret is None:
        raise MpsearchError(f"llama.cpp defines no fallback for type {target} "
                            f"(tensor {name!r} has {ncols} columns)")
    if ncols % GGML_TYPES[ret][0]:
        ret = "f16"
    return ret


def _layer_info(i_layer: int, n_layer: int, name: str, n_expert: int) -> tuple[int, int]:
    if n_expert > 1:
        layer = _layer_of(name)
        if layer < 0:
            raise MpsearchError(f"cannot tell the block of tensor {name!r}; llama.cpp's mixes need "
                                "'blk.N.' names for expert models")
        if layer >= n_layer:
            raise MpsearchError(f"tensor {name!r} is in block {layer} but n_layer is {n_layer}; "
                                "pass the model's block count as n_layer")
        i_layer = layer
    return i_layer, n_layer


# The ported C if-chain (llama_tensor_get_type_impl): kept whole and in the C order, so that it reads line
# by line against llama.cpp; excepted from the size limits (SIZE_EXCEPTIONS in tests/test_seams.py).
def _get_type_impl(st: _State, new_type: str, name: str, ncols: int, ndim3: int, ftype: str,
                   cat: str, *, arch: str, n_gqa: int, n_expert: int, is_70b: bool,
                   output_tensor_type: str | None) -> str:
    """``llama_tensor_get_type_impl``: the mix's choice for one tensor (advances the counters)."""
    n_expert_eff = max(1, n_expert)

    if arch == "glm5-next" and any(s in name for s in ("attn_q_a", "attn_q_b", "nextn.eh_proj")):
        if new_type not in _FLOAT_TYPES:
            return "q8_0"

    if cat == "output" or (st.has_tied_embeddings and cat == "token_embd"):
        if output_tensor_type is not None:
            new_type = output_tensor_type
        else:
            qk_k = GGML_TYPES[new_type][0]
            if ftype == "MXFP4_MOE":
                new_type = "q8_0"
            elif arch == "falcon" or ncols % qk_k != 0:
                new_type = "q8_0"
            elif ftype in _IQ_LOW_OUTPUT:
                new_type = "q5_K"
            elif new_type != "q8_0":
                new_type = "q6_K"
    elif ftype == "MXFP4_MOE":
        is_bm3_expert = arch == "bailingmoe3" and cat in ("ffn_up", "ffn_gate", "ffn_down")
        if ndim3 > 1 and (arch != "bailingmoe3" or is_bm3_expert):
            new_type = "mxfp4"
        else:
            new_type = "q8_0"
    elif cat == "token_embd":
        # (an explicit --token-embedding-type never reaches here: llama_tensor_get_type returns it)
        if ftype in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"):
            new_type = "q2_K"
        elif ftype in ("IQ2_S", "IQ2_M", "IQ3_XXS"):
            new_type = "iq3_s"
        elif ftype in ("TQ1_0", "TQ2_0", "Q2_0"):
            new_type = "q4_K"
    elif ftype in _IQ_LOW:
        if cat in ("attn_v", "attn_qkv", "attn_kv_b"):
            if n_gqa >= 4 or n_expert >= 4:
                new_type = "q4_K"
            else:
                new_type = "iq3_s" if ftype in ("IQ2_S", "IQ2_M") else "q2_K"
            st.i_attention_wv += 1
        elif n_expert == 8 and cat == "attn_k":
            new_type = "q4_K"
        elif cat == "ffn_down":
            if st.i_ffn_down < st.n_ffn_down // 8:
                new_type = "iq3_s" if ftype in ("IQ2_S", "IQ2_M") else "q2_K"
            st.i_ffn_down += 1
        elif cat == "attn_output":
            if n_expert == 8:
                new_type = "q5_K"
            elif ftype in ("IQ1_S", "IQ1_M"):
                new_type = "iq2_xxs"
            elif ftype in ("IQ2_S", "IQ2_M"):
                new_type = "iq3_s"
    elif cat in ("attn_v", "attn_qkv", "attn_kv_b"):
        if ftype == "Q2_K":
            new_type = "q4_K" if n_gqa >= 4 else "q3_K"
        elif ftype == "Q2_K_S" and n_gqa >= 4:
            new_type = "q4_K"
        elif ftype == "IQ3_XXS":
            new_type = "q4_K" if n_gqa >= 4 else ("iq3_s" if not st.has_imatrix else "iq3_xxs")
        elif ftype in ("IQ3_XS", "IQ3_S") and n_gqa >= 4:
            new_type = "q4_K"
        elif ftype == "IQ3_M":
            new_type = "q4_K"
        elif ftype == "Q3_K_M":
            new_type = "q5_K" if st.i_attention_wv < 2 else "q4_K"
        elif ftype == "Q3_K_L":
            new_type = "q5_K"
        elif ftype in ("IQ4_NL", "IQ4_XS") and n_gqa >= 4:
            new_type = "q5_K"
        elif ftype in ("Q4_K_M", "Q5_K_M") and _use_more_bits(st.i_attention_wv, st.n_attention_wv):
            new_type = "q6_K"
        elif ftype == "Q4_K_S" and st.i_attention_wv < 4:
            new_type = "q5_K"
        if is_70b and new_type in ("q3_K", "q4_K"):
            new_type = "q5_K"
        if n_expert == 8:
            new_type = "q8_0"
        st.i_attention_wv += 1
    elif cat == "attn_k":
        if n_expert == 8:
            new_type = "q8_0"
        elif ftype == "IQ3_XS":
            new_type = "iq3_xxs"
        elif ftype == "IQ3_XXS":
            new_type = "iq2_s"
    elif cat == "attn_q":
        if ftype == "IQ3_XS":
            new_type = "iq3_xxs"
        elif ftype == "IQ3_XXS":
            new_type = "iq2_s"
    elif cat == "ffn_down":
        i_layer, n_layer = _layer_info(st.i_ffn_down, st.n_ffn_down, name, n_expert_eff)
        if ftype == "Q2_K":
            new_type = "q3_K"
        elif ftype == "Q2_K_S":
            if i_layer < n_layer // 8:
                new_type = "q4_K"
        elif ftype == "IQ3_XXS" and not st.has_imatrix:
            new_type = "q4_K" if i_layer < n_layer // 8 else "q3_K"
        elif ftype == "Q3_K_M":
            if i_layer < n_layer // 16:
                new_type = "q5_K"
            elif arch != "falcon" or _use_more_bits(i_layer, n_layer):
                new_type = "q4_K"
            else:
                new_type = "q3_K"
        elif ftype == "IQ3_M" and (i_layer < n_layer // 8
                                   or (n_expert == 8 and _use_more_bits(i_layer, n_layer))):
            new_type = "q4_K"
        elif ftype == "Q3_K_L":
            new_type = "q4_K" if arch == "falcon" else "q5_K"
        elif ftype == "Q4_K_M":
            if arch == "falcon":
                new_type = ("q6_K" if i_layer < n_layer // 16 else
                            "q5_K" if _use_more_bits(i_layer, n_layer) else "q4_K")
            elif _use_more_bits(i_layer, n_layer):
                new_type = "q6_K"
        elif (i_layer < n_layer // 8 and ftype in ("IQ4_NL", "IQ4_XS")
              and not st.has_imatrix):
            new_type = "q5_K"
        elif ftype == "Q5_K_M" and _use_more_bits(i_layer, n_layer):
            new_type = "q6_K"
        elif ftype == "Q4_K_S" and arch != "falcon" and i_layer < n_layer // 8:
            new_type = "q5_K"
        elif ftype in ("Q4_0", "Q5_0") and st.has_imatrix and i_layer < n_layer // 8:
            new_type = "q4_1" if ftype == "Q4_0" else "q5_1"
        st.i_ffn_down += 1
    elif cat == "attn_output":
        if arch != "falcon":
            if n_expert == 8:
                if ftype in ("Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S",
                             "Q4_K_M", "IQ3_S", "IQ3_M", "IQ4_XS"):
                    new_type = "q5_K"
            else:
                if ftype == "Q2_K":
                    new_type = "q3_K"
                elif ftype == "IQ3_XXS":
                    new_type = "iq3_s"
                elif ftype == "Q3_K_M":
                    new_type = "q4_K"
                elif ftype == "Q3_K_L":
                    new_type = "q5_K"
                elif ftype == "IQ3_M":
                    new_type = "q4_K"
        elif ftype == "Q3_K_L":
            new_type = "q4_K"
    elif cat == "attn_qkv":  # unreachable, as in llama.cpp: attn_qkv is attn_v-like above
        pass
    elif cat == "ffn_gate":
        i_layer, n_layer = _layer_info(st.i_ffn_gate, st.n_ffn_gate, name, n_expert_eff)
        if ftype == "IQ3_XS" and n_layer // 8 <= i_layer < 7 * n_layer // 8:
            new_type = "iq3_xxs"
        st.i_ffn_gate += 1
    elif cat == "ffn_up":
        i_layer, n_layer = _layer_info(st.i_ffn_up, st.n_ffn_up, name, n_expert_eff)
        if ftype == "IQ3_XS" and n_layer // 8 <= i_layer < 7 * n_layer // 8:
            new_type = "iq3_xxs"
        st.i_ffn_up += 1
    return new_type


def _check_tensors(tensors) -> list[tuple[str, tuple[int, ...]]]:
    out, seen = [], set()
    try:
        items = list(tensors.items()) if isinstance(tensors, Mapping) else list(tensors)
    except TypeError:
        items = None
    if not items:
        raise MpsearchError("tensors must be a non-empty list of (gguf tensor name, shape) pairs, "
                            "e.g. [('blk.0.attn_q.weight', (576, 576))]")
    for item in items:
        try:
            name, shape = item
            shape = tuple(int(d) for d in shape)
        except (TypeError, ValueError):
            raise MpsearchError(f"bad tensor entry {item!r}: give (gguf tensor name, shape) with a "
                                "shape of integers in torch order (rows, columns)") from None
        if not isinstance(name, str) or not name:
            raise MpsearchError(f"bad tensor name {name!r}: give the GGUF name, e.g. "
                                "'blk.0.attn_q.weight'")
        if name in seen:
            raise MpsearchError(f"tensor {name!r} is listed twice; list each GGUF tensor once")
        if any(d <= 0 for d in shape):
            raise MpsearchError(f"tensor {name!r} has shape {shape}; every dimension must be >= 1")
        seen.add(name)
        out.append((name, shape))
    return out


def _positive(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MpsearchError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _tensor_type_patterns(tensor_types) -> list:
    """``--tensor-type`` pairs as (compiled lowercased regex, canonical type), checked."""
    patterns = []
    for entry in tensor_types or ():
        try:
            pat, t = entry
            patterns.append((re.compile(str(pat).lower()), canonical_type(t)))
        except re.error as e:
            raise MpsearchError(f"bad tensor-type regex {entry[0]!r}: {e}; give a regular "
                                "expression over GGUF tensor names") from None
        except (TypeError, ValueError) as e:
            if isinstance(e, MpsearchError):
                raise
            raise MpsearchError(f"bad tensor-type entry {entry!r}: give (regex, ggml type) "
                                "pairs") from None
    return patterns


def mix_types(ftype: str, tensors, *, arch: str = "llama", n_layer: int, n_head: int,
              n_head_kv: int, n_expert: int = 0, has_imatrix: bool = False,
              token_embedding_type: str | None = None, output_tensor_type: str | None = None,
              tensor_types: Sequence[tuple[str, str]] | None = None, pure: bool = False,
              quantize_output_tensor: bool = True) -> dict[str, str]:
    """The ggml type ``llama-quantize`` gives every tensor for mix ``ftype``.

    ``tensors``: ``(gguf name, shape)`` pairs (or a name -> shape mapping), shapes in torch order
    ``(rows, columns)``. List every weight of the model: which tensors exist matters (an absent
    ``output.weight`` means tied embeddings, and the number of ``attn_v`` tensors steers the mix).
    Returns ``{name: type}`` for the tensors llama.cpp quantizes; tensors it keeps as they are
    (1-D tensors, norms...) are left out, because their type is the input file's.

    ``n_layer``, ``n_head``, ``n_head_kv``, ``n_expert`` are the GGUF's ``{arch}.block_count``,
    ``attention.head_count``, ``attention.head_count_kv`` and ``expert_count``. The keyword
    options mirror llama-quantize's flags: ``--imatrix`` (``has_imatrix``),
    ``--token-embedding-type``, ``--output-tensor-type``, ``--tensor-type``/``--tensor-type-file``
    (``tensor_types``: ``(regex, type)`` pairs, first match wins, regexes are lowercased as
    llama-quantize does), ``--pure`` and ``--leave-output-tensor`` (``quantize_output_tensor=False``).
    """
    ftype = canonical_ftype(ftype)
    items = _check_tensors(tensors)
    _positive("n_layer", n_layer)
    _positive("n_head", n_head)
    _positive("n_head_kv", n_head_kv, 0)
    _positive("n_expert", n_expert, 0)
    if not isinstance(arch, str) or not arch:
        raise MpsearchError(f"arch must be the GGUF general.architecture string, got {arch!r}")
    tok_type = canonical_type(token_embedding_type) if token_embedding_type is not None else None
    out_type = canonical_type(output_tensor_type) if output_tensor_type is not None else None
    patterns = _tensor_type_patterns(tensor_types)
    shapes = dict(items)
    order = tensor_order(shapes)
    st = _State(order, n_layer, has_imatrix)
    default_type = FTYPE_DEFAULT_TYPE[ftype]
    n_gqa = n_head // n_head_kv if n_head_kv else 0
    is_70b = _is_70b(arch, n_layer, n_head, n_head_kv, n_expert)

    result: dict[str, str] = {}
    for name in order:  # the preliminary loop of llama_model_quantize_impl
        shape = shapes[name]
        if not allows_quantization(name, shape, arch=arch,
                                   quantize_output_tensor=quantize_output_tensor):
            continue
        cat = tensor_category(name)
        # llama_tensor_get_type
        if tok_type is not None and cat == "token_embd":
            named = name == "per_layer_token_embd.weight" and any(
                p.search(name) for p, _ in patterns)
            if not named:
                result[name] = tok_type
                continue
        if out_type is not None and cat == "output":
            result[name] = out_type
            continue
        new_type = default_type
        if default_type not in _FLOAT_TYPES:  # ggml_is_quantized(default_type)
            manual = False
            for pat, t in patterns:
                if pat.search(name):
                    new_type, manual = t, True
                    break
            if not manual and not pure:
                new_type = _get_type_impl(
                    st, new_type, name, shape[-1], shape[-3] if len(shape) >= 3 else 1, ftype,
                    cat, arch=arch, n_gqa=n_gqa, n_expert=n_expert, is_70b=is_70b,
                    output_tensor_type=out_type)
            new_type = _fallback(st, name, shape[-1], new_type)
        result[name] = new_type
    return result


def mix_nbytes(types: Mapping[str, str], tensors) -> int:
    """Total tensor-data bytes of ``types`` (from :func:`mix_types`) for the given shapes."""
    shapes = dict(_check_tensors(tensors))
    missing = [n for n in types if n not in shapes]
    if missing:
        raise MpsearchError(f"no shape given for {name_list(missing)}; list every typed tensor")
    return sum(type_nbytes(t, shapes[n]) for n, t in types.items())


# ----------------------------------------------------------------------------- as mpsearch plans
#: the mixes offered as recipes beside a frontier (every type in them is an option of
#: ``--target llama.cpp``); without an importance matrix, those llama-quantize would refuse to
#: write are left out (:func:`mix_needs_imatrix`).
RECIPE_FTYPES: tuple[str, ...] = (
    "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0",
    "Q4_0", "Q4_1", "Q5_0", "Q5_1", *IQ_FTYPES,
)

#: tensor types llama-quantize writes only with an imatrix (``tensor_requires_imatrix``; q2_K too,
#: in a Q2_K_S file), except for the token embedding and the output tensor
_NEEDS_IMATRIX = ("iq3_xxs", "iq2_xxs", "iq2_xs", "iq2_s", "iq1_m", "iq1_s")


def mix_needs_imatrix(ftype: str, types: Mapping[str, str]) -> bool:
    """Whether llama-quantize refuses to write mix ``ftype`` with these tensor ``types`` (from
    :func:`mix_types`) without an importance matrix (``tensor_requires_imatrix``)."""
    ftype = canonical_ftype(ftype)
    for name, t in types.items():
        if tensor_category(name) in ("token_embd", "output"):
            continue
        if t in _NEEDS_IMATRIX or (t == "q2_K" and ftype == "Q2_K_S"):
            return True
    return False

_HF_BLOCK = re.compile(r"^(?:model\.)?layers\.(\d+)\.(.+)$")
_HF_IN_BLOCK = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_HF_TOP = {"embed_tokens": "token_embd", "model.embed_tokens": "token_embd", "lm_head": "output"}


def hf_to_gguf_name(hf_name: str) -> str | None:
    """GGUF tensor name of a Llama-family Hugging Face module (``None`` if it has none), as
    gguf-py's TensorNameMap names them: ``model.layers.3.mlp.down_proj`` -> ``blk.3.ffn_down.weight``."""
    m = _HF_BLOCK.match(hf_name)
    if m:
        base = _HF_IN_BLOCK.get(m.group(2))
        return None if base is None else f"blk.{m.group(1)}.{base}.weight"
    base = _HF_TOP.get(hf_name)
    return None if base is None else base + ".weight"


def recipes_for_layers(layers, ftypes: Sequence[str] = RECIPE_FTYPES, *, n_head: int | None = None,
                       n_head_kv: int | None = None, gguf_name=hf_to_gguf_name,
                       has_imatrix: bool = False) -> dict[str, dict[str, str]]:
    """llama.cpp's built-in mixes as ``{mix name: {layer name: ggml type or 'keep'}}`` plans.

    ``layers``: objects with ``name`` (Hugging Face module name), ``out_channels`` and
    ``in_features`` (mpsearch's :class:`~mpsearch.layers.Layer`). The layers are taken as the
    model's whole set of GGUF matrices: no ``lm_head`` among them means tied embeddings, as in
    llama.cpp. ``n_head``/``n_head_kv`` default to the q/k row ratio, which is all the mixes read
    of them (``n_gqa``). Returns ``{}`` when a layer has no GGUF name (not a Llama-family model).
    Float results (f16 where no 32-block type fits) are given as ``keep``. ``has_imatrix``: the
    mixes as llama-quantize chooses them with ``--imatrix``; without it, the mixes it would refuse
    to write (IQ2_XXS...) are left out.
    """
    names, tensors = {}, []
    for lay in layers:
        g = gguf_name(lay.name)
        if g is None:
            return {}
        names[lay.name] = g
        tensors.append((g, (int(lay.out_channels), int(lay.in_features))))
    if not tensors:
        return {}
    shapes = dict(tensors)
    blocks = {_layer_of(g) for g in shapes if _layer_of(g) >= 0}
    if not blocks:
        return {}
    n_layer = max(blocks) + 1
    if n_head is None or n_head_kv is None:
        q = shapes.get("blk.0.attn_q.weight")
        k = shapes.get("blk.0.attn_k.weight")
        n_head, n_head_kv = (q[0] // k[0], 1) if q and k and k[0] and q[0] % k[0] == 0 else (1, 1)
    out = {}
    for ftype in ftypes:
        types = mix_types(ftype, tensors, n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv,
                          has_imatrix=has_imatrix)
        if not has_imatrix and mix_needs_imatrix(ftype, types):
            continue
        out[canonical_ftype(ftype)] = {
            lay: ("keep" if types[g] in _FLOAT_TYPES else types[g]) for lay, g in names.items()
            if g in types}
    return out

"""``llama.cpp``: GGML tensor types as ``llama-quantize`` writes them.

Options are GGML types by their llama.cpp names (``q4_K``, ``q5_0``, ``iq2_xs``...); each one's
size is the GGUF block size (q4_K = 144 bytes per 256 weights = 4.5 bits per weight) and its
rounding is llama.cpp's, reproduced in torch (:mod:`mpsearch.formats.ggml`,
:mod:`mpsearch.formats.ggml_iq` for the i-quants): with an importance matrix (:mod:`mpsearch.imatrix`;
computed from the calibration data by default, as publishers run ``llama-quantize --imatrix``) or
without one (``--no-imatrix``).

The i-quants (iq1_s ... iq4_xs) are options but in the default search set only when the rounding
uses an importance matrix (``imatrix_default_options``): llama-quantize refuses iq1_s, iq1_m,
iq2_xxs, iq2_xs, iq2_s and iq3_xxs without one, and those are refused here too.

Per-tensor rules, as ``src/llama-quant.cpp`` applies them:

- a type needs the tensor's row length (``ne[0]``, the input features) to be a multiple of its
  block: 256 for K-quants, 32 for the others. llama.cpp silently replaces an illegal type by a
  fallback (``tensor_type_fallback``: q2_K/q3_K -> q4_0, q4_K -> q5_0, q5_K -> q5_1, q6_K -> q8_0),
  which is what turned a 4-bit plan into a 5.9-bit file on SmolLM2 (hidden size 576). Here an
  illegal type is never offered, so the plan is what the file will be;
- the planned layers are the transformer blocks' matrices; a tied ``lm_head`` is not a tensor of
  its own in GGUF (``token_embd`` serves both) and is not planned; the token embedding gets the
  type given at export (``--token-embedding-type``);
- llama.cpp keeps q/k/v and gate/up as separate tensors: no runtime ties;
- mixture-of-experts: all experts of one projection are one GGUF tensor (``blk.N.ffn_gate_exps``,
  ``ffn_up_exps``, ``ffn_down_exps``; shared experts ``ffn_*_shexp``), so a stacked expert tensor is
  one decision, and per-expert Linears (``experts.3.w1``) are tied by projection; a fused
  ``gate_up_proj`` is *one* decision written as two GGUF tensors of the same type (the converter
  splits it; rows are quantized independently, so the two tensors' sizes add up to the stacked
  one's exactly). The router ``ffn_gate_inp`` (and Qwen2-MoE's ``ffn_gate_inp_shexp``) is written
  in F32 by ``convert_hf_to_gguf.py`` and never quantized by ``llama-quantize``
  (``tensor_allows_quantization``): it is not planned.
"""

from __future__ import annotations

from . import DeclaredTarget, is_output_layer, STACKED_EXPERT_TIES
from ..export.llamacpp_types import llama_gguf_name
from ..formats.ggml import fallback_type  # llama.cpp's tensor_type_fallback
from .llamacpp_mixes import recipes_for_layers


class LlamaCppTarget(DeclaredTarget):
    """The options are the GGML formats that declare ``Offer("llama.cpp", ...)``
    (:mod:`mpsearch.formats.ggml`, :mod:`mpsearch.formats.ggml_iq`), by nominal bits: the 32-block
    types (iq4_nl among them) and the K-quants in the default set, the i-quants of 256-blocks in it
    only with an importance matrix."""

    name = "llama.cpp"
    consumer = "llama-quantize --tensor-type-file (GGUF)"
    description = ("GGML types: K-quants and i-quants (super-blocks of 256) and the 32-blocks "
                   "q4_0..q8_0, iq4_nl")
    exporter = "llama.cpp"
    #: none left out of the imatrix default set on the CPU for speed: q4_1 and q5_1 take about half of the
    #: CPU rounding time (experiments/newcomer_cpu.md), but q5_1 is llama.cpp's own fallback of q5_K
    #: on rows that do not divide 256 (SmolLM2's 576 columns), so without it the built-in mixes
    #: (Q3_K_M, Q4_K_M, pure q4_K ...) can no longer be measured beside the plans
    cpu_imatrix_left_out: tuple = ()
    notes = ("rows must divide the type's block (256 for K-quants and i-quants, 32 otherwise); a tied "
             "lm_head is not planned; iq1_*, iq2_* and iq3_xxs need an importance matrix")

    moe_ties = STACKED_EXPERT_TIES

    def unplanned_reason(self, layer, model=None) -> str | None:
        if getattr(layer, "role", None) == "router":
            return "router: llama.cpp keeps ffn_gate_inp in F32 (llama-quantize never quantizes it)"
        if layer.kind == "embedding":
            return None if llama_gguf_name(layer.name) is not None else "embedding: no GGUF tensor name"
        if model is not None and is_output_layer(model, layer.name, tied_only=True):
            return "tied lm_head: GGUF stores it once, as token_embd"
        return None

    def recipes(self, layers, imatrix: bool = False) -> dict[str, dict[str, str]]:
        """``pure-<type>``: every planned tensor at one type, with llama.cpp's own fallback where
        the type cannot store the tensor (what ``llama-quantize --pure`` writes); plus the built-in
        mixes (Q4_K_M, IQ2_M...) where :mod:`mpsearch.targets.llamacpp_mixes` can name the tensors,
        chosen as llama-quantize chooses them with (``imatrix``) or without an importance matrix;
        without one, the mixes llama-quantize would refuse to write are left out."""
        out = {}
        for t in self.default_option_names(imatrix):
            # what llama.cpp writes (its fallback; f16, the export's keep type, where none fits)
            written = {lay.name: fallback_type(t, lay.in_features) for lay in layers}
            out[f"pure-{t}"] = {n: "keep" if w == "f16" else w for n, w in written.items()}
        out.update(_builtin_mixes(layers, imatrix))
        return out


def _builtin_mixes(layers, imatrix: bool = False) -> dict[str, dict[str, str]]:
    """llama.cpp's built-in mixes for these layers (empty for names it cannot map to GGUF)."""
    return recipes_for_layers(layers, has_imatrix=imatrix)


LLAMACPP = LlamaCppTarget()

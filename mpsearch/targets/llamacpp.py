"""``llama.cpp``: GGML tensor types as ``llama-quantize`` writes them (no imatrix).

Options are GGML types by their llama.cpp names (``q4_K``, ``q5_0``...); each one's size is the
GGUF block size (q4_K = 144 bytes per 256 weights = 4.5 bits per weight) and its rounding is
llama.cpp's reference quantization, reproduced in torch (:mod:`mpsearch.formats.ggml`).

Per-tensor rules, as ``src/llama-quant.cpp`` applies them:

- a type needs the tensor's row length (``ne[0]``, the input features) to be a multiple of its
  block: 256 for K-quants, 32 for the others. llama.cpp silently replaces an illegal type by a
  fallback (``tensor_type_fallback``: q2_K/q3_K -> q4_0, q4_K -> q5_0, q5_K -> q5_1, q6_K -> q8_0),
  which is what turned a 4-bit plan into a 5.9-bit file on SmolLM2 (hidden size 576). Here an
  illegal type is never offered, so the plan is what the file will be;
- the planned layers are the transformer blocks' matrices; a tied ``lm_head`` is not a tensor of
  its own in GGUF (``token_embd`` serves both) and is not planned; the token embedding gets the
  type given at export (``--token-embedding-type``);
- llama.cpp keeps q/k/v and gate/up as separate tensors: no runtime ties.
"""

from __future__ import annotations

from ..options import parse_option
from . import Target

from ..formats.ggml import FALLBACK  # noqa: E402,F401  (llama.cpp's tensor_type_fallback)
K_TYPES = ("q2_K", "q3_K", "q4_K", "q5_K", "q6_K")
LEGACY_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")


class LlamaCppTarget(Target):
    name = "llama.cpp"
    consumer = "llama-quantize --tensor-type-file (GGUF)"
    description = "GGML types: K-quants (super-blocks of 256) and the 32-blocks q4_0..q8_0"
    exporter = "llama.cpp"
    options = ("q2_K", "q3_K", "q4_0", "q4_1", "q4_K", "iq4_nl", "q5_0", "q5_1", "q5_K",
               "q6_K", "q8_0", "keep")
    default_options = ("q2_K", "q3_K", "q4_0", "q4_1", "q4_K", "iq4_nl", "q5_0", "q5_1", "q5_K",
                       "q6_K", "q8_0")
    notes = "rows must divide the type's block (256 for K-quants, 32 otherwise); a tied lm_head is not planned"

    def plans_layer(self, layer, model=None) -> bool:
        from ..export.llamacpp_types import llama_gguf_name

        if layer.kind == "embedding":
            return llama_gguf_name(layer.name) is not None
        if model is not None and _is_tied_output(model, layer.name):
            return False
        return True

    def recipes(self, layers) -> dict[str, dict[str, str]]:
        """``pure-<type>``: every planned tensor at one type, with llama.cpp's own fallback where
        the type cannot store the tensor (what ``llama-quantize --pure`` writes); plus the built-in
        mixes (Q4_K_M...) where :mod:`mpsearch.targets.llamacpp_mixes` can name the tensors."""
        out = {}
        for t in self.default_options:
            plan = {}
            for lay in layers:
                name = t
                if self.option_reason(lay, parse_option(name)) is not None:
                    name = FALLBACK.get(t, "keep")
                    if self.option_reason(lay, parse_option(name)) is not None:
                        name = "keep"  # llama.cpp writes f16: the keep type of the export
                plan[lay.name] = name
            out[f"pure-{t}"] = plan
        out.update(_builtin_mixes(layers))
        return out


def _is_tied_output(model, name: str) -> bool:
    get_out = getattr(model, "get_output_embeddings", None)
    get_in = getattr(model, "get_input_embeddings", None)
    if get_out is None or get_in is None:
        return False
    try:
        out, inp = get_out(), get_in()
    except (AttributeError, NotImplementedError):
        return False
    if out is None or inp is None or out.weight is not inp.weight:
        return False
    from ..layers import get_module

    try:
        return get_module(model, name) is out
    except Exception:
        return False


def _builtin_mixes(layers) -> dict[str, dict[str, str]]:
    """llama.cpp's built-in mixes for these layers (empty until the mix module can name them)."""
    try:
        from . import llamacpp_mixes
    except ImportError:
        return {}
    return llamacpp_mixes.recipes_for_layers(layers) if hasattr(llamacpp_mixes, "recipes_for_layers") else {}


LLAMACPP = LlamaCppTarget()

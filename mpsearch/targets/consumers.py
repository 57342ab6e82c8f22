"""Targets for the serving stacks and quantization libraries whose formats live in
:mod:`mpsearch.formats.intq` and :mod:`mpsearch.formats.fp`.

Each target's options are the formats that declare it (:class:`mpsearch.formats.Offer` in
:mod:`mpsearch.formats.intq` and :mod:`mpsearch.formats.fp`: which target, whether in its default
set); the shape rules are the formats' own (group sizes must divide the input features, packed
layouts need multiples of 32...). Runtimes that
fuse q/k/v and gate/up into one matrix (vLLM, SGLang, TensorRT-LLM serve the compressed-tensors,
GPTQ, AutoRound and ModelOpt checkpoints that way) tie those projections: they must share a format.
"""

from __future__ import annotations

from . import DeclaredTarget, FUSED_MOE_TIES, is_output_layer


class ConsumerTarget(DeclaredTarget):
    """A serving stack or library; like their own recipes (llm-compressor ``ignore: [lm_head]``,
    GPTQModel, AutoRound, ModelOpt), the output projection ``lm_head`` is left in 16 bits and not
    planned (it is often tied to the embedding)."""

    fused_runtime = True
    moe_ties = FUSED_MOE_TIES  # vLLM's FusedMoE: one scheme for a layer's experts (see the module doc)

    def unplanned_reason(self, layer, model=None) -> str | None:
        if layer.kind == "embedding":
            return f"embedding: {self.name} leaves embeddings in 16 bits"
        if layer.name.rsplit(".", 1)[-1] == "lm_head" or (model is not None and is_output_layer(model, layer.name)):
            return f"output projection: {self.name} leaves lm_head in 16 bits, as its own recipes do"
        return super().unplanned_reason(layer, model)

    def __init__(self, name, consumer, description, exporter, notes=""):
        self.name = name
        self.consumer = consumer
        self.description = description
        self.exporter = exporter
        self.notes = notes


VLLM = ConsumerTarget(
    "vllm", "vLLM (compressed-tensors checkpoints written by llm-compressor)",
    "compressed-tensors schemes vLLM serves: int4/int8 weight-only, W8A8 int8 and FP8, NVFP4, MXFP4",
    "llm-compressor",
    "group sizes divide the input features; q/k/v and gate/up share a scheme (fused at serving time); "
    "W8A8, FP8, NVFP4 and MXFP4-W4A4 quantize activations too",
)

GPTQMODEL = ConsumerTarget(
    "gptqmodel", "GPTQModel (QuantizeConfig with per-module dynamic overrides)",
    "GPTQ integer weights, symmetric, groups of 128 (bits 2, 3, 4, 8)",
    "gptqmodel",
    "in and out features are packed in multiples of 32; q/k/v and gate/up share bits",
)

TORCHAO = ConsumerTarget(
    "torchao", "torchao quantize_ with an FqnToConfig",
    "IntxWeightOnlyConfig 1-8 bits in groups of 32/64/128 (sym or asym) and Int8WeightOnly",
    "torchao",
    "group sizes divide the input features",
)
TORCHAO.fused_runtime = False  # torchao quantizes module by module

MODELOPT = ConsumerTarget(
    "modelopt", "NVIDIA ModelOpt (hf_quant_config.json, MIXED_PRECISION) for TensorRT-LLM / vLLM",
    "ModelOpt formats: INT4 AWQ (RTN part), INT8 weight-only, FP8 (W8A8 static), NVFP4 (W4A4)",
    "modelopt",
    "FP8 and NVFP4 quantize activations too; q/k/v and gate/up share a format",
)

AUTOROUND = ConsumerTarget(
    "autoround", "AutoRound (layer_config), round-to-nearest path",
    "AutoRound integer weights 2-8 bits in groups of 32 or 128, symmetric or asymmetric",
    "autoround",
    "in and out features are packed in multiples of 32; q/k/v and gate/up share bits",
)

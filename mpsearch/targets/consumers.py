"""Targets for the serving stacks and quantization libraries whose formats live in
:mod:`mpsearch.formats.intq` and :mod:`mpsearch.formats.fp`.

Each target lists its consumer's formats under their names; the shape rules are the formats' own
(group sizes must divide the input features, packed layouts need multiples of 32...). Runtimes that
fuse q/k/v and gate/up into one matrix (vLLM, SGLang, TensorRT-LLM serve the compressed-tensors,
GPTQ, AutoRound and ModelOpt checkpoints that way) tie those projections: they must share a format.
"""

from __future__ import annotations

from . import FUSED_MOE_TIES, Target, is_output_layer


class ConsumerTarget(Target):
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

    def __init__(self, name, consumer, description, exporter, options, default_options, notes=""):
        self.name = name
        self.consumer = consumer
        self.description = description
        self.exporter = exporter
        self.options = tuple(options) + ("keep",)
        self.default_options = tuple(default_options)
        self.notes = notes


VLLM = ConsumerTarget(
    "vllm", "vLLM (compressed-tensors checkpoints written by llm-compressor)",
    "compressed-tensors schemes vLLM serves: int4/int8 weight-only, W8A8 int8 and FP8, NVFP4, MXFP4",
    "llm-compressor",
    ("w4a16-g128", "w4a16-g32", "w4a16-asym", "w8a16", "w8a8-int8", "w8a8-fp8", "nvfp4", "mxfp4",
     "mxfp4-w4a4"),
    ("w4a16-g128", "w4a16-g32", "w8a16"),
    "group sizes divide the input features; q/k/v and gate/up share a scheme (fused at serving time); "
    "W8A8, FP8, NVFP4 and MXFP4-W4A4 quantize activations too",
)

GPTQMODEL = ConsumerTarget(
    "gptqmodel", "GPTQModel (QuantizeConfig with per-module dynamic overrides)",
    "GPTQ integer weights, symmetric, groups of 128 (bits 2, 3, 4, 8)",
    "gptqmodel",
    ("gptq-int2-g128", "gptq-int3-g128", "gptq-int4-g128", "gptq-int8-g128"),
    ("gptq-int2-g128", "gptq-int3-g128", "gptq-int4-g128", "gptq-int8-g128"),
    "in and out features are packed in multiples of 32; q/k/v and gate/up share bits",
)

TORCHAO = ConsumerTarget(
    "torchao", "torchao quantize_ with an FqnToConfig",
    "IntxWeightOnlyConfig 1-8 bits in groups of 32/64/128 (sym or asym) and Int8WeightOnly",
    "torchao",
    tuple(f"intx-{b}-g{g}{s}" for b in range(1, 9) for g in (32, 64, 128) for s in ("", "-asym"))
    + ("int8wo",),
    ("intx-2-g32-asym", "intx-3-g32-asym", "intx-4-g32-asym", "intx-5-g32-asym", "intx-6-g32-asym",
     "intx-8-g32-asym"),
    "group sizes divide the input features",
)
TORCHAO.fused_runtime = False  # torchao quantizes module by module

MODELOPT = ConsumerTarget(
    "modelopt", "NVIDIA ModelOpt (hf_quant_config.json, MIXED_PRECISION) for TensorRT-LLM / vLLM",
    "ModelOpt formats: INT4 AWQ (RTN part), INT8 weight-only, FP8 (W8A8 static), NVFP4 (W4A4)",
    "modelopt",
    ("int4_awq", "int8_wo", "fp8", "nvfp4-modelopt"),
    ("int4_awq", "int8_wo", "fp8", "nvfp4-modelopt"),
    "FP8 and NVFP4 quantize activations too; q/k/v and gate/up share a format",
)

AUTOROUND = ConsumerTarget(
    "autoround", "AutoRound (layer_config), round-to-nearest path",
    "AutoRound integer weights 2-8 bits in groups of 32 or 128, symmetric or asymmetric",
    "autoround",
    # AutoRound refuses 8-bit asymmetric layers (unless AR_ALLOW_W8_ASYM=1), so they are not offered
    tuple(f"autoround-int{b}-g{g}{s}" for b in range(2, 9) for g in (32, 128) for s in ("", "-asym")
          if not (b == 8 and s)),
    tuple(f"autoround-int{b}-g128" for b in (2, 3, 4, 8)),
    "in and out features are packed in multiples of 32; q/k/v and gate/up share bits",
)

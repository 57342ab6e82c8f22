r"""llm-compressor: a recipe whose modifier has one ``config_groups`` entry per option, as YAML.

The recipe layout is llm-compressor's (``quant_stage: quant_modifiers: <Modifier>: {...}``); each
group is a compressed-tensors ``QuantizationScheme`` (``compressed_tensors/quantization/
quant_scheme.py``): ``targets`` (here the exact module names, which compressed-tensors matches by
equality), ``weights`` and, for formats that quantize activations, ``input_activations``
(``QuantizationArgs``). ``keep`` layers go to ``ignore``. A stacked expert tensor
(``model.layers.0.mlp.experts.gate_up_proj``) is written as the regex target
``re:^model\.layers\.0\.mlp\.experts\.\d+\.(?:gate_proj|up_proj)$``: llm-compressor unfuses
transformers' 3-D experts into one ``gate_proj``/``up_proj``/``down_proj`` Linear per expert
(``llmcompressor/modeling/moe/linearize.py``), compressed-tensors matches ``re:`` targets as regexes,
and vLLM fuses them back into one FusedMoE layer, which needs one scheme for all of them. The modifier follows the rounding
the plan's table was measured with (``QuantizationModifier`` for round to nearest, ``GPTQModifier``
for ``--quantizer gptq`` and for plans that do not say); ``modifier="QuantizationModifier"`` gives round-to-nearest, which is what the
formats' fake quantizers model.

The compressed-tensors formats of ``--target vllm`` are written as compressed-tensors' own preset
schemes (``PRESET_SCHEMES``), field for field: the integer ones from their settings (bits, group,
symmetry; W8A8's per-token int8 activations), the float ones as their declarations
(:attr:`mpsearch.formats.Format.consumer_config`, :mod:`mpsearch.formats.fp`) give them:

| format        | preset        | weights                                  | input_activations              |
|---------------|---------------|------------------------------------------|--------------------------------|
| `w4a16-g128`  | W4A16         | int4 sym, group 128                      |                                |
| `w4a16-g32`   | W4A16, g32    | int4 sym, group 32                       |                                |
| `w4a16-asym`  | W4A16_ASYM    | int4 asym, group 128                     |                                |
| `w8a16`       | W8A16         | int8 sym, group 128                      |                                |
| `w8a8-int8`   | W8A8          | int8 sym, channel                        | int8 sym, token, dynamic       |
| `w8a8-fp8`    | FP8_DYNAMIC   | fp8 (E4M3), channel                      | fp8, token, dynamic            |
| `nvfp4`       | NVFP4         | fp4, tensor_group 16, fp8 scales         | fp4, tensor_group 16, dynamic "local", static_minmax observer (global scale) |
| `mxfp4`       | MXFP4A16      | fp4, group 32, uint8 (E8M0) scales/zp    |                                |
| `mxfp4-w4a4`  | MXFP4         | fp4, group 32, uint8 (E8M0) scales       | fp4, group 32, dynamic         |

mpsearch's own integer options (``int4-g128``...) are written as ``num_bits``, ``type: int``,
``symmetric``, ``strategy: channel`` or ``group`` with ``group_size``, ``dynamic: false``; weight
bits 2-8 (vLLM's kernels serve 4 and 8).
"""

from __future__ import annotations

import re

from ..plan import BitPlan
from ._base import (consumer_config, ExportError, Exporter, format_name, group_by_option, int_settings, refuse,
                    unfused_projections)


def weight_args(opt) -> dict:
    """QuantizationArgs of an integer option's weights (channel or group strategy)."""
    args = {"num_bits": opt.bits, "type": "int", "symmetric": opt.symmetric,
            "strategy": "channel" if opt.group_size is None else "group"}
    if opt.group_size is not None:
        args["group_size"] = opt.group_size
    args["dynamic"] = False
    return args


#: the integer formats' dynamic per-token int8 activations (compressed-tensors W8A8)
INT8_TOKEN = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}


def scheme_args(opt) -> dict:
    """The ``weights`` (and ``input_activations``) of the scheme that executes ``opt``."""
    declared = consumer_config(opt, "compressed-tensors")  # the float formats' preset args
    if declared is not None:
        return declared
    name = format_name(opt, "compressed-tensors")
    out = {"weights": weight_args(int_settings(opt))}
    if name is not None and opt.format.act_bits == 8:  # W8A8: dynamic per-token int8 inputs
        out["input_activations"] = dict(INT8_TOKEN)
    return out


def expert_targets(name: str) -> list[str]:
    """The compressed-tensors targets of a plan layer: its name, or for a stacked expert tensor
    (``X.experts.gate_up_proj``) a regex over the per-expert Linears llm-compressor unfuses it into
    (``X.experts.<e>.gate_proj`` and ``.up_proj``; ``llmcompressor/modeling/moe/linearize.py``),
    which vLLM fuses back into one FusedMoE layer."""
    unfused = unfused_projections(name)
    if unfused is None:
        return [name]
    container, projs = unfused
    alt = projs[0] if len(projs) == 1 else "(?:" + "|".join(projs) + ")"
    return [rf"re:^{re.escape(container)}\.\d+\.{alt}$"]


class LLMCompressorExporter(Exporter):
    """llm-compressor recipe YAML (compressed-tensors ``config_groups``)."""

    name = "llm-compressor"
    suffix = ".yaml"
    fused_runtime = True
    runtime = "vLLM (which serves compressed-tensors checkpoints)"
    consumers = ("compressed-tensors",)
    stacked_experts = None  # regex targets over llm-compressor's per-expert Linears

    def __init__(self, modifier: str | None = None):
        self.modifier = modifier

    def modifier_for(self, plan: BitPlan) -> str:
        """``modifier`` if given; else the rounding the plan's damage was measured with:
        ``QuantizationModifier`` (round to nearest) for ``quantizer: rtn``, ``GPTQModifier`` for
        ``gptq`` and for plans that do not say (the historical default)."""
        if self.modifier is not None:
            return self.modifier
        table = plan.provenance.get("table") if isinstance(plan.provenance, dict) else None
        quantizer = table.get("quantizer") if isinstance(table, dict) else None
        return "QuantizationModifier" if quantizer == "rtn" else "GPTQModifier"

    def check(self, plan: BitPlan) -> None:
        if self.modifier is not None and (not isinstance(self.modifier, str) or not self.modifier.isidentifier()):
            raise ExportError(f"llm-compressor: modifier must be a class name such as "
                              f"'GPTQModifier' or 'QuantizationModifier', got {self.modifier!r}")
        refuse(plan, self.name, lambda o: o.is_keep or o.fmt is not None or 2 <= o.bits <= 8,
               "compressed-tensors integer weights here are 2-8 bits (or keep)")

    def build(self, plan: BitPlan) -> dict:
        groups, ignore = {}, []
        for opt, names in group_by_option(plan):
            names = [t for n in names for t in expert_targets(n)]
            if opt.is_keep:
                ignore.extend(names)
            else:
                groups[f"group_{len(groups)}"] = {"targets": list(names), **scheme_args(opt)}
        if not groups:
            raise ExportError("llm-compressor: the plan keeps every layer at 16 bits; there is nothing to quantize")
        body = {"ignore": ignore, "config_groups": groups}
        return {"quant_stage": {"quant_modifiers": {self.modifier_for(plan): body}}}

    def dumps(self, doc) -> str:
        import yaml

        return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)

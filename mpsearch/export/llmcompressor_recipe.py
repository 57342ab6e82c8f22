"""llm-compressor: a recipe whose modifier has one ``config_groups`` entry per option, as YAML.

The recipe layout is llm-compressor's (``quant_stage: quant_modifiers: <Modifier>: {...}``); each
group is a compressed-tensors ``QuantizationScheme`` (``compressed_tensors/quantization/
quant_scheme.py``): ``targets`` (here the exact module names, which compressed-tensors matches by
equality) and ``weights`` = ``QuantizationArgs`` (``num_bits``, ``type: int``, ``symmetric``,
``strategy: channel`` or ``group`` with ``group_size``, ``dynamic: false``). ``keep`` layers go to
``ignore``. The modifier defaults to ``GPTQModifier``; ``modifier="QuantizationModifier"`` gives
round-to-nearest. Weight bits 2-8 are written (vLLM's kernels serve 4 and 8).
"""

from __future__ import annotations

from ..plan import BitPlan
from ._base import ExportError, Exporter, group_by_option, refuse


def weight_args(opt) -> dict:
    args = {"num_bits": opt.bits, "type": "int", "symmetric": opt.symmetric,
            "strategy": "channel" if opt.group_size is None else "group"}
    if opt.group_size is not None:
        args["group_size"] = opt.group_size
    args["dynamic"] = False
    return args


class LLMCompressorExporter(Exporter):
    """llm-compressor recipe YAML (compressed-tensors ``config_groups``)."""

    name = "llm-compressor"
    suffix = ".yaml"
    fused_runtime = True
    runtime = "vLLM (which serves compressed-tensors checkpoints)"

    def __init__(self, modifier: str = "GPTQModifier"):
        self.modifier = modifier

    def check(self, plan: BitPlan) -> None:
        if not isinstance(self.modifier, str) or not self.modifier.isidentifier():
            raise ExportError(f"llm-compressor: modifier must be a class name such as "
                              f"'GPTQModifier' or 'QuantizationModifier', got {self.modifier!r}")
        refuse(plan, self.name, lambda o: o.is_keep or 2 <= o.bits <= 8,
               "compressed-tensors integer weights here are 2-8 bits (or keep)")

    def build(self, plan: BitPlan) -> dict:
        groups, ignore = {}, []
        for opt, names in group_by_option(plan):
            if opt.is_keep:
                ignore.extend(names)
            else:
                groups[f"group_{len(groups)}"] = {"targets": list(names), "weights": weight_args(opt)}
        if not groups:
            raise ExportError("llm-compressor: the plan keeps every layer at 16 bits; there is nothing to quantize")
        body = {"ignore": ignore, "config_groups": groups}
        return {"quant_stage": {"quant_modifiers": {self.modifier: body}}}

    def dumps(self, doc) -> str:
        import yaml

        return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)

"""NVIDIA ModelOpt: ``hf_quant_config.json`` with ``quant_algo: MIXED_PRECISION`` and ``quantized_layers``.

ModelOpt's unified HF export (``modelopt/torch/export/quant_utils.py``,
``process_layer_quant_config``) writes ``{"producer": ..., "quantization": {"quant_algo":
"MIXED_PRECISION", "kv_cache_quant_algo": null, "quantized_layers": {layer: {"quant_algo": ...,
"group_size": ...}}, "exclude_modules": [...]}}``; TensorRT-LLM and vLLM read it. The integer
weight-only algorithms of TensorRT-LLM's ``QuantAlgo`` that fit a plan's options are:

| option                      | quant_algo   | extra                                  |
|-----------------------------|--------------|----------------------------------------|
| int8, per channel, sym      | `W8A16`      |                                        |
| int8-gG (sym or asym)       | `W8A16_GPTQ` | `group_size`, `has_zero_point`         |
| int4, per channel, sym      | `W4A16`      |                                        |
| int4-gG, sym                | `W4A16_AWQ`  | `group_size`, `has_zero_point: false`  |
| int4-gG-asym                | `W4A16_GPTQ` | `group_size`, `has_zero_point: true`   |
| keep                        | (none)       | listed in `exclude_modules`            |

Other bit-widths (and asymmetric per-channel) have no TensorRT-LLM kernel and are refused.
"""

from __future__ import annotations

from .. import __version__
from ..options import Option
from ..plan import BitPlan
from ._base import ExportError, Exporter, refuse


def layer_algo(opt: Option) -> dict | None:
    """The ``quantized_layers`` entry of an option, or None if TensorRT-LLM has none."""
    if opt.bits not in (4, 8):
        return None
    if opt.group_size is None:
        return {"quant_algo": f"W{opt.bits}A16"} if opt.symmetric else None
    algo = "W4A16_AWQ" if opt.bits == 4 and opt.symmetric else f"W{opt.bits}A16_GPTQ"
    return {"quant_algo": algo, "group_size": opt.group_size, "has_zero_point": not opt.symmetric}


class ModelOptExporter(Exporter):
    """ModelOpt ``hf_quant_config.json`` (MIXED_PRECISION, per-layer ``quantized_layers``)."""

    name = "modelopt"
    suffix = ".json"
    fused_runtime = True
    runtime = "TensorRT-LLM / vLLM (which serve ModelOpt checkpoints)"

    def check(self, plan: BitPlan) -> None:
        refuse(plan, self.name, lambda o: o.is_keep or layer_algo(o) is not None,
               "TensorRT-LLM's integer weight-only formats are int4 and int8 (per channel symmetric, "
               "or grouped)")

    def build(self, plan: BitPlan) -> dict:
        layers = {lay: layer_algo(plan.option(lay)) for lay in plan.layers if not plan.option(lay).is_keep}
        if not layers:
            raise ExportError("modelopt: the plan keeps every layer at 16 bits; there is nothing to quantize")
        return {
            "producer": {"name": "mpsearch", "version": __version__},
            "quantization": {
                "quant_algo": "MIXED_PRECISION",
                "kv_cache_quant_algo": None,
                "quantized_layers": layers,
                "exclude_modules": [lay for lay in plan.layers if plan.option(lay).is_keep],
            },
        }

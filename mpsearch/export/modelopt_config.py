"""NVIDIA ModelOpt: ``hf_quant_config.json`` with ``quant_algo: MIXED_PRECISION`` and ``quantized_layers``.

ModelOpt's unified HF export (``modelopt/torch/export/quant_utils.py``: ``get_quant_config``,
``process_layer_quant_config``) writes ``{"producer": ..., "quantization": {"quant_algo":
"MIXED_PRECISION", "kv_cache_quant_algo": null, "quantized_layers": {layer: {"quant_algo": ...,
...}}}}``; TensorRT-LLM and vLLM read it (and ModelOpt's ``convert_hf_quant_config_format`` turns
it into the ``quantization_config`` of ``config.json``). ModelOpt has two integer weight-only
formats, and this export writes exactly the entries ModelOpt itself writes for them:

| option                      | ModelOpt format | entry                                                   |
|-----------------------------|-----------------|---------------------------------------------------------|
| int8, per channel, sym      | `int8_wo`       | `{"quant_algo": "W8A16"}`                               |
| int4-gG, sym                | `int4_awq`      | `{"quant_algo": "W4A16_AWQ", "group_size": G, "has_zero_point": false, "pre_quant_scale": true}` |
| keep                        | (none)          | not in `quantized_layers`; listed in `exclude_modules`  |

Other options are refused: ModelOpt quantizes int4 only in groups (its export asserts block
sizes), writes int8 as ``W8A16`` whatever its blocks (so a grouped int8 plan would be served per
channel), has no zero points for integers, and neither its config converter nor TensorRT-LLM's
PyTorch back end reads the ``W4A16`` / ``W4A16_GPTQ`` / ``W8A16_GPTQ`` algorithms.
"""

from __future__ import annotations

from .. import __version__
from ..options import Option
from ..plan import BitPlan
from ._base import ExportError, Exporter, refuse


def layer_algo(opt: Option) -> dict | None:
    """The ``quantized_layers`` entry ModelOpt writes for an option, or None if it has none."""
    if not opt.symmetric:
        return None
    if opt.bits == 8 and opt.group_size is None:
        return {"quant_algo": "W8A16"}
    if opt.bits == 4 and opt.group_size is not None:
        return {"quant_algo": "W4A16_AWQ", "group_size": opt.group_size, "has_zero_point": False,
                "pre_quant_scale": True}
    return None


class ModelOptExporter(Exporter):
    """ModelOpt ``hf_quant_config.json`` (MIXED_PRECISION, per-layer ``quantized_layers``)."""

    name = "modelopt"
    suffix = ".json"
    fused_runtime = True
    runtime = "TensorRT-LLM / vLLM (which serve ModelOpt checkpoints)"

    def check(self, plan: BitPlan) -> None:
        refuse(plan, self.name, lambda o: o.is_keep or layer_algo(o) is not None,
               "ModelOpt's integer weight-only formats are int8 per channel (W8A16) and int4 in "
               "groups (W4A16_AWQ), both symmetric (or keep)")

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

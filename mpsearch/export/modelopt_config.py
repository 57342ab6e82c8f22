"""NVIDIA ModelOpt: ``hf_quant_config.json`` with ``quant_algo: MIXED_PRECISION`` and ``quantized_layers``.

ModelOpt's unified HF export (``modelopt/torch/export/quant_utils.py``: ``get_quant_config``,
``process_layer_quant_config``) writes ``{"producer": ..., "quantization": {"quant_algo":
"MIXED_PRECISION", "kv_cache_quant_algo": null, "quantized_layers": {layer: {"quant_algo": ...,
...}}}}``; TensorRT-LLM and vLLM read it (and ModelOpt's ``convert_hf_quant_config_format`` turns
it into the ``quantization_config`` of ``config.json``). This export writes exactly the entries
ModelOpt itself writes (``process_layer_quant_config``) for its formats (the options of
``--target modelopt``) and for the mpsearch integer options that are one of them:

| option                           | ModelOpt format  | entry                                              |
|----------------------------------|------------------|----------------------------------------------------|
| `int8_wo`; int8, per channel, sym| `int8_wo`        | `{"quant_algo": "W8A16"}`                          |
| `int4_awq`; int4-gG, sym         | `int4_awq`       | `{"quant_algo": "W4A16_AWQ", "group_size": G, "has_zero_point": false, "pre_quant_scale": true}` |
| `fp8`                            | `fp8`            | `{"quant_algo": "FP8"}`                            |
| `nvfp4-modelopt`                 | `nvfp4`          | `{"quant_algo": "NVFP4", "group_size": 16}`        |
| keep                             | (none)           | not in `quantized_layers`; listed in `exclude_modules` |

A plan of one format (besides keep) is written as ModelOpt writes it: that entry's fields at the top
of ``quantization`` (``"quant_algo": "FP8"``...), no ``quantized_layers``.

``pre_quant_scale: true`` is what ModelOpt writes for every ``int4_awq`` layer: the AWQ smoothing
factor a reader divides the input by. The ``int4_awq`` format is AWQ's round-to-nearest part
(ModelOpt's ``max`` calibration, no AWQ search), for which that factor is 1 everywhere: the
flag changes no value (and ``export_hf_checkpoint`` stores no ``pre_quant_scale`` tensor then).
``fp8`` and ``nvfp4-modelopt`` also quantize activations with a calibrated static range
(``input_scale``), which ModelOpt's calibration computes, not this file.

Other options are refused: ModelOpt quantizes int4 only in groups (its export asserts block
sizes), writes int8 as ``W8A16`` whatever its blocks (so a grouped int8 plan would be served per
channel), has no zero points for integers, and neither its config converter nor TensorRT-LLM's
PyTorch back end reads the ``W4A16`` / ``W4A16_GPTQ`` / ``W8A16_GPTQ`` algorithms.

Mixture-of-experts: ModelOpt quantizes transformers' stacked experts in place
(``_QuantFusedExperts``: one weight quantizer per expert of ``gate_up_proj`` and ``down_proj``) and
its ``get_quant_config`` writes **one** entry for the experts module, ``model.layers.0.mlp.experts``
(the FusedMoE layer vLLM and TensorRT-LLM look it up by; the checkpoint's tensors are the
per-expert ``experts.<e>.gate_proj.weight``...). So the stacked tensors of one experts module are
written as that one entry and must share one option (refused otherwise, ``force`` or not, and when
the plan has only some of them); a kept experts module is listed in ``exclude_modules``. Routers are
not plan layers, and ModelOpt does not quantize them. A plan with stacked experts is always written
``MIXED_PRECISION``, even with one format: in the one-format form a reader quantizes every module
``exclude_modules`` does not name, and the routers' names (``mlp.gate``, which ModelOpt's own file
lists there) are not in the plan; ``quantized_layers`` names exactly what is quantized.
"""

from __future__ import annotations

from .. import __version__
from ..options import Option
from ..plan import BitPlan
from ._base import consumer_config, STACKED_EXPERT, ExportError, Exporter, int_settings, refuse

def layer_algo(opt: Option) -> dict | None:
    """The ``quantized_layers`` entry ModelOpt writes for an option (a float format's as its
    declaration gives it, :attr:`mpsearch.formats.Format.consumer_config`), or None if it has none."""
    declared = consumer_config(opt, "modelopt")
    if declared is not None:
        return declared
    opt = int_settings(opt)
    if not opt.symmetric:
        return None
    if opt.bits == 8 and opt.group_size is None:
        return {"quant_algo": "W8A16"}
    if opt.bits == 4 and opt.group_size is not None:
        return {"quant_algo": "W4A16_AWQ", "group_size": opt.group_size, "has_zero_point": False,
                "pre_quant_scale": True}
    return None


def experts_entry(name: str) -> str:
    """The module ModelOpt's ``quantized_layers`` names for a plan layer: the experts module of a
    stacked expert tensor, else the layer itself."""
    m = STACKED_EXPERT.match(name)
    return name if m is None else m["container"]


def experts_modules(plan: BitPlan) -> dict[str, list[str]]:
    """Experts module -> the plan's stacked expert tensors in it."""
    out: dict[str, list[str]] = {}
    for lay in plan.layers:
        m = STACKED_EXPERT.match(lay)
        if m is not None:
            out.setdefault(m["container"], []).append(lay)
    return out


class ModelOptExporter(Exporter):
    """ModelOpt ``hf_quant_config.json`` (MIXED_PRECISION, per-layer ``quantized_layers``)."""

    name = "modelopt"
    suffix = ".json"
    fused_runtime = True
    runtime = "TensorRT-LLM / vLLM (which serve ModelOpt checkpoints)"
    consumers = ("modelopt",)
    stacked_experts = None  # one quantized_layers entry per experts module, as ModelOpt writes them

    def check(self, plan: BitPlan) -> None:
        refuse(plan, self.name, lambda o: o.is_keep or layer_algo(o) is not None,
               "ModelOpt's integer weight-only formats are int8 per channel (W8A16) and int4 in "
               "groups (W4A16_AWQ), both symmetric (or keep), besides its fp8 and nvfp4-modelopt formats")
        for container, members in experts_modules(plan).items():
            names = {plan.option(m).name for m in members}
            projs = {STACKED_EXPERT.match(m)["proj"] for m in members}
            if len(names) > 1:
                shown = ", ".join(f"{m}={plan.option(m).name}" for m in members)
                raise ExportError(f"modelopt: ModelOpt writes the experts of {container!r} as one quantized_layers "
                                  f"entry, but the plan gives them different options: {shown}; solve with "
                                  f"--target modelopt (it ties them)")
            if "down_proj" not in projs or projs == {"down_proj"}:
                raise ExportError(f"modelopt: the plan has only {', '.join(sorted(members))} of {container!r}, but "
                                  f"ModelOpt writes all of that experts module's tensors as one quantized_layers "
                                  f"entry; plan all of them with one option")

    def build(self, plan: BitPlan) -> dict:
        entry_of = {lay: experts_entry(lay) for lay in plan.layers}  # plan layer -> ModelOpt module name
        layers = {entry_of[lay]: layer_algo(plan.option(lay)) for lay in plan.layers if not plan.option(lay).is_keep}
        if not layers:
            raise ExportError("modelopt: the plan keeps every layer at 16 bits; there is nothing to quantize")
        keep = list(dict.fromkeys(entry_of[lay] for lay in plan.layers if plan.option(lay).is_keep))
        entries = {str(e): e for e in layers.values()}
        if len(entries) == 1 and not experts_modules(plan):  # one format: ModelOpt writes it as the model's quant_algo
            (entry,) = entries.values()
            quant = {**entry, "kv_cache_quant_algo": None, "exclude_modules": keep}
        else:
            quant = {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": None, "quantized_layers": layers,
                     "exclude_modules": keep}
        return {"producer": {"name": "mpsearch", "version": __version__}, "quantization": quant}

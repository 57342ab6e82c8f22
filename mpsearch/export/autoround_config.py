"""AutoRound: the ``layer_config`` mapping (layer name -> its scheme), as JSON.

AutoRound (``auto_round``) takes ``AutoRound(model, tokenizer, ..., layer_config={...})`` where each
entry overrides the global scheme for one layer: ``bits``, ``group_size`` (``-1`` = per output
channel), ``sym`` and ``data_type: "int"``; a layer kept in floating point is ``{"bits": 16,
"data_type": "float"}`` (the form AutoRound writes to ``extra_config`` in the
``quantization_config.json`` of its checkpoints). Every plan layer is written, so the global
scheme does not matter for them. Integer bits 2-8 are written (AutoRound's exported kernels serve
2, 3, 4 and 8). Use it as ``layer_config=json.load(open(FILE))``.

AutoRound (0.16) refuses an entry that asks for 8-bit *asymmetric* weights (``ValueError``: vLLM's
8-bit GPTQ-format kernels are symmetric only) unless the export format is
``auto_round:llm_compressor`` or ``AR_ALLOW_W8_ASYM=1`` is set, so such plans are refused here
unless ``w8_asym=True`` (``--opt w8_asym=True``) says one of those is in use. AutoRound also keeps,
on its own, any layer whose weight has a dimension not divisible by 32 at 16 bits (with its usual
integer weight-only schemes), and ``lm_head`` when the model ties it to the embeddings.

The AutoRound formats of ``--target autoround`` (``autoround-intB-gG[-asym]``) are written as
``{"bits": B, "group_size": G, "sym": ..., "data_type": "int"}``, mpsearch's own options likewise.

Mixture-of-experts: AutoRound unfuses transformers' stacked experts before it resolves
``layer_config`` (``prepare_model_for_moe_quantization``: each expert becomes ``<experts>.<e>`` with
``gate_proj``/``up_proj``/``down_proj`` Linears, ``gate_up_proj`` split in two), so a stacked tensor
``model.layers.0.mlp.experts.gate_up_proj`` is written as the regex key
``^model.layers.0.mlp.experts.[0-9]+.(gate_proj|up_proj)$``, which AutoRound expands to every
expert's Linears (its ``to_standard_regex`` escapes bare dots, and would escape an escaped dot twice).
Routers are not plan layers, and AutoRound leaves them alone: ``mlp.gate`` is in its predefined
``ignore_layers``, transformers' routers are not Linears, and Qwen2-MoE's ``shared_expert_gate``
(a Linear with one output row) is kept by its shape rule above.
"""

from __future__ import annotations

import re

from ..plan import BitPlan
from ._base import ExportError, Exporter, int_settings, refuse, unfused_projections


def layer_key(name: str) -> str:
    """The ``layer_config`` key of a plan layer: its name, or for a stacked expert tensor the regex
    over the per-expert Linears AutoRound unfuses it into (bare dots: AutoRound escapes them)."""
    unfused = unfused_projections(name)
    if unfused is None:
        return name
    container, projs = unfused
    if not re.fullmatch(r"[A-Za-z0-9_.]+", container):
        raise ExportError(f"autoround: cannot write a layer_config pattern for {name!r} (its module path has "
                          f"characters other than letters, digits, '_' and '.')")
    alt = projs[0] if len(projs) == 1 else "(" + "|".join(projs) + ")"
    return f"^{container}.[0-9]+.{alt}$"


class AutoRoundExporter(Exporter):
    """AutoRound ``layer_config`` JSON."""

    name = "autoround"
    suffix = ".json"
    fused_runtime = True
    runtime = "AutoRound's serving back ends (vLLM, SGLang)"
    consumers = ("autoround",)
    stacked_experts = None  # regex keys over the per-expert Linears AutoRound unfuses them into

    def __init__(self, w8_asym: bool = False):
        self.w8_asym = w8_asym

    def check(self, plan: BitPlan) -> None:
        if not isinstance(self.w8_asym, bool):
            raise ExportError(f"autoround: w8_asym must be True or False, got {self.w8_asym!r}")
        refuse(plan, self.name, lambda o: o.is_keep or 2 <= int_settings(o).bits <= 8,
               "AutoRound integer schemes are 2-8 bits (or 16 to keep a layer)")
        if not self.w8_asym:
            refuse(plan, self.name, lambda o: o.is_keep or int_settings(o).bits != 8 or int_settings(o).symmetric,
                   "AutoRound refuses 8-bit asymmetric weights unless its export format is "
                   "'auto_round:llm_compressor' or AR_ALLOW_W8_ASYM=1 is set (then pass --opt w8_asym=True)")

    def build(self, plan: BitPlan) -> dict:
        out = {}
        for lay in plan.layers:
            opt = int_settings(plan.option(lay))
            if opt.is_keep:
                out[layer_key(lay)] = {"bits": 16, "data_type": "float"}
            else:
                out[layer_key(lay)] = {"bits": opt.bits, "group_size": -1 if opt.group_size is None else opt.group_size,
                                       "sym": opt.symmetric, "data_type": "int"}
        return out

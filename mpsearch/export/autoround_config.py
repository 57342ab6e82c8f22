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
"""

from __future__ import annotations

from ..plan import BitPlan
from ._base import ExportError, Exporter, int_settings, refuse


class AutoRoundExporter(Exporter):
    """AutoRound ``layer_config`` JSON."""

    name = "autoround"
    suffix = ".json"
    fused_runtime = True
    runtime = "AutoRound's serving back ends (vLLM, SGLang)"
    consumers = ("autoround",)
    stacked_experts = ("AutoRound unfuses fused experts into per-expert Linears (experts.<e>.gate_proj ...), "
                       "whose layer_config entries mpsearch does not write yet; export with --to "
                       "llm-compressor or llama.cpp")

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
                out[lay] = {"bits": 16, "data_type": "float"}
            else:
                out[lay] = {"bits": opt.bits, "group_size": -1 if opt.group_size is None else opt.group_size,
                            "sym": opt.symmetric, "data_type": "int"}
        return out

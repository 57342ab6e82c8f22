"""``mpsearch export``: write a plan in a consumer's format (torchao, GPTQModel, llama.cpp ...)."""

from __future__ import annotations

from ._common import add_command, check_outputs, parse_params, say

EXAMPLE = """mpsearch export --plan plan.json --to gptqmodel -o quantize_config.json
mpsearch export --plan plan.json --to llama.cpp -o tensor_types.txt
formats: torchao, gptqmodel, llm-compressor, llama.cpp, autoround, modelopt"""


def register(sub):
    p = add_command(sub, "export", "Write a plan in the per-layer format of another quantizer.", EXAMPLE, run)
    p.add_argument("--plan", required=True, help="plan (.json)")
    p.add_argument("--to", required=True, metavar="FORMAT",
                   help="torchao | gptqmodel | llm-compressor | llama.cpp | autoround | modelopt")
    p.add_argument("-o", "--output", required=True, help="where to write the consumer's file")
    p.add_argument("--force", action="store_true",
                   help="export even if fused layers (q/k/v, gate/up) have different options")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="a format setting (repeatable), e.g. --opt arch=qwen2 --opt keep_type=bf16")


def run(args) -> int:
    from ..export import get_exporter, save_export
    from ..plan import BitPlan

    check_outputs(files=[("-o", args.output)])
    opts = parse_params(args.opt)
    get_exporter(args.to, **opts)  # the format and its settings, before reading anything
    plan = BitPlan.load(args.plan)
    path = save_export(plan, args.to, args.output, force=args.force, **opts)
    say(f"wrote {path} ({args.to}, {len(plan.layers)} layers)")
    return 0

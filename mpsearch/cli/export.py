"""``mpsearch export``: write a plan in a consumer's format (torchao, GPTQModel, llama.cpp ...)."""

from __future__ import annotations

from ._common import add_command, check_outputs, parse_params, say, target_from_args

EXAMPLE = """mpsearch export --plan plan.json --to gptqmodel -o quantize_config.json
mpsearch export --plan plan.json --to llama.cpp -o tensor_types.txt
mpsearch export --plan plan.json -o tensor_types.txt    # the plan's own target's format
formats: torchao, gptqmodel, llm-compressor, llama.cpp, autoround, modelopt"""


def register(sub):
    p = add_command(sub, "export", "Write a plan in the per-layer format of another quantizer.", EXAMPLE, run)
    p.add_argument("--plan", required=True, help="plan (.json)")
    p.add_argument("--to", default=None, metavar="FORMAT",
                   help="torchao | gptqmodel | llm-compressor | llama.cpp | autoround | modelopt "
                        "(default: the format of --target, or of the target the plan was solved for)")
    p.add_argument("--target", default=None, metavar="NAME", help="write the format of this target")
    p.add_argument("-o", "--output", required=True, help="where to write the consumer's file")
    p.add_argument("--force", action="store_true",
                   help="export even if fused layers (q/k/v, gate/up) have different options")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="a format setting (repeatable), e.g. --opt arch=qwen2 --opt keep_type=bf16")


def run(args) -> int:
    from ..export import get_exporter, save_export
    from ..plan import BitPlan

    from ..targets import export_format

    check_outputs(files=[("-o", args.output)])
    opts = parse_params(args.opt)
    if args.to is not None:
        get_exporter(args.to, **opts)  # the format and its settings, before reading anything
    target = target_from_args(args)
    plan = BitPlan.load(args.plan)
    fmt = export_format(plan, args.to, target)
    path = save_export(plan, fmt, args.output, force=args.force, **opts)
    say(f"wrote {path} ({fmt}, {len(plan.layers)} layers)")
    counted = plan.provenance.get("file") if isinstance(plan.provenance, dict) else None
    if fmt == "llama.cpp" and isinstance(counted, dict) and counted.get("command"):
        # the base mix the file budget counted the unplanned tensors with (token_embd, output ...)
        say(f"quantize with: llama-quantize --tensor-type-file {path} MODEL-f16.gguf MODEL-mixed.gguf "
            f"{counted['command']}")
    return 0

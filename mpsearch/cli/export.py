"""``mpsearch export``: write a plan in a consumer's format (torchao, GPTQModel, llama.cpp ...)."""

from __future__ import annotations

from ..errors import MpsearchError
from ._common import add_command, add_json_arg, check_outputs, parse_params, report, target_from_args

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
    add_json_arg(p)
    p.add_argument("-o", "--output", required=True, help="where to write the consumer's file")
    p.add_argument("--force", action="store_true",
                   help="export even if fused layers (q/k/v, gate/up) have different options")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="a format setting (repeatable), e.g. --opt arch=qwen2 --opt keep_type=bf16")
    p.add_argument("--imatrix", default=None, metavar="FILE",
                   help="llama.cpp: the importance matrix llama-quantize will use; it must be the one the plan's "
                        "table was estimated with (default: that one, where its file is still there). An imatrix "
                        "mpsearch computed is written beside the output (OUTPUT.imatrix.gguf)")


def run(args) -> int:
    from ..export import get_exporter, save_export  # start-up: the CLI's parser loads only what it needs
    from ..plan import BitPlan  # start-up: the CLI's parser loads only what it needs

    from ..targets import export_format  # start-up: the CLI's parser loads only what it needs

    check_outputs(files=[("-o", args.output)])
    opts = parse_params(args.opt)
    if args.to is not None:
        get_exporter(args.to, **opts)  # the format and its settings, before reading anything
    target = target_from_args(args)
    plan = BitPlan.load(args.plan)
    # start-up: the CLI's parser loads only what it needs
    from ..coverage import check_recorded, recorded, recorded_summary

    check_recorded(plan.provenance)
    fmt = export_format(plan, args.to, target)
    if get_exporter(fmt, **opts).name != "llama.cpp":
        if args.imatrix:
            raise MpsearchError(f"--imatrix is llama.cpp's importance matrix; format {fmt!r} does not use one")
        path = save_export(plan, fmt, args.output, force=args.force, **opts)
        report(args, {"output": str(path), "format": fmt, "layers": len(plan.layers),
                      "coverage": recorded(plan.provenance)},
               [f"wrote {path} ({fmt}, {len(plan.layers)} layers)", recorded_summary(plan.provenance)])
        return 0
    # start-up: the CLI's parser loads only what it needs
    from ..export.llamacpp_types import quantize_command
    # start-up: the CLI's parser loads only what it needs
    from ..imatrix import imatrix_for_plan, plan_rounding

    imatrix, _ = imatrix_for_plan(plan, args.imatrix, strict=True)  # the rounding the table was made with
    copy = None
    if imatrix is not None and str((plan_rounding(plan)[1] or {}).get("source", "")).startswith("computed"):
        copy = str(args.output) + ".imatrix.gguf"
        check_outputs(files=[("-o (its imatrix file)", copy)])
    path = save_export(plan, fmt, args.output, force=args.force, **opts)
    if copy:
        imatrix.write_copy(copy)
    counted = plan.provenance.get("file") if isinstance(plan.provenance, dict) else None
    base = counted["command"] if isinstance(counted, dict) and counted.get("command") else "Q8_0"
    # a file budget counted the unplanned tensors (token_embd, output ...) with that base mix
    command = quantize_command(plan, path, imatrix=copy or (imatrix.path if imatrix else None), base=base, **opts)
    report(args, {"output": str(path), "format": fmt, "layers": len(plan.layers), "imatrix_file": copy,
                  "coverage": recorded(plan.provenance), "quantize_command": command},
           [f"wrote {path} ({fmt}, {len(plan.layers)} layers)" + (f" and {copy}" if copy else ""),
            recorded_summary(plan.provenance), "quantize with: " + command])
    return 0

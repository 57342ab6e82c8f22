"""``mpsearch apply``: fake-quantize a model by a plan and save its state dict."""

from __future__ import annotations

from ._common import (add_command, add_device_args, add_imatrix_args, add_json_arg, check_outputs,
                      load_model_args, report, say)

EXAMPLE = """mpsearch apply --model mypkg.models:build --plan plan.json -o quantized.pt"""


def register(sub):
    p = add_command(sub, "apply", "Fake-quantize a model according to a plan; save its state dict.", EXAMPLE, run)
    p.add_argument("--model", required=True, help="model spec")
    p.add_argument("--plan", required=True, help="plan (.json)")
    add_device_args(p)
    add_imatrix_args(p, auto=False)
    add_json_arg(p)
    p.add_argument("-o", "--output", required=True, help="where to write the quantized state dict (.pt)")


def run(args) -> int:
    from pathlib import Path

    from ..apply import apply_plan  # start-up: the CLI's parser loads only what it needs
    from ..fileio import torch_save  # start-up: the CLI's parser loads only what it needs
    from ..plan import BitPlan  # start-up: the CLI's parser loads only what it needs

    check_outputs(files=[("-o", args.output)])
    plan = BitPlan.load(args.plan)
    from ..imatrix import imatrix_for_plan  # start-up: the CLI's parser loads only what it needs

    imatrix, note = imatrix_for_plan(plan, args.imatrix, strict=False)
    if note:
        say(note)
    model = load_model_args(args)
    quantized = apply_plan(model, plan, inplace=True, imatrix=imatrix)
    out = Path(args.output)
    torch_save(quantized.state_dict(), out)
    report(args, {"output": str(out), "layers": len(plan.bits)}, [f"quantized {len(plan.bits)} layers; wrote {out}"])
    return 0

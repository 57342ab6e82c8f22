"""``mpsearch apply``: fake-quantize a model by a plan and save its state dict."""

from __future__ import annotations

from ._common import add_command, add_device_args, load_model_args, say

EXAMPLE = """mpsearch apply --model mypkg.models:build --plan plan.json -o quantized.pt"""


def register(sub):
    p = add_command(sub, "apply", "Fake-quantize a model according to a plan; save its state dict.", EXAMPLE, run)
    p.add_argument("--model", required=True, help="model spec")
    p.add_argument("--plan", required=True, help="plan (.json)")
    add_device_args(p)
    p.add_argument("-o", "--output", required=True, help="where to write the quantized state dict (.pt)")


def run(args) -> int:
    import os
    import tempfile
    from pathlib import Path

    import torch

    from ..apply import apply_plan
    from ..plan import BitPlan
    plan = BitPlan.load(args.plan)
    model = load_model_args(args)
    quantized = apply_plan(model, plan, inplace=True)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(quantized.state_dict(), tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    say(f"quantized {len(plan.bits)} layers; wrote {out}")
    return 0

"""``mpsearch targets``: the quantizers a plan can be made for, their options and costs."""

from __future__ import annotations

from ..errors import MpsearchError
from ._common import add_command, add_device_args, load_model_args, say

EXAMPLE = """mpsearch targets              # every target and its options
mpsearch targets llama.cpp    # one target: options, bits per weight, defaults
mpsearch targets llama.cpp --model smollm2   # every recipe's real file size for that model"""


def register(sub):
    p = add_command(sub, "targets", "List the targets (consumers), their options and storage costs.", EXAMPLE, run)
    p.add_argument("name", nargs="?", help="one target to describe")
    p.add_argument("--model", default=None,
                   help="a model spec: print the real file size of each recipe and uniform option of the target "
                        "for it (the values --budget size=NAME takes)")

    add_device_args(p)


def run(args) -> int:
    from ..targets import get_target, target_names  # start-up: the CLI's parser loads only what it needs

    if args.model:
        if not args.name:
            raise MpsearchError("targets --model needs a target: mpsearch targets llama.cpp --model M")
        from ..filemodels import model_file_model  # start-up: the CLI's parser loads only what it needs
        from ..filesize import recipe_table  # start-up: the CLI's parser loads only what it needs

        fm = model_file_model(load_model_args(args), get_target(args.name))
        say(f"{get_target(args.name).name} files of {args.model} ({fm.source}):")
        for line in recipe_table(fm):
            say("  " + line)
        return 0
    names = [args.name] if args.name else target_names()
    for name in names:
        t = get_target(name)
        say(f"{t.name}: {t.description}")
        say(f"  executes with: {t.consumer}; export: {t.exporter or '(none: mpsearch apply)'}"
            f"{'; fuses q/k/v and gate/up (tied at solve time)' if t.fused_runtime else ''}")
        if t.notes:
            say(f"  rules: {t.notes}")
        if not args.name:
            say(f"  options: {', '.join(t.options)}")
            continue
        rows = t.describe()
        say(f"  {'option':<20} {'bits':>4} {'bits/weight':>11} {'act':>4}  default")
        for row in rows:
            default = "yes" if row["default"] else "with imatrix" if row["default_with_imatrix"] else ""
            need = "  (needs an importance matrix)" if row["needs_imatrix"] else ""
            say(f"  {row['option']:<20} {row['bits']:>4} {row['bits_per_weight']:>11.4f} "
                f"{row['act_bits']:>4}  {default}{need}")
    return 0

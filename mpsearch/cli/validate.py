"""``mpsearch validate``: check a plan on a model, report real size and measured quality."""

from __future__ import annotations

from ..recipe import is_callable_spec
from ._common import (add_command, add_device_args, add_imatrix_args, add_json_arg, add_target_arg,
                      add_text_args, check_outputs, dump_json, load_model_args, report, say, target_from_args)

EXAMPLE = """mpsearch validate --model mypkg.models:build --plan plan.json \\
    --metric mypkg.eval:accuracy -o report.json"""


def register(sub):
    p = add_command(sub, "validate", "Apply a plan, check every layer's levels, measure size and quality.", EXAMPLE, run)
    p.add_argument("--model", required=True, help="model spec")
    p.add_argument("--plan", required=True, help="plan (.json)")
    p.add_argument("--metric", help="quality: kld, top1, perplexity (causal LMs; default kld), cosine, accuracy, "
                                    "agreement, kl, or package.module:callable taking the model, returning a float")
    p.add_argument("--eval-data", help="evaluation data spec (text file, .pt, callable, short name) for --metric NAME")
    add_device_args(p)
    add_text_args(p, calib=False)
    add_target_arg(p, "which options each layer may take (checked: no consumer fallback)")
    p.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                   help="accept leaving these tensors unplanned (the plan's own exclusions are accepted too)")
    add_imatrix_args(p, auto=False)
    add_json_arg(p)
    p.add_argument("-o", "--output", help="write the report (.json)")


def run(args) -> int:
    from ..plan import BitPlan  # start-up: the CLI's parser loads only what it needs
    from ..specs import _load_callable, load_metric  # start-up: the CLI's parser loads only what it needs
    from ..fileio import atomic_write_text  # start-up: the CLI's parser loads only what it needs
    from ..validate import validate_plan  # start-up: the CLI's parser loads only what it needs

    check_outputs(files=[("-o", args.output)])
    target = target_from_args(args)
    plan = BitPlan.load(args.plan)
    from ..imatrix import imatrix_for_plan  # start-up: the CLI's parser loads only what it needs

    imatrix, note = imatrix_for_plan(plan, args.imatrix, strict=False)
    if note:
        say(note)
    model = load_model_args(args)
    metric = None

    if args.eval_data or (args.metric and not is_callable_spec(args.metric)):  # a named metric needs --eval-data
        metric = load_metric(args.metric, args.eval_data, model, args.model, eval_tokens=args.eval_tokens,
                             window=args.eval_window, stride=args.eval_stride, batch_size=args.batch_size,
                             seq_len=args.seq_len)
    elif args.metric:
        from ..metrics import FunctionMetric  # start-up: the CLI's parser loads only what it needs

        metric = FunctionMetric(_load_callable(args.metric, "metric"))  # checks it returns a number
    result = validate_plan(model, plan, metric=metric, target=target, exclude=args.exclude, imatrix=imatrix)
    from ..coverage import recorded_summary  # start-up: the CLI's parser loads only what it needs

    lines = [f"levels ok in all {len(result.layers)} planned layers; unplanned (kept): {len(result.unplanned)}",
             recorded_summary({"coverage": result.coverage}),
             f"real size: {result.size_mb:.4f} MB, {result.avg_bits:.4f} bits per weight"]
    if result.quality is not None:
        lines.append(f"quality: {result.quality:.6g} (full precision: {result.baseline_quality:.6g})")
        for key, value in (result.metrics or {}).items():
            lines.append(f"  {key}: {value:.6g} (full precision: "
                         f"{result.baseline_metrics.get(key, float('nan')):.6g})")
    if args.output:
        atomic_write_text(args.output, dump_json(result.to_dict()) + "\n")
        lines.append(f"wrote {args.output}")
    report(args, {**result.to_dict(), "output": args.output}, lines)
    return 0

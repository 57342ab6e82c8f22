"""``mpsearch demo``: the whole job on all-MiniLM-L6-v2 with Shakespeare text, and the arguments of
``mpsearch frontier --model``. Both parse, make one library call (:func:`mpsearch.pipeline.run_demo`,
:func:`mpsearch.pipeline.model_frontier`) and print.

The demo estimates a cost table on passages from some plays, solves the size/quality frontier,
applies and measures plans along it on passages from *other* plays (embedding cosine to the
full-precision model), measures uniform options alongside, recommends at each uniform size the best
measured plan, and writes everything into ``--out``. A second run (or one after an interruption)
reads the cached table and measurements back.
"""

from __future__ import annotations

from ..recipe import DEFAULT_RECIPE, DEMO_DATA, REFINE_METHODS
from ._common import parse_params, say

EXAMPLE = "mpsearch demo --out mpsearch-demo"

#: the default recipe and the demo's data sizes (chosen from experiments/measured_loop.md)
DEMO = {**DEFAULT_RECIPE, **DEMO_DATA}


def register(sub):
    from ._common import add_command

    p = add_command(sub, "demo", "Run the whole job on a real pretrained model (all-MiniLM-L6-v2).", EXAMPLE, run)
    p.add_argument("--out", default="mpsearch-demo", help="output folder (default: ./mpsearch-demo)")
    p.add_argument("--estimator", default=DEMO["estimator"], help=f"estimator (default: {DEMO['estimator']})")
    p.add_argument("--solver", default=DEMO["solver"], help=f"solver (default: {DEMO['solver']})")
    p.add_argument("--validate", type=int, default=DEMO["validate"], help="plans to measure along the frontier")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    from ._common import add_device_args, add_target_arg

    add_device_args(p)
    add_target_arg(p)


def check_run_args(args, out_flag: str, out: str) -> None:
    """Settings and output paths of the model path, before any heavy import or work."""
    from ..errors import MpsearchError
    from ..options import parse_options
    from ..registry import check_settings, get_solver
    from ._common import check_outputs

    if args.validate < 0:
        raise MpsearchError(f"--validate must be an integer >= 0 (plans to measure), got {args.validate}")
    check_outputs(dirs=[(out_flag, out)])
    estimator = args.estimator or DEFAULT_RECIPE["estimator"]
    check_settings("estimator", estimator, parse_params(getattr(args, "estimator_param", [])))
    get_solver(args.solver or DEFAULT_RECIPE["solver"], **parse_params(getattr(args, "param", [])))
    target = getattr(args, "target", None)
    if target is not None:
        from ..targets import get_target

        t = get_target(target)  # an unknown target is refused before any work
        if getattr(args, "options", None) is not None:
            t.parsed_options(args.options)
    else:
        parse_options(getattr(args, "options", None) or DEFAULT_RECIPE["options"])


def run(args) -> int:
    import time

    check_run_args(args, "--out", args.out)
    t0 = time.perf_counter()
    from ..pipeline import run_demo

    result = run_demo(args.out, estimator=args.estimator, solver=args.solver, validate=args.validate,
                      progress=not args.no_progress, device=args.device, dtype=args.dtype,
                      target=args.target)
    say(summarize(result))
    say(f"done in {time.perf_counter() - t0:.0f} s")
    return 0


def summarize(run, name: str = "all-MiniLM-L6-v2") -> str:
    """A few lines: the recommended plan at each target against uniform, the proxy check, the files."""
    lines = [f"{name}, {run.table.metadata.get('estimator')} estimator, "
             f"{len(run.table.layers)} layers; quality = {run.metric_label} on held-out data"]
    q = f"measured_{run.metric}"
    uni = run.uniform.set_index("option") if len(run.uniform) else None
    for _, r in run.recommended.iterrows():
        if r["status"] == "none":
            lines.append(f"  {r['budget']}: no measured plan fits")
            continue
        tag = ""
        if uni is not None and r["budget"] in uni.index:
            tag = f"   uniform {r['budget']} {uni.loc[r['budget'], q]:.4g}"
        lines.append(f"  {r['avg_bits']:.3f} bits/weight (at {r['budget']}): recommended {r['plan']} "
                     f"{r['quality']:.4g} [{r['status']}]{tag}")
    chk = run.uniform_check
    lines.append(f"mixed vs uniform: {chk.get('beats_uniform', 0)} of {chk.get('validated', 0)} measured mixed plans "
                 f"at least as good as uniform of equal or smaller size" + (
                     f"; {chk['loses']} LOSE (see warnings)" if chk.get("loses") else ""))
    log = run.refinement
    if len(log) and "data" in log.columns:  # evolve: one line per target, the search data's and the evaluation's
        for _, r in log[log["data"] == "evaluation"].iterrows():
            lines.append(f"evolve at {r['budget']}: {int(r['evals'])} measured plans ({int(r['round'])} generations); "
                         f"calibration-data loss {r['search_loss_before']:.4g} -> {r['search_loss_after']:.4g}, "
                         f"evaluation loss {r['loss_before']:.4g} -> {r['loss_after']:.4g}"
                         + ("" if r["loss_after"] <= r["loss_before"] else " (worse: not recommended)"))
    elif len(log):
        gain = run.refinement.groupby("round")["gain"].sum()
        lines.append(f"refinement: {int(run.refinement['evals'].sum())} measured plans; measured loss gain per round "
                     + ", ".join(f"{g:.4g}" for g in gain))
    lines.append(f"proxy check (information): Spearman(predicted damage, measured loss) = {run.proxy['spearman']:.3f}"
                 + ("  (POOR)" if run.proxy["poor"] else ""))
    lines.append(f"outputs in {run.out}/:")
    for key, path in run.files.items():
        lines.append(f"  {key:18s} {path}")
    return "\n".join(lines)


# ------------------------------------------------- 'mpsearch frontier --model ...' (the model path)
def add_model_frontier_args(p) -> None:
    """The arguments of the model path of ``mpsearch frontier``."""
    g = p.add_argument_group("measured frontier (instead of --table): estimate, solve, apply and measure")
    g.add_argument("--model", help="model spec: HF directory, package.module:callable, file.py:callable, "
                                   "or minilm / smollm2 / fashion-cnn / digits-mlp")
    g.add_argument("--data", help="calibration data spec (text file, .pt, IDX file, callable, or a short name)")
    from ._common import add_device_args, add_text_args

    add_device_args(g)
    add_text_args(g)
    g.add_argument("--eval-data", help="evaluation data spec (default: held-out data for the zoo models; "
                                       "required otherwise, as calibration and evaluation data are disjoint)")
    g.add_argument("--estimator", default=DEFAULT_RECIPE["estimator"],
                   help=f"estimator name (default: {DEFAULT_RECIPE['estimator']})")
    g.add_argument("--estimator-param", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting of the estimator (repeatable), e.g. --estimator-param metric=kl")
    g.add_argument("--bits", dest="options", default=None,
                   help="options, e.g. 2,3,4,8 or int4-g128, or the preset llm (int2..int8 plus groups of 64/32 at "
                        "3-5 bits) (default: the preset llm for a causal LM, else asymmetric per-channel int2..int8)")
    g.add_argument("--validate", type=int, default=5, metavar="K", help="plans to apply and measure (default: 5)")
    g.add_argument("--workers", type=int, default=1, metavar="N",
                   help="processes measuring the K plans on a CPU host (under torchrun the ranks share them)")
    g.add_argument("--device-map", default=None, metavar="MAP",
                   help="spread a Hugging Face model over this host's GPUs with accelerate (auto, balanced, JSON)")
    g.add_argument("--metric", default=None,
                   help="kld, top1, perplexity (causal LMs: kld, reporting all three), cosine, accuracy, agreement, "
                        "kl, or package.module:callable (default: by model)")
    g.add_argument("--refine", type=int, default=DEFAULT_RECIPE["refine"], metavar="R",
                   help=f"rounds of measured refinement at each target budget; evolve: generations "
                        f"(default: {DEFAULT_RECIPE['refine']})")
    g.add_argument("--refine-method", default=DEFAULT_RECIPE["refine_method"], choices=REFINE_METHODS,
                   help="calibrate: NNLS damage multipliers, re-solve; local: measured swaps; both; evolve: a "
                        "measured evolutionary search on the calibration data, its result measured on the "
                        f"evaluation data (default: {DEFAULT_RECIPE['refine_method']})")
    g.add_argument("--refine-evals", type=int, default=None, metavar="N",
                   help="at most N plans measured by the refinement in all (default: no limit beyond --refine)")
    g.add_argument("--refine-target", action="append", default=None, metavar="LABEL",
                   help="refine only at this target budget (repeatable; a uniform option's name such as "
                        "int4-asym, or avg_bits=4 for --budget avg_bits=4; default: every target)")
    g.add_argument("--refine-param", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting of the refinement (repeatable): swaps, groups, ridge; evolve: offspring, "
                        "survivors, seed, max_switches, time_limit (seconds per target)")


def run_model_frontier(args) -> int:
    """Estimate -> frontier -> measure, compare, refine, recommend; ``-o`` names the output folder."""
    from ..pipeline import InfeasibleBudget, model_frontier
    from . import EXIT_INFEASIBLE
    from ._common import budget_from_args

    try:
        run = model_frontier(
            args.model, data=args.data, eval_data=args.eval_data, metric=args.metric,
            estimator=args.estimator, estimator_params=parse_params(args.estimator_param),
            solver=args.solver or DEFAULT_RECIPE["solver"], solver_params=parse_params(args.param),
            options=args.options, validate=args.validate, points=args.points, key=args.key or "avg_bits",
            budget=budget_from_args(args), refine=args.refine, refine_method=args.refine_method,
            refine_evals=args.refine_evals, refine_targets=args.refine_target,
            refine_params=parse_params(args.refine_param), out=args.output, plans_dir=args.plans_dir, plot=args.plot,
            progress=True, workers=args.workers, device_map=args.device_map, device=args.device,
            dtype=args.dtype, seq_len=args.seq_len, calib_samples=args.calib_samples, eval_tokens=args.eval_tokens,
            eval_window=args.eval_window, eval_stride=args.eval_stride, batch_size=args.batch_size,
            target=getattr(args, "target", None))
    except InfeasibleBudget as exc:
        import sys

        sys.stderr.write(f"mpsearch frontier: infeasible: {exc}\n")
        return EXIT_INFEASIBLE
    from ..distributed import current

    if current().is_main:
        say(summarize(run, str(args.model)))
    return 0


def __getattr__(name):  # ``from mpsearch.cli.demo import run_demo`` without importing torch on start-up
    if name == "run_demo":
        from ..pipeline import run_demo

        return run_demo
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

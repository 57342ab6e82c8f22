"""``mpsearch frontier``: cost table -> Pareto frontier (CSV of at most ``--max-points`` rows, every
point in the ``.npz`` beside it, optional plans and plot; all or nothing), or, with ``--model``, the
measured frontier (:func:`mpsearch.measured.model_frontier`: estimate, solve, apply and measure,
compare with uniform, refine, recommend). Both paths take the same solver, key, points, budget,
bound, pin and tie flags.

The model path's flags are the fields of :class:`~mpsearch.measured.FrontierSettings`,
:class:`~mpsearch.refine.RefineSettings` (``--refine-*``) and :class:`~mpsearch.measured.DataSettings`,
built by :func:`frontier_settings` and :func:`data_settings` and checked before any model loads: a
new setting is one field there and one argparse line here (its ``dest`` the field's name).
"""

from __future__ import annotations

import sys
from pathlib import Path

from . import EXIT_INFEASIBLE
from ..errors import MpsearchError
from ..recipe import CPU_LLM_ESTIMATOR, DEFAULT_RECIPE, REFINE_METHODS
from ._common import (add_budget_args, add_command, add_device_args, add_imatrix_args, add_json_arg,
                      add_memory_args, add_monotone_arg, add_param_arg, add_target_arg, add_text_args,
                      budget_from_args, check_outputs, fitted_table, imatrix_arg, make_solver, memory_params,
                      note_kept, parse_params, report,
                      settings_from_args, target_from_args)

EXAMPLE = """mpsearch frontier --table table.csv --solver dp --points 30 -o frontier.csv \\
    --plans-dir plans/ --plot frontier.png
mpsearch frontier --model fashion-cnn --budget avg_bits=4 --refine 2 --refine-evals 8 -o out/"""


def register(sub):
    p = add_command(sub, "frontier", "Compute the size/damage Pareto frontier of a cost table.", EXAMPLE, run)
    p.add_argument("--table", help="cost table (.csv or .json)")
    p.add_argument("--solver", default=None,
                   help="dp (exact, one pass), ilp, baq, evolutionary, optuna, greedy, exhaustive "
                        "(default: dp with --table, the default recipe's with --model)")
    p.add_argument("--points", type=int, default=None,
                   help="number of budgets (default: every point for dp/evolutionary, 20 for the others; "
                        "24 with --model)")
    p.add_argument("--key", default=None,
                   help="budget swept: avg_bits (default when the table has params), size_bits, size_mb or a column")
    add_budget_args(p)
    add_target_arg(p, "the options and their legality per layer (with --model), its runtime ties, and its "
                      "own recipes measured beside the uniform plans")
    add_param_arg(p, "solver")
    p.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                   help="with --model: leave layers (or tensors mpsearch does not understand) out")
    add_monotone_arg(p)
    add_json_arg(p)
    p.add_argument("--no-progress", action="store_true", help="with --model: hide the progress bars")
    p.add_argument("-o", "--output", required=True, help="frontier CSV to write (with --model: an output folder)")
    p.add_argument("--max-points", type=int, default=None,
                   help="most rows written to the CSV (and plans): the best point under each of that many "
                        "evenly spaced sizes; every point goes to the .npz beside the CSV (default: 200)")
    p.add_argument("--plans-dir", default=None, help="also write one plan JSON per CSV row into this folder "
                                                     "(with --model the plans are always in OUTPUT/plans/)")
    p.add_argument("--plot", default=None, help="also draw the frontier into this image (.png, .svg, .pdf)")
    add_model_frontier_args(p)  # --model/--data/--estimator/--validate K: -o is then the output folder
    return p


# ------------------------------------------------- 'mpsearch frontier --model ...' (the model path)
def add_model_frontier_args(p) -> None:
    """The arguments of the model path: FrontierSettings, RefineSettings (``--refine-*``), DataSettings."""
    g = p.add_argument_group("measured frontier (instead of --table): estimate, solve, apply and measure")
    g.add_argument("--model", help="model spec: HF directory, package.module:callable, file.py:callable, "
                                   "or minilm / smollm2 / fashion-cnn / digits-mlp")
    g.add_argument("--data", help="calibration data spec (text file, .pt, IDX file, callable, or a short name)")
    add_device_args(g)
    add_memory_args(g)
    add_text_args(g)
    g.add_argument("--eval-data", help="evaluation data spec (default: held-out data for the zoo models; "
                                       "required otherwise, as calibration and evaluation data are disjoint)")
    g.add_argument("--estimator", default=None,
                   help=f"estimator name (default: the recipe's, {DEFAULT_RECIPE['estimator']}; "
                        f"{CPU_LLM_ESTIMATOR} for a causal LM on the CPU)")
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
    g.add_argument("--refine", dest="refine_rounds", type=int, default=DEFAULT_RECIPE["refine"], metavar="R",
                   help=f"rounds of measured refinement at each target budget; evolve: generations "
                        f"(default: {DEFAULT_RECIPE['refine']})")
    g.add_argument("--refine-method", default=DEFAULT_RECIPE["refine_method"], choices=REFINE_METHODS,
                   help="calibrate: NNLS damage multipliers, re-solve; local: measured swaps; both; evolve: a "
                        "measured evolutionary search on the calibration data, its result measured on the "
                        f"evaluation data (default: {DEFAULT_RECIPE['refine_method']})")
    g.add_argument("--refine-evals", dest="refine_max_evals", type=int, default=None, metavar="N",
                   help="at most N plans measured by the refinement in all (default: no limit beyond --refine)")
    g.add_argument("--refine-target", dest="refine_targets", action="append", default=None, metavar="LABEL",
                   help="refine only at this target budget (repeatable; a uniform option's name such as "
                        "int4-asym, or avg_bits=4 for --budget avg_bits=4; default: every target)")
    g.add_argument("--refine-param", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting of the refinement (repeatable): swaps, groups, ridge; evolve: offspring, "
                        "survivors, seed, max_switches, time_limit (seconds per target)")
    add_imatrix_args(g, auto=True)


def refine_settings(args):
    """The :class:`~mpsearch.refine.RefineSettings` of the ``--refine*`` flags (checked)."""
    from ..refine import RefineSettings  # start-up: the CLI's parser loads only what it needs

    params = parse_params(getattr(args, "refine_param", []))
    flags = {"rounds": "--refine", "max_evals": "--refine-evals", "targets": "--refine-target",
             **{k: f"--refine-param {k}" for k in params}}
    return settings_from_args(RefineSettings, args, prefix="refine_", flags=flags,
                              make=lambda **fields: RefineSettings.from_params(params, **fields))


def frontier_settings(args, **values):
    """The :class:`~mpsearch.measured.FrontierSettings` of the arguments (checked: names, settings,
    options against the target, before any model loads); ``values`` fixes fields the flags do not."""
    from ..measured import FrontierSettings  # start-up: the CLI's parser loads only what it needs

    if hasattr(args, "refine_rounds"):
        values.setdefault("refine", refine_settings(args))
    if hasattr(args, "budget"):
        values.setdefault("budget", budget_from_args(args))
    if getattr(args, "offload", False):  # before any work
        from ..errors import MpsearchError

        raise MpsearchError("frontier --model --offload: measuring the plans does not stream the model yet (only the "
                            "estimate does); run 'mpsearch estimate --offload -o table.csv' and then "
                            "'mpsearch frontier --table table.csv'")
    values.setdefault("estimator_params", memory_params(args, parse_params(getattr(args, "estimator_param", [])),
                                                        getattr(args, "estimator", None)))
    values.setdefault("solver_params", parse_params(getattr(args, "param", [])))
    if hasattr(args, "imatrix"):
        values.setdefault("imatrix", imatrix_arg(args))
    if getattr(args, "no_progress", False):
        values.setdefault("progress", False)
    return settings_from_args(FrontierSettings, args, flags={"options": "--bits"}, **values)


def data_settings(args):
    """The :class:`~mpsearch.measured.DataSettings` of the arguments (checked)."""
    from ..measured import DataSettings  # start-up: the CLI's parser loads only what it needs

    return settings_from_args(DataSettings, args)


def run_model_frontier(args) -> int:
    """Estimate -> frontier -> measure, compare, refine, recommend; ``-o`` names the output folder."""
    # start-up: the CLI's parser loads only what it needs
    from ..measured import InfeasibleBudget, model_frontier

    extra = {"estimate_kwargs": {"exclude": list(args.exclude)}} if getattr(args, "exclude", None) else {}
    settings, data = frontier_settings(args, **extra), data_settings(args)
    check_outputs(dirs=[("-o", args.output), ("--plans-dir", args.plans_dir)], plots=[("--plot", args.plot)])
    note_kept(kept_in_folder(args.output))
    try:
        run = model_frontier(args.model, data, settings, out=args.output, plans_dir=args.plans_dir, plot=args.plot)
    except InfeasibleBudget as exc:
        sys.stderr.write(f"mpsearch frontier: infeasible: {exc}\n")
        return EXIT_INFEASIBLE
    from ..distributed import current  # start-up: the CLI's parser loads only what it needs

    if current().is_main:
        from ..coverage import recorded_summary  # start-up: the CLI's parser loads only what it needs

        lines = [summarize(run, str(args.model)), recorded_summary(run.table.metadata)]
        im = run.table.metadata.get("imatrix") if isinstance(run.table.metadata, dict) else None
        if im:
            lines.append(f"llama.cpp's types rounded with the imatrix {im.get('file')} ({im.get('source')}, "
                         f"sha256 {str(im.get('sha256'))[:12]})")
        report(args, {**run_summary(run, str(args.model)), "coverage": run.table.metadata.get("coverage"),
                      "imatrix": im}, lines)
    return 0


def run_summary(run, name: str) -> dict:
    """The printed summary as data (``--json``): what ``summarize`` says, with the outputs' paths."""
    from ..diagnose import non_monotone  # start-up: the CLI's parser loads only what it needs

    bad = run.table.metadata.get("non_monotone")
    return {"model": name, "estimator": run.table.metadata.get("estimator"), "layers": len(run.table.layers),
            "metric": run.metric, "metric_label": run.metric_label, "baseline": run.baseline,
            "baseline_values": run.baseline_values, "key": run.key,
            "recommended": run.recommended.to_dict("records"), "uniform_check": run.uniform_check,
            "refinement": run.refinement.to_dict("records"), "proxy": run.proxy,
            "non_monotone_layers": sorted(non_monotone(run.table) if bad is None else bad),
            "zero_damage_options": run.table.metadata.get("zero_damage_options", {}),
            "out": str(run.out), "files": run.files}


def kept_in_folder(out) -> str:
    """What Ctrl-C keeps of a measured run building its output folder ``out``."""
    from ..fileio import staged_dir_name  # start-up: the CLI's parser loads only what it needs

    return (f"the work so far (the table, the estimator's cache, measured plans) is kept in "
            f"{staged_dir_name(out)}: run the same command again to resume")


def _size(key: str, value) -> str:
    """A target budget's own size in words: ``4.156 bits/weight``, ``size_mb 59.7``."""
    if value is None or value != value:
        return "size unknown"
    return f"{value:.3f} bits/weight" if key == "avg_bits" else f"{key} {value:.6g}"


def summarize(run, name: str = "all-MiniLM-L6-v2") -> str:
    """A few lines: the recommended plan at each target against uniform, the proxy check, the files."""
    lines = [f"{name}, {run.table.metadata.get('estimator')} estimator, "
             f"{len(run.table.layers)} layers; quality = {run.metric_label} on held-out data"]
    if run.baseline_values:  # a multi-value metric: the full-precision values the gaps are read from
        lines.append("full precision: " + ", ".join(f"{k} {v:.4g}" for k, v in run.baseline_values.items()))
    q = f"measured_{run.metric}"
    uni = run.uniform.set_index("option") if len(run.uniform) else None
    key = run.key or "avg_bits"
    for _, r in run.recommended.iterrows():
        at = f"at {r['budget']} ({_size(key, r.get(f'budget_{key}'))})"
        if r["status"] == "none":
            lines.append(f"  {at}: no measured plan fits")
            continue
        tag = ""
        if uni is not None and r["budget"] in uni.index:
            tag = f"; {r['budget']} itself {uni.loc[r['budget'], q]:.4g}"
        lines.append(f"  {at}: recommended {r['plan']} ({r['avg_bits']:.3f} bits/weight), {run.metric} "
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
    from ..diagnose import non_monotone_line  # start-up: the CLI's parser loads only what it needs

    lines.extend(filter(None, [non_monotone_line(run.table)]))
    lines.append(f"proxy check (information): Spearman(predicted damage, measured loss) = {run.proxy['spearman']:.3f}"
                 + ("  (POOR)" if run.proxy["poor"] else ""))
    lines.append(f"outputs in {run.out}/:")
    for key, path in run.files.items():
        lines.append(f"  {key:18s} {path}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the table path
def frontier_from_table(table, args):
    """Compute the frontier of ``table`` (a CostTable) with the solver, key, points and budget of ``args``."""
    from ..frontier import compute_frontier  # start-up: the CLI's parser loads only what it needs

    key = args.key or ("avg_bits" if "params" in table.frame else "size_bits")
    solver = make_solver(args)
    if getattr(solver, "risk", 0):  # ilp --param risk=λ: the frontier of damage + λ·damage_std
        from ..solvers.ilp import risk_adjusted  # start-up: the CLI's parser loads only what it needs

        table = risk_adjusted(table, solver.risk)
    from ..targets import solve_budget  # start-up: the CLI's parser loads only what it needs

    budget = solve_budget(table, budget_from_args(args), target_from_args(args))
    return compute_frontier(table, solver, points=args.points, key=key, budget=budget)


def write_outputs(frontier, args) -> None:
    """Write the CSV (plans and plot where asked) and print a summary."""
    from ..frontier import DEFAULT_MAX_POINTS  # start-up: the CLI's parser loads only what it needs

    import contextlib

    max_points = getattr(args, "max_points", None) or DEFAULT_MAX_POINTS
    with contextlib.ExitStack() as stack:  # the plot is put in place with the frontier, or neither is
        if args.plot:  # first: drawing is what fails most (a missing backend), before the CSV exists
            from ..fileio import atomic_write  # start-up: the CLI's parser loads only what it needs
            from ..plotting import save_frontier_plot  # start-up: the CLI's parser loads only what it needs

            save_frontier_plot(frontier, stack.enter_context(atomic_write(args.plot, None)))
        frontier.write(args.output, plans_dir=args.plans_dir, max_points=max_points)
    pts = frontier.points
    first, last = pts[0].predicted, pts[-1].predicted
    unit = "avg_bits" if "avg_bits" in first else "size_bits"
    shown = min(len(pts), max_points)
    from ..frontier import npz_path  # start-up: the CLI's parser loads only what it needs

    npz = npz_path(args.output)
    report(args, {"points": len(pts), "rows": shown, "solver": frontier.solver, "first": first, "last": last,
                  "output": str(args.output), "npz": str(npz), "plans_dir": args.plans_dir, "plot": args.plot},
           [f"{len(pts)} non-dominated points from {unit}={first[unit]:.4g} (damage {first['damage']:.4g}) "
            f"to {unit}={last[unit]:.4g} (damage {last['damage']:.4g}) [{frontier.solver}]",
            f"wrote {args.output} ({shown} rows; every point in {npz})"
            + (f", plans in {args.plans_dir}" if args.plans_dir else "")
            + (f", plot {args.plot}" if args.plot else "")])


def run(args) -> int:
    from ..table import CostTable  # start-up: the CLI's parser loads only what it needs

    if args.points is not None and args.points < 1:
        raise MpsearchError(f"--points must be a positive integer, got {args.points}")
    if args.max_points is not None and args.max_points < 1:
        raise MpsearchError(f"--max-points must be a positive integer, got {args.max_points}")
    if args.model and not args.table:
        if args.max_points is not None:
            raise MpsearchError("--max-points thins the CSV of a --table frontier; with --model every point is "
                                "written: choose how many with --points")
        return run_model_frontier(args)
    if not args.table:
        raise MpsearchError("frontier needs --table TABLE.csv (a cost table from 'mpsearch estimate') "
                            "or --model SPEC (estimate, solve and measure)")
    if args.imatrix or args.no_imatrix:
        raise MpsearchError("--imatrix/--no-imatrix decide how --model's table is estimated; a --table was "
                            "estimated already (its metadata says with which imatrix): leave them out")
    from ..fileio import check_output_path  # start-up: the CLI's parser loads only what it needs
    from ..frontier import npz_path  # start-up: the CLI's parser loads only what it needs

    check_output_path(args.output, flag="-o")  # first: the .npz's name is made from it
    if Path(args.output).suffix.lower() == ".npz":
        raise MpsearchError(f"-o {args.output!r}: name the frontier CSV (every point goes to the .npz beside it), "
                            f"for example {str(Path(args.output).with_suffix('.csv'))!r}")
    check_outputs(files=[("-o", args.output), ("-o (its .npz of every point)", str(npz_path(args.output)))],
                  dirs=[("--plans-dir", args.plans_dir)], plots=[("--plot", args.plot)])
    make_solver(args)  # the solver's settings and the target, before reading the table
    budget_from_args(args)
    target_from_args(args)
    table = fitted_table(CostTable.read(args.table), args)
    frontier = frontier_from_table(table, args)
    if not frontier.points:
        sys.stderr.write(f"mpsearch frontier: {frontier.status}: {frontier.message}\n")
        return EXIT_INFEASIBLE
    if "damage_std" in table.frame and len(frontier.points) <= 2000:  # error bars in the CSV and plot
        from ..measured import plan_damage_std  # start-up: the CLI's parser loads only what it needs

        for p in frontier.points:
            p.predicted["damage_std"] = plan_damage_std(table, p.plan)
    write_outputs(frontier, args)
    return 0

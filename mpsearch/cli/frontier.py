"""``mpsearch frontier``: cost table -> Pareto frontier (CSV of at most ``--max-points`` rows, every
point in the ``.npz`` beside it, optional plans and plot; all or nothing), or, with ``--model``, the
measured frontier (:func:`mpsearch.pipeline.model_frontier`: estimate, solve, apply and measure,
compare with uniform, refine, recommend). Both paths take the same solver, key, points, budget,
bound, pin and tie flags."""

from __future__ import annotations

import sys
from pathlib import Path

from ._common import (add_budget_args, add_command, add_param_arg, add_target_arg, budget_from_args, check_outputs,
                      make_solver, say)

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
    p.add_argument("-o", "--output", required=True, help="frontier CSV to write (with --model: an output folder)")
    p.add_argument("--max-points", type=int, default=None,
                   help="most rows written to the CSV (and plans): the best point under each of that many "
                        "evenly spaced sizes; every point goes to the .npz beside the CSV (default: 200)")
    p.add_argument("--plans-dir", default=None, help="also write one plan JSON per CSV row into this folder "
                                                     "(with --model the plans are always in OUTPUT/plans/)")
    p.add_argument("--plot", default=None, help="also draw the frontier into this image (.png, .svg, .pdf)")
    from .demo import add_model_frontier_args

    add_model_frontier_args(p)  # --model/--data/--estimator/--validate K: -o is then the output folder
    return p


def frontier_from_table(table, args):
    """Compute the frontier of ``table`` (a CostTable) with the solver, key, points and budget of ``args``."""
    from ..frontier import compute_frontier

    key = args.key or ("avg_bits" if "params" in table.frame else "size_bits")
    solver = make_solver(args)
    if getattr(solver, "risk", 0):  # ilp --param risk=λ: the frontier of damage + λ·damage_std
        from ..solvers.ilp import risk_adjusted

        table = risk_adjusted(table, solver.risk)
    from ..targets import solve_budget

    budget = solve_budget(table, budget_from_args(args), getattr(args, "target", None))
    return compute_frontier(table, solver, points=args.points, key=key, budget=budget)


def write_outputs(frontier, args) -> None:
    """Write the CSV (plans and plot where asked) and print a summary."""
    from ..frontier import DEFAULT_MAX_POINTS

    max_points = getattr(args, "max_points", None) or DEFAULT_MAX_POINTS
    if args.plot:  # first: drawing is what fails most (a missing backend), before the CSV exists
        from ..fileio import atomic_write
        from ..plotting import save_frontier_plot

        with atomic_write(args.plot, None) as tmp:
            save_frontier_plot(frontier, tmp)
    frontier.write(args.output, plans_dir=args.plans_dir, max_points=max_points)
    pts = frontier.points
    first, last = pts[0].predicted, pts[-1].predicted
    unit = "avg_bits" if "avg_bits" in first else "size_bits"
    say(f"{len(pts)} non-dominated points from {unit}={first[unit]:.4g} (damage {first['damage']:.4g}) "
        f"to {unit}={last[unit]:.4g} (damage {last['damage']:.4g}) [{frontier.solver}]")
    shown = min(len(pts), max_points)
    say(f"wrote {args.output} ({shown} rows; every point in {Path(args.output).with_suffix('.npz')})"
        + (f", plans in {args.plans_dir}" if args.plans_dir else "")
        + (f", plot {args.plot}" if args.plot else ""))


def run(args) -> int:
    from ..errors import MpsearchError
    from ..table import CostTable
    from . import EXIT_INFEASIBLE

    if args.points is not None and args.points < 1:
        raise MpsearchError(f"--points must be a positive integer, got {args.points}")
    if args.model and not args.table:
        from .demo import check_run_args, run_model_frontier

        check_run_args(args, "-o", args.output)
        check_outputs(dirs=[("--plans-dir", args.plans_dir)], plots=[("--plot", args.plot)])
        return run_model_frontier(args)
    if not args.table:
        raise MpsearchError("frontier needs --table TABLE.csv (a cost table from 'mpsearch estimate') "
                            "or --model SPEC (estimate, solve and measure)")
    if args.max_points is not None and args.max_points < 1:
        raise MpsearchError(f"--max-points must be a positive integer, got {args.max_points}")
    check_outputs(files=[("-o", args.output)], dirs=[("--plans-dir", args.plans_dir)],
                  plots=[("--plot", args.plot)])
    make_solver(args)  # the solver's settings, before reading the table
    budget_from_args(args)
    table = CostTable.read(args.table)
    frontier = frontier_from_table(table, args)
    if not frontier.points:
        sys.stderr.write(f"mpsearch frontier: {frontier.status}: {frontier.message}\n")
        return EXIT_INFEASIBLE
    if "damage_std" in table.frame and len(frontier.points) <= 2000:  # error bars in the CSV and plot
        from ..pipeline import plan_damage_std

        for p in frontier.points:
            p.predicted["damage_std"] = plan_damage_std(table, p.plan)
    write_outputs(frontier, args)
    return 0

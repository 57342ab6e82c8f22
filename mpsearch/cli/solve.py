"""``mpsearch solve``: cost table + budget -> bit plan."""

from __future__ import annotations

import sys

from ._common import (add_budget_args, add_command, add_json_arg, add_monotone_arg, add_param_arg, add_target_arg,
                      budget_from_args, check_outputs, fitted_table, make_solver, report, target_from_args)

EXAMPLE = """mpsearch solve --table table.csv --solver greedy --budget avg_bits=4 -o plan.json"""


def register(sub):
    p = add_command(sub, "solve", "Choose each layer's bit-width under a budget; write a plan.", EXAMPLE, run)
    p.add_argument("--table", required=True, help="cost table (.csv or .json)")
    from ..registry import solver_names

    p.add_argument("--solver", default="greedy", metavar="SOLVER",
                   help=f"{' | '.join(solver_names())} (default: greedy; settings: 'mpsearch list solvers')")
    add_budget_args(p)
    add_target_arg(p, "its runtime ties (fused q/k/v, gate/up) and which options may appear")
    add_param_arg(p, "solver")
    add_monotone_arg(p)
    add_json_arg(p)
    p.add_argument("-o", "--output", required=True, help="where to write the plan (.json)")


def run(args) -> int:
    from ..table import CostTable
    from . import EXIT_INFEASIBLE

    from ..targets import solve_budget

    check_outputs(files=[("-o", args.output)])
    solver = make_solver(args)  # settings checked before any work (even if the budget is infeasible)
    budget = budget_from_args(args)
    target = target_from_args(args)
    table = fitted_table(CostTable.read(args.table), args)
    from ..coverage import check_recorded, recorded_summary

    check_recorded(table.metadata)  # a table below its coverage threshold is refused, not solved
    budget = solve_budget(table, budget, target)
    result = solver.solve(table, budget)
    if result.plan is None:
        sys.stderr.write(f"mpsearch solve: {result.status}: {result.message}\n")
        return EXIT_INFEASIBLE
    result.plan.provenance["table_path"] = args.table
    if args.monotone:
        result.plan.provenance["monotone_fit"] = table.metadata["monotone_fit"]
    result.plan.save(args.output)
    pred = result.plan.predicted
    parts = [f"damage={pred['damage']:.6g}", f"size_mb={pred.get('size_bits', 0) / 8e6:.4g}"]
    if "avg_bits" in pred:
        parts.append(f"avg_bits={pred['avg_bits']:.4g}")
    lines = [f"{result.status}: {', '.join(parts)} ({result.stats.get('time_s', 0) * 1e3:.1f} ms)"]
    lines += [result.message] if result.message else []
    report(args, {"status": result.status, "message": result.message, "predicted": pred, "solver": solver.name,
                  "time_s": result.stats.get("time_s"), "output": str(args.output),
                  "coverage": table.metadata.get("coverage")},
           lines + [recorded_summary(table.metadata), f"wrote {args.output}"])
    return 0

"""``mpsearch solve``: cost table + budget -> bit plan."""

from __future__ import annotations

import sys

from ._common import add_budget_args, add_command, add_param_arg, add_target_arg, budget_from_args, parse_params, say

EXAMPLE = """mpsearch solve --table table.csv --solver greedy --budget avg_bits=4 -o plan.json"""


def register(sub):
    p = add_command(sub, "solve", "Choose each layer's bit-width under a budget; write a plan.", EXAMPLE, run)
    p.add_argument("--table", required=True, help="cost table (.csv or .json)")
    p.add_argument("--solver", default="greedy", help="solver name (default: greedy)")
    add_budget_args(p)
    add_target_arg(p, "its runtime ties (fused q/k/v, gate/up) and which options may appear")
    add_param_arg(p, "solver")
    p.add_argument("-o", "--output", required=True, help="where to write the plan (.json)")


def run(args) -> int:
    from ..registry import get_solver
    from ..table import CostTable
    from . import EXIT_INFEASIBLE

    from ..targets import solve_budget

    table = CostTable.read(args.table)
    budget = solve_budget(table, budget_from_args(args), args.target)
    solver = get_solver(args.solver, **parse_params(args.param))
    result = solver.solve(table, budget)
    if result.plan is None:
        sys.stderr.write(f"mpsearch solve: {result.status}: {result.message}\n")
        return EXIT_INFEASIBLE
    result.plan.provenance["table_path"] = args.table
    result.plan.save(args.output)
    pred = result.plan.predicted
    parts = [f"damage={pred['damage']:.6g}", f"size_mb={pred.get('size_bits', 0) / 8e6:.4g}"]
    if "avg_bits" in pred:
        parts.append(f"avg_bits={pred['avg_bits']:.4g}")
    say(f"{result.status}: {', '.join(parts)} ({result.stats.get('time_s', 0) * 1e3:.1f} ms)")
    if result.message:
        say(result.message)
    say(f"wrote {args.output}")
    return 0

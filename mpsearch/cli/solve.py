"""``mpsearch solve``: cost table + budget -> bit plan."""

from __future__ import annotations

import sys

from ._common import (add_budget_args, add_command, add_param_arg, add_target_arg, budget_from_args, target_from_args,
                      check_outputs, make_solver, say)

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
    p.add_argument("-o", "--output", required=True, help="where to write the plan (.json)")


def run(args) -> int:
    from ..table import CostTable
    from . import EXIT_INFEASIBLE

    from ..targets import solve_budget

    check_outputs(files=[("-o", args.output)])
    solver = make_solver(args)  # settings checked before any work (even if the budget is infeasible)
    budget = budget_from_args(args)
    target = target_from_args(args)
    table = CostTable.read(args.table)
    budget = solve_budget(table, budget, target)
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
    if "file_bytes" in pred:  # a budget in the user's words: the consumer's whole file
        parts.append(f"file={pred['file_bytes']:,.0f} B ({pred['file_bytes'] / 2**20:.2f} MiB, "
                     f"{pred['bpw']:.3f} bits/weight)")
    say(f"{result.status}: {', '.join(parts)} ({result.stats.get('time_s', 0) * 1e3:.1f} ms)")
    if result.message:
        say(result.message)
    say(f"wrote {args.output}")
    return 0

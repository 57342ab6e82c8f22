"""``mpsearch solve``: cost table + budget -> bit plan."""

from __future__ import annotations

import sys

from . import EXIT_INFEASIBLE
from ..errors import MpsearchError
from ..registry import solver_names
from ._common import (add_budget_args, add_command, add_json_arg, add_monotone_arg, add_param_arg,
                      add_target_arg, budget_from_args, check_outputs, fitted_table, make_solver, report,
                      target_from_args)

EXAMPLE = """mpsearch solve --table table.csv --solver greedy --budget avg_bits=4 -o plan.json
mpsearch solve --table table.csv --budget size=Q4_K_M -o plan.json     # the file of llama.cpp's Q4_K_M
mpsearch solve --table table.csv --fit gpu=24GiB,ctx=32768 -o plan.json   # plan for a machine"""


def register(sub):
    p = add_command(sub, "solve", "Choose each layer's bit-width under a budget; write a plan.", EXAMPLE, run)
    p.add_argument("--table", required=True, help="cost table (.csv or .json)")

    p.add_argument("--solver", default="greedy", metavar="SOLVER",
                   help=f"{' | '.join(solver_names())} (default: greedy; settings: 'mpsearch list solvers')")
    add_budget_args(p)
    add_target_arg(p, "its runtime ties (fused q/k/v, gate/up) and which options may appear")
    add_param_arg(p, "solver")
    add_monotone_arg(p)
    add_json_arg(p)
    p.add_argument("--fit", default=None, metavar="SPEC",
                   help="plan for a machine (llama.cpp tables): gpu=SIZE, ram=SIZE, ctx=N, parallel=N, kv=auto|TYPE, "
                        "placement=auto|gpu|experts-cpu|cpu|ngl=N, cpu=avx512|avx2|none, min_tps=X; writes the plan, its tensor-type file "
                        "(PLAN.types.txt) and prints the llama-quantize and llama-server commands")
    p.add_argument("-o", "--output", required=True, help="where to write the plan (.json)")


def run(args) -> int:
    from ..table import CostTable  # start-up: the CLI's parser loads only what it needs

    from ..targets import solve_budget  # start-up: the CLI's parser loads only what it needs

    check_outputs(files=[("-o", args.output)])
    solver = make_solver(args)  # settings checked before any work (even if the budget is infeasible)
    if args.fit is not None:
        return _run_fit(args, solver)
    budget = budget_from_args(args)
    target = target_from_args(args)
    table = fitted_table(CostTable.read(args.table), args)
    # start-up: the CLI's parser loads only what it needs
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
    if "file_bytes" in pred:  # a budget in the user's words: the consumer's whole file
        parts.append(f"file={pred['file_bytes']:,.0f} B ({pred['file_bytes'] / 2**20:.2f} MiB, "
                     f"{pred['bpw']:.3f} bits/weight)")
    lines = [f"{result.status}: {', '.join(parts)} ({result.stats.get('time_s', 0) * 1e3:.1f} ms)"]
    lines += [result.message] if result.message else []
    report(args, {"status": result.status, "message": result.message, "predicted": pred, "solver": solver.name,
                  "time_s": result.stats.get("time_s"), "output": str(args.output),
                  "coverage": table.metadata.get("coverage")},
           lines + [recorded_summary(table.metadata), f"wrote {args.output}"])
    return 0


def _run_fit(args, solver) -> int:
    """``solve --fit``: :func:`mpsearch.fit.solve_fit`, then the plan, its tensor-type file, the summary."""
    from pathlib import Path

    from ..export import export_text  # start-up: the CLI's parser loads only what it needs
    from ..fileio import atomic_write_text  # start-up: the CLI's parser loads only what it needs
    from ..fit import FitSpec, solve_fit  # start-up: the CLI's parser loads only what it needs
    from ..table import CostTable  # start-up: the CLI's parser loads only what it needs

    spec = FitSpec.parse(args.fit)
    if args.budget or args.min_bits or args.max_bits or args.pin:
        raise MpsearchError("--fit is the whole budget: drop --budget, --min-bits, --max-bits and --pin")
    types_path = str(Path(args.output).with_suffix("")) + ".types.txt"
    check_outputs(files=[("-o", args.output), ("-o (its tensor-type file)", types_path)])
    table = CostTable.read(args.table)
    result = solve_fit(table, spec, solver)
    if result.plan is None:
        sys.stderr.write(f"mpsearch solve: infeasible: {result.message}\n")
        return EXIT_INFEASIBLE
    result.plan.provenance["table_path"] = args.table
    text = export_text(result.plan, "llama.cpp")
    result.plan.save(args.output)
    atomic_write_text(types_path, text)
    summary, commands = list(result.summary(spec)), list(result.commands(types_path))
    report(args, {"output": str(args.output), "tensor_types": types_path, "summary": summary, "commands": commands,
                  "predicted": result.plan.predicted},
           [*summary, "run:", *("  " + c for c in commands), f"wrote {args.output} and {types_path}"])
    return 0

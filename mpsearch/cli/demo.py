"""``mpsearch demo``: the whole job on all-MiniLM-L6-v2 with Shakespeare text: parse, one library call
(:func:`mpsearch.measured.run_demo`), print (:func:`mpsearch.cli.frontier.summarize`, as
``mpsearch frontier --model`` prints).

The demo estimates a cost table on passages from some plays, solves the size/quality frontier,
applies and measures plans along it on passages from *other* plays (embedding cosine to the
full-precision model), measures uniform options alongside, recommends at each uniform size the best
measured plan, and writes everything into ``--out``. A second run (or one after an interruption)
reads the cached table and measurements back.
"""

from __future__ import annotations

from ..recipe import DEFAULT_RECIPE, DEMO_DATA
from ._common import (add_command, add_device_args, add_json_arg, add_target_arg, check_outputs, note_kept,
                      report)
from .frontier import frontier_settings, kept_in_folder, run_summary, summarize  # noqa: F401  (the demo's printout too)

EXAMPLE = "mpsearch demo --out mpsearch-demo"

#: the default recipe and the demo's data sizes (chosen from experiments/measured_loop.md)
DEMO = {**DEFAULT_RECIPE, **DEMO_DATA}


def register(sub):
    p = add_command(sub, "demo", "Run the whole job on a real pretrained model (all-MiniLM-L6-v2).", EXAMPLE, run)
    p.add_argument("--out", default="mpsearch-demo", help="output folder (default: ./mpsearch-demo)")
    p.add_argument("--estimator", default=DEMO["estimator"], help=f"estimator (default: {DEMO['estimator']})")
    p.add_argument("--solver", default=DEMO["solver"], help=f"solver (default: {DEMO['solver']})")
    p.add_argument("--validate", type=int, default=DEMO["validate"], help="plans to measure along the frontier")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")

    add_device_args(p)
    add_target_arg(p)
    add_json_arg(p)


def run(args) -> int:
    import time

    settings = frontier_settings(args)  # checked before any work
    check_outputs(dirs=[("--out", args.out)])
    note_kept(kept_in_folder(args.out))
    t0 = time.perf_counter()
    from ..measured import run_demo  # start-up: the CLI's parser loads only what it needs

    result = run_demo(args.out, settings, progress=not args.no_progress, device=args.device, dtype=args.dtype)
    seconds = time.perf_counter() - t0
    report(args, {**run_summary(result, "all-MiniLM-L6-v2"), "seconds": seconds},
           [summarize(result), f"done in {seconds:.0f} s"])
    return 0


def __getattr__(name):  # ``from mpsearch.cli.demo import run_demo`` without importing torch on start-up
    if name == "run_demo":
        from ..measured import run_demo

        return run_demo
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

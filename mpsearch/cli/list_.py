"""``mpsearch list``: the estimators, solvers and metrics, with their settings and defaults."""

from __future__ import annotations

from ._common import add_command, say

EXAMPLE = """mpsearch list
mpsearch list solvers
mpsearch solve --table table.csv --solver ilp --param time_limit=10 --budget avg_bits=4 -o plan.json"""

KINDS = {"estimators": "estimator", "solvers": "solver", "metrics": "metric"}


def register(sub):
    p = add_command(sub, "list", "List estimators, solvers and metrics with their settings and defaults.",
                    EXAMPLE, run)
    p.add_argument("what", nargs="?", default="all", choices=["all", *KINDS],
                   help="which section to show (default: all)")


def sections(what: str = "all") -> dict:
    """section title -> [(name, [Setting, ...]), ...] (plain data; the command prints it)."""
    from .. import registry

    out = {}
    for title, kind in KINDS.items():
        if what not in ("all", title):
            continue
        rows = []
        for name in sorted(registry._KINDS[kind]):
            found = registry.settings(kind, name)
            if kind == "metric":  # the first argument is the evaluation data, not a setting
                found = found[1:]
            rows.append((name, found))
        out[title] = rows
    if what == "all":
        for title, fn in registry.LIST_SECTIONS.items():  # e.g. targets
            out[title] = fn()
    return out


def run(args) -> int:
    for title, rows in sections(args.what).items():
        say(f"{title}:")
        for name, found in rows:
            say(f"  {name}")
            for s in found:
                say(f"      {s.describe()}")
        say()
    say("settings: --param KEY=VALUE (solve, frontier, estimate); values are Python literals")
    return 0

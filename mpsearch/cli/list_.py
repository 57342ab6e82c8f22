"""``mpsearch list``: every registered name ``--estimator``, ``--solver``, ``--metric``, ``--target``
and ``--to`` accept (:mod:`mpsearch.registry`), with settings, defaults and aliases."""

from __future__ import annotations

from ._common import add_command, say

EXAMPLE = """mpsearch list
mpsearch list solvers
mpsearch solve --table table.csv --solver ilp --param time_limit=10 --budget avg_bits=4 -o plan.json"""

#: section -> (registry kind, the flag that takes its names)
KINDS = {"estimators": ("estimator", "--estimator"), "solvers": ("solver", "--solver"),
         "metrics": ("metric", "--metric"), "targets": ("target", "--target"),
         "exporters": ("exporter", "export --to, import --from")}


def register(sub):
    p = add_command(sub, "list", "List estimators, solvers, metrics, targets and export formats with their "
                                 "settings and defaults.", EXAMPLE, run)
    p.add_argument("what", nargs="?", default="all", choices=["all", *KINDS],
                   help="which section to show (default: all)")


def _target_lines(name: str) -> list[str]:
    from ..targets import get_target

    t = get_target(name)
    return [f"options: {', '.join(t.options)}",
            f"default: {', '.join(t.default_options)}; export: {t.exporter or '-'}"
            + ("; fused q/k/v, gate/up" if t.fused_runtime else "")]


def _setting_lines(kind: str, name: str) -> list[str]:
    from .. import registry

    found = registry.settings(kind, name)
    if kind == "metric":  # the first argument is the evaluation data, not a setting
        found = found[1:]
    return [s.describe() for s in found]


def sections(what: str = "all") -> dict:
    """section title -> [(name, [line, ...]), ...] (plain data; the command prints it)."""
    from ..registry import REGISTRIES

    out = {}
    for title, (kind, _flag) in KINDS.items():
        if what not in ("all", title):
            continue
        reg = REGISTRIES[kind]
        rows = []
        for name in reg.names():
            aliases = reg.aliases_of(name)
            lines = [f"also: {', '.join(aliases)}"] if aliases else []
            lines += _target_lines(name) if kind == "target" else _setting_lines(kind, name)
            rows.append((name, lines))
        out[title] = rows
    return out


def run(args) -> int:
    for title, rows in sections(args.what).items():
        say(f"{title}: ({KINDS[title][1]})")
        for name, lines in rows:
            say(f"  {name}")
            for line in lines:
                say(f"      {line}")
        say()
    say("settings: --param KEY=VALUE (solve, frontier, estimate; export --to: its own flags); values are "
        "Python literals")
    return 0

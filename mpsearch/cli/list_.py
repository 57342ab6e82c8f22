"""``mpsearch list``: every registered name ``--estimator``, ``--solver``, ``--metric``, ``--target``
and ``--to`` accept (:mod:`mpsearch.registry`), with settings, defaults and aliases."""

from __future__ import annotations

from .. import registry
from ..registry import REGISTRIES
from ._common import add_command, add_json_arg, report, say

EXAMPLE = """mpsearch list
mpsearch list solvers
mpsearch solve --table table.csv --solver ilp --param time_limit=10 --budget avg_bits=4 -o plan.json"""

#: section -> (registry kind, the flag that takes its names and what it defaults to)
KINDS = {"estimators": ("estimator", "--estimator; default: output-distance with --data, fisher for a causal LM on "
                                     "the CPU, weight-error without --data"),
         "solvers": ("solver", "--solver; default: greedy (solve), dp (frontier --table), ilp (frontier --model, demo)"),
         "metrics": ("metric", "--metric; default: kld for a causal LM, cosine for an encoder, accuracy with labels; "
                               "on the CLI the windows are --eval-window / --eval-stride (default --seq-len), "
                               "--batch-size"),
         "targets": ("target", "--target; default: mpsearch"),
         "exporters": ("exporter", "export --to, import --from; default: the plan's target")}


def register(sub):
    p = add_command(sub, "list", "List estimators, solvers, metrics, targets and export formats with their "
                                 "settings and defaults.", EXAMPLE, run)
    p.add_argument("what", nargs="?", default="all", choices=["all", *KINDS],
                   help="which section to show (default: all)")
    add_json_arg(p)


def _target_lines(name: str) -> list[str]:
    from ..targets import get_target  # start-up: the CLI's parser loads only what it needs

    t = get_target(name)
    from ..targets import DEFAULT_TARGET  # start-up: the CLI's parser loads only what it needs

    default = ", ".join(t.default_options)
    if t.name == DEFAULT_TARGET:  # what the recipe searches when --bits is not given
        default += " (the preset llm for a causal LM)"
    return [f"options: {', '.join(t.options)}",
            f"default: {default}; export: {t.exporter or '-'}"
            + ("; fused q/k/v, gate/up" if t.fused_runtime else "")]


def _setting_lines(kind: str, name: str) -> list[str]:
    found = registry.settings(kind, name)
    if kind == "metric":  # the first argument is the evaluation data, not a setting
        found = found[1:]
    return [s.describe() for s in found]


def sections(what: str = "all") -> dict:
    """section title -> [(name, [line, ...]), ...] (plain data; the command prints it)."""
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
    if args.json:
        report(args, {title: {name: lines for name, lines in rows} for title, rows in sections(args.what).items()}, [])
        return 0
    for title, rows in sections(args.what).items():
        say(f"{title}: ({KINDS[title][1]})")
        for name, lines in rows:
            say(f"  {name}")
            for line in lines:
                say(f"      {line}")
        say()
    say("settings: --param KEY=VALUE on estimate (the estimator's), solve and frontier (the solver's); frontier "
        "--model: --estimator-param KEY=VALUE for the estimator's; export: --opt KEY=VALUE; values are Python literals")
    return 0

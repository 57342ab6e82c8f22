"""The ``mpsearch`` command line: one subcommand per module of this package.

Each subcommand module defines ``register(subparsers)`` and a ``run(args) -> int``: it turns the
arguments into library objects (settings objects checked before any work: ``frontier --model`` and
``demo`` build :class:`mpsearch.measured.FrontierSettings` in ``cli/frontier.py``), calls the library
(the work lives there, so a notebook does the same), and prints. Exit codes: 0 success, 2 bad input
or usage (one line on stderr, no half-written output), 3 infeasible budget, 130 interrupted (one
line saying what was kept: a command notes it with :func:`mpsearch.cli._common.note_kept` as its long
work starts).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .. import __version__
from .._quiet import hold_warnings
from ..errors import disk_error, MpsearchError
from ._common import kept_note, note_kept

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_INFEASIBLE = 3

#: subcommand -> module of this package
COMMANDS = {
    "estimate": "estimate",
    "solve": "solve",
    "apply": "apply",
    "validate": "validate",
    "frontier": "frontier",
    "export": "export",
    "import": "import_",
    "list": "list_",
    "demo": "demo",
    "targets": "targets",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.print_usage(sys.stderr)
        sys.stderr.write(f"mpsearch: error: {message}\n")
        raise SystemExit(EXIT_BAD_INPUT)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mpsearch",
        description="Mixed-precision bit allocation: how many bits should each layer get?",
        epilog="Run 'mpsearch COMMAND --help' for a command's options and an example.",
    )
    parser.add_argument("--version", action="version", version=f"mpsearch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, module in COMMANDS.items():
        importlib.import_module(f".{module}", __name__).register(sub)
    return parser


def main(argv=None) -> int:
    """Run one command. A refusal is one line on stderr (exit 2; 3 for an infeasible budget; 130 for
    Ctrl-C): the warnings the command gave before it are dropped. A command that succeeds (or fails
    with a traceback) gives its warnings at the end, each once."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)

    note_kept(None)
    held = None
    try:
        with hold_warnings() as held:
            code = _run(args)
    except BaseException:
        if held is not None:
            held.release()
        raise
    if code == EXIT_OK:
        held.release()
    return code


def _run(args) -> int:
    try:
        from ..env import rank  # start-up: the CLI's parser loads only what it needs

        if rank() > 0:  # under torchrun only rank 0 prints (and writes)
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        return int(args.run(args) or 0)
    except MpsearchError as exc:
        return _refuse(args, exc)
    except OSError as exc:  # a full disk, a read-only or forbidden folder met while writing
        refusal = disk_error(exc)
        if refusal is None:
            raise
        return _refuse(args, refusal)
    except KeyboardInterrupt:
        sys.stderr.write(f"mpsearch {args.command}: interrupted; {kept_note()}\n")
        return 130


def _refuse(args, exc) -> int:
    text = " ".join(str(exc).split())  # one line, whatever the message held
    sys.stderr.write(f"mpsearch {args.command}: error: {text}\n")
    return EXIT_BAD_INPUT


def entry() -> None:  # console script
    sys.exit(main())

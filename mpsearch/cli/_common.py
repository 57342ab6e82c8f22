"""Helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import ast
import json
import sys

from ..errors import MpsearchError, SettingsError
from ..registry import get_solver


def add_command(sub, name: str, help: str, example: str, run):
    p = sub.add_parser(
        name,
        help=help,
        description=help,
        epilog="example:\n  " + example.strip().replace("\n", "\n  "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(run=run)
    return p


def parse_params(items) -> dict:
    """``--param KEY=VALUE`` items into a dict; values are Python literals or strings."""
    out = {}
    for item in items or ():
        if "=" not in item:
            raise MpsearchError(f"--param {item!r}: write KEY=VALUE, for example --param probes=16")
        key, _, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not key.isidentifier():
            raise MpsearchError(f"--param {item!r}: {key!r} is not a setting name; write KEY=VALUE")
        try:
            out[key] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            out[key] = value
    return out


def add_param_arg(p, what: str):
    p.add_argument(
        "--param", action="append", default=[], metavar="KEY=VALUE",
        help=f"a setting of the {what} (repeatable), e.g. --param seed=1",
    )


def add_target_arg(p, what: str = "the options, their sizes and rounding, and each layer's legal options"):
    p.add_argument("--target", default=None, metavar="NAME",
                   help=f"the quantizer that will execute the plan; it decides {what} "
                        f"('mpsearch targets' lists them; default: the table's own, else mpsearch)")


def target_from_args(args):
    """``--target`` resolved once, where the command starts, into its :class:`~mpsearch.targets.Target`
    (its options, rules, ties, recipes and exporter), passed on from there; ``None`` when not given
    (the table's or plan's own). An unknown name is refused here, before any work."""
    name = getattr(args, "target", None)
    if name is None:
        return None
    from ..targets import get_target  # start-up: the CLI's parser loads only what it needs

    return get_target(name)


def add_budget_args(p):
    p.add_argument("--budget", action="append", default=[], metavar="KEY=VALUE",
                   help="a constraint: avg_bits=4, size_mb=10, or any numeric column (sum <= value); repeatable")
    p.add_argument("--min-bits", action="append", default=[], metavar="[LAYER=]BITS",
                   help="lower bit bound for all layers, or for LAYER (exact name, 're:REGEX')")
    p.add_argument("--max-bits", action="append", default=[], metavar="[LAYER=]BITS",
                   help="upper bit bound, like --min-bits")
    p.add_argument("--pin", action="append", default=[], metavar="LAYER=OPTION",
                   help="fix a layer's option, e.g. --pin lm_head=keep or --pin 're:.*embed.*=8'")
    p.add_argument("--tie", action="append", default=[], metavar="REGEX",
                   help="layers matching REGEX with equal capture groups share one option")


def add_monotone_arg(p):
    p.add_argument("--monotone", action="store_true",
                   help="first fit each layer's damage to fall with size (isotonic regression: an option of more "
                        "bits never has more damage; mpsearch.diagnose.monotone_fit)")


def fitted_table(table, args):
    """``table``, or its monotone fit with ``--monotone``."""
    if not getattr(args, "monotone", False):
        return table
    from ..diagnose import monotone_fit  # start-up: the CLI's parser loads only what it needs

    return monotone_fit(table)


def budget_from_args(args):
    from ..budget import Budget  # start-up: the CLI's parser loads only what it needs

    return Budget.parse(args.budget, min_bits=args.min_bits, max_bits=args.max_bits,
                        pins=args.pin, ties=args.tie)


#: what the running command would keep if interrupted now (``note_kept``); ``main`` prints it after Ctrl-C
_KEPT: list = []


def note_kept(text: str | None) -> None:
    """Say what an interruption from now on keeps (``None``: nothing); the line after Ctrl-C reads it."""
    _KEPT[:] = [text] if text else []


def kept_note() -> str:
    return _KEPT[0] if _KEPT else "nothing was kept"


def say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def dump_json(obj) -> str:
    return json.dumps(obj, indent=2, default=str)


def add_json_arg(p):
    p.add_argument("--json", action="store_true",
                   help="print the summary as one JSON object on stdout instead of text (progress bars and "
                        "warnings stay on stderr)")


def plain(obj):
    """``obj`` as JSON can hold it: numpy scalars and arrays as numbers and lists, NaN and infinities as
    ``null``, paths and other objects as strings."""
    import math

    import numpy as np

    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return plain(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return None if not math.isfinite(float(obj)) else float(obj)
    if obj is None or isinstance(obj, str):
        return obj
    return str(obj)


def report(args, summary: dict, lines) -> None:
    """The command's summary: ``lines`` of text, or with ``--json`` the ``summary`` as one JSON object."""
    if getattr(args, "json", False):
        say(json.dumps(plain({"command": args.command, **summary}), indent=2))
        return
    for line in lines:
        say(line)


#: image formats ``--plot`` can write (matplotlib's own list where it is installed)
PLOT_SUFFIXES = (".png", ".svg", ".pdf", ".jpg", ".jpeg", ".eps", ".ps", ".tif", ".tiff", ".webp")


def plot_suffixes() -> set:
    try:
        from matplotlib.backend_bases import FigureCanvasBase

        return {"." + s for s in FigureCanvasBase.get_supported_filetypes()}
    except ImportError:  # pragma: no cover - matplotlib is a dependency of the plots
        return set(PLOT_SUFFIXES)


def check_outputs(*, files=(), dirs=(), plots=()) -> None:
    """Check every output path of a command before any work (one line, exit 2, on a bad one).

    ``files``/``dirs``/``plots``: ``(flag, path)`` pairs; ``None`` paths are skipped. Two outputs
    naming the same path are refused too.
    """
    from pathlib import Path

    from ..fileio import check_output_path  # start-up: the CLI's parser loads only what it needs

    seen = {}
    for kind, items in (("file", files), ("dir", dirs), ("plot", plots)):
        for flag, path in items:
            if path is None:
                continue
            if kind == "plot":
                p = check_output_path(path, flag=flag, kind="file", suffixes=plot_suffixes())
            else:
                p = check_output_path(path, flag=flag, kind=kind)
            key = Path(p).resolve()
            if key in seen:
                raise MpsearchError(f"{flag} and {seen[key]} name the same path {str(path)!r}; give each its own")
            seen[key] = flag


def make_solver(args, default: str = "dp"):
    """The solver of ``--solver``/``--param`` (``default`` when not given), its settings checked
    (call it before any work)."""
    return get_solver(args.solver or default, **parse_params(args.param))


def add_device_args(p):
    """``--device`` and ``--dtype``: where and in which precision the model is loaded."""
    p.add_argument("--device", default=None, metavar="DEV",
                   help="cpu, cuda, cuda:N or auto (CUDA when available); default: cpu")
    p.add_argument("--dtype", default=None, metavar="DTYPE",
                   help="float32, bfloat16, float16 or auto (the checkpoint's); default: float32. "
                        "Quantization arithmetic is float32 per layer whatever the model dtype")


def add_text_args(p, *, calib: bool = True, evaluation: bool = True):
    """Sizes of tokenized text data (the model's own tokenizer reads .txt files)."""
    p.add_argument("--seq-len", type=int, default=None, metavar="N",
                   help="tokens per text window (causal LMs: 512 on GPU, 128 on CPU; encoders: 64)")
    if calib:
        p.add_argument("--calib-samples", type=int, default=None, metavar="N",
                       help="calibration windows of --seq-len tokens (causal LMs: 128 on GPU, 16 on CPU)")
    if evaluation:
        p.add_argument("--eval-tokens", type=int, default=None, metavar="N",
                       help="evaluation tokens of a causal LM (32768 on GPU, 4096 on CPU)")
        p.add_argument("--eval-window", type=int, default=None, metavar="N",
                       help="evaluation window in tokens (default: --seq-len)")
        p.add_argument("--eval-stride", type=int, default=None, metavar="N",
                       help="tokens a window advances (default: the window: no overlap)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N",
                   help="text windows per forward pass (default: 8)")


def load_model_args(args, device=None):
    """The model of ``--model`` on ``--device`` (or ``device``) in ``--dtype``."""
    from ..specs import load_model  # start-up: the CLI's parser loads only what it needs

    return load_model(args.model, device=device or getattr(args, "device", None), dtype=getattr(args, "dtype", None))


def add_memory_args(p):
    """``--offload``, ``--micro-batch``, ``--stack-options``: the output-distance estimator's memory settings."""
    p.add_argument("--offload", action="store_true",
                   help="keep the model in CPU memory and stream its decoder blocks to --device one window at a "
                        "time (output-distance): plans a model larger than the GPU")
    p.add_argument("--device-memory", type=float, default=None, metavar="MB",
                   help="the GPU memory the estimate may use (default: what is free); the estimate is refused "
                        "up front when it would need more")
    p.add_argument("--micro-batch", type=int, default=None, metavar="N",
                   help="samples per suffix pass (output-distance; less memory, more passes)")
    p.add_argument("--stack-options", type=int, default=None, metavar="K",
                   help="options measured together in one suffix pass (output-distance; default: all of a layer's)")


def memory_params(args, params: dict, estimator: str | None) -> dict:
    """``params`` with the memory flags (checked: one line, before any work, for an estimator that does
    not take them; ``estimator`` ``None``: not decided yet)."""
    flags = {"offload": bool(getattr(args, "offload", False)) or None,
             "device_memory_mb": getattr(args, "device_memory", None),
             "micro_batch": getattr(args, "micro_batch", None), "stack_options": getattr(args, "stack_options", None)}
    given = {k: v for k, v in flags.items() if v is not None}
    if not given:
        return params
    if estimator is None:  # the recipe decides it later; the estimator refuses a setting it lacks
        params.update(given)
        return params
    import inspect

    from ..registry import load_class

    cls = load_class("estimator", estimator)
    accepted = inspect.signature(cls.__init__).parameters
    for key in given:
        if key not in accepted:
            flag = "--" + {"device_memory_mb": "device-memory"}.get(key, key).replace("_", "-")
            what = ("streams decoder blocks through the output-distance estimator" if key == "offload"
                    else "is a setting of the output-distance estimator")
            raise MpsearchError(f"{flag} {what}; estimator {estimator!r} cannot take it: use --estimator "
                                f"output-distance or leave {flag} out")
    params.update(given)
    if given.get("offload") and getattr(args, "device", None):
        from ..specs import resolve_device

        params.setdefault("device", str(resolve_device(args.device)))
    return params


def settings_from_args(cls, args, *, prefix: str = "", flags: dict | None = None, make=None, **values):
    """A settings object (a :class:`mpsearch.settings.Settings` dataclass) from parsed arguments:
    each field from the argument ``prefix + field`` (its argparse ``dest``) where that is given and
    not ``None``, unless ``values`` names it. A new setting is one field and one argparse line.
    ``make``: what builds the object from the fields (default ``cls``). A refused value names its
    flag (``--refine-evals``; ``flags`` maps a field to another flag)."""
    for name in cls.field_names():
        if name not in values and getattr(args, prefix + name, None) is not None:
            values[name] = getattr(args, prefix + name)
    try:
        return (make or cls)(**values)
    except SettingsError as exc:
        name = getattr(exc, "setting", None)
        if getattr(exc, "owner", None) is not cls:
            raise
        flag = (flags or {}).get(name) or "--" + (prefix + name).replace("_", "-")
        raise SettingsError(f"{flag} {exc.detail}") from None


def add_imatrix_args(p, *, auto: bool):
    """``--imatrix FILE`` (llama.cpp's importance matrix) and, where one is computed by default,
    ``--no-imatrix``."""
    if auto:
        p.add_argument("--imatrix", default=None, metavar="FILE",
                       help="llama.cpp importance matrix (GGUF or legacy .dat, as llama-imatrix writes it): "
                            "llama.cpp's types are rounded with it, as llama-quantize --imatrix does "
                            "(default with --target llama.cpp and --data: computed from the calibration data "
                            "as llama-imatrix does)")
        p.add_argument("--no-imatrix", action="store_true",
                       help="round llama.cpp's types without an imatrix (llama-quantize without --imatrix)")
    else:
        p.add_argument("--imatrix", default=None, metavar="FILE",
                       help="llama.cpp importance matrix to round llama.cpp's types with (default: the one the "
                            "plan's table was estimated with, where its file is still there)")


def imatrix_arg(args):
    """The ``imatrix=`` value of ``--imatrix``/``--no-imatrix`` (``"auto"`` when neither is given)."""
    if getattr(args, "no_imatrix", False):
        if args.imatrix:
            raise MpsearchError("--imatrix FILE and --no-imatrix contradict each other: give one")
        return None
    if args.imatrix:
        from ..imatrix import read_imatrix  # start-up: the CLI's parser loads only what it needs

        return read_imatrix(args.imatrix)  # a bad file refused before any work
    return "auto"

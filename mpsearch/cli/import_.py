"""``mpsearch import``: read a plan back from a consumer's file (torchao, GPTQModel, llama.cpp)."""

from __future__ import annotations

from ..errors import MpsearchError
from ._common import add_command, add_json_arg, check_outputs, parse_params, report

EXAMPLE = """mpsearch import --from llama.cpp tensor_types.txt -o plan.json
mpsearch import --from gptqmodel quantize_config.json --layers plan.json -o plan2.json"""


def register(sub):
    p = add_command(sub, "import", "Read a plan back from a quantizer's per-layer file.", EXAMPLE, run)
    p.add_argument("file", help="the consumer's file")
    p.add_argument("--from", dest="fmt", required=True, metavar="FORMAT", help="torchao | gptqmodel | llama.cpp")
    add_json_arg(p)
    p.add_argument("-o", "--output", required=True, help="where to write the plan (.json)")
    p.add_argument("--layers", metavar="FILE",
                   help="the model's layer names, for formats that use regexes: a plan .json or a text "
                        "file with one name per line")
    p.add_argument("--model", help="model spec whose quantizable layers give the names (instead of --layers)")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="a format setting (repeatable), e.g. --opt arch=qwen2")


def _read_layers(path: str) -> list[str]:
    from pathlib import Path

    from ..plan import BitPlan  # start-up: the CLI's parser loads only what it needs

    p = Path(path)
    if not p.is_file():
        raise MpsearchError(f"--layers file {path!r} does not exist")
    if p.suffix == ".json":
        return BitPlan.load(p).layers
    names = [line.strip() for line in p.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if not names:
        raise MpsearchError(f"--layers file {path!r} names no layer")
    return names


def run(args) -> int:
    from ..export import get_exporter, import_plan  # start-up: the CLI's parser loads only what it needs

    check_outputs(files=[("-o", args.output)])
    opts = parse_params(args.opt)
    get_exporter(args.fmt, **opts)
    layers = None
    if args.layers:
        layers = _read_layers(args.layers)
    elif args.model:
        from ..specs import load_model  # start-up: the CLI's parser loads only what it needs

        layers = load_model(args.model)
    plan = import_plan(args.file, args.fmt, layers=layers, **opts)
    plan.save(args.output)
    report(args, {"output": str(args.output), "format": args.fmt, "layers": len(plan.layers)},
           [f"wrote {args.output} ({len(plan.layers)} layers from {args.fmt})"])
    return 0

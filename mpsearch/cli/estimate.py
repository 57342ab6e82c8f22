"""``mpsearch estimate``: model + data -> cost table."""

from __future__ import annotations

from ..errors import MpsearchError
from ..recipe import busy_cpu_note, check, estimator_note, resolve
from ..registry import estimator_names, get_estimator, load_class
from ._common import (add_command, add_device_args, add_imatrix_args, add_json_arg, add_memory_args,
                      add_param_arg, add_target_arg, add_text_args, check_outputs, imatrix_arg, load_model_args,
                      memory_params, note_kept, parse_params, report, say, target_from_args)

EXAMPLE = """mpsearch estimate --model mypkg.models:build --data mypkg.data:calib \\
    --estimator weight-error --bits 2,3,4,8 -o table.csv
mpsearch estimate --model path/to/hf-dir --data calib.txt --estimator output-distance \\
    --target llama.cpp -o table.csv     # llama.cpp's types, rounded with calib.txt's imatrix"""


def register(sub):
    p = add_command(sub, "estimate", "Measure per-layer sensitivity and write a cost table.", EXAMPLE, run)
    p.add_argument("--model", required=True,
                   help="model spec: HF directory, smollm2, minilm, package.module:callable or file.py:callable")
    p.add_argument("--data", help="calibration data spec: a text file (tokenized with the model's tokenizer), "
                                  ".pt, callable or short name (needed by data-driven estimators and for MACs/BOPs)")
    add_device_args(p)
    add_text_args(p, evaluation=False)

    p.add_argument("--estimator", default=None, metavar="ESTIMATOR",
                   help=f"{' | '.join(estimator_names())} (default recipe: output-distance with --data, fisher "
                        f"for a causal LM on the CPU, weight-error without --data; settings: 'mpsearch list estimators')")
    p.add_argument("--bits", "--options", dest="options", default=None,
                   help="options to cost, comma-separated: 2,3,4,8,keep or int4-g128,int8, or a target's "
                        "own (q4_K,q5_0...), or the preset llm (int2..int8 plus groups of 64/32 at 3-5 bits) "
                        "(default: the default recipe's int2-asym..int8-asym, the preset llm for a causal LM; "
                        "with --target, the target's default set)")
    add_target_arg(p)
    p.add_argument("--quantizer", choices=("rtn", "gptq"), default="rtn",
                   help="rounding the damage is measured with: rtn (round to nearest, default) or gptq "
                        "(Hessian-compensated, as GPTQModel/llm-compressor run it; integer options)")
    add_imatrix_args(p, auto=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tie", action="append", default=[], metavar="REGEX", help="tie layers (group column)")
    p.add_argument("--fuse-projections", action="store_true",
                   help="tie q/k/v and gate/up projections as serving runtimes fuse them")
    p.add_argument("--include-embedding", action="store_true", help="also cost Embedding layers")
    p.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                   help="leave layers (or tensors mpsearch does not understand) out; the coverage line says "
                        "what is left out")
    p.add_argument("--per-expert", action="store_true",
                   help="mixture-of-experts: one layer per expert of each stacked expert tensor "
                        "(...experts.down_proj[3]; --target mpsearch only)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--device-map", default=None, metavar="MAP",
                   help="spread a Hugging Face model over this host's GPUs with accelerate: auto, balanced, "
                        "sequential or a JSON object module -> device (see 'Several GPUs' in the README)")
    p.add_argument("--kv-types", default=None, metavar="TYPES",
                   help="also measure the damage of llama.cpp's KV cache types for K and for V (e.g. f16,q8_0,q4_0), "
                        "as the output-distance estimator measures a layer, so solve --fit can choose the cache type "
                        "with the weights (--target llama.cpp, a causal LM, --data, estimator output-distance)")
    add_memory_args(p)
    add_param_arg(p, "estimator")
    add_json_arg(p)
    p.add_argument("-o", "--output", required=True, help="where to write the table (.csv or .json)")


def run(args) -> int:
    from ..budget import check_patterns  # start-up: the CLI's parser loads only what it needs
    # start-up: the CLI's parser loads only what it needs
    from ..distributed import current, load_device_map, place_model
    from ..sensitivity.base import on_gpu  # start-up: the CLI's parser loads only what it needs
    from ..specs import load_calibration  # start-up: the CLI's parser loads only what it needs
    from ..table import sidecar_path  # start-up: the CLI's parser loads only what it needs

    check_outputs(files=[("-o", args.output)])
    if not str(args.output).lower().endswith(".json"):
        check_outputs(files=[("-o (its metadata file)", str(sidecar_path(args.output)))])
    check_patterns(args.exclude, "--exclude")
    check_patterns(args.tie, "--tie")
    params = _params(args)
    if args.device_map:
        from ..distributed import check_device_map  # start-up: the CLI's parser loads only what it needs

        args.device_map = check_device_map(args.device_map)  # before any work
    target = target_from_args(args)  # resolved once, passed on
    # start-up: the CLI's parser loads only what it needs
    from ..imatrix import imatrix_expected, uses_imatrix

    imatrix = imatrix_arg(args)
    expected = imatrix_expected(imatrix, target, args.data)  # i-quants are llama.cpp's only with one
    check(target=target, options=args.options, estimator=args.estimator, params=params, has_data=bool(args.data),
          imatrix=expected)
    if imatrix not in ("auto", None) and not uses_imatrix(target):
        raise MpsearchError("--imatrix is llama.cpp's importance matrix: it needs --target llama.cpp")
    if imatrix == "auto" and args.data and uses_imatrix(target):
        check_outputs(files=[("-o (its imatrix file)", imatrix_sidecar(args.output))])
    kv_types = _kv_types(args, target)
    _check_offload(args, params, kv_types)
    shard = current()  # under torchrun: this rank's share of the work; rank 0 writes the table
    model = load_device_map(args.model, args.device_map) if args.device_map else load_model_args(
        args, device="cpu" if args.offload else None)  # offloaded: the model stays in CPU memory
    place_model(model, shard)
    gpu = on_gpu(model, _compute_device(args))
    recipe = resolve(target=target, options=args.options, estimator=args.estimator, has_data=bool(args.data),
                     model=model, imatrix=expected, gpu=gpu)
    memory_params(args, params, recipe.estimator)
    estimator = get_estimator(recipe.estimator, **_with_cache(recipe.estimator, params), options=recipe.options)
    if estimator_note(recipe) and shard.is_main and not args.json:  # before the work (in the JSON: "note")
        say(estimator_note(recipe))
    busy = None if gpu else busy_cpu_note(model)
    if busy and shard.is_main and not args.json:
        say(busy)
    note_kept(_kept(estimator))
    data = load_calibration(args.data, model, args.model, seq_len=args.seq_len, samples=args.calib_samples,
                            batch_size=args.batch_size)
    table = estimator.estimate(
        model, data, ties=args.tie, fuse_projections=args.fuse_projections,
        include_embedding=args.include_embedding, exclude=args.exclude,
        progress=not args.no_progress, target=target, quantizer=args.quantizer, per_expert=args.per_expert,
        imatrix=imatrix,
    )
    if kv_types:  # the KV cache types' damage, in the table's units (output distance)
        from ..kvcache import measure_kv_damage  # start-up: the CLI's parser loads only what it needs

        if recipe.estimator != "output-distance":
            raise MpsearchError(f"--kv-types measures the KV cache as output-distance measures a layer; the table's "
                                f"estimator is {recipe.estimator!r}: use --estimator output-distance")
        metric = getattr(estimator, "metric", "kl")
        table.metadata["kv_damage"] = measure_kv_damage(
            model, data, kv_types, arch=table.metadata.get("deploy", {}).get("arch", "llama"),
            metric="kl" if metric == "auto" else metric, progress=not args.no_progress)
    if not shard.is_main:
        return 0
    return _write_and_report(args, table, estimator, recipe, target)


def _check_offload(args, params: dict, kv_types) -> None:
    """``--offload`` against the flags it cannot go with, and its settings, before any work."""
    if args.offload and args.device_map:
        raise MpsearchError("--offload streams the model's blocks to one device and --device-map spreads it over "
                            "several GPUs: give one of them")
    if kv_types and args.offload:
        raise MpsearchError("--kv-types measures the KV cache on the whole model, which does not stream yet: "
                            "leave --offload out, or measure the KV types in a run of their own")
    if args.offload and args.estimator is None:  # the estimator that streams
        args.estimator = "output-distance"
    memory_params(args, params, args.estimator)  # --offload, --micro-batch, --stack-options: checked here


def _compute_device(args):
    """Where the estimate computes: ``--device``; with ``--offload`` and no ``--device``, CUDA when present."""
    import torch  # start-up: the CLI's parser loads only what it needs

    from ..specs import resolve_device  # start-up: the CLI's parser loads only what it needs

    dev = resolve_device(args.device)
    if dev is None and args.offload:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return dev


def imatrix_sidecar(output) -> str:
    """Where ``estimate -o TABLE`` writes the imatrix it computed: ``TABLE.imatrix.gguf``."""
    return str(output) + ".imatrix.gguf"


def _write_and_report(args, table, estimator, recipe, target) -> int:
    """Write the table (and a computed imatrix beside it), then say what was written."""
    from ..coverage import recorded_summary  # start-up: the CLI's parser loads only what it needs
    from ..diagnose import non_monotone_line  # start-up: the CLI's parser loads only what it needs
    from ..imatrix import uses_imatrix  # start-up: the CLI's parser loads only what it needs

    table.metadata.setdefault("model_spec", args.model)
    if args.data:
        table.metadata.setdefault("data_spec", args.data)
    imx = table.imatrix
    if imx is not None and imx.computed:  # llama-quantize --imatrix will need it: beside the table
        imx.datasets = [str(args.data)]
        imx.write(imatrix_sidecar(args.output))
        table.metadata["imatrix"] = imx.describe()
    table.write(args.output)
    cost = table.metadata.get("cost", {})
    origin = f", read from the estimator cache in {estimator.cache_dir}" if cost.get("from_cache") else ""
    lines = [f"wrote {args.output}: {len(table.layers)} layers x {len(table.options)} options "
             f"({recipe.estimator}, {cost.get('seconds', 0):.2f} s{origin})", *filter(None, [non_monotone_line(table)]),
             recorded_summary(table.metadata)]
    if imx is not None:
        lines.append(f"rounded llama.cpp's types with the imatrix {imx.path} ({imx.describe()['source']}, "
                     f"{len(imx)} tensors, sha256 {imx.sha256[:12]})")
    elif uses_imatrix(target):
        lines.append("rounded llama.cpp's types without an imatrix (as llama-quantize without --imatrix"
                     + ("; --data computes one)" if not args.data else ")"))
    report(args, {"output": str(args.output), "estimator": recipe.estimator, "note": estimator_note(recipe),
                  "layers": len(table.layers), "options": list(table.options), "target": table.metadata.get("target"),
                  "seconds": cost.get("seconds"), "from_cache": bool(cost.get("from_cache")),
                  "cache_dir": getattr(estimator, "cache_dir", None),
                  "non_monotone_layers": sorted(table.metadata.get("non_monotone", {})),
                  "zero_damage_options": table.metadata.get("zero_damage_options", {}),
                  "source_grid": table.metadata.get("source_grid"),
                  "coverage": table.metadata.get("coverage"), "rounding": table.metadata.get("rounding"),
                  "imatrix": table.metadata.get("imatrix"),
                  "imatrix_file": imatrix_sidecar(args.output) if imx is not None and imx.computed else None},
           lines)
    return 0


def _params(args) -> dict:
    """``--param`` as a dict (``--seed`` in it); ``--param options=...`` is ``--bits`` by another name."""
    params = parse_params(args.param)
    params.setdefault("seed", args.seed)
    if "options" in params:  # --param options=... is --bits by another name
        if args.options is not None:
            raise MpsearchError("give the options once: --bits or --param options, not both")
        given = params.pop("options")
        args.options = ",".join(map(str, given)) if isinstance(given, (list, tuple)) else str(given)
    return params


def _with_cache(name: str, params: dict) -> dict:
    """The estimator's settings with its cache on by default (in :func:`default_cache_dir`) where it
    has one, so an interrupted run keeps its work; ``--param cache_dir=None`` turns it off."""
    import inspect

    from ..sensitivity.cache import default_cache_dir  # start-up: the CLI's parser loads only what it needs

    if "cache_dir" in inspect.signature(load_class("estimator", name).__init__).parameters:
        params = {"cache_dir": str(default_cache_dir()), **params}
    return params


def _kept(estimator) -> str:
    """What Ctrl-C keeps from now on, for the line printed after it."""
    if getattr(estimator, "cache_dir", None):
        return (f"the estimator's work so far is kept in {estimator.cache_dir} (saved every "
                f"{getattr(estimator, 'cache_every', 0):g} s): run the same command again to resume")
    if "cache_dir" in estimator.get_params():
        return ("nothing was kept: the estimator cache is off (--param cache_dir=None); leave cache_dir "
                "unset (or give --param cache_dir=DIR) so an interrupted run keeps its work")
    return f"nothing was kept (estimator {estimator.name!r} keeps no cache: it starts over, and it is quick)"


def _kv_types(args, target) -> list[str]:
    """``--kv-types`` checked before any work."""
    from ..kvcache import KV_CACHE_TYPES  # start-up: the CLI's parser loads only what it needs

    if args.kv_types is None:
        return []
    types = [t.strip() for t in str(args.kv_types).split(",") if t.strip()]
    bad = [t for t in types if t not in KV_CACHE_TYPES]
    if not types or bad:
        raise MpsearchError(f"--kv-types {args.kv_types!r}: give llama.cpp cache types from "
                            f"{', '.join(KV_CACHE_TYPES)}, e.g. f16,q8_0,q4_0")
    if getattr(target, "name", target) != "llama.cpp" or not args.data:
        raise MpsearchError("--kv-types needs --target llama.cpp and --data (the KV damage is measured on the data)")
    return types

"""``mpsearch demo``: the whole job on all-MiniLM-L6-v2 with Shakespeare text.

Estimates a cost table on passages from some plays, solves the size/quality frontier, applies and
measures plans along it on passages from *other* plays (embedding cosine to the full-precision
model), measures uniform bit-widths alongside, and writes everything into ``--out``. A second run
(or one after an interruption) reads the cached table and measurements back.
"""

from __future__ import annotations

from ..options import DEFAULT_SEARCH_OPTIONS
from ._common import parse_params, say

EXAMPLE = "mpsearch demo --out mpsearch-demo"

#: the default recipe (chosen from experiments/real_models.md)
DEMO = {"estimator": "output-distance", "solver": "ilp",
        "options": DEFAULT_SEARCH_OPTIONS,
        "calib": 16, "eval": 64, "max_length": 48, "validate": 5}


def register(sub):
    from ._common import add_command

    p = add_command(sub, "demo", "Run the whole job on a real pretrained model (all-MiniLM-L6-v2).", EXAMPLE, run)
    p.add_argument("--out", default="mpsearch-demo", help="output folder (default: ./mpsearch-demo)")
    p.add_argument("--estimator", default=DEMO["estimator"], help=f"estimator (default: {DEMO['estimator']})")
    p.add_argument("--solver", default=DEMO["solver"], help=f"solver (default: {DEMO['solver']})")
    p.add_argument("--validate", type=int, default=DEMO["validate"], help="plans to measure along the frontier")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    from ._common import add_device_args

    add_device_args(p)


def run_demo(out="mpsearch-demo", *, estimator=DEMO["estimator"], solver=DEMO["solver"],
             validate=DEMO["validate"], progress=True, device=None, dtype=None):
    """The demo as a library call; returns the :class:`~mpsearch.pipeline.FrontierRun`."""
    import torch

    from .. import zoo
    from ..metrics import EmbeddingCosine
    from ..pipeline import measured_frontier

    torch.manual_seed(0)
    from ..specs import load_model

    model, tok = zoo.load_minilm()
    model = load_model(model, device=device, dtype=dtype)
    calib = zoo.minilm_batches(zoo.shakespeare_lines(DEMO["calib"], "calib"), 16,
                               DEMO["max_length"], tokenizer=tok)
    evals = zoo.minilm_batches(zoo.shakespeare_lines(DEMO["eval"], "eval", seed=1), 32,
                               DEMO["max_length"], tokenizer=tok)
    return measured_frontier(model, calib, EmbeddingCosine(evals), estimator=estimator, solver=solver,
                             options=DEMO["options"], validate=validate, out=out, progress=progress)


def run(args) -> int:
    import time

    t0 = time.perf_counter()
    result = run_demo(args.out, estimator=args.estimator, solver=args.solver, validate=args.validate,
                      progress=not args.no_progress, device=args.device, dtype=args.dtype)
    say(summarize(result))
    say(f"done in {time.perf_counter() - t0:.0f} s")
    return 0


def summarize(run) -> str:
    """A few lines: measured quality of mixed precision vs uniform at the same sizes, and the files."""
    q = f"measured_{run.metric}"
    lines = [f"all-MiniLM-L6-v2, {run.table.metadata.get('estimator')} estimator, "
             f"{len(run.table.layers)} layers; quality = {run.metric_label} on held-out data"]
    for _, row in run.validated().iterrows():
        # the plan solved at a uniform plan's exact size (its own size may be a little smaller)
        same = run.uniform[(run.uniform["avg_bits"] - row["budget_avg_bits"]).abs() < 1e-6]
        tag = f"   uniform {same[q].iloc[0]:.4g}" if len(same) else ""
        lines.append(f"  {row['avg_bits']:.3f} bits/weight: mixed {row[q]:.4g}{tag}")
    lines.append(f"proxy check: Spearman(predicted damage, measured loss) = {run.proxy['spearman']:.3f}"
                 + ("  (POOR)" if run.proxy["poor"] else ""))
    lines.append(f"outputs in {run.out}/:")
    for key, path in run.files.items():
        lines.append(f"  {key:18s} {path}")
    return "\n".join(lines)


# ------------------------------------------------- 'mpsearch frontier --model ...' (the model path)
def add_model_frontier_args(p) -> None:
    """The arguments of the model path of ``mpsearch frontier``."""
    g = p.add_argument_group("measured frontier (instead of --table): estimate, solve, apply and measure")
    g.add_argument("--model", help="model spec: HF directory, package.module:callable, file.py:callable, "
                                   "or minilm / smollm2 / fashion-cnn / digits-mlp")
    g.add_argument("--data", help="calibration data spec (text file, .pt, IDX file, callable, or a short name)")
    from ._common import add_device_args, add_text_args

    add_device_args(g)
    add_text_args(g)
    g.add_argument("--eval-data", help="evaluation data spec (default: held-out data for the zoo models; "
                                       "required otherwise, as calibration and evaluation data are disjoint)")
    g.add_argument("--estimator", default="weight-error", help="estimator name (default: weight-error)")
    g.add_argument("--bits", dest="options", default=DEFAULT_SEARCH_OPTIONS,
                   help="options, e.g. 2,3,4,8 or int4-g128 (default: asymmetric per-channel int2..int8)")
    g.add_argument("--validate", type=int, default=5, metavar="K", help="plans to apply and measure (default: 5)")
    g.add_argument("--workers", type=int, default=1, metavar="N",
                   help="processes measuring the K plans on a CPU host (under torchrun the ranks share them)")
    g.add_argument("--device-map", default=None, metavar="MAP",
                   help="spread a Hugging Face model over this host's GPUs with accelerate (auto, balanced, JSON)")
    g.add_argument("--metric", default=None,
                   help="kld, top1, perplexity (causal LMs: kld, reporting all three), cosine, accuracy, agreement, "
                        "kl, or package.module:callable (default: by model)")


def _zoo_eval(spec: str, tokenizer):
    from .. import zoo

    if spec == "minilm":
        return zoo.minilm_batches(zoo.shakespeare_lines(64, "eval", seed=1), 32, 48, tokenizer=tokenizer)
    if spec == "fashion-cnn":
        return zoo.fashion_batches("test", n=2000, batch_size=500)
    if spec == "digits-mlp":
        return zoo.digits_batches("test")
    return None


def run_model_frontier(args) -> int:
    """Estimate -> frontier -> apply and measure K plans; ``-o`` names the output folder."""
    from ..distributed import current, load_device_map, place_model
    from ..errors import MpsearchError
    from ..pipeline import measured_frontier
    from ..specs import _is_text, load_calibration, load_data, load_metric, tokenizer_for
    from ._common import load_model_args

    shard = current()  # under torchrun: ranks share the estimate and the measurements; rank 0 writes
    model = load_device_map(args.model, args.device_map) if args.device_map else load_model_args(args)
    place_model(model, shard)
    data = args.data or {"minilm": "shakespeare", "smollm2": "shakespeare"}.get(args.model)
    text = _is_text(data) or _is_text(args.eval_data) or args.model == "smollm2" and not args.eval_data
    tokenizer = tokenizer_for(args.model) if text else None  # read once, only for text data
    sizes = dict(seq_len=args.seq_len, batch_size=args.batch_size, tokenizer=tokenizer)
    if data is not None:
        calib = load_calibration(data, model, args.model, samples=args.calib_samples, **sizes)
    else:
        calib = load_data({"fashion-cnn": "fashion-mnist", "digits-mlp": "digits"}.get(args.model))
    if args.metric and ":" in args.metric:
        metric = load_metric(args.metric, None, model)
    elif args.eval_data or args.model == "smollm2":
        metric = load_metric(args.metric, args.eval_data or "shakespeare", model, args.model,
                             eval_tokens=args.eval_tokens, window=args.eval_window, stride=args.eval_stride,
                             **sizes)
    else:
        evals = _zoo_eval(args.model, tokenizer)
        if evals is None:
            raise MpsearchError("--eval-data is required for this model: calibration and evaluation data "
                                "must be disjoint (or give --metric package.module:callable)")
        from ..data import first_batch
        from ..metrics import default_metric_name, make_metric

        metric = make_metric(args.metric or default_metric_name(model, first_batch(evals)), evals)
    run = measured_frontier(model, calib, metric, estimator=args.estimator, solver=args.solver,
                            options=args.options, validate=args.validate, out=args.output,
                            solver_params=parse_params(args.param), progress=True,
                            workers=args.workers)
    say(summarize(run).replace("all-MiniLM-L6-v2", str(args.model)))
    return 0

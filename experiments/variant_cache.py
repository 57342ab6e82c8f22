"""Quantized weights kept across calibration batches (``output-distance``'s ``max_variant_mb``) against
quantizing again for every batch (``max_variant_mb=0``, the behaviour before), side by side in one run
on the CPU: the same table bit for bit, the wall time of each, alternating, median of ``--repeats``.

Cases (real models, fp32, 1 thread unless OMP_NUM_THREADS says otherwise):

* ``smollm2-ggml``: SmolLM2-135M's first ``--blocks`` decoder blocks (7 linear layers each) with the
  GGML types of ``--target llama.cpp`` (the K-quants' scale searches are the costly quantizers), on
  ``--windows`` windows of 64 tokens of the calibration plays, one window per batch;
* ``smollm2-int``: the same layers with the ``llm`` preset (integer options, per channel and g128);
* ``minilm``: MiniLM with the default options on 8 batches of 16 lines of the calibration plays.

    OMP_NUM_THREADS=1 python experiments/variant_cache.py --blocks 1 --windows 4 --out experiments/variant_cache.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def smollm2_case(blocks: int, windows: int, target: bool):
    from mpsearch import zoo
    from mpsearch.layers import discover_layers

    model = zoo.smollm2(dtype=torch.float32)
    tok = zoo.smollm2_tokenizer()
    ids = tok(zoo.shakespeare_text("calib"), return_tensors="pt")["input_ids"][0]
    batches = [ids[i * 64:(i + 1) * 64][None] for i in range(windows)]
    keep = {f"model.layers.{b}." for b in range(blocks)}
    layers = [lay for lay in discover_layers(model) if any(lay.name.startswith(k) for k in keep)]
    kw = {"target": "llama.cpp", "imatrix": None} if target else {}
    return model, batches, layers, ("auto" if target else "llm"), kw


def minilm_case():
    from mpsearch import zoo

    model = zoo.minilm()
    text = zoo.shakespeare_text("calib", max_chars=200_000)
    lines = [ln.strip() for ln in text.splitlines() if len(ln.split()) >= 6][:128]
    return model, zoo.minilm_batches(lines, batch_size=16, max_length=64), None, None, {}


def run(case, settings):
    import mpsearch

    model, batches, layers, options, kw = case
    est = mpsearch.get_estimator("output-distance", **({"options": options} if options not in (None, "auto") else {}),
                                 **settings)
    t0 = time.perf_counter()
    table = est.estimate(model, batches, layers=layers, progress=False, min_coverage=0.0, **kw)
    return time.perf_counter() - t0, table


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="smollm2-ggml,smollm2-int,minilm")
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, help="markdown page to write")
    args = p.parse_args(argv)
    rows = []
    for name in args.cases.split(","):
        if name == "minilm":
            case = minilm_case()
        else:
            case = smollm2_case(args.blocks, args.windows, target=name == "smollm2-ggml")
        times = {"kept": [], "again": []}
        tables = {}
        for r in range(args.repeats):
            order = [("again", {"max_variant_mb": 0}), ("kept", {})] if r % 2 == 0 else \
                [("kept", {}), ("again", {"max_variant_mb": 0})]
            for label, st in order:
                s, table = run(case, st)
                times[label].append(s)
                tables[label] = table
        same = np.array_equal(tables["kept"].pivot("damage").to_numpy(), tables["again"].pivot("damage").to_numpy(),
                              equal_nan=True)  # NaN: options a layer may not take
        ck, ca = tables["kept"].metadata["cost"], tables["again"].metadata["cost"]
        row = {"case": name, "layers": len(tables["kept"].layers), "options": len(tables["kept"].options),
               "batches": len(case[1]), "same_table": bool(same),
               "again_s": round(statistics.median(times["again"]), 2), "kept_s": round(statistics.median(times["kept"]), 2),
               "speedup": round(statistics.median(times["again"]) / statistics.median(times["kept"]), 2),
               "quantizations_again": ca.get("quantizations"), "quantizations_kept": ck.get("quantizations"),
               "variant_cache_mb": ck.get("variant_cache_mb"), "threads": torch.get_num_threads(),
               "times": times}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        lines = [
            "# Quantized weights kept across calibration batches (output-distance, `max_variant_mb`)", "",
            "Script: [variant_cache.py](variant_cache.py). CPU, fp32, "
            f"{rows[0]['threads']} thread(s), medians of {args.repeats} alternating runs of each side "
            "in one process (the machine was shared: ratios, not absolute times, are the result).", "",
            "| case | layers | options | batches | same table | quantized again per batch (s) | kept (s) | "
            "speed-up | quantizations again / kept | kept MB |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(f"| {r['case']} | {r['layers']} | {r['options']} | {r['batches']} | {r['same_table']} | "
                         f"{r['again_s']} | {r['kept_s']} | {r['speedup']}x | {r['quantizations_again']} / "
                         f"{r['quantizations_kept']} | {r['variant_cache_mb']} |")
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How compact and how fast are the exports? Llama-7B-shaped plans (32 blocks x 7 projections + lm_head).

For plans with 2-6 distinct options (fused siblings tied), compares GPTQModel's ``dynamic`` as
mpsearch writes it (one pattern per option) with the naive form (one exact pattern per non-default
layer), and times every exporter (median of repeats). Writes experiments/export_sizes.md.

    python experiments/export_sizes.py
"""

from __future__ import annotations

import json
import random
import re
import statistics
import time
from pathlib import Path

from mpsearch.export import export_plan, export_text, format_names
from mpsearch.options import parse_option
from mpsearch.plan import BitPlan

PROJ = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
SPECS = ["int4-g128", "int8", "int3-g128", "int2-g64", "keep", "int4"]


def plan_with(k: int, seed: int = 0) -> BitPlan:
    rng = random.Random(seed)
    specs = SPECS[:k]
    choice = {}
    for i in range(32):
        qkv, gu = rng.choice(specs), rng.choice(specs)
        for p in PROJ:
            leaf = p.split(".")[1]
            choice[f"model.layers.{i}.{p}"] = (qkv if leaf in ("q_proj", "k_proj", "v_proj")
                                               else gu if leaf in ("gate_proj", "up_proj") else rng.choice(specs))
    choice["lm_head"] = "int8"
    opts = {n: parse_option(s) for n, s in choice.items()}
    return BitPlan(bits={n: o.bits for n, o in opts.items()}, options={n: o.to_dict() for n, o in opts.items()})


def naive_dynamic(plan: BitPlan, doc: dict) -> dict:
    default = (doc["bits"], doc["group_size"], doc["sym"])
    out = {}
    for n in plan.layers:
        o = plan.option(n)
        f = (o.bits, -1 if o.group_size is None else o.group_size, o.symmetric)
        if o.is_keep:
            out[f"-:^{re.escape(n)}$"] = {}
        elif f != default:
            out[f"+:^{re.escape(n)}$"] = {"bits": f[0], "group_size": f[1], "sym": f[2]}
    return out


def median_ms(fn, repeats=15) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main() -> None:
    rows = ["| distinct options | layers | mpsearch keys | naive keys | mpsearch bytes | naive bytes | bytes ratio |",
            "|---|---|---|---|---|---|---|"]
    for k in (2, 3, 4, 6):
        plan = plan_with(k)
        doc = export_plan(plan, "gptqmodel")
        naive = {**doc, "dynamic": naive_dynamic(plan, doc)}
        a, b = len(json.dumps(doc)), len(json.dumps(naive))
        rows.append(f"| {k} | {len(plan.layers)} | {len(doc['dynamic'])} | {len(naive['dynamic'])} | {a} | {b} | {a / b:.3f} |")
    plan = plan_with(4)
    timing = ["| format | median export ms (225 layers) | file bytes |", "|---|---|---|"]
    for fmt in format_names():
        try:
            text = export_text(plan, fmt, force=True)
        except Exception as exc:  # noqa: BLE001 - e.g. modelopt refuses int3/int2
            timing.append(f"| {fmt} | refused: {str(exc)[:60]}... | - |")
            continue
        timing.append(f"| {fmt} | {median_ms(lambda: export_text(plan, fmt, force=True)):.2f} | {len(text)} |")
    out = Path(__file__).with_suffix(".md")
    out.write_text(
        "# Export sizes and speed\n\nWritten by `python experiments/export_sizes.py` (Llama-7B-shaped plans, "
        "fused siblings tied, seed 0).\n\n## GPTQModel `dynamic`: one pattern per option vs one per layer\n\n"
        + "\n".join(rows) + "\n\n## Export time per format (4 distinct options)\n\n" + "\n".join(timing) + "\n"
    )
    print(out.read_text())


if __name__ == "__main__":
    main()

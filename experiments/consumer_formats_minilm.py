"""Uniform consumer-format plans on all-MiniLM-L6-v2, measured through mpsearch's applier.

Each plan gives every linear layer one format (where the format accepts the layer's shape; the
others stay 16-bit), applies it with ``apply_plan`` (weights, and activation hooks for the
activation formats), and measures the mean cosine of sentence embeddings to the full-precision
model on held-out Shakespeare lines. Formats with a static activation range are measured twice:
with each batch's own range (dynamic) and after ``calibrate_activations`` on separate calibration
lines (the consumers' static calibration).

Usage: OMP_NUM_THREADS=1 python experiments/consumer_formats_minilm.py [-o FILE.md]
"""

from __future__ import annotations

import argparse

import torch

from mpsearch.apply import apply_plan, calibrate_activations
from mpsearch.formats import get_format
from mpsearch.layers import discover_layers
from mpsearch.metrics import make_metric
from mpsearch.options import KEEP, parse_option
from mpsearch.plan import BitPlan
from mpsearch.validate import validate_plan
from mpsearch.zoo import minilm, minilm_batches, shakespeare_lines

FORMATS = ["w4a16-g32", "w4a16-g128", "w4a16-asym", "w8a16", "w8a8-int8", "w8a8-fp8", "nvfp4",
           "mxfp4", "mxfp4-w4a4", "int8wo", "intx-4-g32", "intx-4-g32-asym", "int4_awq", "int8_wo",
           "fp8", "nvfp4-modelopt", "autoround-int4-g128", "autoround-int4-g128-asym",
           "autoround-int3-g128", "gptq-int4-g128", "gptq-int3-g128"]


def uniform_plan(layers, name):
    opt = parse_option(name)
    options = {lay.name: (opt if opt.check_shape(lay.out_channels, lay.in_features) is None else KEEP)
               for lay in layers}
    return BitPlan({k: o.bits for k, o in options.items()}, options={k: o.to_dict() for k, o in options.items()})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-o", "--output")
    a = ap.parse_args()
    torch.manual_seed(0)
    model = minilm().eval()
    layers = [lay for lay in discover_layers(model) if lay.kind == "linear"]
    calib = minilm_batches(shakespeare_lines(32, split="calib", seed=1))
    evald = minilm_batches(shakespeare_lines(64, split="eval", seed=2))
    metric = make_metric("cosine", evald)
    metric.fit(model)
    rows = []
    with torch.no_grad():
        for name in FORMATS:
            fmt = get_format(name)
            plan = uniform_plan(layers, name)
            q = apply_plan(model, plan)
            rep = validate_plan(model, plan, quantized=q, metric=metric, baseline=False)
            cos = rep.quality
            static = ""
            if getattr(fmt, "act_static", False):
                calibrate_activations(q, calib)
                rep2 = validate_plan(model, plan, quantized=q, metric=metric, baseline=False)
                static = f"{rep2.quality:.5f}"
            kept = sum(1 for k in plan.bits if plan.option(k).is_keep)
            bpw = (sum(plan.option(lay.name).size_bits(lay.out_channels, lay.in_features) for lay in layers)
                   / sum(lay.out_channels * lay.in_features for lay in layers))
            rows.append(f"| `{name}` | {fmt.consumer} | {fmt.act_bits} | {bpw:.3f} | {kept} | "
                        f"{cos:.5f} | {static} |")
            print(rows[-1], flush=True)
    text = "\n".join([
        f"all-MiniLM-L6-v2, {len(layers)} linear layers, eval: 64 held-out Shakespeare lines, "
        "metric: mean embedding cosine to fp32", "",
        "| format | consumer | act bits | bits/weight (linear layers) | layers left 16-bit (shape) | cosine "
        "(dynamic act range) | cosine (calibrated static range) |",
        "|---|---|---|---|---|---|---|", *rows])
    if a.output:
        with open(a.output, "w") as f:
            f.write("# Consumer formats on MiniLM (uniform plans)\n\n`OMP_NUM_THREADS=1 python "
                    "experiments/consumer_formats_minilm.py -o experiments/consumer_formats_minilm.md`\n\n"
                    + text + "\n")
    print(text)


if __name__ == "__main__":
    main()

"""Time each consumer format's fake-quantizer on one 4096 x 14336 float32 matrix (CPU).

Usage: OMP_NUM_THREADS=1 python experiments/consumer_formats_speed.py [--threads N] [-o FILE.md]
Writes a markdown table (seconds per quantize call, best of 2) to stdout or FILE.md.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from mpsearch.formats import get_format

NAMES = ["w4a16-g128", "w4a16-asym", "w8a8-int8", "w8a8-fp8", "nvfp4", "mxfp4", "int8wo",
         "intx-4-g32-asym", "int4_awq", "fp8", "nvfp4-modelopt", "autoround-int4-g128",
         "autoround-int4-g128-asym", "gptq-int4-g128"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("-o", "--output")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    w = torch.randn(4096, 14336, generator=torch.Generator().manual_seed(0)) * 0.02
    rows = []
    for name in NAMES:
        fmt = get_format(name)
        best = float("inf")
        for _ in range(2):
            t0 = time.perf_counter()
            q = fmt.quantize(w)
            best = min(best, time.perf_counter() - t0)
        err = float((q - w).pow(2).mean() / w.pow(2).mean())
        rows.append(f"| `{name}` | {fmt.consumer} | {best:.2f} | {fmt.bits_per_weight(14336):.4f} | {err:.3g} |")
        del q
    text = "\n".join([
        f"4096 x 14336 float32 matrix, torch {torch.__version__}, {a.threads} thread(s), "
        f"{platform.processor() or platform.machine()}",
        "",
        "| format | consumer | seconds | bits/weight (in=14336) | relative MSE |",
        "|---|---|---|---|---|",
        *rows,
    ])
    if a.output:
        with open(a.output, "w") as f:
            f.write("# Consumer formats: fake-quantization speed\n\n"
                    "`OMP_NUM_THREADS=1 python experiments/consumer_formats_speed.py -o "
                    "experiments/consumer_formats_speed.md`\n\n" + text + "\n")
    print(text)


if __name__ == "__main__":
    main()

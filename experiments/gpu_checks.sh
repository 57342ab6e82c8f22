#!/usr/bin/env bash
# One batched call on the GPU machine (the device tool runs it from the repository root; $OUT comes
# back): the CUDA tests, a single-rank torchrun estimate equal to the plain run, and the sharded
# estimators' one-rank measurement (experiments/distributed.py). Results: experiments/gpu_checks.md.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg
OUT=${OUT:-/tmp/gpu_checks}; mkdir -p "$OUT"
python3 -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.cuda.get_device_name(0), "transformers", transformers.__version__)'
pip install -q --no-deps pulp optuna colorlog alembic >/dev/null 2>&1 || true
echo "== CUDA tests"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_llm.py tests/test_formats_ggml.py \
  tests/test_estimators_conformance.py -k "cuda" 2>&1 | tail -15
echo "== single-rank torchrun equals the plain run (tiny random Llama on cuda)"
python3 - <<'PY'
from mpsearch import zoo
zoo.save_tiny_llama("/tmp/tiny-llama")
import random
random.seed(0)
words = "the king shall not speak of love nor war but of the sea and all its ships tonight".split()
open("/tmp/calib.txt", "w").write(" ".join(random.choice(words) for _ in range(4000)))
PY
common="--model /tmp/tiny-llama --data /tmp/calib.txt --estimator output-distance --device ${DEVICE:-cuda} --seq-len 64 --calib-samples 4 --no-progress"
timeout 90 python3 -m mpsearch estimate $common -o /tmp/plain.csv
timeout 120 torchrun --nproc-per-node 1 -m mpsearch estimate $common -o /tmp/rank1.csv
python3 - <<'PY'
import pandas as pd
a, b = pd.read_csv("/tmp/plain.csv"), pd.read_csv("/tmp/rank1.csv")
same = a.equals(b)
print(f"rows {len(a)} vs {len(b)}; identical: {same}; max |damage diff| {float((a.damage - b.damage).abs().max()):.3g}")
PY
[ -n "${SKIP_BIG:-}" ] && exit 0
echo "== experiments/distributed.py, one rank, Llama-1.1B shape"
timeout 220 python3 experiments/distributed.py --shapes llama-1.1b --ranks 1 --dtype bfloat16 -o "$OUT/distributed_h200.md" 2>&1 | tail -25

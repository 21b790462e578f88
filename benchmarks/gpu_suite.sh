#!/usr/bin/env bash
# GPU readiness in one run (issue 15, item 6), ~6-8 minutes on one H100:
#   1. generation: unigap's sampler vs transformers' `generate(generation_mode="image")` on a
#      Janus-Pro-1B-shaped random model in bf16 at batch 16 and 64, CFG 5, with the HBM roofline
#      (benchmarks/bench_generate.py --hbm-tbps: ~17 images/s at batch 16, ~32 at batch 64 for 3.0 TB/s);
#   2. judge throughput: the one-pass P(Yes) judge vs generating the judge's answer (same script);
#   3. training: SFT (conditional and guided) and DPO steps (precomputed vs resident reference) on the
#      same model with LoRA (benchmarks/bench_train.py), tokens/s and peak GPU memory.
# Not in it: CUDA graphs / torch.compile of the decode step (not implemented in models/janus.py).
# Nothing is downloaded: the weights are random, from the published config (models.loading.random_janus_pro).
# Output: stdout, and $OUT/gpu_suite.txt when OUT is set (the device tool's result folder).
#
#   bash benchmarks/gpu_suite.sh                                   # on a GPU machine
#   GPU_SUITE_MODEL=shapes GPU_SUITE_DEVICE=cpu GPU_SUITE_DTYPE=float32 GPU_SUITE_BATCH=2 \
#     GPU_SUITE_TRAIN_BATCH=2 GPU_SUITE_STEPS=1 GPU_SUITE_REPEATS=1 bash benchmarks/gpu_suite.sh   # CPU smoke run
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
MODEL=${GPU_SUITE_MODEL:-janus-pro-1b}
DEVICE=${GPU_SUITE_DEVICE:-cuda}
DTYPE=${GPU_SUITE_DTYPE:-bfloat16}
BATCH=${GPU_SUITE_BATCH:-16 64}
TRAIN_BATCH=${GPU_SUITE_TRAIN_BATCH:-8}
STEPS=${GPU_SUITE_STEPS:-3}
REPEATS=${GPU_SUITE_REPEATS:-2}
HBM_TBPS=${GPU_SUITE_HBM_TBPS:-3.0}
LOG=${OUT:+$OUT/gpu_suite.txt}
LOG=${LOG:-/dev/null}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

{
  echo "# gpu_suite $(date -u +%Y-%m-%dT%H:%MZ) model=$MODEL device=$DEVICE dtype=$DTYPE"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  fi
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
  echo "## 1-2. generation and judge (ours vs transformers), roofline at $HBM_TBPS TB/s"
  # shellcheck disable=SC2086  # BATCH is a list of sizes
  $PY benchmarks/bench_generate.py --model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" --batch $BATCH \
    --repeats "$REPEATS" --hbm-tbps "$HBM_TBPS"
  echo "## 3. training steps (LoRA r=16): SFT, guided SFT, DPO precomputed / resident reference"
  $PY benchmarks/bench_train.py --model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" --batch "$TRAIN_BATCH" \
    --steps "$STEPS" --warmup 1 --repeats 1
  echo "# gpu_suite done"
} 2>&1 | tee "$LOG"

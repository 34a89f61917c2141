#!/usr/bin/env bash
# Everything that needs a GPU, in one command (see ../shared/GPU.md for bringing the wheels first):
#   export PYTHONPATH=/tmp/site:$PWD:$PYTHONPATH; bash tests/gpu/run.sh [OUT_DIR]
# Runs tests/gpu (DALI mixed decoding, NCCL world of 1, DeepSpeed bf16/fp16, the classifier on CUDA),
# then the classifier, data and full-step benchmarks, writing logs and JSON under OUT_DIR.
set -uo pipefail
OUT_DIR="${1:-${OUT:-gpu_out}}"
mkdir -p "$OUT_DIR"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"   # the image's 9.0a breaks DeepSpeed's parser
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
PY="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT_DIR/gpu.txt"
$PY -m pytest tests/gpu -q -p no:cacheprovider 2>&1 | tee "$OUT_DIR/tests.log"
bench() { $PY -m distrib_face bench classifier --device cuda --batch 256 --embedding 512 --steps 20 --warmup 5 "$@"; }
{
  for n in 1000000 2000000 4000000; do bench --classes $n --dtype bf16; done
  bench --classes 1000000 --dtype fp32 --no-baseline
  for n in 8000000 16000000; do bench --classes $n --sample-rate 0.1 --dtype bf16; done
} 2>&1 | tee "$OUT_DIR/bench_classifier.md"
if $PY -m distrib_face bench --help 2>/dev/null | grep -q " data"; then
  $PY -m distrib_face bench data --device cuda 2>&1 | tee "$OUT_DIR/bench_data.md"
fi
if $PY -m distrib_face bench --help 2>/dev/null | grep -q " train"; then
  for c in configs/ms1mv3_r50_arcface.yaml; do
    $PY -m distrib_face bench train --config "$c" --set device=cuda 2>&1 | tee -a "$OUT_DIR/bench_train.md"
  done
fi

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
# Full step (no data loading), random images, against ../shared/GPU.md: iresnet50 + 2M classes at rate 0.2,
# batch 256 (reference 1,598 img/s fp16), and iresnet50 with a small classifier (reference 2,426 fp16, 3,312 bf16+compile).
bt() {
  $PY -m distrib_face bench train --config configs/ms1mv3_r50_arcface.yaml --steps 20 --warmup 5 --no-data \
    --set device=cuda --set data.source=random --set data.random_num_samples=4096 --set data.batch_size=256 \
    --set tracking.enabled=false "$@"
}
{
  bt --set data.random_num_classes=2000000 --set loss.sample_rate=0.2 --set deepspeed.precision=fp16
  bt --set data.random_num_classes=2000000 --set loss.sample_rate=0.2 --set deepspeed.precision=bf16 \
     --set loss.compute_dtype=bf16 --set model.channels_last=true
  bt --set data.random_num_classes=1000 --set deepspeed.precision=fp16
  bt --set data.random_num_classes=1000 --set deepspeed.precision=bf16 --set model.channels_last=true --set model.compile=true
} 2>&1 | tee "$OUT_DIR/bench_train.md"

#!/usr/bin/env bash
# The GPU check (docs/testing.md gives the exact `run` calls; ../shared/GPU.md the machine's facts).
#
#   bash tests/gpu/run.sh part1 [OUT_DIR]    # <= 6 min; needs torch (image) + the wheels of tests/gpu/wheels.sh:
#                                            #   CUDA tests of the kernels and the classifier, classifier benchmarks
#                                            #   (1M-4M rate 1.0; 8M-32M rate 0.1, bf16 weights), iresnet50 and
#                                            #   full-step benchmarks -> OUT_DIR/gpu_check.json, gpu_check.md
#   bash tests/gpu/run.sh part2 [OUT_DIR]    # optional, afterwards, once DALI's wheel parts are installed
#                                            #   (../shared/tools/gpu-wheels.sh): the other GPU tests (DALI mixed
#                                            #   decoding, backbones, eval, training CLI) and bench data
#   bash tests/gpu/run.sh dry-run [OUT_DIR]  # here, on CPU: part 1's code paths at tiny sizes, the GPU image's
#                                            #   missing packages hidden (5-8 min on 2 cores)
set -uo pipefail
part="${1:-part1}"
OUT_DIR="${2:-${OUT:-gpu_out}}"
mkdir -p "$OUT_DIR"
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"   # the image's 9.0a breaks DeepSpeed's parser
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
case "$part" in
  part1)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT_DIR/gpu.txt" 2>&1
    $PY tests/gpu/check.py --out "$OUT_DIR" --budget-s "${BUDGET_S:-330}"
    ;;
  part2)
    $PY -m pytest tests/gpu -q -p no:cacheprovider \
      --ignore=tests/gpu/test_triton_gpu.py --ignore=tests/gpu/test_classifier_gpu.py 2>&1 | tee "$OUT_DIR/tests_part2.log"
    if $PY -m distrib_face bench --help 2>/dev/null | grep -q " data"; then
      $PY -m distrib_face bench data --device cuda 2>&1 | tee "$OUT_DIR/bench_data.md"
    fi
    ;;
  dry-run)
    # here the stack lives in the repo's .venv (the GPU image has it in its system python3)
    [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
    $PY tests/gpu/check.py --out "$OUT_DIR" --dry-run --budget-s "${BUDGET_S:-1200}"
    ;;
  *)
    echo "usage: bash tests/gpu/run.sh part1|part2|dry-run [OUT_DIR]" >&2
    exit 2
    ;;
esac

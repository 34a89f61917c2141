"""The pieces of the GPU check that can be checked here (the whole dry run is ``bash tests/gpu/run.sh
dry-run``, ~5 minutes): the GPU image's missing packages are hidden as they would be missing, the report
puts our numbers beside the references, and benchmark rows the classifier cannot run yet are skipped
with the reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.gpu import check


def test_stand_ins_fail_imports_like_the_image_but_keep_find_spec_working():
    folder = check._blocker_dir()
    code = (
        "import importlib.util, sys\n"
        f"sys.path.insert(0, {folder!r})\n"
        "assert importlib.util.find_spec('ray') is not None  # torch._dynamo probes optional packages so\n"
        "for name in ('ray', 'mlflow', 'nvidia.dali'):\n"
        "    try:\n"
        "        __import__(name)\n"
        "    except ModuleNotFoundError as err:\n"
        "        print(err.name, '|', err)\n"
        "import torch, json  # what the image has still imports\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["ray", "mlflow", "nvidia.dali"]
    assert all("is not on the GPU image" in line for line in lines)


def test_report_sets_our_numbers_beside_the_references(tmp_path):
    rows = [
        {"name": "clf 1M r1.0", "impl": "sharded (triton)", "classes": 1_000_000, "sample_rate": 1.0,
         "ms_per_step": 8.5, "peak_mem_mb": 5120.0, "note": "slowest rank"},
        {"name": "clf 8M r0.1", "impl": "sharded", "classes": 8_000_000, "sample_rate": 0.1,
         "ms_per_step": float("nan"), "peak_mem_mb": float("nan"), "note": "skipped: no weight_dtype"},
        {"name": "clf 32M r0.1", "error": "OutOfMemoryError()"},
    ]
    (tmp_path / "classifier.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "train.jsonl").write_text(json.dumps(
        {"name": "step 2M r0.2 bf16 cl", "images_per_sec": 3612.4, "median_step_ms": 70.9, "peak_memory_mb": 20480.0,
         "global_batch": 256}) + "\n")
    report = {"environment": {"dry_run": False, "python": "3.12", "gpu": "H200"}, "tests": {"rc": 0, "summary": "9 passed"},
              "skipped": [("r50 bf16 cl compile", "needs ~150 s, 40 s left")],
              "stages": {"classifier": {"rc": "timeout", "wall_s": 120.0}}}
    check.write_report(tmp_path, report)
    text = (tmp_path / "gpu_check.md").read_text()
    assert "| clf 1M r1.0 | 8.5 ms, 5.0 GB | 50.8 ms, 13.4 GB | <= 10 ms |" in text
    # the memory half of the target sits on the bf16-weight row (fp32 storage alone is 6 GB at 1M classes)
    assert "| clf 1M r1.0 bf16 weights | not reached | 50.8 ms, 13.4 GB (fp32) | <= 10 ms, <= 6 GB |" in text
    assert "| clf 8M r0.1 | skipped | 163 ms, 61.1 GB |" in text and "skipped: no weight_dtype" in text
    assert "| clf 32M r0.1 | - | - | - | OutOfMemoryError() |" in text
    assert "| step 2M r0.2 bf16 cl | 3,612 img/s, 70.9 ms, 20.0 GB | 1,598 img/s (fp16) | >= 3,500 img/s |" in text
    assert "| r50 bf16 cl compile | skipped | 3,312 img/s | - | needs ~150 s, 40 s left |" in text
    assert "| clf 2M r1.0 | not reached | 98 ms, 26.8 GB |" in text  # the stage was cut off before it
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["train"][0]["images_per_sec"] == 3612.4 and len(saved["classifier"]) == 3


def test_bf16_weight_rows_run_and_fp16_rows_say_why_not():
    from distrib_face.parallel.bench import BenchSpec, UnsupportedSpec, run_benchmark, weight_dtype_kwargs

    assert weight_dtype_kwargs("fp32") == {}
    assert weight_dtype_kwargs("bf16") == {"dtype": torch.bfloat16}  # the classifier's storage dtype
    with pytest.raises(UnsupportedSpec, match="the classifier stores fp32 or bf16 weights"):
        weight_dtype_kwargs("fp16")
    (row,) = run_benchmark(BenchSpec(classes=100, batch=4, embedding=8, weight_dtype="fp16", steps=1, warmup=0),
                           baseline=False)
    assert row.note.startswith("skipped: weight_dtype=fp16") and row.ms_per_step != row.ms_per_step  # NaN
    (row,) = run_benchmark(BenchSpec(classes=100, batch=4, embedding=8, weight_dtype="bf16", sample_rate=0.1,
                                     steps=1, warmup=0), baseline=False)
    assert row.ms_per_step > 0 and "weights bf16" in row.dtype
    with pytest.raises(ValueError, match="kernel must be one of"):
        BenchSpec(classes=100, kernel="cuda")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the triton row runs through the interpreter")
def test_bench_names_the_kernel_it_ran():
    from distrib_face.parallel.bench import BenchSpec, run_benchmark

    spec = BenchSpec(classes=50, batch=8, embedding=16, steps=1, warmup=0, kernel="triton")
    (row,) = run_benchmark(spec, baseline=False)  # "auto" would be the torch path on CPU
    assert row.impl == "sharded (triton)" and row.ms_per_step > 0

"""The training step on a GPU through ``distrib-face train``: fp16 with DeepSpeed loss scaling (the
class-shard gradients are unscaled) and bf16, with channels_last. Skipped without CUDA."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_training_runs(tmp_path, precision):
    config = {
        "data": {"source": "random", "random_num_classes": 100, "random_num_samples": 4096, "batch_size": 64},
        "model": {"backbone": "iresnet18", "channels_last": True},
        "deepspeed": {"precision": precision},
        "train": {"total_steps": 20, "output_dir": str(tmp_path / "run"), "log_every": 5, "export_onnx": False},
        "tracking": {"enabled": False},
        "device": "cuda",
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    summary_path = tmp_path / "summary.json"
    subprocess.run([sys.executable, "-m", "distrib_face", "train", "--config", str(path),
                    "--summary-json", str(summary_path)], check=True, timeout=600)
    summary = json.loads(summary_path.read_text())
    assert summary["steps"] == 20 and summary["skipped_steps"] == 0
    assert summary["final_loss"] == summary["final_loss"]  # not NaN

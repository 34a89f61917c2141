"""``distrib-face train`` in one process (DeepSpeed gets a world of 1 of its own), a bad config's exit code,
and ``launch/train.py`` under ``torchrun`` with 2 ranks, the deepspeed launcher's ``--local_rank`` included."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CONFIG = {
    "data": {"source": "random", "random_num_classes": 10, "random_num_samples": 128, "batch_size": 8,
             "image_size": 32},
    "model": {"backbone": "iresnet_tiny", "embedding_size": 16},
    "train": {"total_steps": 3, "log_every": 1, "export_onnx": False},
    "tracking": {"enabled": False},
}


def _write(tmp_path: Path, out: str) -> Path:
    cfg = {**CONFIG, "train": {**CONFIG["train"], "output_dir": str(tmp_path / out)}}
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1"}


def test_single_process_cli_and_bad_config(tmp_path):
    path = _write(tmp_path, "one")
    summary = tmp_path / "summary.json"
    proc = subprocess.run([sys.executable, "-m", "distrib_face", "train", "--config", str(path),
                           "--set", "optim.lr=0.05", "--summary-json", str(summary)],
                          capture_output=True, text=True, timeout=300, env=_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(summary.read_text())
    assert result["steps"] == 3 and result["world_size"] == 1
    assert "step 3/3 | loss" in proc.stderr  # progress lines when stderr is not a terminal
    bad = subprocess.run([sys.executable, "-m", "distrib_face", "train", "--config", str(path),
                          "--set", "optim.lr=-1"], capture_output=True, text=True, timeout=120, env=_env(), cwd=ROOT)
    assert bad.returncode == 2 and "optim.lr must be > 0, got -1.0" in bad.stderr


@pytest.mark.slow
def test_torchrun_two_ranks(tmp_path):
    path = _write(tmp_path, "torchrun")
    summary = tmp_path / "summary.json"
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", str(ROOT / "launch" / "train.py"),
                           "--config", str(path), "--summary-json", str(summary), "--local_rank=0"],
                          capture_output=True, text=True, timeout=300, env=_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(summary.read_text())
    assert result["steps"] == 3 and result["world_size"] == 2

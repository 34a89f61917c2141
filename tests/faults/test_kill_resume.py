"""kill -9, for real, of ``distrib-face train`` in the middle of a checkpoint write and in the middle of
training (DALI shards, 2 forkserver reader processes, Partial FC, ZeRO 1, flips): each time ``latest`` names a
complete checkpoint, no reader survives, and the job resumed with ``train.resume: auto`` ends with exactly the
weights, classifier and losses of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.distributed.test_train import _final_weights, _loss_history, _resume_config


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from distrib_face.data import write_synthetic

    out = tmp_path_factory.mktemp("shards")
    write_synthetic(out, num_identities=16, min_images=4, max_images=12, holdout_identities=0, image_size=32,
                    samples_per_shard=40, seed=3)
    return out


def _start(config: Path, fault: dict | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    env["KILL_TEST_RUN"] = str(config)  # every process the trainer starts inherits it: how survivors are found
    if fault:
        env["DISTRIB_FACE_TEST_FAULTS"] = json.dumps(fault)
    log = config.with_suffix(".log").open("a")  # a file, not a pipe: nobody reads it while the run goes on
    return subprocess.Popen([sys.executable, "-m", "distrib_face", "train", "--config", str(config)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)


def _log(config: Path) -> str:
    return config.with_suffix(".log").read_text()[-3000:]


def _train(config: Path, fault: dict | None = None) -> tuple[int, str]:
    proc = _start(config, fault)
    proc.wait(timeout=600)
    return proc.returncode, _log(config)


def _config_file(tmp_path: Path, name: str, shards: Path) -> Path:
    cfg = _resume_config(tmp_path, name, shards, checkpoint_every=2)
    cfg["data"]["num_workers"] = 2  # reader processes that must not outlive a killed trainer
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _readers_of(config: Path) -> list[int]:
    """Pids of live processes whose environment names this run (the readers inherit the trainer's)."""
    marker = f"KILL_TEST_RUN={config}".encode()
    alive = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker in (proc / "environ").read_bytes().split(b"\0") and \
                    (proc / "stat").read_text().split()[2] != "Z":
                alive.append(int(proc.name))
        except OSError:
            continue
    return alive


@pytest.mark.slow
def test_killed_in_a_checkpoint_and_in_training_resumes_bit_identically(tmp_path, shards):
    whole = _config_file(tmp_path, "whole", shards)
    code, err = _train(whole)
    assert code == 0, err[-3000:]

    killed = _config_file(tmp_path, "killed", shards)
    root = tmp_path / "killed" / "checkpoints"
    # 1. SIGKILL after step 4's files are written, before the folder is published.
    code, err = _train(killed, {"exit_in_checkpoint_at_step": 4})
    assert code == -signal.SIGKILL, err[-3000:]
    assert (root / "latest").read_text().strip() == "step_000000002"
    assert (root / "step_000000004.tmp").is_dir() and not (root / "step_000000004").exists()
    # 2. Resumed from step 2; SIGKILL after step 5, between checkpoints. Its readers are seen alive meanwhile.
    proc = _start(killed, {"exit_at_step": 5})
    most_readers = 0
    while proc.poll() is None:
        most_readers = max(most_readers, len(_readers_of(killed)) - 1)  # minus the trainer itself
        time.sleep(0.05)
    assert proc.returncode == -signal.SIGKILL, _log(killed)
    assert most_readers >= 2, "the reader processes were never seen: the survivor check below would prove nothing"
    assert (root / "latest").read_text().strip() == "step_000000004"
    deadline = time.monotonic() + 10
    while _readers_of(killed) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _readers_of(killed) == [], "reader processes outlived the killed trainer"
    # 3. Resumed from step 4 to the end.
    code, err = _train(killed)
    assert code == 0, err[-3000:]

    backbone_a, weight_a = _final_weights(tmp_path / "whole")
    backbone_b, weight_b = _final_weights(tmp_path / "killed")
    for name, value in backbone_a.items():
        assert torch.equal(value, backbone_b[name]), name
    assert torch.equal(weight_a, weight_b)
    assert _loss_history(tmp_path / "whole") == _loss_history(tmp_path / "killed")

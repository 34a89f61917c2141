"""A real Ray head on 127.0.0.1 and ``ray job submit`` of a short training run (launch/ray_job.py).

The head is started the way launch/demo.sh starts it (``tests/ray_head.py`` -> ``launch/local_ray.py``): its
own ``--temp-dir``, token and free ports, loopback-only, in its own process group, which the test kills at the
end: other users' Ray processes are never touched (no ``ray stop``). While the job runs, every listening
socket of the head's process tree is sampled: all are on loopback but the one docs/ray.md names.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.ray_head import SocketWatch, describe, loopback_env, ray_cli, ray_head, short_temp_dir, tcpstore_listeners

ROOT = Path(__file__).resolve().parents[2]


def tiny_config(tmp_path: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A config dict for a few CPU steps of a tiny backbone on 2 Ray workers; ``sections`` update it."""
    cfg: dict[str, Any] = {
        "device": "cpu",
        "data": {"source": "random", "random_num_classes": 24, "random_num_samples": 64, "batch_size": 8,
                 "image_size": 32, "num_workers": 0, "dali_threads": 1},
        "model": {"backbone": "iresnet_tiny", "embedding_size": 32},
        "loss": {"margin": "arcface"},
        "optim": {"name": "sgd", "lr": 0.05},
        "deepspeed": {"zero_stage": 0, "precision": "fp32"},
        "train": {"total_steps": 4, "checkpoint_every": 2, "keep_checkpoints": 0, "log_every": 1, "seed": 3,
                  "deterministic": True, "output_dir": str(tmp_path / "run"), "export_onnx": False,
                  "eval_at_start": False, "resume": "never"},
        "ray": {"num_workers": 2, "cpus_per_worker": 1.0, "max_failures": 0},
        "tracking": {"enabled": False},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def test_bad_config_fails_before_any_worker(tmp_path):
    """A bad value stops launch/ray_job.py with exit code 2 and names the field and the value; no Ray starts."""
    cfg = tiny_config(tmp_path)
    cfg["optim"]["lr"] = -1.0
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "ray_job.py"), "--config", str(path)],
        capture_output=True, text=True, env=loopback_env(), timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "optim.lr" in proc.stderr and "-1.0" in proc.stderr
    assert "Started a local Ray instance" not in proc.stderr + proc.stdout

    cfg["optim"]["lr"] = 0.1
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "ray_job.py"), "--config", str(path), "--set", "ray.num_workers=0"],
        capture_output=True, text=True, env=loopback_env(), timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "ray.num_workers" in proc.stderr and "got 0" in proc.stderr
    assert time.monotonic() - started < 60


def test_working_dir_upload_holds_the_package_not_the_data():
    """What ``ray job submit --working-dir .`` uploads, by Ray's own .gitignore/.rayignore filter."""
    from ray._private.runtime_env.packaging import get_excludes_from_ignore_files

    excludes = get_excludes_from_ignore_files(ROOT, include_gitignore=True)
    excluded = lambda rel: any(fn(ROOT / rel) for fn in excludes)  # noqa: E731
    for rel in (".venv", ".git", "demo_out", "runs", "mlruns", "mlruns.db", "data", "bench_out"):
        assert excluded(rel), rel
    for rel in ("distrib_face", "distrib_face/data", "distrib_face/data/loader.py", "distrib_face/train",
                "launch/ray_job.py", "configs/tiny_cpu.yaml"):
        assert not excluded(rel), rel


@pytest.mark.slow
def test_ray_job_submit_trains_and_reports_checkpoint(tmp_path):
    """``ray job submit --working-dir .`` runs a DALI-decoded, verified, tracked 2-worker job to SUCCEEDED."""
    from distrib_face.data import write_synthetic

    data = tmp_path / "synth"
    write_synthetic(data, num_identities=16, min_images=4, max_images=12, holdout_identities=8, num_pairs=40,
                    samples_per_shard=40, holdout_images=4, image_size=32, seed=1)
    cfg = tiny_config(
        tmp_path,
        data={"source": "shards", "shards": "synth", "decoder": "dali"},
        train={"output_dir": "out/job", "eval_pairsets": ["synth/holdout_pairs.npz"], "eval_at_start": True},
        tracking={"enabled": True, "tracking_uri": "sqlite:///mlruns.db", "experiment": "ray_job_test"},
    )
    config_path = tmp_path / "job.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    submission_id = f"distrib_face_test_{os.getpid()}"
    with short_temp_dir() as ray_tmp, ray_head(ray_tmp) as head:
        with SocketWatch([head.pid]) as sockets:
            proc = ray_cli(
                "job", "submit", "--address", head.address, "--working-dir", str(ROOT), "--submission-id",
                submission_id, "--", "python", "launch/ray_job.py", "--config", str(config_path), "--base-dir",
                str(tmp_path), "--summary-json", "summary.json",
                env=head.env, timeout=400,
            )
        status = ray_cli("job", "status", "--address", head.address, submission_id, env=head.env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert f"Job '{submission_id}' succeeded" in proc.stdout + proc.stderr
    assert f"Job '{submission_id}' succeeded" in status.stdout, status.stdout + status.stderr  # JobStatus.SUCCEEDED

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["finished"] is True
    assert summary["world_size"] == 2 and len(summary["workers"]) == 2
    assert set(summary["verification_before"]) == set(summary["verification_after"]) == {"synthetic_holdout"}
    # Relative paths were taken from --base-dir, not from Ray's temporary copy of the working dir.
    assert summary["output_dir"] == str(tmp_path / "out" / "job")
    assert summary["tracking_uri"] == f"sqlite:///{tmp_path / 'mlruns.db'}"

    # The reported checkpoint is one folder in Ray's storage holding every rank's files exactly once.
    checkpoint = Path(summary["ray_checkpoint"])
    assert checkpoint.parent == tmp_path / "out" / "job" / "ray" / "job"
    trainer_state = json.loads((checkpoint / "trainer.json").read_text())
    assert trainer_state["step"] == 4 and trainer_state["world_size"] == 2
    assert trainer_state["run_id"] == summary["mlflow_run_id"]
    assert sorted(p.name for p in (checkpoint / "ranks").glob("*.json")) == ["rank_00000.json", "rank_00001.json"]
    assert len(list((checkpoint / "classifier").iterdir())) == 2
    assert not list(checkpoint.rglob(".ray_upload_*"))
    checkpoints = sorted(p for p in checkpoint.parent.glob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) == 2  # step 2 and the final step 4
    assert json.loads((checkpoints[0] / "trainer.json").read_text())["step"] == 2

    # The MLflow run says what ran and which Ray job ran it, and a fresh job is not a resume.
    from mlflow import MlflowClient

    run = MlflowClient(summary["tracking_uri"]).get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.info.run_name.startswith("iresnet_tiny-arcface-synthetic-"), run.info.run_name
    tags = run.data.tags
    assert tags["ray.job_submission_id"] == submission_id and tags["ray.job_id"]
    assert "launch/ray_job.py --config" in tags["ray.entrypoint"] and "resumed_at" not in tags
    # Nothing of this head, its agents, the job's driver and the training workers listens beyond loopback
    # except the process group's TCPStore on rank 0 (torch binds it to every interface; docs/ray.md).
    names = {listener.process for listener in sockets.seen}
    assert {"gcs_server", "raylet"} <= names and any(n.startswith("ray::") for n in names), describe(sockets.seen)
    store = tcpstore_listeners(sockets, summary["workers"])
    assert len(store) == 1, describe(sockets.seen)
    assert {w["master_addr"] for w in summary["workers"]} == {"127.0.0.1"}
    assert sockets.exposed() == store, "listening beyond loopback:\n" + describe(sockets.exposed() - store)

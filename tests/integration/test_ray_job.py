"""A real Ray head on 127.0.0.1 and ``ray job submit`` of a short training run (launch/ray_job.py).

The head gets its own ``--temp-dir`` and free ports and runs in its own process group, which the test
kills at the end: other users' Ray processes are never touched (no ``ray stop``).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ray_env(token_path: Path | None = None) -> dict[str, str]:
    """The environment for Ray CLI calls: this venv first on PATH, no usage stats, token auth.

    Token auth is explicit: a ``ray start`` head requires a token once one exists (any local ``ray.init()``
    writes ``~/.ray/auth_token``), but the ``ray job`` CLI only sends it with ``RAY_AUTH_MODE=token``. With
    ``token_path`` the head and the CLI use that token file instead of ``~/.ray/auth_token``.
    """
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["RAY_AUTH_MODE"] = "token"
    if token_path is not None:
        env["RAY_AUTH_TOKEN_PATH"] = str(token_path)
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN", None)
    return env


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


@contextmanager
def short_temp_dir() -> Iterator[Path]:
    """A fresh folder under /tmp with a short name: Ray's unix socket paths must stay under 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="dfray_", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def ray_head(temp_dir: Path, num_cpus: int = 2) -> Iterator[tuple[str, dict[str, str]]]:
    """Start ``ray start --head --block`` in its own process group, with its own auth token.

    Yields the dashboard URL and the environment for CLI calls to it; kills the process group at the end.
    """
    temp_dir.mkdir(parents=True, exist_ok=True)
    token_path = temp_dir / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    token_path.chmod(0o600)
    env = ray_env(token_path)
    dashboard_port = free_port()
    cmd = [
        str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--include-dashboard=true",
        f"--num-cpus={num_cpus}", "--object-store-memory=1000000000", f"--temp-dir={temp_dir}",
        "--disable-usage-stats", f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
    ]
    log = open(temp_dir / "head.log", "w")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        _wait_for_job_api(address, head, temp_dir / "head.log", env)
        yield address, env
    finally:
        stop_process_group(head)
        log.close()


def ray_cli(*args: str, env: dict[str, str], timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run the ``ray`` CLI of this venv in the repository root."""
    return subprocess.run([str(VENV_BIN / "ray"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _wait_for_job_api(
    address: str, head: subprocess.Popen, log_path: Path, env: dict[str, str], timeout_s: float = 120.0
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}:\n{log_path.read_text()[-3000:]}")
        proc = ray_cli("job", "list", "--address", address, env=env)
        if proc.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the Ray job API at {address} did not answer in {timeout_s} s:\n{proc.stderr[-2000:]}")
        time.sleep(1.0)


def stop_process_group(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM the process group led by ``proc`` (our own head and everything it started), then SIGKILL.

    On SIGTERM the raylet drains for ~15 s and ``ray start --block`` does not exit at all; the cluster is
    thrown away, so a short grace period, then SIGKILL.
    """
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        if proc.poll() is not None:
            try:  # the leader is gone; give its children a moment, then stop waiting politely
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                break
        time.sleep(0.5)
    else:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def test_bad_config_fails_before_any_worker(tmp_path):
    """A bad value stops launch/ray_job.py with exit code 2 and names the field and the value; no Ray starts."""
    cfg = tiny_config(tmp_path)
    cfg["optim"]["lr"] = -1.0
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "ray_job.py"), "--config", str(path)],
        capture_output=True, text=True, env=ray_env(), timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "optim.lr" in proc.stderr and "-1.0" in proc.stderr
    assert "Started a local Ray instance" not in proc.stderr + proc.stdout

    cfg["optim"]["lr"] = 0.1
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "ray_job.py"), "--config", str(path), "--set", "ray.num_workers=0"],
        capture_output=True, text=True, env=ray_env(), timeout=120,
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
    with short_temp_dir() as ray_tmp, ray_head(ray_tmp) as (address, env):
        proc = ray_cli(
            "job", "submit", "--address", address, "--working-dir", str(ROOT), "--submission-id", submission_id,
            "--", "python", "launch/ray_job.py", "--config", str(config_path), "--base-dir", str(tmp_path),
            "--summary-json", "summary.json",
            env=env, timeout=400,
        )
        status = ray_cli("job", "status", "--address", address, submission_id, env=env)
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

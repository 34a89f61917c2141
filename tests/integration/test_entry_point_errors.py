"""Every failure of the three entry points is one line on stderr and a documented exit code (docs/training.md).

The real commands run as subprocesses: ``distrib-face train``, ``launch/train.py`` and ``launch/ray_job.py``
(its checks run before Ray starts, so no cluster is needed). Faults: a bad value, missing shards (the folder, or
one shard its manifest names), an output
folder that cannot be written (a file where a folder is expected, a path under /proc, a read-only folder
when not root), an unusable MLflow store (a sqlite path under a file, an unreachable server whose URI holds
a password), a small disk (``RLIMIT_FSIZE``, i.e. ``ulimit -f``, and a real full tmpfs where a mount
namespace is allowed), a diverging loss.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.ray_head import free_port

ROOT = Path(__file__).resolve().parents[2]
CONFIG = {
    "data": {"source": "random", "random_num_classes": 10, "random_num_samples": 64, "batch_size": 8,
             "image_size": 32, "num_workers": 0},
    "model": {"backbone": "iresnet_tiny", "embedding_size": 16},
    "train": {"total_steps": 2, "log_every": 1, "export_onnx": False, "checkpoint_every": 2, "resume": "never"},
    "tracking": {"enabled": False},
}
COMMANDS = {
    "distrib-face train": [sys.executable, "-m", "distrib_face", "train"],
    "launch/train.py": [sys.executable, str(ROOT / "launch" / "train.py")],
    "ray_job.py": [sys.executable, str(ROOT / "launch" / "ray_job.py")],
}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "RAY_ADDRESS")}
    return {**env, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}


def _run(prog: str, tmp_path: Path, *sets: str, extra: tuple[str, ...] = (), file_size_limit: int | None = None,
         wrap: list[str] | None = None, env: dict[str, str] | None = None,
         timeout: float = 300) -> subprocess.CompletedProcess:
    config = tmp_path / "config.yaml"
    cfg = {**CONFIG, "train": {**CONFIG["train"], "output_dir": str(tmp_path / "out")}}
    config.write_text(yaml.safe_dump(cfg))
    args = [*COMMANDS[prog], "--config", str(config), *(a for s in sets for a in ("--set", s)), *extra]

    def limit() -> None:
        if file_size_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.run([*(wrap or []), *args], capture_output=True, text=True, timeout=timeout,
                          env={**_env(), **(env or {})}, cwd=tmp_path, preexec_fn=limit)


def _one_line(proc: subprocess.CompletedProcess, prog: str, code: int, *needles: str) -> str:
    """Assert the exit code and that stderr is exactly one error line holding every needle; returns it."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _last_line(proc: subprocess.CompletedProcess, prog: str, code: int, *needles: str) -> str:
    """For failures after training started (progress lines come first): the exit code, the error as the last
    line, no other error line, no traceback."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and lines[-1].startswith(f"{prog}: error: "), proc.stderr[-3000:]
    assert sum(": error: " in line for line in lines) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])
    return lines[-1]


@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "a_file"
    path.write_text("not a folder\n")
    return path


@pytest.mark.parametrize("prog", COMMANDS)
def test_bad_value_and_missing_shards(tmp_path, prog):
    _one_line(_run(prog, tmp_path, "optim.lr=-1"), prog, 2, "optim.lr must be > 0, got -1.0")
    missing = tmp_path / "no_such_shards"
    _one_line(_run(prog, tmp_path, "data.source=shards", f"data.shards={missing}"), prog, 2, "data.shards", str(missing))


# Written into a folder put first on PYTHONPATH: at exit, the command's process writes the names of the modules
# it imported. Without distrib_face.parallel (the one package that sets up a process group) and deepspeed there
# was no process group, engine or training worker; without ray no cluster was joined or started; without the
# loader no reader process. (torch.distributed itself is no sign: ``import torch`` imports it.)
_WORKER_MODULES = frozenset({"distrib_face.parallel", "deepspeed", "ray", "distrib_face.data.loader"})
_RECORD_MODULES = """
import atexit, os, sys

def _record():
    with open(os.environ["DISTRIB_FACE_TEST_MODULES"], "w") as handle:
        handle.write("\\n".join(sorted(sys.modules)))

atexit.register(_record)
"""


def _recording_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    site = tmp_path / "record_site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(_RECORD_MODULES)
    record = tmp_path / "modules.txt"
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "DISTRIB_FACE_TEST_MODULES": str(record)}, record


@pytest.mark.parametrize("prog", COMMANDS)
def test_a_missing_shard_is_found_before_any_worker_starts(tmp_path, prog):
    """The manifest names part-000004.tar, which is not on disk: the preflight says so (exit 2, one line)
    before a process group, a reader or Ray starts; the loader would only find it inside the workers."""
    from distrib_face.data.testing import write_indexed_shards

    shards = tmp_path / "shards"
    write_indexed_shards(shards, [2] * 5)
    (shards / "part-000004.tar").unlink()
    env, record = _recording_env(tmp_path)
    # ray_job.py gets an address where nothing listens: were the check to come too late, it would fail to
    # connect instead of starting a local cluster on this shared machine
    extra = ("--address", f"127.0.0.1:{free_port()}") if prog == "ray_job.py" else ()
    proc = _run(prog, tmp_path, "data.source=shards", f"data.shards={shards}", "data.image_size=16", extra=extra,
                env=env)
    line = _one_line(proc, prog, 2, "data.shards: part-000004.tar is missing", str(shards / "part-000004.tar"),
                     str(shards / "manifest.json"), "data.allow_missing_shards")
    assert "more" not in line  # the only missing one
    modules = set(record.read_text().split())
    assert "distrib_face.cli.train" in modules  # the record is the command's own
    assert not modules & _WORKER_MODULES, modules & _WORKER_MODULES
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_the_shard_check_counts_the_missing_and_respects_allow_missing_shards(tmp_path):
    from distrib_face.cli.train import check_shard_files
    from distrib_face.data.testing import write_indexed_shards

    shards = tmp_path / "shards"
    write_indexed_shards(shards, [2] * 6)
    check_shard_files(shards)  # all there
    for index in (1, 2, 4):
        (shards / f"part-00000{index}.tar").unlink()
    (shards / "part-000003.tar").unlink()
    (shards / "part-000003.tar").mkdir()  # a folder where a shard should be is no shard
    with pytest.raises(FileNotFoundError) as caught:
        check_shard_files(shards / "manifest.json")
    assert str(caught.value).startswith("data.shards: part-000001.tar is missing: ")
    assert "(and 3 more: part-000002.tar, part-000003.tar, part-000004.tar)" in str(caught.value)
    check_shard_files(shards, allow_missing=True)  # the loader trains on the rest (and says which are missing)
    for index in (0, 5):
        (shards / f"part-00000{index}.tar").unlink()
    with pytest.raises(FileNotFoundError, match="all 6 shards listed in .* are missing"):
        check_shard_files(shards, allow_missing=True)


@pytest.mark.parametrize("prog", COMMANDS)
def test_unwritable_output_folder(tmp_path, prog, a_file):
    for output, words in (
        (a_file / "out", "a part of that path is a file"),  # a file where a folder is expected
        (a_file, "is a file, not a folder"),
        (Path("/proc") / f"distrib_face_out_{os.getpid()}", "No such file or directory"),  # a pseudo file system
    ):
        line = _one_line(_run(prog, tmp_path, f"train.output_dir={output}"), prog, 2, "train.output_dir", str(output))
        assert words in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only (chmod 0500) folder anyway")
def test_read_only_output_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        for prog in COMMANDS:
            _one_line(_run(prog, tmp_path, f"train.output_dir={locked / 'out'}"), prog, 2, str(locked / "out"))
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("prog", COMMANDS)
def test_unusable_mlflow_store(tmp_path, prog, a_file):
    db = a_file / "mlruns.db"
    _one_line(_run(prog, tmp_path, "tracking.enabled=true", f"tracking.tracking_uri=sqlite:///{db}"), prog, 2,
              f"sqlite:///{db}", str(a_file))
    port = free_port()  # nothing listens there
    line = _one_line(_run(prog, tmp_path, "tracking.enabled=true",
                          f"tracking.tracking_uri=http://alice:Hunter2-pw@127.0.0.1:{port}"), prog, 2,
                     f"http://alice:[REDACTED]@127.0.0.1:{port}", "unreachable")
    assert "Hunter2-pw" not in line


@pytest.mark.parametrize("prog", ["distrib-face train", "launch/train.py"])
def test_file_size_limit_during_a_checkpoint(tmp_path, prog):
    """``ulimit -f 48``: the first checkpoint's DeepSpeed model states exceed it; torch.save's
    "unexpected pos" becomes the file named."""
    proc = _run(prog, tmp_path, file_size_limit=48 * 1024)
    line = _last_line(proc, prog, 2, "file too large for", str(tmp_path / "out" / "checkpoints"), "ulimit -f")
    named = Path(line.split("file too large for ", 1)[1].split(" (", 1)[0])
    # The file that hit the limit, in the unpublished step folder; written atomically, so its half-written
    # temp copy is gone (or, written by a library directly, it stands at the limit).
    assert named.parent.parent.name == "step_000000002.tmp" or named.parent.name == "step_000000002.tmp"
    assert not named.exists() or named.stat().st_size == 48 * 1024
    assert not (tmp_path / "out" / "checkpoints" / "latest").exists()  # nothing half-written was published


def _tmpfs_wrapper(mount_point: Path) -> list[str] | None:
    """A command prefix running the rest in a private mount namespace with a 160 KiB tmpfs at ``mount_point``."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    probe = subprocess.run([unshare, "-rm", "sh", "-c", f"mount -t tmpfs -o size=160k tmpfs {mount_point}"],
                           capture_output=True, timeout=30)
    if probe.returncode != 0:
        return None
    return [unshare, "-rm", "sh", "-c", f'mount -t tmpfs -o size=160k tmpfs {mount_point} && exec "$@"', "sh"]


def test_full_disk_during_a_checkpoint(tmp_path):
    """A real ENOSPC: a 160 KiB tmpfs (in a mount namespace of the subprocess only) fills during the
    first checkpoint."""
    small = tmp_path / "small"
    small.mkdir()
    wrapper = _tmpfs_wrapper(small)
    if wrapper is None:
        pytest.skip("no unprivileged mount namespace (unshare -rm) to mount a small tmpfs in")
    proc = _run("distrib-face train", tmp_path, f"train.output_dir={small / 'out'}", wrap=wrapper)
    _last_line(proc, "distrib-face train", 2, f"no space left on {small / 'out'}")


@pytest.mark.parametrize("prog", ["distrib-face train", "launch/train.py"])
def test_diverged_loss_is_a_training_failure(tmp_path, prog):
    from distrib_face.train.faults import ENV_VAR

    proc = _run(prog, tmp_path, "train.max_bad_steps=2", env={ENV_VAR: '{"nan_micro_steps": [0, 1, 2, 3]}'})
    _last_line(proc, prog, 1, "non-finite", "train.max_bad_steps=2")


def test_debug_log_level_adds_the_traceback(tmp_path, a_file):
    proc = _run("launch/train.py", tmp_path, f"train.output_dir={a_file}", extra=("--log-level", "DEBUG"))
    assert proc.returncode == 2 and "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("launch/train.py: error: train.output_dir")
    proc = _run("distrib-face train", tmp_path, f"train.output_dir={a_file}")
    assert "Traceback" not in proc.stderr

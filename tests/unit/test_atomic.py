"""The atomic-write helpers: complete or absent, never partial; disk errors name the path."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from distrib_face.atomic import (
    OutputError,
    atomic_dir,
    atomic_open,
    atomic_path,
    publish_dir,
    publish_file,
    write_json,
    write_text,
)


def test_write_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.json"
    write_json(target, {"x": 1})
    write_json(target, {"x": 2})
    assert json.loads(target.read_text()) == {"x": 2}
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    write_text(target, "old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_open(target, "w") as handle:
            handle.write("new, half written")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_atomic_path_for_writers_that_want_a_name(tmp_path: Path) -> None:
    import numpy as np

    target = tmp_path / "p.npz"
    with atomic_path(target, suffix=".tmp.npz") as tmp:
        np.savez(tmp, a=np.arange(3))
    assert np.load(target)["a"].tolist() == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.npz"]


def test_atomic_dir(tmp_path: Path) -> None:
    final = tmp_path / "ckpt"
    with atomic_dir(final) as tmp:
        (tmp / "f").write_text("1")
        assert not final.exists()
    assert (final / "f").read_text() == "1"
    with pytest.raises(FileExistsError):
        with atomic_dir(final):
            pass
    with pytest.raises(ValueError):
        with atomic_dir(final, replace=True) as tmp:
            (tmp / "g").write_text("2")
            raise ValueError("half")
    assert sorted(p.name for p in final.iterdir()) == ["f"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_file_size_limit_is_one_error_naming_the_path(tmp_path: Path) -> None:
    """``ulimit -f``: the write fails with EFBIG; the error names the target, the old file survives."""
    target = tmp_path / "big.bin"
    target.write_bytes(b"old")
    script = textwrap.dedent(f"""
        import resource, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        from distrib_face.atomic import OutputError, write_bytes
        try:
            write_bytes({str(target)!r}, b"x" * 100_000)
        except OutputError as err:
            print("OUTPUT-ERROR", err)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"file too large for {target}" in out.stdout
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.bin"]
    assert issubclass(OutputError, OSError)


def test_new_files_get_the_mode_open_gives_and_replaced_files_keep_theirs(tmp_path: Path) -> None:
    import os
    import stat

    old_umask = os.umask(0o022)  # mkstemp's 0600 and open()'s 0644 differ under it
    try:
        reference = tmp_path / "plain.txt"
        reference.write_text("x")  # what open() gives: the independent reference
        written = write_text(tmp_path / "atomic.txt", "x")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(reference.stat().st_mode) == 0o644
    assert stat.S_IMODE(written.stat().st_mode) == 0o644
    os.chmod(written, 0o640)
    write_text(written, "y")
    assert stat.S_IMODE(written.stat().st_mode) == 0o640 and written.read_text() == "y"


def test_publish_file_puts_a_finished_temp_file_in_place(tmp_path: Path) -> None:
    final = tmp_path / "shard.tar"
    final.write_bytes(b"old")
    tmp = tmp_path / "shard.tar.tmp"
    tmp.write_bytes(b"new")
    assert publish_file(tmp, final) == final
    assert final.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["shard.tar"]
    with pytest.raises(FileNotFoundError):  # nothing to publish: the error, and the target is untouched
        publish_file(tmp, final)
    assert final.read_bytes() == b"new"


def test_publish_dir_replaces_only_when_asked_and_tolerates_a_racing_publisher(tmp_path: Path) -> None:
    final = tmp_path / "step_2"
    tmp = tmp_path / "step_2.tmp"
    (tmp / "sub").mkdir(parents=True)
    (tmp / "sub" / "f").write_text("1")
    assert publish_dir(tmp, final) == final
    assert (final / "sub" / "f").read_text() == "1" and not tmp.exists()
    tmp.mkdir()
    (tmp / "g").write_text("2")
    with pytest.raises(FileExistsError, match="step_2 already exists"):
        publish_dir(tmp, final)
    assert (final / "sub" / "f").read_text() == "1"
    publish_dir(tmp, final, replace=True)
    assert sorted(p.name for p in final.iterdir()) == ["g"]
    # another process already renamed the shared temp folder: with may_race that is success, else an error
    assert publish_dir(tmp, final, replace=True, may_race=True) == final
    assert sorted(p.name for p in final.iterdir()) == ["g"]
    with pytest.raises(FileNotFoundError):
        publish_dir(tmp_path / "never.tmp", tmp_path / "never")

"""Nothing hangs, nothing is left behind: the data side's worker processes (loader readers, pack / verify
pools) start from a fork server, fail with their name when they die or get stuck, and die with a trainer
killed by SIGKILL. Real processes, real signals, /proc for the survivors."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from distrib_face.data import build_loader
from distrib_face.data.procs import OrderedPool, WorkerError, start_method
from distrib_face.data.testing import write_indexed_shards

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("indexed")
    write_indexed_shards(out, [40] * 4, image_size=8)
    return out


def test_workers_start_from_a_fork_server_not_a_fork_of_this_process():
    # a fork of a process that runs threads (MLflow, gloo, Ray, tqdm) can inherit a lock held by one of them
    assert start_method() == ("forkserver" if sys.platform.startswith("linux") else "spawn")
    assert sum(OrderedPool(abs, 2, name="test worker").imap(range(-50, 50), chunk_size=7)) == 2500


def test_a_killed_reader_is_an_error_naming_it_not_a_skipped_sample(shards):
    loader = build_loader(shards, batch_size=4, rank=0, world_size=1, num_workers=2, decoder="pil",
                          prefetch_chunks=1, chunk_size=4)
    iterator = iter(loader)
    next(iterator)
    readers = [p for p in mp.active_children() if p.name == "data reader 1"]
    assert len(readers) == 1
    os.kill(readers[0].pid, signal.SIGKILL)
    with pytest.raises(WorkerError, match=r"data reader worker 1 .*pid \d+\) was killed by SIGKILL"):
        for _ in iterator:
            pass
    assert loader.num_skipped == 0, "a dead reader is not a bad sample"
    assert not [p for p in mp.active_children() if p.name.startswith("data reader")], "the other reader stopped"


def test_a_stuck_reader_is_stopped_and_named_within_the_timeout(tmp_path):
    manifest = write_indexed_shards(tmp_path, [10, 10], image_size=8)
    stuck = Path(manifest.shards[1])
    stuck.unlink()
    os.mkfifo(stuck)  # opening it blocks forever: no writer will come
    loader = build_loader(tmp_path, batch_size=4, rank=0, world_size=1, num_workers=2, decoder="pil",
                          split="shard", shuffle=False, stall_timeout=2.0)
    start = time.monotonic()
    with pytest.raises(WorkerError, match=r"data reader worker 1 .*made no progress for 2 s: stuck"):
        for _ in loader:
            pass
    assert time.monotonic() - start < 20
    assert not [p for p in mp.active_children() if p.name.startswith("data reader")]


def test_a_dead_pool_worker_is_named_instead_of_waited_for():
    # multiprocessing.Pool.imap would wait forever for the chunk a dead worker took with it
    from tests.faults.helpers import die_at_five

    with pytest.raises(WorkerError, match=r"pack worker 1 \(pid \d+\) was killed by SIGKILL"):
        list(OrderedPool(die_at_five, 2, name="pack worker").imap(range(10), chunk_size=5))


SCRIPT = textwrap.dedent("""
    # no `if __name__ == "__main__"` guard on purpose: readers must not run this script again
    import json, multiprocessing as mp, sys, time
    from multiprocessing import forkserver
    from distrib_face.data import build_loader
    loader = build_loader(sys.argv[1], batch_size=4, rank=0, world_size=1, num_workers=2, decoder="pil",
                          prefetch_chunks=1, chunk_size=4)
    start = time.perf_counter()
    iterator = iter(loader)
    next(iterator)
    first_batch = time.perf_counter() - start
    readers = [p.pid for p in mp.active_children() if p.name.startswith("data reader")]
    print(json.dumps({"readers": readers, "server": forkserver._forkserver._forkserver_pid,
                      "first_batch_s": first_batch}), flush=True)
    time.sleep(120)
""")


def _survivors(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_trainer_killed_with_sigkill_leaves_no_reader_alive(shards, tmp_path):
    marker = f"DISTRIB_FACE_ORPHAN_TEST={uuid.uuid4().hex}"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           marker.split("=")[0]: marker.split("=")[1]}
    script = tmp_path / "trainer.py"
    script.write_text(SCRIPT)
    trainer = subprocess.Popen([sys.executable, str(script), str(shards)], env=env, stdout=subprocess.PIPE,
                               text=True)
    try:
        line = trainer.stdout.readline()
        assert line, "the trainer script failed before its first batch"
        started = json.loads(line)
        children = started["readers"] + [started["server"]]
        assert len(started["readers"]) == 2 and all(Path(f"/proc/{pid}").exists() for pid in children)
        assert set(children) <= set(_survivors(marker))
        os.kill(trainer.pid, signal.SIGKILL)
        # not reaped yet: the trainer stays a zombie, as it would under a slow parent
        deadline = time.monotonic() + 5.0
        while _survivors(marker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _survivors(marker) == [], "reader processes outlived the SIGKILLed trainer"
    finally:
        trainer.kill()
        trainer.wait(timeout=10)


COMPILE_SCRIPT = textwrap.dedent("""
    import json, os, time
    from torch._inductor.async_compile import AsyncCompile
    AsyncCompile.warm_pool()  # what model.compile starts on a GPU (on the CPU inductor compiles in-process)
    AsyncCompile.process_pool()
    print(json.dumps({"pid": os.getpid()}), flush=True)
    time.sleep(120)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_compile_workers_do_not_outlive_a_killed_trainer(tmp_path):
    """``model.compile: true`` on a GPU starts inductor's compile-worker pool; a SIGKILLed trainer must not leave
    it behind (its worker reads the parent's pipe and exits on EOF). Two compile threads force the pool here."""
    marker = f"DISTRIB_FACE_ORPHAN_TEST={uuid.uuid4().hex}"
    env = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": "2", marker.split("=")[0]: marker.split("=")[1]}
    script = tmp_path / "compile_trainer.py"
    script.write_text(COMPILE_SCRIPT)
    trainer = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        line = trainer.stdout.readline()
        assert line, "the script failed before its compile pool started"
        deadline = time.monotonic() + 30.0
        while len(_survivors(marker)) < 2 and time.monotonic() < deadline:  # the trainer and its compile worker
            time.sleep(0.2)
        workers = [pid for pid in _survivors(marker) if pid != trainer.pid]
        assert workers, "no compile worker started: the test would check nothing"
        os.kill(trainer.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while _survivors(marker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _survivors(marker) == [], "compile workers outlived the SIGKILLed trainer"
    finally:
        trainer.kill()
        trainer.wait(timeout=10)

"""``embed``'s reader processes: one that dies is named, and none outlives the process that embeds.

A reader is held inside a real read: the second image of the source is a FIFO, so the reader that opens it
blocks until this test opens the writing end, then blocks in ``read`` while the test holds it open. The test
finds that reader by the FIFO among its open files (``/proc/PID/fd``), then kills the reader (the message
must name it) or the embedding process (the reader must go too).
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="finds the reader through /proc")


def _source(tmp_path: Path) -> tuple[Path, Path]:
    """A list source ``flat/a.jpg 0``, ``flat/b.jpg 1`` whose second image is a FIFO; returns (list, FIFO)."""
    flat = tmp_path / "flat"
    flat.mkdir()
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (flat / "a.jpg").write_bytes(buffer.getvalue())
    os.mkfifo(flat / "b.jpg")
    listing = tmp_path / "list.txt"
    listing.write_text("flat/a.jpg 0\nflat/b.jpg 1\n")
    return listing, flat / "b.jpg"


def _hold_the_reader(fifo: Path, deadline_s: float = 120.0) -> tuple[int, int]:
    """Open the FIFO's writing end once a reader has opened it, and find that reader; returns (fd, pid)."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO until a reader has it open
            break
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no reader opened {fifo}") from None
            time.sleep(0.05)
    # the reader's open() returns (and its fd shows in /proc) a moment after the writer's open succeeded
    while time.monotonic() < deadline:
        for pid in (int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()):
            try:
                if any(os.readlink(f"/proc/{pid}/fd/{n}") == str(fifo) for n in os.listdir(f"/proc/{pid}/fd")):
                    return fd, pid
            except OSError:
                continue  # gone, or not ours to look at
        time.sleep(0.05)
    os.close(fd)
    raise AssertionError(f"no process holds {fifo} open")


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not: nothing may reap a reader whose parents are gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 8)).eval()


def test_a_reader_that_dies_is_named_with_what_it_was_reading(tmp_path):
    from distrib_face.eval.embedset import embed_source

    listing, fifo = _source(tmp_path)
    found: dict = {}

    def kill_the_reader() -> None:
        try:
            found["fd"], found["pid"] = _hold_the_reader(fifo)
            os.kill(found["pid"], signal.SIGKILL)
        except BaseException as err:  # noqa: BLE001 - reported by the test below
            found["error"] = err

    killer = threading.Thread(target=kill_the_reader, daemon=True)
    killer.start()
    try:
        with pytest.raises(RuntimeError) as caught:
            embed_source(_net(), listing, workers=1, chunk_size=1, timeout=120, image_size=(16, 16), progress=False)
    finally:
        killer.join(timeout=130)
        if "fd" in found:
            os.close(found["fd"])
    assert "error" not in found, found.get("error")
    message = str(caught.value)
    assert message.startswith("a reader process died (out of memory, or killed): "), message
    assert f"reader 1 of 1 (pid {found['pid']}, killed by SIGKILL) while decoding image 1, from flat/b.jpg of " \
           f"{listing}" in message, message


_EMBED = textwrap.dedent("""
    import sys
    import torch
    from distrib_face.eval.embedset import embed_source

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 8)).eval()
    embed_source(net, sys.argv[1], workers=1, chunk_size=1, timeout=600, image_size=(16, 16), progress=False)
""")


def test_readers_do_not_outlive_a_killed_embed(tmp_path):
    listing, fifo = _source(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    embed = subprocess.Popen([sys.executable, "-c", _EMBED, str(listing)], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    fd = None
    try:
        fd, reader = _hold_the_reader(fifo)
        assert reader != embed.pid and _running(reader)
        embed.kill()
        embed.wait(timeout=30)
        deadline = time.monotonic() + 15  # the parent watch looks twice a second; PDEATHSIG is at once
        while _running(reader) and time.monotonic() < deadline:
            time.sleep(0.1)
        survived = _running(reader)
        if survived:
            os.kill(reader, signal.SIGKILL)  # leave nothing behind on a shared machine
        assert not survived, f"reader {reader} outlived the SIGKILLed embed process {embed.pid}"
    finally:
        if embed.poll() is None:
            embed.kill()
            embed.wait(timeout=30)
        if fd is not None:
            os.close(fd)

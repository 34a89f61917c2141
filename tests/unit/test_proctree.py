"""The process-tree monitor of ``bench scale`` / ``bench workers``: a known tree (two children that each hold
a known amount of memory and burn a known CPU time) is measured as such."""

from __future__ import annotations

import sys

import pytest

from distrib_face.train.proctree import PhaseFailed, check, measure_command

CHILD = ("import time, numpy as np; a = np.ones({mb} * 2**20, np.uint8); t = time.process_time(); "
         "exec('while time.process_time() - t < {cpu}: pass'); time.sleep(0.8)")
PARENT = ("import subprocess, sys; c = sys.argv[1]; "
          "ps = [subprocess.Popen([sys.executable, '-c', c]) for _ in range(2)]; sys.exit(sum(p.wait() for p in ps))")


def test_a_known_tree_is_measured_whole(tmp_path):
    child = CHILD.format(mb=150, cpu=0.6)
    usage = measure_command([sys.executable, "-c", PARENT, child], log_path=tmp_path / "log", poll_interval=0.05)
    assert usage.returncode == 0 and usage.max_processes == 3
    # two children hold 150 MiB each at the same time (plus their interpreters): the sum, not the largest one
    assert 300 * 2**20 <= usage.peak_rss_bytes < 300 * 2**20 + 250 * 2**20
    assert usage.by_kind["other"][0] == 2 and usage.by_kind["other"][1] >= 150 * 2**20
    assert 1.2 <= usage.cpu_s < 1.2 + 2.0  # 2 x 0.6 s of spinning, plus the interpreters' start-up
    assert usage.wall_s >= 0.8


def test_a_failing_or_slow_command_is_named_with_its_log(tmp_path):
    usage = measure_command([sys.executable, "-c", "print('the reason'); raise SystemExit(3)"],
                            log_path=tmp_path / "fail.log")
    with pytest.raises(PhaseFailed, match=r"phase synth failed \(exit 3\)(.|\n)*the reason"):
        check(usage, "synth")
    slow = measure_command([sys.executable, "-c", "import time; time.sleep(30)"], log_path=tmp_path / "slow.log",
                           timeout=1.0)
    assert slow.returncode != 0 and slow.wall_s < 15


RANK = "import os, time; pid = os.fork(); time.sleep(1.0); os.waitpid(pid, 0) if pid else os._exit(0)"
LAUNCHER = ("import subprocess, sys; sys.exit(subprocess.Popen([sys.executable, '-c', sys.argv[1], 'train', "
            "'--config', 'x']).wait())")


def test_a_rank_is_the_launchers_child_not_a_fork_of_it(tmp_path):
    """A rank's forked child (a fork server between its fork and its exec) shows the rank's command line; it
    is not counted as a second rank (bench scale saw 4 ranks of 3 that way)."""
    usage = measure_command([sys.executable, "-c", LAUNCHER, RANK], log_path=tmp_path / "log", poll_interval=0.05)
    assert usage.returncode == 0 and usage.max_processes == 3
    assert usage.by_kind["rank"][0] == 1 and usage.by_kind["other"][0] == 1

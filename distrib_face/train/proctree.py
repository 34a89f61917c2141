"""Run a command and measure its whole process tree: wall time, peak RSS summed over the tree, CPU seconds.

A phase of ``distrib-face bench scale`` (or ``bench workers``) is a real command -- ``torchrun`` and its
ranks, each rank's fork server and reader processes; ``synth`` and its forkserver workers -- so its memory is
that of every process it started. :func:`measure_command` starts the command in a session of its own and
polls the tree with psutil (every ``poll_interval`` seconds): the peak of the summed resident sets (shared
pages, e.g. a fork server's, count once per process that maps them, as ``ps`` would add them up), the largest
resident set of each kind of process, and the CPU seconds of every process seen (as last sampled: a process
that lives less than one interval is missed, one that ends loses at most one interval).

``wait4`` or ``/usr/bin/time`` would not do: a forkserver's workers are not waited for by the command.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

log = logging.getLogger(__name__)


class PhaseFailed(RuntimeError):
    """A measured command exited non-zero or ran past its time limit; the message names it and its log."""

    exit_code = 1


@dataclass
class TreeUsage:
    """What one command's process tree used.

    Attributes:
        command: the command line.
        returncode: its exit status (``-9`` when stopped at the time limit).
        wall_s: seconds from start to exit.
        peak_rss_bytes: the largest sum of the tree's resident sets at one poll.
        cpu_s: user + system seconds of every process of the tree.
        max_processes: the most processes alive at one poll.
        by_kind: per kind of process (``rank``, ``forkserver``, ``worker``, ``launcher``, ...): the most of
            them alive at once and the largest single resident set, ``{kind: (count, max_rss_bytes)}``.
        cpu_by_kind: CPU seconds per kind of process.
        log_path: where its stdout and stderr went.
    """

    command: list[str]
    returncode: int
    wall_s: float
    peak_rss_bytes: int
    cpu_s: float
    max_processes: int
    by_kind: dict[str, tuple[int, int]] = field(default_factory=dict)
    cpu_by_kind: dict[str, float] = field(default_factory=dict)
    log_path: Path | None = None


def _kind(proc: object, root_pid: int, forkservers: set[int]) -> str:
    """What a process of the tree is, from its command line and parent (see :class:`TreeUsage`)."""
    import psutil

    try:
        cmdline = " ".join(proc.cmdline())  # type: ignore[attr-defined]
        parent = proc.ppid()  # type: ignore[attr-defined]
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return "gone"
    if parent in forkservers:
        return "worker"  # forked by a fork server: a reader / pack / synth / verify worker
    if "multiprocessing.forkserver" in cmdline:
        forkservers.add(proc.pid)  # type: ignore[attr-defined]
        return "forkserver"
    if "multiprocessing.resource_tracker" in cmdline:
        return "resource_tracker"
    if proc.pid == root_pid:  # type: ignore[attr-defined]
        return "launcher" if "torchrun" in cmdline else "main"
    # a rank is the launcher's child; a child of a rank caught between its fork and its exec shows the rank's
    # command line too (a fork server starting), and is not one
    if parent == root_pid and (" train " in f" {cmdline} " or "launch/train.py" in cmdline):
        return "rank"
    return "other"


def measure_command(
    command: Sequence[str],
    *,
    log_path: str | os.PathLike,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    poll_interval: float = 0.2,
    timeout: float | None = None,
) -> TreeUsage:
    """Run ``command`` to its end (output to ``log_path``) and measure its process tree.

    Args:
        command: the command line.
        log_path: file for its stdout and stderr.
        env: its environment (default: this process's).
        cwd: its working folder.
        poll_interval: seconds between two looks at the tree.
        timeout: seconds after which the whole session is stopped (SIGTERM, then SIGKILL after 10 s).

    Returns:
        The :class:`TreeUsage` (also when the command failed: check ``returncode``).
    """
    import psutil

    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cpu: dict[tuple[int, float], float] = {}  # (pid, start time) -> user + system seconds, last seen
    kinds: dict[tuple[int, float], str] = {}
    by_kind: dict[str, tuple[int, int]] = {}
    forkservers: set[int] = set()
    peak = most = 0
    start = time.perf_counter()
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(list(command), stdout=out, stderr=subprocess.STDOUT, env=dict(env or os.environ),
                                cwd=cwd, start_new_session=True)
        root = psutil.Process(proc.pid)
        try:
            while proc.poll() is None:
                if timeout is not None and time.perf_counter() - start > timeout:
                    _stop_session(proc)
                    break
                try:
                    members = [root, *root.children(recursive=True)]
                except psutil.NoSuchProcess:
                    members = []
                total, alive, counts = 0, 0, {}
                for member in members:
                    try:
                        with member.oneshot():
                            key = (member.pid, member.create_time())
                            rss = member.memory_info().rss
                            times = member.cpu_times()
                    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                        continue
                    # every sample: a process seen between fork and exec is classified again once it has exec'd
                    kind = kinds[key] = _kind(member, proc.pid, forkservers)
                    if kind == "gone":
                        continue
                    cpu[key] = times.user + times.system
                    total += rss
                    alive += 1
                    count, largest = counts.get(kind, (0, 0))
                    counts[kind] = (count + 1, max(largest, rss))
                for kind, (count, largest) in counts.items():
                    seen_count, seen_rss = by_kind.get(kind, (0, 0))
                    by_kind[kind] = (max(seen_count, count), max(seen_rss, largest))
                peak, most = max(peak, total), max(most, alive)
                time.sleep(poll_interval)
        except BaseException:
            _stop_session(proc)
            raise
        returncode = proc.wait()
    wall = time.perf_counter() - start
    cpu_by_kind: dict[str, float] = {}
    for key, seconds in cpu.items():
        cpu_by_kind[kinds[key]] = cpu_by_kind.get(kinds[key], 0.0) + seconds
    return TreeUsage(list(command), returncode, wall, peak, sum(cpu.values()), most, by_kind, cpu_by_kind, log_path)


def _stop_session(proc: subprocess.Popen) -> None:
    """Stop the command's session (the command and everything it started), TERM first, KILL after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def tail(path: str | os.PathLike | None, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file (for an error message)."""
    if path is None or not Path(path).is_file():
        return ""
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])


def check(usage: TreeUsage, name: str) -> TreeUsage:
    """``usage`` when its command succeeded, else :class:`PhaseFailed` naming the phase, with its log's tail."""
    if usage.returncode != 0:
        raise PhaseFailed(f"phase {name} failed (exit {usage.returncode}): {' '.join(usage.command)}\n"
                          f"log {usage.log_path}:\n{tail(usage.log_path)}")
    return usage

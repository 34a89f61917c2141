"""Worker processes of the data side (loader readers, ``pack``, ``data verify``): started safely, watching their
parent, and never waited on without a bound.

- Start method: ``forkserver`` (``spawn`` where it does not exist). Forking the calling process is unsafe:
  by the time a loader starts its readers the trainer runs MLflow, gloo, Ray and tqdm threads, and a child
  forked while one of them held a lock waits on that lock forever (a forked pack worker sat in
  ``futex_do_wait`` until a 900 s test timeout). The fork server is a fresh interpreter that preloads only
  this light module and :mod:`distrib_face.data.stream` (numpy, PIL; no torch), so a worker starts in
  milliseconds once the server runs.
- Orphans: every worker sets ``PR_SET_PDEATHSIG`` (SIGKILL when its parent dies: with a fork server that
  parent is the server, which exits when the trainer does) and runs a thread that checks twice a second that
  the trainer (its pid given at start) is still alive and not a zombie; either way a SIGKILLed trainer
  leaves no worker behind for more than about a second.
- Waits: the parent polls each worker with a timeout; a worker that died is reported with its name, pid and
  exit code or signal, one that neither sent anything nor made progress for ``stall_timeout`` seconds is
  stopped and reported as stuck (:class:`WorkerError`, never a decode failure).
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import multiprocessing as mp
import os
import queue as queue_module
import signal
import sys
import threading
import time
import traceback
from typing import Any, Callable, Iterable, Iterator, Sequence

log = logging.getLogger(__name__)

PRELOAD = ["distrib_face.data.procs", "distrib_face.data.stream"]
"""Modules the fork server imports once (light: numpy and PIL, no torch)."""

DEFAULT_STALL_TIMEOUT = 300.0
"""Seconds a worker may go without sending anything or making progress before it counts as stuck."""

ORPHAN_EXIT_CODE = 75
_PR_SET_PDEATHSIG = 1


class WorkerError(RuntimeError):
    """A worker process crashed, died or got stuck (the message names it); never a problem of one sample.

    Exit code 1 at the entry points: a training failure."""

    exit_code = 1


def start_method() -> str:
    """``forkserver`` where the platform has it, else ``spawn``."""
    return "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"


def worker_context() -> Any:
    """The multiprocessing context for data workers (see the module docstring)."""
    method = start_method()
    ctx = mp.get_context(method)
    if method == "forkserver":
        # only takes effect if the fork server is not running yet (it keeps its first preload list)
        ctx.set_forkserver_preload(PRELOAD)
    return ctx


# ---------------------------------------------------------------------------------------------- child side
def _process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, which a SIGKILLed trainer stays until reaped, counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
        return stat[stat.rindex(b")") + 2:stat.rindex(b")") + 3] not in (b"Z", b"X")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (macOS): signal 0 tells whether the pid exists
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True


def _set_parent_death_signal() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            log.debug("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    except (OSError, AttributeError) as err:  # no libc prctl: the watch thread still runs
        log.debug("prctl unavailable: %s", err)


def watch_parent(parent_pid: int, interval: float = 0.5) -> None:
    """In a worker: die with the process that started it (``parent_pid``), whatever killed that one.

    Sets ``PR_SET_PDEATHSIG`` to SIGKILL and starts a daemon thread that exits the process (code 75) when
    ``parent_pid`` is gone or a zombie, or when this process's own parent changes (the fork server died).
    """
    _set_parent_death_signal()
    first_parent = os.getppid()
    if not _process_alive(parent_pid):
        os._exit(ORPHAN_EXIT_CODE)

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != first_parent or not _process_alive(parent_pid):
                os._exit(ORPHAN_EXIT_CODE)

    threading.Thread(target=watch, name="watch-parent", daemon=True).start()


def reader_main(spec: Any, out: Any, progress: Any, parent_pid: int) -> None:
    """Entry point of a loader reader process: stream ``spec``'s chunks into ``out``.

    ``progress`` (a shared counter) goes up with every sample the reader passes, including the ones a
    resumed reader skips without decoding, so the parent can tell a slow reader from a stuck one.
    """
    watch_parent(parent_pid)
    from distrib_face.data.stream import chunk_stream

    def tick() -> None:
        progress.value += 1

    try:
        for chunk in chunk_stream(spec, on_sample=tick):
            out.put(("chunk", chunk))
        out.put(("end", None))
    except BaseException:  # noqa: BLE001 - forwarded to the loader with its traceback
        out.put(("error", traceback.format_exc()))


def _pool_main(fn: Callable[[Any], Any], tasks: Any, results: Any, progress: Any, parent_pid: int) -> None:
    watch_parent(parent_pid)
    while True:
        chunk = tasks.get()
        if chunk is None:
            return
        try:
            done = []
            for job in chunk:
                done.append(fn(job))
                progress.value += 1
            results.put(("ok", done))
        except BaseException:  # noqa: BLE001 - forwarded to the parent with its traceback
            results.put(("error", traceback.format_exc()))
            return


# ---------------------------------------------------------------------------------------------- parent side
def start_worker(process: Any) -> None:
    """``process.start()`` without making the child import the parent's ``__main__`` script.

    A forkserver or spawn child runs the parent's main script again (as ``__mp_main__``) when that script
    was started by path: a training script without an ``if __name__ == "__main__"`` guard would start
    itself in every reader, and a guarded one still costs each reader its imports (torch, deepspeed,
    Ray's worker module: seconds). Data workers run library functions only, so the script is hidden from
    multiprocessing's preparation data for the moment of the start (``python -m`` entry points and
    interactive sessions are never re-imported anyway).
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None) if main is not None and getattr(main, "__spec__", None) is None else None
    if path is None:
        process.start()
        return
    del main.__file__  # type: ignore[union-attr]
    try:
        process.start()
    finally:
        main.__file__ = path  # type: ignore[union-attr]


def _describe_exit(process: Any) -> str:
    code = process.exitcode
    if code is None:
        return "is still running"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def receive(source: Any, process: Any, name: str, progress: Any | None, stall_timeout: float,
            poll: float = 0.5) -> Any:
    """The next message from ``source`` (a queue fed by ``process``), waiting at most ``stall_timeout`` without
    progress.

    Raises:
        WorkerError: the process died, or neither sent anything nor advanced ``progress`` for ``stall_timeout`` s.
    """
    last_progress = progress.value if progress is not None else None
    last_change = time.monotonic()
    while True:
        try:
            return source.get(timeout=poll)
        except queue_module.Empty:
            pass
        if not process.is_alive():
            try:  # it may have put its last message just before exiting
                return source.get(timeout=poll)
            except queue_module.Empty:
                raise WorkerError(f"{name} (pid {process.pid}) {_describe_exit(process)} before it finished; "
                                  "see its output above (out of memory? killed?)") from None
        now = time.monotonic()
        if progress is not None and progress.value != last_progress:
            last_progress, last_change = progress.value, now
        elif now - last_change > stall_timeout:
            raise WorkerError(f"{name} (pid {process.pid}) sent nothing and made no progress for "
                              f"{stall_timeout:.0f} s: stuck (a hung read or lock?); stopped it")


def stop_processes(processes: Sequence[Any], grace: float = 5.0) -> None:
    """Terminate ``processes``, then kill those still alive after ``grace`` seconds; every wait is bounded."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + grace
    for process in processes:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join(timeout=grace)


class OrderedPool:
    """``fn`` over jobs in worker processes, results in job order (a ``Pool.imap`` whose waits are bounded).

    Jobs are dealt in chunks round-robin (chunk ``k`` to worker ``k % n``), at most two chunks ahead per
    worker, so the input may be a long lazy iterator. A worker that dies or gets stuck raises
    :class:`WorkerError` naming it (``Pool.imap`` would wait forever for the lost chunk).

    Args:
        fn: a module-level function (workers import it by name).
        num_workers: processes.
        name: what to call a worker in messages (``"pack worker"``).
        stall_timeout: seconds without a result or progress before a worker counts as stuck.
    """

    def __init__(self, fn: Callable[[Any], Any], num_workers: int, name: str = "worker",
                 stall_timeout: float = DEFAULT_STALL_TIMEOUT) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.fn, self.num_workers, self.name, self.stall_timeout = fn, num_workers, name, stall_timeout
        self.processes: list[Any] = []

    def imap(self, jobs: Iterable[Any], chunk_size: int = 16) -> Iterator[Any]:
        """Yield ``fn(job)`` for every job, in order."""
        ctx = worker_context()
        n = self.num_workers
        tasks = [ctx.Queue() for _ in range(n)]
        results = [ctx.Queue() for _ in range(n)]
        progress = [ctx.RawValue("q", 0) for _ in range(n)]
        self.processes = [ctx.Process(target=_pool_main, args=(self.fn, tasks[w], results[w], progress[w],
                                                                os.getpid()),
                                      name=f"{self.name} {w}", daemon=True) for w in range(n)]
        source = iter(jobs)
        chunks = iter(lambda: list(itertools.islice(source, chunk_size)), [])
        sent = received = 0
        try:
            for process in self.processes:
                start_worker(process)
            for _ in range(2 * n):
                chunk = next(chunks, None)
                if chunk is None:
                    break
                tasks[sent % n].put(chunk)
                sent += 1
            while received < sent:
                w = received % n
                kind, payload = receive(results[w], self.processes[w], f"{self.name} {w}", progress[w],
                                        self.stall_timeout)
                if kind == "error":
                    raise WorkerError(f"{self.name} {w} (pid {self.processes[w].pid}) failed:\n{payload}")
                received += 1
                chunk = next(chunks, None)
                if chunk is not None:
                    tasks[sent % n].put(chunk)
                    sent += 1
                yield from payload
            for task in tasks:
                task.put(None)
            for process in self.processes:
                process.join(timeout=5.0)
        finally:
            self.close()

    def close(self) -> None:
        """Stop the workers (bounded)."""
        stop_processes(self.processes)
        self.processes = []

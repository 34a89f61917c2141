"""Run a function on W gloo ranks in fresh processes (a ``file://`` store in a temp dir) and collect results.

Usage in a test::

    results = run_world(my_fn, world_size=3, tmp_path=tmp_path, args=(a, b))

``my_fn(rank, world_size, *args)`` must be a module-level function (it is pickled to the children); it runs
after ``torch.distributed.init_process_group("gloo")`` and its return value (picklable) comes back in
rank order. An exception in any rank fails the caller with that rank's traceback.
"""

from __future__ import annotations

import os
import pickle
import traceback
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world_size: int, store_path: str, out_dir: str, fn: Callable, args: Sequence[Any]) -> None:
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    result_path = Path(out_dir) / f"rank{rank}.pkl"
    try:
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
        value = fn(rank, world_size, *args)
        payload = ("ok", value)
    except BaseException:  # noqa: BLE001 - forwarded to the parent as text
        payload = ("error", traceback.format_exc())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    with open(result_path, "wb") as handle:
        pickle.dump(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())
    # The result is on disk: leave without interpreter teardown. Native threads that libraries leave behind
    # (DeepSpeed / gloo) can abort in their destructors at exit ("terminate called without an active
    # exception", seen once in this suite), which would fail a rank whose work had finished and been checked.
    os._exit(0)


def run_world(fn: Callable, world_size: int, tmp_path: Path, args: Sequence[Any] = ()) -> list[Any]:
    """Spawn ``world_size`` gloo ranks running ``fn(rank, world_size, *args)``; return their results."""
    tmp_path = Path(tmp_path)
    store = tmp_path / f"store_{world_size}_{uuid.uuid4().hex}"  # never reuse a store: a stale one hangs
    out_dir = tmp_path / f"results_{store.name}"
    out_dir.mkdir(parents=True, exist_ok=True)
    mp.start_processes(
        _entry, args=(world_size, str(store), str(out_dir), fn, tuple(args)), nprocs=world_size,
        join=True, start_method="spawn",
    )
    results = []
    for rank in range(world_size):
        with open(out_dir / f"rank{rank}.pkl", "rb") as handle:  # our own children's output, not untrusted
            status, value = pickle.load(handle)
        if status != "ok":
            raise AssertionError(f"rank {rank} of {world_size} failed:\n{value}")
        results.append(value)
    return results

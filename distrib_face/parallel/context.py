"""The process context: which rank this is, of how many, on which device, in which group.

Only entry points call :func:`init_distributed`; library code receives a :class:`ProcessContext` (or a
group) as an argument. Initialising twice is a no-op, so under Ray Train (which creates the group before
the training function runs) or torchrun the existing group is reused.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessContext:
    """Where this process stands in the job.

    Attributes:
        rank: global rank (0 in a world of 1).
        world_size: number of ranks.
        local_rank: rank within the node (selects the GPU).
        device: the device this rank computes on.
        group: the process group, or ``None`` for the default group / a world of 1.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    group: dist.ProcessGroup | None = None

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that talks to MLflow and writes shared files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when collectives actually communicate."""
        return self.world_size > 1


def group_rank_and_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """``(rank, world_size)`` within ``group``; ``(0, 1)`` when no process group is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _pick_device(device: str | torch.device | None, local_rank: int) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def init_distributed(
    backend: str | None = None,
    device: str | torch.device | None = None,
    timeout_s: float = 1800.0,
) -> ProcessContext:
    """Join (or create) the default process group and describe this process.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` (set by torchrun,
    the deepspeed launcher and Ray Train). Without them, or with ``WORLD_SIZE=1``, no group is created and
    the context describes a world of 1. If a group already exists (Ray Train made it) it is reused.

    Args:
        backend: ``"nccl"`` or ``"gloo"``; default nccl on CUDA devices, gloo otherwise.
        device: ``"cpu"``, ``"cuda"`` (this rank's ``LOCAL_RANK`` GPU) or an explicit device.
        timeout_s: collective timeout when this call creates the group.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local_rank)
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        return ProcessContext(rank=rank, world_size=world, local_rank=local_rank, device=dev)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return ProcessContext(local_rank=local_rank, device=dev)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    rank = int(os.environ["RANK"])
    dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    logger.info("joined process group: rank %d of %d, backend %s, device %s", rank, world, backend, dev)
    return ProcessContext(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def barrier(group: dist.ProcessGroup | None = None) -> None:
    """Wait for every rank of ``group`` (no-op in a world of 1)."""
    if group_rank_and_size(group)[1] > 1:
        dist.barrier(group=group)

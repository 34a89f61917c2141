"""A diverged run never poisons its checkpoints: the finiteness check before a checkpoint is published, and
the building block of ``train.on_divergence: rollback``.

:func:`find_non_finite` looks at every tensor of the state that a checkpoint would hold -- backbone
parameters and buffers, the backbone optimiser's state (fp32 master weights, momentum / Adam moments), the
class shard, its margin state and optimiser, the auxiliary losses and their optimiser -- with one
``aminmax`` per tensor (no host sync, no full-size temporary: NaN and +-Inf survive a min / max), one
all-reduce of a per-rank flag vector and one host read. Only when something is non-finite does it look
closer (which tensors, how many values) and tell every rank, so that every rank raises the same
:class:`NonFiniteStateError` and takes the same decision.

:func:`rollback_to_last_good` is what ``train.on_divergence: rollback`` calls: it reloads the last good
checkpoint into the live engine, classifier and optimisers and returns its state with the rollback count
and the learning-rate scale updated (the loop applies the scale and re-positions the loader).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import torch

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

    from distrib_face.config import TrainConfig
    from distrib_face.parallel import ProcessContext, ShardedMarginClassifier
    from distrib_face.parallel.optim import ShardOptimizer
    from distrib_face.train.checkpoint import TrainerState

logger = logging.getLogger(__name__)

_MAX_NAMED = 8
"""At most this many non-finite tensors are named per rank in the message (then "and N more")."""


class NonFiniteStateError(RuntimeError):
    """The training state holds NaN or Inf, so the checkpoint was not published (raised on every rank alike).

    A training failure: exit code 1 at the entry points.

    Attributes:
        step: the optimiser step whose checkpoint was refused.
        findings: ``{rank: ["classifier weight: 3 of 4096 values non-finite", ...]}``.
        last_good: the newest published checkpoint (what ``latest`` still names), or None.
    """

    exit_code = 1

    def __init__(self, message: str, *, step: int, findings: dict[int, list[str]], last_good: Path | None) -> None:
        super().__init__(message)
        self.step = step
        self.findings = findings
        self.last_good = last_good


def find_non_finite(named_tensors: Iterable[tuple[str, torch.Tensor]], ctx: ProcessContext) -> dict[int, list[str]]:
    """Which ranks hold a non-finite value, and where (collective: every rank calls it).

    Args:
        named_tensors: this rank's ``(name, tensor)`` pairs; integer and empty tensors are skipped.
        ctx: the :class:`~distrib_face.parallel.ProcessContext` (rank, world size, group, device).

    Returns:
        ``{}`` when every value on every rank is finite, else ``{rank: [description, ...]}`` for every
        rank with a non-finite value (the same dict on every rank).
    """
    from distrib_face.parallel.collectives import all_reduce_tensor, broadcast_object

    names: list[str] = []
    tensors: list[torch.Tensor] = []
    extrema: list[torch.Tensor] = []
    for name, tensor in named_tensors:
        if not (tensor.is_floating_point() and tensor.numel()):
            continue
        tensor = tensor.detach()
        low, high = torch.aminmax(tensor)  # NaN propagates into both, an Inf shows as the min or the max
        names.append(name)
        tensors.append(tensor)
        extrema.append(torch.stack([low, high]).to(device=ctx.device, dtype=torch.float32))
    flags = torch.zeros(ctx.world_size, dtype=torch.float32, device=ctx.device)  # [W], 1 where a rank is bad
    bad_rows = None
    if extrema:
        bad_rows = ~torch.isfinite(torch.stack(extrema)).all(dim=1)  # [T]
        flags[ctx.rank] = bad_rows.any().float()
    flags = all_reduce_tensor(flags, "sum", ctx.group)
    bad_ranks = [rank for rank, flag in enumerate(flags.tolist()) if flag]  # the one host sync of a good save
    if not bad_ranks:
        return {}
    mine: list[str] | None = None
    if ctx.rank in bad_ranks and bad_rows is not None:
        mine = []
        indices = bad_rows.nonzero().flatten().tolist()
        for i in indices[:_MAX_NAMED]:
            count = int((~torch.isfinite(tensors[i])).sum())
            mine.append(f"{names[i]} ({count} of {tensors[i].numel()} values non-finite)")
        if len(indices) > _MAX_NAMED:
            mine.append(f"and {len(indices) - _MAX_NAMED} more tensors")
    return {rank: broadcast_object(mine, src=rank, group=ctx.group) or [] for rank in bad_ranks}


def describe(findings: dict[int, list[str]]) -> str:
    """``"rank 1: classifier weight (3 of 4096 values non-finite); rank 2: ..."``."""
    return "; ".join(f"rank {rank}: {', '.join(items)}" for rank, items in sorted(findings.items()))


def non_finite_state_error(findings: dict[int, list[str]], *, step: int, refused: Path | None,
                           last_good: Path | None) -> NonFiniteStateError:
    """The error raised on every rank: by ``save_checkpoint`` (``refused``: the checkpoint it did not write)
    or by ``check_finite_state`` (``refused`` None)."""
    good = (f"the last good checkpoint is {last_good} (`latest` still names it)" if last_good is not None
            else "there is no earlier checkpoint of this run")
    what = f", so checkpoint {refused} was not written" if refused is not None else ""
    return NonFiniteStateError(
        f"step {step}: the training state is not finite{what}: "
        f"{describe(findings)}; {good}. Lower optim.lr, set optim.grad_clip, check the data, or set "
        "train.on_divergence: rollback",
        step=step, findings=findings, last_good=last_good,
    )


def rollback_to_last_good(
    error: Exception,
    root: str | os.PathLike,
    *,
    train_cfg: TrainConfig,
    trainer_state: TrainerState,
    ctx: ProcessContext,
    engine: DeepSpeedEngine,
    classifier: ShardedMarginClassifier,
    shard_optimizer: ShardOptimizer,
    auxiliary: tuple[Any, Any] = (None, None),
) -> Any:
    """``train.on_divergence: rollback``: reload the last good checkpoint into the live components (collective).

    Call it on every rank with the exception the divergence raised (a :class:`NonFiniteStateError` from
    ``save_checkpoint``, or any other the loop treats as divergence), at an optimiser-step boundary.

    Args:
        error: the divergence; re-raised unchanged when ``train_cfg.on_divergence`` is ``abort``.
        root: the checkpoints folder (``<output_dir>/checkpoints``).
        train_cfg: the :class:`~distrib_face.config.TrainConfig` (``on_divergence``, ``rollback_lr_factor``,
            ``max_rollbacks``).
        trainer_state: the live :class:`~distrib_face.train.checkpoint.TrainerState` (its ``rollbacks`` and
            ``lr_scale`` carry on; everything else comes from the checkpoint).
        ctx, engine, classifier, shard_optimizer, auxiliary: as for
            :func:`~distrib_face.train.checkpoint.load_checkpoint`.

    Returns:
        The :class:`~distrib_face.train.checkpoint.LoadedCheckpoint`; its ``trainer_state`` has
        ``rollbacks`` one higher and ``lr_scale`` multiplied by ``train.rollback_lr_factor``.

    Raises:
        ``error`` itself: ``on_divergence`` is ``abort``.
        NonFiniteStateError: ``train.max_rollbacks`` rollbacks were already made, or there is no checkpoint
            to go back to (the message says which, after the divergence's own).
    """
    from distrib_face.train.checkpoint import load_checkpoint, resolve_checkpoint

    if train_cfg.on_divergence != "rollback":
        raise error
    step = getattr(error, "step", trainer_state.step)
    findings = getattr(error, "findings", {})
    last_good = resolve_checkpoint(root)
    if last_good is None:
        raise NonFiniteStateError(f"{error}; train.on_divergence is rollback, but there is no checkpoint in {root} "
                                  "to roll back to", step=step, findings=findings, last_good=None) from error
    if trainer_state.rollbacks >= train_cfg.max_rollbacks:
        raise NonFiniteStateError(f"{error}; giving up after {trainer_state.rollbacks} rollbacks "
                                  f"(train.max_rollbacks={train_cfg.max_rollbacks})",
                                  step=step, findings=findings, last_good=last_good) from error
    loaded = load_checkpoint(last_good, ctx=ctx, engine=engine, classifier=classifier,
                             shard_optimizer=shard_optimizer, auxiliary=auxiliary)
    state = loaded.trainer_state
    state.rollbacks = trainer_state.rollbacks + 1
    state.lr_scale = trainer_state.lr_scale * train_cfg.rollback_lr_factor
    state.world_size = ctx.world_size
    logger.warning("rank %d: diverged at step %d (%s); rolled back to %s (step %d), learning rates now x%g, "
                   "rollback %d of %d", ctx.rank, step, error, last_good, state.step, state.lr_scale, state.rollbacks,
                   train_cfg.max_rollbacks)
    return loaded

"""Learning-rate schedules: linear warm-up, then polynomial, cosine or step decay, per optimiser step.

A schedule is a pure function of the optimiser step, so resuming needs nothing but the step count, and
the same factor drives both optimisers (the backbone's inside DeepSpeed and the classifier's
``ShardOptimizer``), each relative to its own peak learning rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

from distrib_face.config import Config, ScheduleConfig

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True, kw_only=True)
class LRSchedule:
    """Multiplier of the peak learning rate at each optimiser step.

    Attributes:
        kind: ``poly``, ``cosine`` or ``steps``.
        total_steps: optimiser steps of the whole run.
        warmup_steps: linear warm-up from ``1 / warmup_steps`` of the peak to the peak.
        power: ``poly`` exponent.
        min_ratio: floor of ``poly`` / ``cosine`` as a fraction of the peak.
        milestones: ``steps`` decay points (optimiser steps).
        gamma: ``steps`` decay factor.
    """

    kind: str
    total_steps: int
    warmup_steps: int = 0
    power: float = 2.0
    min_ratio: float = 0.0
    milestones: Sequence[int] = field(default_factory=tuple)
    gamma: float = 0.1

    def factor(self, step: int) -> float:
        """The multiplier for optimiser step ``step`` (0-based: the step about to be taken)."""
        if self.warmup_steps and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "steps":
            return self.gamma ** sum(1 for m in self.milestones if step >= m)
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, max(0.0, (step - self.warmup_steps) / span))
        if self.kind == "poly":
            decay = (1.0 - progress) ** self.power
        elif self.kind == "cosine":
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            raise ValueError(f"unknown schedule kind {self.kind!r}")
        return self.min_ratio + (1.0 - self.min_ratio) * decay

    @classmethod
    def from_config(cls, cfg: ScheduleConfig, total_steps: int, steps_per_epoch: float | None) -> "LRSchedule":
        """Build from the ``schedule`` section; epoch-valued fields need ``steps_per_epoch``."""
        warmup = cfg.warmup_steps
        milestones: list[int] = list(cfg.milestones)
        if not warmup and cfg.warmup_epochs:
            warmup = int(round(cfg.warmup_epochs * _need_epoch_length(steps_per_epoch, "schedule.warmup_epochs")))
        if cfg.kind == "steps" and not milestones:
            length = _need_epoch_length(steps_per_epoch, "schedule.milestone_epochs")
            milestones = [int(round(e * length)) for e in cfg.milestone_epochs]
        return cls(
            kind=cfg.kind, total_steps=total_steps, warmup_steps=warmup, power=cfg.power,
            min_ratio=cfg.min_lr_ratio, milestones=tuple(milestones), gamma=cfg.gamma,
        )


def _need_epoch_length(steps_per_epoch: float | None, field_name: str) -> float:
    if not steps_per_epoch:
        raise ValueError(f"{field_name} needs a data source with a known epoch length")
    return steps_per_epoch


def peak_learning_rates(cfg: Config, world_size: int) -> tuple[float, float]:
    """``(backbone_lr, classifier_lr)`` at the top of the schedule, after the optional batch scaling."""
    lr = cfg.optim.lr
    if cfg.optim.scale_lr_by_batch:
        global_batch = cfg.data.batch_size * world_size * cfg.optim.grad_accum
        lr = lr * global_batch / cfg.optim.reference_batch
    return lr, lr * cfg.optim.classifier_lr_mult


def set_learning_rates(optimizers: Sequence[torch.optim.Optimizer], peaks: Sequence[float], factor: float) -> list[float]:
    """Set ``lr = peak x factor`` on every param group of each optimiser; returns the new rates."""
    rates = []
    for optimizer, peak in zip(optimizers, peaks):
        for group in optimizer.param_groups:
            group["lr"] = peak * factor
        rates.append(peak * factor)
    return rates

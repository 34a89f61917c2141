"""The training step of one rank: :class:`StepRunner`, shared by the trainer and ``distrib-face bench train``.

Per optimiser step, on every rank::

    for each of grad_accum micro-batches:
        embeddings = engine(images)                  # backbone under DeepSpeed, [B_local, D]
        loss = classifier(embeddings, labels)         # class-sharded margin softmax, mean over the global batch
        engine.backward(loss)                         # fills backbone grads (averaged over ranks at the
                                                      # boundary) and this rank's class-shard grads
    engine.step()                                     # steps the backbone at the accumulation boundary
    shard_optimizer.step()                            # the class shard: never averaged, never in DeepSpeed

The loss is identical on all ranks, so every rank takes the same decisions (skip a non-finite loss, stop,
checkpoint, verify) without extra communication.

Host syncs of a step that does not log (counted in tests/distributed/test_step_syncs.py):

- ours: one per micro-batch, ``float(loss)`` in :meth:`StepRunner.forward_backward`, the non-finite verdict.
  It is needed per micro-batch, not once per step: a non-finite micro-batch is skipped *before* its backward
  and another one drawn (a backward through a NaN forward would poison the accumulated gradients, which
  cannot be taken back), so with ``optim.grad_accum = k`` a step makes ``k`` reads. ``finish_step`` makes
  none in fp32 / bf16; under fp16 it reads the class shard's finiteness flag once (``unscale_``'s 0-d
  tensor), right after DeepSpeed's own overflow read, which has already waited for the same backward.
- DeepSpeed's, inside ``engine.step()``: none in fp32 with ZeRO 0; one (``is_invalid_grad_norm``) with
  ZeRO >= 1; bf16 / fp16 with ZeRO 0 go through DeepSpeed's ``FP16_Optimizer``, which checks the gradient
  of each backbone parameter for overflow with its own host read (one per parameter) and reads the norm.
- host offload on CUDA (``loss.offload: host``): the classifier's plan waits once per step for the sampled
  indices and the previous step's rows (docs/classifier.md, "Host offload").
- logging steps add the gradient norm and the classifier's device-side error counters
  (``check_step_errors``).

The classifier's forward, backward and optimiser step have none (docs/classifier.md), nor have the auxiliary
losses except semi-hard triplet mining (one ``nonzero`` for its anchor-positive pairs).
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch

from distrib_face.config import Config
from distrib_face.parallel import ProcessContext
from distrib_face.parallel.collectives import all_reduce_tensor

if TYPE_CHECKING:
    from distrib_face.train.components import Components

logger = logging.getLogger(__name__)


def _backbone_grad_sq(engine: object) -> float:
    """Squared L2 norm of the backbone gradient (after DeepSpeed averaged it)."""
    if engine.zero_optimization_stage() == 0:  # type: ignore[attr-defined]
        sq = sum((p.grad.detach().double().pow(2).sum() for p in engine.module.parameters()  # type: ignore[attr-defined]
                  if p.grad is not None), torch.zeros((), dtype=torch.float64))
        return float(sq)
    norm = engine.get_global_grad_norm()  # type: ignore[attr-defined]
    return float(norm) ** 2 if norm is not None else float("nan")


def _shard_grad_sq(grad: torch.Tensor | None, ctx: ProcessContext) -> torch.Tensor:
    """Squared L2 norm of the class-shard gradient over all shards (one all-reduce; stays on the device)."""
    sq = torch.zeros((), dtype=torch.float64, device=ctx.device)
    if grad is not None:
        sq = sq + grad.detach().double().pow(2).sum()
    return all_reduce_tensor(sq, "sum", ctx.group)


class StepRunner:
    """Forward, backward and optimiser steps of one rank (see the module docstring).

    Args:
        cfg: the config (precision, memory format, grad clipping, accumulation).
        ctx: the process context.
        parts: the rank's components (engine, classifier and optimisers, auxiliary losses).
    """

    def __init__(self, cfg: Config, ctx: ProcessContext, parts: Components) -> None:
        self.cfg, self.ctx, self.parts = cfg, ctx, parts
        self.memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format

    def forward_backward(self, images: torch.Tensor, labels: torch.Tensor, poison: bool = False) -> float:
        """Forward one micro-batch and, when its loss is finite, backward it; returns the loss.

        The loss is the mean over the global micro-batch, identical on every rank. A non-finite loss is
        returned without a backward pass (``poison`` makes it NaN: the test-fault hook of
        :mod:`distrib_face.train.faults`). Before the accumulation boundary the engine's micro-step is
        also taken here.
        """
        parts, ctx = self.parts, self.ctx
        images = images.to(ctx.device, dtype=parts.input_dtype, non_blocking=True)
        images = images.contiguous(memory_format=self.memory_format)
        labels = labels.to(ctx.device, non_blocking=True)
        # Sample this step's classes from the labels alone; with host offload their rows' copy to the device
        # then overlaps the backbone's forward (a side CUDA stream).
        parts.classifier.prefetch(labels)
        embeddings = parts.engine(images).float()  # [B_local, D]
        loss = parts.classifier(embeddings, labels)
        if parts.auxiliary is not None:
            loss = loss + parts.auxiliary(embeddings, labels, classifier=parts.classifier)[0]
        if poison:
            loss = loss * float("nan")
        # The host sync of the micro-batch: every rank must see the same verdict before the backward.
        value = float(loss.detach())
        if not math.isfinite(value):
            return value
        parts.engine.backward(loss)
        if not parts.engine.is_gradient_accumulation_boundary():
            parts.engine.step()  # DeepSpeed only counts the micro-step
        return value

    def finish_step(self, want_grad_norm: bool = False) -> float | None:
        """At the accumulation boundary: step the backbone (DeepSpeed), the class shard and auxiliary losses.

        Under fp16 the class-shard and auxiliary gradients carry DeepSpeed's loss scale: they are unscaled
        first, and their steps are skipped together with the backbone's when either overflowed.

        Returns:
            The global gradient norm (backbone and all class shards) when ``want_grad_norm``, else None.
        """
        parts, ctx, engine = self.parts, self.ctx, self.parts.engine
        shard_grad = parts.classifier.active_rows()[1].grad
        fp16 = engine.fp16_enabled()
        shard_finite = True
        if fp16:
            from distrib_face.train.engine import current_loss_scale

            inv_scale = 1.0 / current_loss_scale(engine)
            if shard_grad is not None:
                shard_finite = parts.shard_optimizer.unscale_(inv_scale)
            if parts.aux_optimizer is not None:
                for group in parts.aux_optimizer.param_groups:
                    for p in group["params"]:
                        if p.grad is not None:
                            p.grad.mul_(inv_scale)
        grad_norm = None
        # Under ZeRO 0 the grads are read before the step (DeepSpeed frees them after); ZeRO >= 1 keeps the norm.
        if want_grad_norm and engine.zero_optimization_stage() == 0:
            grad_norm = math.sqrt(_backbone_grad_sq(engine) + float(_shard_grad_sq(shard_grad, ctx)))
        engine.step()
        # shard_finite is a 0-d tensor: reading it here costs no stall, since DeepSpeed's overflow check in
        # engine.step() has already waited for the backward that produced it.
        if fp16 and (not engine.was_step_applied() or not bool(shard_finite)):
            logger.warning("fp16 overflow: the class-shard step is skipped with the backbone's")
        else:
            if self.cfg.optim.grad_clip and shard_grad is not None:
                self._clip_shard_grad(shard_grad, self.cfg.optim.grad_clip)
            parts.shard_optimizer.step()
            if parts.aux_optimizer is not None:
                parts.aux_optimizer.step()
        if parts.aux_optimizer is not None:
            parts.aux_optimizer.zero_grad(set_to_none=True)
        if want_grad_norm and grad_norm is None:
            grad_norm = math.sqrt(_backbone_grad_sq(engine) + float(_shard_grad_sq(shard_grad, ctx)))
        parts.shard_optimizer.zero_grad()
        return grad_norm

    def _clip_shard_grad(self, grad: torch.Tensor, max_norm: float) -> None:
        """Scale the class-shard gradient so that its norm over all shards is at most ``max_norm``.

        The factor stays on the device (``min(1, max_norm / norm)``): no host sync.
        """
        norm = _shard_grad_sq(grad, self.ctx).sqrt()
        grad.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0).to(grad.dtype))

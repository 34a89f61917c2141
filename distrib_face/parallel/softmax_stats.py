"""Softmax normalisation statistics assembled from chunks and ranks: a running max and sum of exponentials.

Every rank streams its class chunks through :meth:`OnlineLogSumExp.update`; :meth:`OnlineLogSumExp.logsumexp`
then combines the ranks with one MAX and one SUM all-reduce (of the row statistics only) and returns
``log(sum over every rank's classes of exp(logit) [+ exp(extra)])``. Empty rows (no class anywhere) and
``-inf`` logits (masked targets) never produce NaN; a NaN logit (a NaN weight row, a NaN embedding) always
does, so that the loss says the state diverged instead of hiding it (a row is empty only when its max is
exactly ``-inf``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from distrib_face.parallel.collectives import world_size_of


def _shift_of(row_max: Tensor) -> Tensor:
    """The shift for ``exp(logit - shift)``: the row max, or 0 for an empty row (max ``-inf``); NaN stays NaN."""
    return torch.where(row_max == float("-inf"), torch.zeros_like(row_max), row_max)


class OnlineLogSumExp:
    """Running ``max`` and ``sum(exp(logit - max))`` over the last dimension of successive chunks.

    Args:
        shape: the shape of the statistics (``[B]`` per row, or ``()`` for one number over everything).
        dtype: float32 or wider.
        device: where the statistics live.
    """

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        self.max = torch.full(shape, float("-inf"), dtype=dtype, device=device)
        self.sum = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, logits: Tensor, consume: bool = False) -> None:
        """Merge a chunk ``[*shape, c]``; ``consume=True`` lets it overwrite ``logits`` to save memory."""
        new_max = torch.maximum(self.max, logits.amax(dim=-1))  # torch.maximum propagates NaN
        safe = _shift_of(new_max)
        shifted = logits.sub_(safe[..., None]).exp_() if consume else torch.exp(logits - safe[..., None])
        self.sum = self.sum * torch.exp(self.max - safe) + shifted.sum(dim=-1)
        self.max = new_max

    def merge(self, part_max: Tensor, part_sum: Tensor) -> None:
        """Merge statistics computed elsewhere: ``part_max`` / ``part_sum`` of shape ``[n, *shape]``.

        Each ``(part_max[k], part_sum[k])`` is a running max and ``sum(exp(logit - part_max[k]))`` over
        some columns (a fused kernel's class split, say); ``-inf`` maxima with a zero sum are empty parts.
        """
        new_max = torch.maximum(self.max, part_max.amax(dim=0))
        safe = _shift_of(new_max)
        empty = part_max == float("-inf")
        parts = torch.where(empty, torch.zeros_like(part_sum), part_sum * torch.exp(part_max - safe))
        self.sum = self.sum * torch.exp(self.max - safe) + parts.sum(dim=0)
        self.max = new_max

    def logsumexp(self, group: dist.ProcessGroup | None, extra: Tensor | None = None) -> Tensor:
        """Combine over the ranks of ``group`` (MAX then SUM all-reduce) and add ``exp(extra)`` if given."""
        global_max = self.max.clone()
        if world_size_of(group) > 1:
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
        safe = _shift_of(global_max)
        empty = self.max == float("-inf")
        total = torch.where(empty, torch.zeros_like(self.sum), self.sum * torch.exp(self.max - safe))
        if world_size_of(group) > 1:
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        if extra is None:
            return safe + torch.log(total)
        top = torch.maximum(safe, extra)
        return top + torch.log(total * torch.exp(safe - top) + torch.exp(extra - top))

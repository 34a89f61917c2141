"""Auxiliary (metric / regularising) losses over the global batch, with class centres sharded by class.

Who holds what (W ranks of ``group``): every rank all-gathers the embeddings ``[B, D]`` and labels ``[B]``
once; each loss is then the same scalar on every rank.

- Batch losses (triplet, contrastive, ring, MagFace's ``g``): every rank computes the whole term from the
  gathered batch. Their embedding gradient is scaled by ``1 / W`` before the gather's backward (a
  reduce-scatter that sums over ranks), so each row gets exactly one copy.
- Centre losses (center, intra-angle, inter-angle): the centres ``[C_r, D]`` are split by class exactly like
  the classifier (:func:`~distrib_face.parallel.shard.class_range`, world-size independent initialisation).
  A per-row term is computed only by the rank owning the row's class and summed with a ``[1]`` all-reduce
  whose backward is the identity (the sum feeds a loss replicated on every rank). The inter-angle term needs
  every row's own centre on every rank: one ``[B, D]`` all-reduce whose backward is an all-reduce too.
- UPLoss: each rank regularises the classifier's weight rows it owns; two scalar all-reduces for the mean
  squared norm of the base classes and one for the loss.

Parameters (sharded centres, the ring radius) are not data-parallel: nothing averages them; the radius gets
the same gradient on every rank because its loss is replicated. Train them with a plain torch optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from distrib_face.losses import metric
from distrib_face.losses.auxiliary import AuxLossSpec
from distrib_face.parallel.collectives import (
    all_gather_variable,
    all_reduce_sum_replicated_grad,
    all_reduce_sum_summed_grad,
    all_reduce_tensor,
    gather_with_grad,
    scale_grad,
)
from distrib_face.parallel.context import group_rank_and_size
from distrib_face.parallel.shard import class_range, init_class_rows


class ShardedClassCenters(nn.Module):
    """Learned class centres ``[C_r, D]`` split by class over the ranks of ``group``.

    Args:
        num_classes: ``C``.
        embedding_size: ``D``.
        group: the process group (``None``: default group or a world of 1).
        seed: centres are ``N(0, init_std)`` drawn per class block: the same matrix at any world size.
        init_std: initial spread of the centres.
        dtype, device: of the shard.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        group: dist.ProcessGroup | None = None,
        seed: int = 0,
        init_std: float = 0.01,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.group = group
        self.rank, self.world_size = group_rank_and_size(group)
        self.num_classes = int(num_classes)
        self.class_range = class_range(self.num_classes, self.rank, self.world_size)
        rows = init_class_rows(*self.class_range, (embedding_size,), seed=seed, std=init_std, dtype=dtype,
                               device=device or "cpu")
        self.centers = nn.Parameter(rows)  # [C_r, D]

    def _owned(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        """``(owned [B] bool, local [B])``: which rows' classes this rank holds, and their local rows.

        Masks, not ``nonzero``: no host synchronisation and no data-dependent shape. Rows owned elsewhere
        point at local row 0 (their terms are zeroed by the mask; only the shape-0 shard has no row 0).
        """
        start, stop = self.class_range
        owned = (labels >= start) & (labels < stop)
        return owned, torch.where(owned, labels - start, 0)

    def _own_centers(self, labels: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
        """``(owned [B], centres of the owned rows' classes [B, D])`` (zeros elsewhere); None for an empty shard."""
        if self.centers.shape[0] == 0:  # fewer classes than ranks: this rank holds none (a static shape)
            return None
        owned, local = self._owned(labels)
        return owned, self.centers[local].to(dtype)

    def center_loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """``0.5 mean_i ||x_i - c_{y_i}||^2`` over the global batch ``embeddings [B, D]`` (replicated)."""
        mine = self._own_centers(labels, embeddings.dtype)
        if mine is None:
            part = embeddings.sum() * 0.0 + self.centers.sum().to(embeddings.dtype) * 0.0
        else:
            owned, centers = mine
            part = torch.where(owned, 0.5 * (embeddings - centers).pow(2).sum(dim=1), 0.0).sum()
        return all_reduce_sum_replicated_grad(part.reshape(1), self.group)[0] / max(len(labels), 1)

    def intra_angle_loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """``mean_i theta_{i, y_i} / pi`` over the global batch (replicated)."""
        mine = self._own_centers(labels, embeddings.dtype)
        if mine is None:
            part = embeddings.sum() * 0.0 + self.centers.sum().to(embeddings.dtype) * 0.0
        else:
            owned, centers = mine
            part = torch.where(owned, metric._angles(embeddings, centers), 0.0).sum()
        return all_reduce_sum_replicated_grad(part.reshape(1), self.group)[0] / (math.pi * max(len(labels), 1))

    def inter_angle_loss(self, labels: Tensor, dtype: torch.dtype) -> Tensor:
        """ArcFace's Inter-Loss term over the global batch's labels and every class (replicated)."""
        if self.num_classes < 2 or len(labels) == 0:
            return self.centers.sum().to(dtype) * 0.0
        centers = self.centers.to(dtype)
        mine = self._own_centers(labels, dtype)
        if mine is None:
            mine_rows = torch.zeros(len(labels), centers.shape[1], dtype=dtype, device=centers.device)
        else:
            mine_rows = torch.where(mine[0][:, None], mine[1], 0.0)  # [B, D]: the rows whose class is here
        target = all_reduce_sum_summed_grad(mine_rows, self.group)  # [B, D]
        cos = nn.functional.normalize(target, dim=1) @ nn.functional.normalize(centers, dim=1).t()  # [B, C_r]
        angles = torch.acos(cos.clamp(-1.0 + metric._ACOS_EPS, 1.0 - metric._ACOS_EPS))
        # Every (row, class) pair but the row's own class; a row whose class is elsewhere keeps all columns.
        own_col = labels - self.class_range[0]
        not_own = torch.arange(centers.shape[0], device=labels.device)[None, :] != own_col[:, None]  # [B, C_r]
        part = (angles * not_own).sum()
        total = all_reduce_sum_replicated_grad(part.reshape(1), self.group)[0]
        return -total / (math.pi * (self.num_classes - 1) * len(labels))


def sharded_up_loss(classifier: nn.Module, novel_local: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """:func:`~distrib_face.losses.metric.up_loss` of a class-sharded classifier's weights (replicated).

    Args:
        classifier: a ``ShardedMarginClassifier`` without Partial FC sampling.
        novel_local: ``[C_r]`` bool for this rank's classes.
        group: the classifier's group.
    """
    if getattr(classifier, "sample_rate", 1.0) < 1.0:
        raise ValueError(f"uploss needs the whole shard each step; classifier sample_rate={classifier.sample_rate}")
    k, d = classifier.num_subcenters, classifier.embedding_size
    sq = classifier.weight[:, :d].pow(2).sum(dim=1).view(-1, k)  # [C_r, K] (bias column excluded)
    mask = novel_local.to(sq.device)[:, None].expand_as(sq)
    counts = all_reduce_tensor(torch.stack([(~mask).sum(), mask.sum()]).to(sq.dtype), "sum", group)
    # Masked sums instead of boolean indexing and a branch on the counts: no host synchronisation. Without
    # base or without novel rows anywhere the loss is 0 (with a gradient path), as in metric.up_loss.
    alpha = all_reduce_tensor(torch.where(mask, 0.0, sq.detach()).sum(), "sum", group) / counts[0].clamp_min(1)
    part = torch.where(mask, (sq - alpha).pow(2), 0.0).sum()
    loss = all_reduce_sum_replicated_grad(part.reshape(1), group)[0] / counts[1].clamp_min(1)
    return torch.where((counts[0] > 0) & (counts[1] > 0), loss, 0.0)


_BATCH_TERMS = ("triplet", "contrastive", "ring", "magface")
_CENTER_TERMS = ("center", "intra_angle", "inter_angle")


class AuxiliaryLosses(nn.Module):
    """A weighted sum of auxiliary losses over the global batch, the same scalar on every rank.

    Build it with :func:`build_auxiliary_losses`.

    Example:
        ``total, parts = aux(local_embeddings, local_labels, classifier=clf)``; add ``total`` to the
        classifier's loss before ``backward``; ``parts`` maps each name to its detached unweighted value.
    """

    def __init__(
        self,
        specs: Sequence[Any],
        num_classes: int,
        embedding_size: int,
        group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        embedding_grad_scale: float = 1.0,
        class_counts: Sequence[int] | np.ndarray | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.specs = list(specs)
        self.group = group
        self.rank, self.world_size = group_rank_and_size(group)
        self.embedding_grad_scale = float(embedding_grad_scale)
        self.num_classes = int(num_classes)
        self.centers = nn.ModuleDict()
        self.radius: nn.Parameter | None = None
        self.novel_local: Tensor | None = None
        for index, spec in enumerate(self.specs):
            if spec.name in _CENTER_TERMS:
                self.centers[spec.name] = ShardedClassCenters(
                    num_classes, embedding_size, group, seed=seed + 7919 * (index + 1),
                    init_std=float(spec.options.get("init_std", 0.01)), dtype=dtype, device=device,
                )
            elif spec.name == "ring":
                self.radius = nn.Parameter(torch.tensor(float(spec.options.get("radius", 1.0)), dtype=dtype,
                                                        device=device))
            elif spec.name == "uploss":
                if class_counts is None:
                    raise ValueError("auxiliary loss 'uploss' needs class_counts (the manifest's per-class counts)")
                counts = torch.as_tensor(np.asarray(class_counts), dtype=torch.int64)
                if counts.numel() != num_classes:
                    raise ValueError(f"class_counts has {counts.numel()} entries for num_classes={num_classes}")
                start, stop = class_range(num_classes, self.rank, self.world_size)
                self.novel_local = counts[start:stop] <= int(spec.options.get("max_samples", 5))

    def forward(
        self, local_embeddings: Tensor, local_labels: Tensor, classifier: nn.Module | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``(sum_k weight_k loss_k, {name: loss_k detached})`` over the global batch.

        Args:
            local_embeddings: ``[B_local, D]`` this rank's embeddings (un-normalised backbone output).
            local_labels: ``[B_local]`` global labels.
            classifier: the ``ShardedMarginClassifier`` (only ``uploss`` uses it).
        """
        embeddings = gather_with_grad(local_embeddings, self.group, self.embedding_grad_scale)  # [B, D]
        labels = all_gather_variable(local_labels.to(torch.int64), self.group)  # [B]
        # Replicated batch terms: every rank differentiates the same term, so each keeps 1 / W of it.
        replicated = scale_grad(embeddings, 1.0 / self.world_size)
        total = embeddings.sum() * 0.0
        parts: dict[str, Tensor] = {}
        for spec in self.specs:
            opts = spec.options
            if spec.name == "triplet":
                value = metric.triplet_loss(replicated, labels, float(opts.get("margin", 0.2)),
                                            opts.get("mining", "batch_hard"), bool(opts.get("normalize", True)))
            elif spec.name == "contrastive":
                value = metric.contrastive_loss(replicated, labels, float(opts.get("margin", 1.0)),
                                                bool(opts.get("normalize", False)))
            elif spec.name == "ring":
                value = metric.ring_loss(replicated, self.radius.to(embeddings.dtype))
            elif spec.name == "magface":
                value = metric.magface_regularizer(replicated.norm(dim=1), float(opts.get("lower_norm", 10.0)),
                                                   float(opts.get("upper_norm", 110.0)))
            elif spec.name == "center":
                value = self.centers["center"].center_loss(embeddings, labels)
            elif spec.name == "intra_angle":
                value = self.centers["intra_angle"].intra_angle_loss(embeddings, labels)
            elif spec.name == "inter_angle":
                value = self.centers["inter_angle"].inter_angle_loss(labels, embeddings.dtype)
            elif spec.name == "uploss":
                if classifier is None:
                    raise ValueError("auxiliary loss 'uploss' needs classifier=... in the call")
                value = sharded_up_loss(classifier, self.novel_local, self.group).to(embeddings.dtype)
            else:  # AuxLossSpec validated the name
                raise ValueError(f"unknown auxiliary loss {spec.name!r}")
            parts[spec.name] = value.detach()
            total = total + spec.weight * value
        return total, parts


def build_auxiliary_losses(
    specs: Sequence[AuxLossSpec | dict[str, Any]],
    *,
    num_classes: int,
    embedding_size: int,
    group: Any = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    embedding_grad_scale: float = 1.0,
    class_counts: Sequence[int] | np.ndarray | None = None,
    seed: int = 0,
) -> AuxiliaryLosses:
    """Build the weighted auxiliary losses (an ``nn.Module``; call it as described in the module docstring).

    Args:
        specs: :class:`AuxLossSpec` or plain dicts; duplicates of a name raise ``ValueError``.
        num_classes, embedding_size: the classifier's ``C`` and ``D``.
        group: the class-shard process group (``None``: default group or a world of 1).
        device, dtype: of the sharded centres and the ring radius.
        embedding_grad_scale: as the classifier's (the data-parallel world size under DeepSpeed / DDP).
        class_counts: ``[C]`` images per class (``uploss`` only).
        seed: seed of the centres' initialisation (world-size independent).
    """
    parsed = [s if isinstance(s, AuxLossSpec) else AuxLossSpec.from_dict(s) for s in specs]
    names = [s.name for s in parsed]
    if len(set(names)) != len(names):
        raise ValueError(f"auxiliary losses listed twice: {sorted(n for n in set(names) if names.count(n) > 1)}")
    return AuxiliaryLosses(parsed, num_classes, embedding_size, group=group, device=device, dtype=dtype,
                           embedding_grad_scale=embedding_grad_scale, class_counts=class_counts, seed=seed)

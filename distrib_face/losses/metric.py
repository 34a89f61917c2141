"""Metric and regularising losses: pure functions of embeddings (and class centres) on one device.

They are combined with the margin softmax by weights (see :mod:`distrib_face.losses.auxiliary`); the
communicating wrappers that compute them over the global batch and shard the class centres live in
:mod:`distrib_face.parallel.auxiliary`.

Every function returns a scalar mean over its terms and is differentiable in all its tensor inputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_EPS = 1e-12
_ACOS_EPS = 1e-7


def pairwise_distances(embeddings: Tensor, squared: bool = False) -> Tensor:
    """Euclidean distances ``[N, N]`` between rows (the square root is kept differentiable at 0)."""
    sq = embeddings.pow(2).sum(dim=1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * embeddings @ embeddings.t()).clamp_min(0.0)
    if squared:
        return d2
    return torch.sqrt(d2.clamp_min(_EPS))


def _masks(labels: Tensor) -> tuple[Tensor, Tensor]:
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same  # positives (not self), negatives


def triplet_loss(
    embeddings: Tensor, labels: Tensor, margin: float = 0.2, mining: str = "batch_hard", normalize: bool = True
) -> Tensor:
    """Triplet loss ``relu(d(a, p) - d(a, n) + margin)`` with online mining over the batch.

    Args:
        embeddings: ``[N, D]``.
        labels: ``[N]`` identities.
        margin: the triplet margin ``alpha``.
        mining: ``"batch_hard"`` (Hermans et al.: per anchor, the farthest positive and the closest
            negative; mean over anchors that have both) or ``"semi_hard"`` (FaceNet: per anchor-positive pair,
            the closest negative farther than the positive; if there is none, the farthest negative; mean
            over all anchor-positive pairs).
        normalize: L2-normalise the embeddings first (distances on the unit sphere).

    Returns:
        A scalar; 0 (with a gradient path) when the batch has no valid triplet.
    """
    if normalize:
        embeddings = F.normalize(embeddings, dim=1)
    dist = pairwise_distances(embeddings)
    pos, neg = _masks(labels)
    if mining == "batch_hard":
        valid = pos.any(dim=1) & neg.any(dim=1)
        hardest_pos = dist.masked_fill(~pos, float("-inf")).amax(dim=1)
        hardest_neg = dist.masked_fill(~neg, float("inf")).amin(dim=1)
        # Anchors without a positive or a negative give relu(-inf) = 0 here, finite, and are masked out.
        return _masked_mean(F.relu(hardest_pos - hardest_neg + margin), valid, embeddings)
    if mining == "semi_hard":
        # The anchor-positive pairs are a data-dependent set (``nonzero``: one host synchronisation per call);
        # a dense form would need an [N, N, N] block.
        anchors, positives = pos.nonzero(as_tuple=True)
        d_ap = dist[anchors, positives]  # [P]
        d_an = dist[anchors]  # [P, N]
        neg_rows = neg[anchors]
        outside = neg_rows & (d_an > d_ap[:, None])
        closest_outside = d_an.masked_fill(~outside, float("inf")).amin(dim=1)
        farthest = d_an.masked_fill(~neg_rows, float("-inf")).amax(dim=1)
        chosen = torch.where(outside.any(dim=1), closest_outside, farthest)
        keep = neg_rows.any(dim=1)  # [P]
        return _masked_mean(F.relu(d_ap - chosen + margin), keep, embeddings)
    raise ValueError(f"triplet mining must be 'batch_hard' or 'semi_hard', got {mining!r}")


def _masked_mean(values: Tensor, keep: Tensor, like: Tensor) -> Tensor:
    """The mean of ``values`` where ``keep``; 0 with a gradient path into ``like`` when nothing is kept.

    A masked sum, not boolean indexing and a branch on the count: no host synchronisation and no
    data-dependent shape. ``values`` must be finite where not kept (their gradient is zeroed, not skipped).
    """
    num_kept = keep.sum()
    mean = torch.where(keep, values, 0.0).sum() / num_kept.clamp_min(1)
    return torch.where(num_kept > 0, mean, like.sum() * 0.0)


def contrastive_loss(embeddings: Tensor, labels: Tensor, margin: float = 1.0, normalize: bool = False) -> Tensor:
    """DeepID2's verification signal over every pair ``i < j`` of the batch.

    ``0.5 ||f_i - f_j||^2`` for a same-identity pair, ``0.5 max(0, margin - ||f_i - f_j||)^2`` otherwise;
    the mean over pairs.
    """
    if normalize:
        embeddings = F.normalize(embeddings, dim=1)
    n = embeddings.shape[0]
    if n < 2:
        return embeddings.sum() * 0.0
    i, j = torch.triu_indices(n, n, offset=1, device=embeddings.device)
    d2 = (embeddings[i] - embeddings[j]).pow(2).sum(dim=1)
    same = labels[i] == labels[j]
    d = torch.sqrt(d2.clamp_min(_EPS))
    return torch.where(same, 0.5 * d2, 0.5 * F.relu(margin - d).pow(2)).mean()


def center_loss(embeddings: Tensor, labels: Tensor, centers: Tensor) -> Tensor:
    """Center loss ``0.5 mean_i ||x_i - c_{y_i}||^2`` (Wen et al.); ``centers`` is ``[C, D]``."""
    return 0.5 * (embeddings - centers[labels]).pow(2).sum(dim=1).mean()


def ring_loss(embeddings: Tensor, radius: Tensor) -> Tensor:
    """Ring loss ``0.5 mean_i (||x_i|| - R)^2`` with a learned radius ``R`` (Zheng et al.)."""
    return 0.5 * (embeddings.norm(dim=1) - radius).pow(2).mean()


def _angles(a: Tensor, b: Tensor) -> Tensor:
    cos = (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(dim=-1)
    return torch.acos(cos.clamp(-1.0 + _ACOS_EPS, 1.0 - _ACOS_EPS))


def intra_angle_loss(embeddings: Tensor, labels: Tensor, centers: Tensor) -> Tensor:
    """ArcFace paper's Intra-Loss term: ``mean_i theta_{i, y_i} / pi``, the angle to the own class centre."""
    return _angles(embeddings, centers[labels]).mean() / math.pi


def inter_angle_loss(centers: Tensor, labels: Tensor) -> Tensor:
    """ArcFace paper's Inter-Loss term: ``-mean_i (1 / (pi (C - 1))) sum_{j != y_i} angle(W_{y_i}, W_j)``.

    Minimising it spreads the class centres of the batch's identities away from every other centre.
    """
    num_classes = centers.shape[0]
    if num_classes < 2:
        return centers.sum() * 0.0
    target = F.normalize(centers[labels], dim=1)  # [N, D]
    cos = target @ F.normalize(centers, dim=1).t()  # [N, C]
    angles = torch.acos(cos.clamp(-1.0 + _ACOS_EPS, 1.0 - _ACOS_EPS))
    not_own = torch.ones_like(angles, dtype=torch.bool).scatter_(1, labels[:, None], False)
    return -(angles * not_own).sum(dim=1).mean() / (math.pi * (num_classes - 1))


def up_loss(weights: Tensor, novel: Tensor) -> Tensor:
    """UP (underrepresented-classes promotion) weight-norm regulariser of Guo & Zhang (one-shot faces).

    ``mean_{c novel} (||w_c||^2 - alpha)^2`` with ``alpha`` the mean squared norm of the other (base) classes,
    held constant (detached): it lifts the small weight norms that rare classes end up with.

    Args:
        weights: ``[C, D]`` (or ``[C, K, D]``: each sub-centre row counts) class weights.
        novel: ``[C]`` bool, True for underrepresented classes.
    """
    sq = weights.pow(2).sum(dim=-1)  # [C] or [C, K]
    mask = novel.reshape(-1, *([1] * (sq.ndim - 1))).expand_as(sq)
    if not bool(mask.any()) or bool(mask.all()):
        return weights.sum() * 0.0
    alpha = sq.detach()[~mask].mean()
    return (sq[mask] - alpha).pow(2).mean()


def magface_regularizer(norms: Tensor, lower_norm: float = 10.0, upper_norm: float = 110.0) -> Tensor:
    """MagFace's ``g(a) = a / u_a^2 + 1 / a`` averaged, ``a = clip(||x||, l_a, u_a)`` (the paper weights it 35)."""
    a = norms.reshape(-1).clamp(lower_norm, upper_norm)
    return (a / upper_norm ** 2 + 1.0 / a).mean()


class CenterLoss(nn.Module):
    """Center loss with learned centres ``[C, D]`` on one device (the sharded form: ``ShardedClassCenters``).

    Train the centres with their own optimizer (the paper's update ``c_j <- c_j - alpha delta c_j`` is SGD
    on this loss up to the per-class count normalisation).
    """

    def __init__(self, num_classes: int, embedding_size: int, init_std: float = 0.01) -> None:
        super().__init__()
        self.centers = nn.Parameter(torch.randn(num_classes, embedding_size) * init_std)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """``0.5 mean_i ||x_i - c_{y_i}||^2``."""
        return center_loss(embeddings, labels, self.centers.to(embeddings.dtype))


class RingLoss(nn.Module):
    """Ring loss with its learned radius ``R`` (a scalar parameter, initialised to ``radius``)."""

    def __init__(self, radius: float = 1.0) -> None:
        super().__init__()
        self.radius = nn.Parameter(torch.tensor(float(radius)))

    def forward(self, embeddings: Tensor) -> Tensor:
        """``0.5 mean_i (||x_i|| - R)^2``."""
        return ring_loss(embeddings, self.radius.to(embeddings.dtype))

"""Sub-centre ArcFace's data cleaning: keep each class's dominant sub-centre, list the samples far from it.

After training ``subcenter_arcface`` with ``K`` sub-centres, most clean images of a class gather around one
sub-centre (the dominant one) and label noise around the others. The paper then drops the non-dominant
sub-centres and discards samples whose angle to the dominant one exceeds a threshold (75 degrees), and
retrains with ``K = 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class SubcenterCleaning:
    """Result of :func:`clean_subcenters`.

    Attributes:
        dominant: ``[C]`` index of each class's dominant sub-centre (0 for a class with no sample).
        counts: ``[C, K]`` samples of each class closest to each of its sub-centres.
        weight: ``[C, D]`` the dominant sub-centre rows (the ``K = 1`` classifier to continue from).
        angles: ``[N]`` degrees between each sample and its class's dominant sub-centre.
        noisy: sorted indices of the samples with ``angles > threshold``.
        threshold: the threshold used, in degrees.
    """

    dominant: np.ndarray
    counts: np.ndarray
    weight: Tensor
    angles: np.ndarray
    noisy: np.ndarray
    threshold: float


def clean_subcenters(
    weight: Tensor, embeddings: Tensor, labels: Tensor, threshold_degrees: float = 75.0, chunk_size: int = 65536
) -> SubcenterCleaning:
    """Find each class's dominant sub-centre and the samples whose angle to it exceeds ``threshold_degrees``.

    Args:
        weight: ``[C, K, D]`` sub-centre weights (e.g. ``distrib_face.parallel.checkpoint.load_full_matrix``).
        embeddings: ``[N, D]`` embeddings of the training samples.
        labels: ``[N]`` their class labels in ``[0, C)``.
        threshold_degrees: samples farther than this from their dominant sub-centre are listed as noisy.
        chunk_size: samples per chunk (bounds memory: only ``[chunk, K, D]`` weight rows are gathered).

    Raises:
        ValueError: on mismatched shapes or labels outside ``[0, C)``, naming the value.
    """
    if weight.ndim != 3:
        raise ValueError(f"weight must be [C, K, D], got shape {tuple(weight.shape)}")
    num_classes, k, dim = weight.shape
    if embeddings.ndim != 2 or embeddings.shape[1] != dim or len(labels) != len(embeddings):
        raise ValueError(
            f"embeddings must be [N, {dim}] with N labels; got {tuple(embeddings.shape)}, {len(labels)} labels"
        )
    labels = torch.as_tensor(labels, dtype=torch.int64)
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got range [{int(labels.min())}, {int(labels.max())}]")
    w_unit = F.normalize(weight.to(torch.float64), dim=2)
    nearest = torch.empty(len(labels), dtype=torch.int64)
    cos_all = torch.empty(len(labels), k, dtype=torch.float64)
    for start in range(0, len(labels), chunk_size):
        x = F.normalize(embeddings[start: start + chunk_size].to(torch.float64), dim=1)
        cos = torch.einsum("nd,nkd->nk", x, w_unit[labels[start: start + chunk_size]])
        cos_all[start: start + chunk_size] = cos
        nearest[start: start + chunk_size] = cos.argmax(dim=1)
    counts = torch.zeros(num_classes, k, dtype=torch.int64)
    counts.index_put_((labels, nearest), torch.ones_like(labels), accumulate=True)
    dominant = counts.argmax(dim=1)  # the first maximum: sub-centre 0 for an empty class
    cos_dominant = cos_all.gather(1, dominant[labels][:, None]).squeeze(1)
    angles = torch.rad2deg(torch.acos(cos_dominant.clamp(-1.0, 1.0))).numpy()
    noisy = np.flatnonzero(angles > threshold_degrees)
    kept = weight[torch.arange(num_classes), dominant]
    return SubcenterCleaning(dominant.numpy(), counts.numpy(), kept, angles, noisy, float(threshold_degrees))

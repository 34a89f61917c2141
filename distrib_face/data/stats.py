"""Images-per-identity statistics of a shard set: a text histogram and a log-log figure."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np


@dataclass
class Histogram:
    """Identities binned by their image count, in powers of two: bin ``k`` holds counts in ``[2^k, 2^(k+1))``."""

    lower: list[int]
    upper: list[int]  # exclusive
    identities: list[int]
    images: list[int]


def images_per_identity_histogram(class_counts: Sequence[int]) -> Histogram:
    """Bin identities by image count in powers of two (identities with 0 images get a bin ``[0, 1)``)."""
    counts = np.asarray(class_counts, dtype=np.int64)
    lower, upper, identities, images = [], [], [], []
    if (counts == 0).any():
        lower.append(0), upper.append(1), identities.append(int((counts == 0).sum())), images.append(0)
    positive = counts[counts > 0]
    if positive.size:
        top = int(np.floor(np.log2(positive.max())))
        for k in range(top + 1):
            low, high = 2 ** k, 2 ** (k + 1)
            members = positive[(positive >= low) & (positive < high)]
            lower.append(low), upper.append(high)
            identities.append(int(members.size)), images.append(int(members.sum()))
    return Histogram(lower, upper, identities, images)


def format_histogram(class_counts: Sequence[int]) -> str:
    """The histogram and a summary line as a text table."""
    hist = images_per_identity_histogram(class_counts)
    counts = np.asarray(class_counts)
    width = max(hist.identities + [1])
    lines = [f"{'images/identity':>17} {'identities':>10} {'images':>10}  "]
    for low, high, ids, imgs in zip(hist.lower, hist.upper, hist.identities, hist.images):
        label = f"{low}" if high - low == 1 else f"{low}-{high - 1}"
        bar = "#" * max(1 if ids else 0, round(40 * ids / width))
        lines.append(f"{label:>17} {ids:>10} {imgs:>10}  {bar}")
    lines.append(
        f"identities {counts.size}, images {int(counts.sum())}, per identity: min {int(counts.min())}, "
        f"median {float(np.median(counts)):g}, mean {float(counts.mean()):.2f}, max {int(counts.max())}"
    )
    return "\n".join(lines)


def plot_images_per_identity(class_counts: Sequence[int], path: str | os.PathLike, title: str = "") -> Path:
    """Write a log-log figure: number of identities having k images (left) and the rank-size curve (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(class_counts, dtype=np.int64)
    positive = counts[counts > 0]
    values, frequency = np.unique(positive, return_counts=True)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.loglog(values, frequency, "o", markersize=3)
    left.set_xlabel("images per identity")
    left.set_ylabel("identities")
    left.set_title("images-per-identity histogram")
    right.loglog(np.arange(1, positive.size + 1), np.sort(positive)[::-1])
    right.set_xlabel("identity rank")
    right.set_ylabel("images")
    right.set_title("rank-size (long tail)")
    for axis in (left, right):
        axis.grid(True, which="both", alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

"""Images-per-identity statistics of a shard set: a text histogram, log-spaced bins and the class-size figure.

:func:`plot_class_sizes` is the one class-size figure of the project: ``distrib-face data stats`` writes it
and the trainer logs it (through ``distrib_face.tracking.plot_class_histogram``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

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


def class_size_histogram(
    class_counts: Iterable[int] | Mapping[object, int], num_bins: int = 30
) -> tuple[np.ndarray, np.ndarray]:
    """Histogram of images per identity on logarithmic bins.

    Args:
        class_counts: images of each identity (a sequence, or a mapping label -> count).
        num_bins: at most this many log-spaced bins between 1 and the largest count (integer edges,
            duplicates merged, so small ranges get one bin per count).

    Returns:
        ``(edges, num_identities)``: integer bin edges (length B+1; bin i holds counts in
        ``[edges[i], edges[i+1])``, the last bin closed) and how many identities fall in each bin.
        Identities with 0 images are not counted.
    """
    counts = _as_counts(class_counts)
    counts = counts[counts > 0]
    top = int(counts.max()) if counts.size else 1
    edges = np.unique(np.floor(np.geomspace(1, top + 1, num_bins + 1)).astype(np.int64))
    if edges[-1] < top + 1:
        edges = np.append(edges, top + 1)
    hist, _ = np.histogram(counts, bins=edges)
    return edges, hist


def _as_counts(class_counts: Iterable[int] | Mapping[object, int]) -> np.ndarray:
    if isinstance(class_counts, np.ndarray):
        values: Any = class_counts  # a manifest's counts: no million-entry list on the way
    else:
        values = list(class_counts.values()) if isinstance(class_counts, Mapping) else list(class_counts)
    counts = np.asarray(values).astype(np.int64)
    if counts.size == 0:
        raise ValueError("class_counts is empty")
    if np.any(counts < 0):
        raise ValueError(f"class_counts has negative entries, e.g. {counts[counts < 0][:3].tolist()}")
    return counts


def plot_class_sizes(
    class_counts: Iterable[int] | Mapping[object, int], path: str | os.PathLike, title: str = ""
) -> Path:
    """Write :func:`class_sizes_figure` as a PNG at ``path`` (folders are created); returns ``path``."""
    from distrib_face.figures import save_png

    return save_png(class_sizes_figure(class_counts, title), path)


def class_sizes_figure(class_counts: Iterable[int] | Mapping[object, int], title: str = "") -> Any:
    """The class-size figure (the one the trainer logs and ``distrib-face data stats`` writes).

    Left: how many identities have how many images, on log-spaced bins (:func:`class_size_histogram`)
    and log-log axes, so a long tail shows as a straight slope. Right: images per identity against the
    identity's rank (largest first), log-log. Tick labels stay readable on short ranges
    (:func:`distrib_face.figures.readable_log_axis`).

    Args:
        class_counts: images of each identity (``Manifest.class_counts``), a sequence or a mapping.
        title: a line above both panels (e.g. the shard folder).

    Returns:
        A matplotlib ``Figure`` (10 x 4 inches) on an Agg canvas.
    """
    from distrib_face.figures import new_figure, readable_log_axis

    counts = _as_counts(class_counts)
    positive = np.sort(counts[counts > 0])[::-1]
    if positive.size == 0:
        raise ValueError("nothing to plot: every identity has 0 images")
    edges, hist = class_size_histogram(counts)
    figure = new_figure(10, 4)
    left, right = figure.subplots(1, 2)
    nonzero = hist > 0
    left.bar(edges[:-1][nonzero], hist[nonzero], width=np.diff(edges)[nonzero], align="edge",
             edgecolor="black", linewidth=0.5)
    left.set_xscale("log")
    left.set_yscale("log")
    used = np.nonzero(hist)[0]
    left.set_xlim(edges[used[0]] / 1.1, edges[used[-1] + 1] * 1.1)
    left.set_ylim(0.7, hist.max() * 1.6)
    left.set(xlabel="images per identity (log bins)", ylabel="identities", title="class-size histogram")
    # The curve is flat over each run of equal counts: its first and last rank of every run draw the very
    # same polyline as every rank would (a million-identity set: ~2 x max-count vertices, not a million).
    change = np.flatnonzero(np.diff(positive))
    kept = np.unique(np.concatenate([[0, positive.size - 1], change, change + 1]))
    right.plot(kept + 1, positive[kept], linewidth=1.4)
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlim(0.8, positive.size * 1.25)
    right.set_ylim(positive.min() / 1.25, positive.max() * 1.25)
    right.set(xlabel="identity rank (largest first)", ylabel="images", title="rank-size (long tail)")
    for ax in (left, right):
        readable_log_axis(ax.xaxis)
        readable_log_axis(ax.yaxis)
        ax.grid(True, which="both", alpha=0.3)
    summary = (f"{counts.size} identities, {int(counts.sum())} images; images per identity: min {int(counts.min())}, "
               f"median {float(np.median(counts)):g}, max {int(counts.max())}")
    figure.suptitle(f"{title}\n{summary}" if title else summary, fontsize=10)
    figure.tight_layout()
    return figure

"""PNG figures the trainer logs: the loss curve and the images-per-identity histogram.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no global backend switch), so they
work on headless workers and leave the caller's matplotlib state alone. ROC curves come from
``distrib_face.eval.plot_roc``; log them with ``Tracker.log_artifacts(paths, subdir="plots")``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from distrib_face.atomic import atomic_path

PathLike = str | os.PathLike[str]


def _save(figure: "Figure", path: PathLike) -> Path:  # noqa: F821 - matplotlib imported lazily
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    with atomic_path(out) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    return out


def plot_loss_curve(history: Mapping[str, Sequence[tuple[int, float]]], path: PathLike) -> Path:
    """Plot each metric's history against the step, one panel per metric, sharing the step axis.

    Args:
        history: ``{"loss": [(step, value), ...], "lr": [...]}`` (``distrib_face.parallel.metrics.MetricAggregator.history``).
        path: the PNG to write (folders are created).

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ValueError: when ``history`` holds no points at all.
    """
    from matplotlib.figure import Figure

    series = {key: points for key, points in history.items() if len(points) > 0}
    if not series:
        raise ValueError(f"nothing to plot for {path}: the history {list(history)} has no points")
    figure = Figure(figsize=(7, 2.4 * len(series) + 0.6))
    axes = figure.subplots(len(series), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (key, points) in zip(axes, sorted(series.items(), key=lambda item: (item[0] != "loss", item[0]))):
        steps, values = zip(*points)
        ax.plot(steps, values, marker="." if len(points) < 50 else None, linewidth=1.2)
        ax.set_ylabel(key)
        ax.grid(True, alpha=0.3)
        positive = np.asarray(values, dtype=np.float64)
        if key == "lr" and np.all(positive[np.isfinite(positive)] > 0) and positive.max() / positive.min() > 100:
            ax.set_yscale("log")
    axes[-1].set_xlabel("step")
    axes[0].set_title("training curves")
    figure.tight_layout()
    return _save(figure, path)


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
    counts = np.asarray(list(class_counts.values()) if isinstance(class_counts, Mapping) else list(class_counts))
    counts = counts.astype(np.int64)
    if counts.size == 0:
        raise ValueError("class_counts is empty")
    if np.any(counts < 0):
        raise ValueError(f"class_counts has negative entries, e.g. {counts[counts < 0][:3].tolist()}")
    counts = counts[counts > 0]
    top = int(counts.max()) if counts.size else 1
    edges = np.unique(np.floor(np.geomspace(1, top + 1, num_bins + 1)).astype(np.int64))
    if edges[-1] < top + 1:
        edges = np.append(edges, top + 1)
    hist, _ = np.histogram(counts, bins=edges)
    return edges, hist


def plot_class_histogram(class_counts: Iterable[int] | Mapping[object, int], path: PathLike) -> Path:
    """Plot how many identities have how many images, on log-log axes (a long tail shows as a slope).

    Args:
        class_counts: images of each identity (``Manifest.class_counts``).
        path: the PNG to write (folders are created).

    Returns:
        ``path`` as a ``Path``.
    """
    from matplotlib.figure import Figure

    edges, hist = class_size_histogram(class_counts)
    values = np.asarray(list(class_counts.values()) if isinstance(class_counts, Mapping) else list(class_counts))
    figure = Figure(figsize=(6, 4))
    ax = figure.subplots()
    nonzero = hist > 0
    widths = np.diff(edges)
    ax.bar(edges[:-1][nonzero], hist[nonzero], width=widths[nonzero], align="edge", edgecolor="black", linewidth=0.5)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("images per identity")
    ax.set_ylabel("identities")
    ax.set_title(
        f"{values.size} identities, {int(values.sum())} images "
        f"(min {int(values.min())}, median {float(np.median(values)):g}, max {int(values.max())})"
    )
    ax.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    return _save(figure, path)

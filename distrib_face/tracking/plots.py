"""PNG figures the trainer logs: the training curves, metric panels and the class-size figure.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no global backend switch), so they
work on headless workers and leave the caller's matplotlib state alone. The class-size figure lives in
:mod:`distrib_face.data.stats` (data may not import tracking; this module re-exports it). ROC curves come
from ``distrib_face.eval.plot_roc``; log them with ``Tracker.log_artifacts(paths, subdir="plots")``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from distrib_face.data.stats import class_size_histogram, plot_class_sizes

__all__ = ["class_size_histogram", "plot_class_histogram", "plot_class_sizes", "plot_training_curves",
           "training_curves_figure"]

PathLike = str | os.PathLike[str]


def plot_class_histogram(class_counts: Iterable[int] | Mapping[object, int], path: PathLike, title: str = "") -> Path:
    """The class-size figure of :func:`distrib_face.data.stats.plot_class_sizes` (one implementation for the
    trainer and ``distrib-face data stats``): log-binned histogram and rank-size curve, log-log axes.

    Returns:
        ``path`` as a ``Path``.
    """
    return plot_class_sizes(class_counts, path, title=title)


def plot_training_curves(
    loss_history: Sequence[Sequence[float]],
    path: PathLike,
    lr_history: Sequence[Sequence[float]] | Mapping[str, Sequence[Sequence[float]]] | None = None,
    eval_history: Sequence[Sequence[Any]] | None = None,
    title: str = "training",
) -> Path:
    """Write :func:`training_curves_figure` as a PNG at ``path`` (folders are created); returns ``path``."""
    from distrib_face.figures import save_png

    try:
        figure = training_curves_figure(loss_history, lr_history, eval_history, title)
    except ValueError as err:
        raise ValueError(f"nothing to plot for {path}: {err}") from None
    return save_png(figure, path)


def training_curves_figure(
    loss_history: Sequence[Sequence[float]],
    lr_history: Sequence[Sequence[float]] | Mapping[str, Sequence[Sequence[float]]] | None = None,
    eval_history: Sequence[Sequence[Any]] | None = None,
    title: str = "training",
) -> Any:
    """One figure of a training run over its steps: loss, learning rate, verification accuracy.

    Panels without data are left out; the panels share the step axis.

    Args:
        loss_history: ``[(step, loss), ...]`` (the trainer's ``loss_history``: the logged ``loss`` metric).
        lr_history: ``[(step, lr), ...]``, or ``{"backbone": [...], "classifier": [...]}`` for several.
        eval_history: ``[(step, {pair set: accuracy}), ...]`` (the trainer's ``eval_history``); accuracy in
            [0, 1], drawn in percent.
        title: the figure's title.

    Returns:
        A matplotlib ``Figure`` on an Agg canvas (7.5 inches wide, 2.3 inches per panel).

    Raises:
        ValueError: when no history holds a point.
    """
    from distrib_face.figures import new_figure, readable_log_axis

    lr_series = lr_history if isinstance(lr_history, Mapping) else ({"lr": lr_history} if lr_history else {})
    lr_series = {name: list(points) for name, points in lr_series.items() if points is not None and len(points)}
    accuracy: dict[str, list[tuple[int, float]]] = {}
    for step, per_set in eval_history or []:
        for name, value in dict(per_set).items():
            if value is not None and np.isfinite(value):
                accuracy.setdefault(str(name), []).append((int(step), 100.0 * float(value)))
    panels = [kind for kind, present in (("loss", len(loss_history) > 0), ("lr", bool(lr_series)),
                                         ("accuracy", bool(accuracy))) if present]
    if not panels:
        raise ValueError("the loss, learning-rate and verification histories are empty")
    figure = new_figure(7.5, 2.3 * len(panels) + 0.7)
    axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, kind in zip(axes, panels):
        if kind == "loss":
            steps, values = _columns(loss_history)
            ax.plot(steps, values, marker="." if len(steps) < 50 else None, linewidth=1.3)
            ax.set_ylabel("loss")
            finite = values[np.isfinite(values) & (values > 0)]
            if finite.size and finite.max() / finite.min() > 20:
                ax.set_yscale("log")
                readable_log_axis(ax.yaxis)
        elif kind == "lr":
            for name, points in lr_series.items():
                steps, values = _columns(points)
                ax.plot(steps, values, linewidth=1.3, label=name)
            ax.set_ylabel("learning rate")
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
            if len(lr_series) > 1:
                ax.legend(fontsize=8)
        else:
            for name, points in sorted(accuracy.items()):
                steps, values = _columns(points)
                ax.plot(steps, values, marker="o", markersize=4, linewidth=1.3, label=f"{name} ({values[-1]:.2f}%)")
            ax.set_ylabel("verification\naccuracy (%)")
            ax.legend(fontsize=8, loc="lower right")
        ax.grid(True, which="both", alpha=0.3)
    axes[-1].set_xlabel("step")
    axes[0].set_title(title)
    figure.tight_layout()
    return figure


def _columns(points: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    array = np.asarray([(float(p[0]), float(p[1])) for p in points], dtype=np.float64).reshape(-1, 2)
    return array[:, 0], array[:, 1]

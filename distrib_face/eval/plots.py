"""ROC and CMC figures written as PNG (matplotlib's Agg backend, no display needed)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping

import numpy as np

from distrib_face.eval.metrics import IdentificationResult, VerificationResult

logger = logging.getLogger(__name__)


def _figure():  # noqa: ANN202 - matplotlib types
    # a bare Figure renders through Agg without touching pyplot's global backend state
    from matplotlib.figure import Figure

    return Figure(figsize=(6, 4.5), dpi=120)


def _thin(fpr: np.ndarray, tpr: np.ndarray, max_points: int = 4000) -> tuple[np.ndarray, np.ndarray]:
    """At most ~``max_points`` ROC points, log-spaced in FAR, each the highest TAR at or below its FAR.

    IJB-C's 15.6M pairs give millions of ROC points; a log-axis plot needs only a few thousand.
    """
    if fpr.size <= max_points:
        return fpr, tpr
    positive = fpr[fpr > 0]
    grid = np.geomspace(positive.min(), 1.0, max_points)
    idx = np.unique(np.searchsorted(fpr, grid, side="right") - 1)  # last point with fpr <= grid value
    return fpr[idx], tpr[idx]


def plot_roc(results: Mapping[str, VerificationResult], path: str | os.PathLike, title: str = "ROC") -> Path:
    """Draw the ROC curves of several pair sets (TAR against FAR, FAR on a log axis) into one PNG.

    Points with FAR = 0 cannot sit on a log axis: the axis starts at the smallest measurable FAR
    (1 / number of impostor pairs) of the largest set.

    Args:
        results: ``{label: result}``.
        path: the PNG to write (folders are created).
        title: the figure title.

    Returns:
        ``path``.
    """
    if not results:
        raise ValueError("plot_roc needs at least one result")
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    min_far = 1.0
    for label, result in results.items():
        fpr, tpr = _thin(result.roc.fpr, result.roc.tpr)
        keep = fpr > 0
        min_far = min(min_far, 1.0 / max(result.num_impostor, 1))
        ax.plot(fpr[keep], tpr[keep], label=f"{label} (AUC {result.auc:.4f}, EER {result.eer:.2%})", linewidth=1.4)
    ax.set_xscale("log")
    ax.set_xlim(min_far, 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("false accept rate (FAR)")
    ax.set_ylabel("true accept rate (TAR)")
    ax.set_title(title)
    ax.grid(True, which="both", linestyle=":", linewidth=0.5)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    logger.info("wrote ROC plot %s", path)
    return path


def plot_cmc(results: Mapping[str, IdentificationResult], path: str | os.PathLike, max_rank: int = 20) -> Path:
    """Draw CMC curves (identification rate against rank, up to ``max_rank``) into one PNG."""
    if not results:
        raise ValueError("plot_cmc needs at least one result")
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    for label, result in results.items():
        cmc = result.cmc[:max_rank]
        ax.plot(np.arange(1, cmc.size + 1), cmc, marker="o", markersize=3, label=f"{label} (rank-1 {result.rank1:.2%})")
    ax.set_xlabel("rank")
    ax.set_ylabel("identification rate")
    ax.set_title("CMC")
    ax.grid(True, linestyle=":", linewidth=0.5)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path

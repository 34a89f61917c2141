"""Verification and identification metrics on embeddings: pure numpy, no model, no I/O.

Scores are cosine similarities of L2-normalised embeddings; a pair is accepted ("same identity")
when its score is at least the threshold. Every curve is computed exactly from the sorted scores
(no threshold grid), so the numbers match scikit-learn's ``roc_curve`` / ``roc_auc_score``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_FAR_TARGETS: tuple[float, ...] = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
NORM_PERCENTILES: tuple[int, ...] = (1, 5, 25, 50, 75, 95, 99)

# Notes already logged at INFO by this process: a trainer verifying every N steps would otherwise repeat the
# same "TAR@FAR not measurable" line at each evaluation. Later copies go to DEBUG; results keep their notes.
_logged_notes: set[str] = set()


def _log_note_once(message: str) -> None:
    if message in _logged_notes:
        logger.debug("%s", message)
        return
    _logged_notes.add(message)
    logger.info("%s", message)


@dataclass
class RocCurve:
    """An exact ROC curve: point ``i`` accepts every pair whose score is ``>= thresholds[i]``.

    ``thresholds`` decrease; the first point is ``(0, 0)`` with threshold ``+inf``, the last accepts everything.
    """

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray
    num_genuine: int
    num_impostor: int


@dataclass
class VerificationResult:
    """1:1 verification metrics for one pair set.

    Attributes:
        accuracy: mean k-fold accuracy, each fold's threshold chosen on the other folds.
        accuracy_std: standard deviation of the fold accuracies (population std, as the LFW protocol reports).
        threshold: mean of the per-fold thresholds (a cosine similarity).
        fold_accuracies: accuracy on each test fold.
        fold_thresholds: threshold chosen for each test fold on its training folds.
        tar_at_far: ``{far: tar}``; ``None`` when the set has fewer than ``1 / far`` impostor pairs.
        auc: area under the ROC curve.
        eer: equal error rate (FAR = FRR), linearly interpolated on the ROC curve.
        eer_threshold: score threshold at the EER (interpolated).
        roc: the exact ROC curve.
        num_pairs: pairs evaluated; ``num_genuine`` / ``num_impostor`` of each kind.
        norm_stats: statistics of the raw embedding norms (see :func:`feature_norm_stats`), when known.
        notes: human-readable caveats (e.g. a FAR the set is too small to measure).
        name: the pair set's name.
        class_sizes: the split by the identities' training-image counts
            (:class:`~distrib_face.eval.buckets.ClassSizeResult`) when those counts are known, else None.
    """

    accuracy: float
    accuracy_std: float
    threshold: float
    fold_accuracies: list[float]
    fold_thresholds: list[float]
    tar_at_far: dict[float, float | None]
    auc: float
    eer: float
    eer_threshold: float
    roc: RocCurve
    num_pairs: int
    num_genuine: int
    num_impostor: int
    norm_stats: dict[str, float] | None = None
    notes: list[str] = field(default_factory=list)
    name: str = ""
    class_sizes: Any = None

    @property
    def fpr(self) -> np.ndarray:
        """False accept rates of the ROC curve."""
        return self.roc.fpr

    @property
    def tpr(self) -> np.ndarray:
        """True accept rates of the ROC curve."""
        return self.roc.tpr

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (the ROC arrays are left out)."""
        return {
            "name": self.name,
            "accuracy": self.accuracy,
            "accuracy_std": self.accuracy_std,
            "threshold": self.threshold,
            "fold_accuracies": list(self.fold_accuracies),
            "fold_thresholds": list(self.fold_thresholds),
            "tar_at_far": {f"{far:.0e}": tar for far, tar in self.tar_at_far.items()},
            "auc": self.auc,
            "eer": self.eer,
            "eer_threshold": self.eer_threshold,
            "num_pairs": self.num_pairs,
            "num_genuine": self.num_genuine,
            "num_impostor": self.num_impostor,
            "norm_stats": self.norm_stats,
            "notes": list(self.notes),
            "class_sizes": self.class_sizes.to_dict() if self.class_sizes is not None else None,
        }


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows of ``x`` divided by their L2 norm (float64)."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def cosine_scores(emb1: np.ndarray, emb2: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row pair ``(emb1[k], emb2[k])``: float64 [N]."""
    emb1, emb2 = np.asarray(emb1), np.asarray(emb2)
    if emb1.ndim != 2 or emb1.shape != emb2.shape:
        raise ValueError(f"embedding shapes must be equal [N, D]: got {emb1.shape} and {emb2.shape}")
    return np.einsum("nd,nd->n", l2_normalize(emb1), l2_normalize(emb2))


def _check_scores(scores: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    issame = np.asarray(issame).reshape(-1)
    if issame.dtype != bool:
        if not np.isin(issame, (0, 1)).all():
            raise ValueError(f"issame must be boolean (or 0/1): got values {np.unique(issame)[:5]}")
        issame = issame.astype(bool)
    if scores.shape != issame.shape:
        raise ValueError(f"{scores.shape[0]} scores for {issame.shape[0]} labels")
    if not np.isfinite(scores).all():
        raise ValueError(f"{int((~np.isfinite(scores)).sum())} scores are not finite (NaN/inf embeddings?)")
    return scores, issame


def roc_curve(scores: np.ndarray, issame: np.ndarray) -> RocCurve:
    """Exact ROC curve over every distinct score (``drop_intermediate=False`` in scikit-learn's terms).

    Args:
        scores: similarity per pair, higher means more alike.
        issame: truth per pair.

    Returns:
        The curve; needs at least one genuine and one impostor pair.
    """
    scores, issame = _check_scores(scores, issame)
    num_genuine, num_impostor = int(issame.sum()), int((~issame).sum())
    if num_genuine == 0 or num_impostor == 0:
        raise ValueError(f"ROC needs both kinds of pairs: {num_genuine} genuine, {num_impostor} impostor")
    order = np.argsort(-scores)
    sorted_scores, sorted_same = scores[order], issame[order]
    # the last index of each run of equal scores: accepting ">= that score" takes the whole run
    distinct_end = np.r_[np.nonzero(np.diff(sorted_scores))[0], sorted_scores.size - 1]
    true_accepts = np.cumsum(sorted_same)[distinct_end]
    false_accepts = (distinct_end + 1) - true_accepts
    fpr = np.r_[0.0, false_accepts / num_impostor]
    tpr = np.r_[0.0, true_accepts / num_genuine]
    thresholds = np.r_[np.inf, sorted_scores[distinct_end]]
    return RocCurve(fpr=fpr, tpr=tpr, thresholds=thresholds, num_genuine=num_genuine, num_impostor=num_impostor)


def roc_auc(roc: RocCurve) -> float:
    """Area under an ROC curve by the trapezoidal rule (ties count half, as in ``roc_auc_score``)."""
    return float(np.trapezoid(roc.tpr, roc.fpr))


def equal_error_rate(roc: RocCurve) -> tuple[float, float]:
    """The equal error rate, where the false accept rate equals the false reject rate.

    The crossing of FPR and FNR = 1 - TPR is interpolated linearly between the two ROC points that
    bracket it; the threshold is interpolated the same way (finite end points only).

    Returns:
        ``(eer, threshold)``.
    """
    fnr = 1.0 - roc.tpr
    diff = fnr - roc.fpr  # starts at 1 (accept nothing), ends at -1 (accept everything): decreasing
    idx = int(np.nonzero(diff <= 0)[0][0])
    if diff[idx] == 0:  # idx >= 1 because diff[0] == 1, so the threshold is finite
        return float(roc.fpr[idx]), float(roc.thresholds[idx])
    lo = idx - 1
    weight = diff[lo] / (diff[lo] - diff[idx])  # in (0, 1]
    eer = roc.fpr[lo] + weight * (roc.fpr[idx] - roc.fpr[lo])
    t_lo = roc.thresholds[lo] if np.isfinite(roc.thresholds[lo]) else roc.thresholds[idx]
    threshold = t_lo + weight * (roc.thresholds[idx] - t_lo)
    return float(eer), float(threshold)


def tar_at_far(
    scores: np.ndarray, issame: np.ndarray, far_targets: Sequence[float] = DEFAULT_FAR_TARGETS
) -> tuple[dict[float, float | None], list[str]]:
    """True accept rate at each target false accept rate.

    For a target ``far`` the threshold is the lowest one that accepts at most ``floor(far * N_impostor)``
    impostor pairs; the TAR is the fraction of genuine pairs it accepts (the highest TPR of the ROC with
    FPR <= far). A FAR below ``1 / N_impostor`` cannot be measured: it is reported as ``None`` with a note.

    Returns:
        ``({far: tar or None}, notes)``.
    """
    scores, issame = _check_scores(scores, issame)
    genuine = np.sort(scores[issame])
    impostor = np.sort(scores[~issame])[::-1]  # descending
    result: dict[float, float | None] = {}
    unmeasurable: list[float] = []
    for far in far_targets:
        far = float(far)
        if not 0.0 < far <= 1.0:
            raise ValueError(f"FAR target must be in (0, 1]: got {far}")
        allowed = math.floor(far * impostor.size + 1e-9)
        if allowed < 1:
            result[far] = None
            unmeasurable.append(far)
            continue
        if allowed >= impostor.size:
            result[far] = 1.0
            continue
        # accept scores strictly above the (allowed+1)-th highest impostor score
        cut = impostor[allowed]
        accepted = genuine.size - int(np.searchsorted(genuine, cut, side="right"))
        result[far] = accepted / genuine.size if genuine.size else float("nan")
    notes = []
    if unmeasurable:
        notes.append(
            f"TAR@FAR={', '.join(f'{far:.0e}' for far in unmeasurable)} not measurable (reported as None): "
            f"{impostor.size} impostor pairs, a FAR f needs >= 1/f of them"
        )
    return result, notes


def _best_threshold(sorted_scores: np.ndarray, sorted_same: np.ndarray) -> float:
    """Threshold maximising accuracy of ``score >= t`` on pairs sorted by ascending score.

    Candidates are midpoints between consecutive distinct scores plus one below the minimum and one above
    the maximum; among equally accurate ones the lowest is taken. O(n): accepting from sorted position
    ``i`` on gets the genuine pairs at ``i..n-1`` right and the impostor pairs at ``0..i-1``.
    """
    n = sorted_scores.size
    genuine_before = np.r_[0, np.cumsum(sorted_same)]  # [n + 1]: genuine pairs among the first i
    impostor_before = np.arange(n + 1) - genuine_before
    cut = np.r_[0, np.nonzero(np.diff(sorted_scores))[0] + 1, n]  # positions between distinct scores
    correct = (genuine_before[-1] - genuine_before[cut]) + impostor_before[cut]
    i = int(cut[int(np.argmax(correct))])
    if i == 0:
        return float(sorted_scores[0] - 1.0)
    if i == n:
        return float(sorted_scores[-1] + 1.0)
    return float((sorted_scores[i - 1] + sorted_scores[i]) / 2.0)


def _accuracy(scores: np.ndarray, issame: np.ndarray, threshold: float) -> float:
    return float(np.mean((scores >= threshold) == issame))


def kfold_accuracy(
    scores: np.ndarray, issame: np.ndarray, nfolds: int = 10, folds: np.ndarray | None = None
) -> tuple[list[float], list[float]]:
    """LFW-protocol accuracy: for each fold, the best threshold on the other folds, measured on this one.

    Args:
        scores: similarity per pair.
        issame: truth per pair.
        nfolds: number of contiguous folds (sizes as ``np.array_split`` / scikit-learn's unshuffled ``KFold``)
            when ``folds`` is not given.
        folds: fold id per pair (e.g. ``PairSet.folds``); overrides ``nfolds``.

    Returns:
        ``(fold_accuracies, fold_thresholds)``.
    """
    scores, issame = _check_scores(scores, issame)
    n = scores.size
    if folds is None:
        if not 2 <= nfolds <= n:
            raise ValueError(f"nfolds must be in [2, {n}] for {n} pairs: got {nfolds}")
        folds = np.concatenate([np.full(len(part), i) for i, part in enumerate(np.array_split(np.arange(n), nfolds))])
    folds = np.asarray(folds).reshape(-1)
    if folds.shape != scores.shape:
        raise ValueError(f"folds has {folds.size} entries for {n} pairs")
    fold_ids = np.unique(folds)
    if fold_ids.size < 2:
        raise ValueError(f"k-fold accuracy needs at least 2 folds: got fold ids {fold_ids.tolist()}")
    # one sort for all folds: dropping a fold from the sorted arrays keeps the rest sorted
    order = np.argsort(scores)
    sorted_scores, sorted_same, sorted_folds = scores[order], issame[order], folds[order]
    accuracies, thresholds = [], []
    for fold in fold_ids:
        train = sorted_folds != fold
        threshold = _best_threshold(sorted_scores[train], sorted_same[train])
        thresholds.append(threshold)
        test = folds == fold
        accuracies.append(_accuracy(scores[test], issame[test], threshold))
    return accuracies, thresholds


def verification_metrics(
    emb1: np.ndarray,
    emb2: np.ndarray,
    issame: np.ndarray,
    nfolds: int = 10,
    far_targets: Sequence[float] = DEFAULT_FAR_TARGETS,
    folds: np.ndarray | None = None,
    name: str = "",
) -> VerificationResult:
    """All 1:1 verification metrics for embeddings of pairs ``(emb1[k], emb2[k])``.

    Args:
        emb1: [N, D] embeddings of the first image of each pair (any norm; cosine similarity is used).
        emb2: [N, D] embeddings of the second image.
        issame: [N] truth.
        nfolds: folds of the accuracy protocol (ignored when ``folds`` is given).
        far_targets: FARs at which the TAR is reported.
        folds: fold id per pair, e.g. ``PairSet.folds``.
        name: the pair set's name, for the result and log messages.

    Returns:
        The :class:`VerificationResult` (``norm_stats`` from the raw embeddings of both sides).
    """
    scores = cosine_scores(emb1, emb2)
    result = verification_metrics_from_scores(
        scores, issame, nfolds=nfolds, far_targets=far_targets, folds=folds, name=name
    )
    result.norm_stats = feature_norm_stats(np.concatenate([np.asarray(emb1), np.asarray(emb2)]))
    return result


def verification_metrics_from_scores(
    scores: np.ndarray,
    issame: np.ndarray,
    nfolds: int = 10,
    far_targets: Sequence[float] = DEFAULT_FAR_TARGETS,
    folds: np.ndarray | None = None,
    name: str = "",
) -> VerificationResult:
    """Like :func:`verification_metrics`, from precomputed similarity scores (higher = more alike)."""
    scores, issame = _check_scores(scores, issame)
    fold_acc, fold_thr = kfold_accuracy(scores, issame, nfolds=nfolds, folds=folds)
    roc = roc_curve(scores, issame)
    tars, notes = tar_at_far(scores, issame, far_targets)
    for note in notes:
        _log_note_once(f"{name}: {note}" if name else note)
    eer, eer_threshold = equal_error_rate(roc)
    return VerificationResult(
        accuracy=float(np.mean(fold_acc)),
        accuracy_std=float(np.std(fold_acc)),
        threshold=float(np.mean(fold_thr)),
        fold_accuracies=fold_acc,
        fold_thresholds=fold_thr,
        tar_at_far=tars,
        auc=roc_auc(roc),
        eer=eer,
        eer_threshold=eer_threshold,
        roc=roc,
        num_pairs=int(scores.size),
        num_genuine=roc.num_genuine,
        num_impostor=roc.num_impostor,
        notes=notes,
        name=name,
    )


def feature_norm_stats(embeddings: np.ndarray) -> dict[str, float]:
    """Statistics of the L2 norms of raw (unnormalised) embeddings, a rough image-quality signal.

    Returns:
        ``count``, ``mean``, ``std``, ``min``, ``max`` and percentiles ``p1`` ... ``p99``.
    """
    embeddings = np.asarray(embeddings, dtype=np.float64)
    if embeddings.ndim != 2 or embeddings.shape[0] == 0:
        raise ValueError(f"embeddings must be a non-empty [N, D] array: got shape {embeddings.shape}")
    norms = np.linalg.norm(embeddings, axis=1)
    stats = {
        "count": float(norms.size),
        "mean": float(norms.mean()),
        "std": float(norms.std()),
        "min": float(norms.min()),
        "max": float(norms.max()),
    }
    for p, value in zip(NORM_PERCENTILES, np.percentile(norms, NORM_PERCENTILES)):
        stats[f"p{p}"] = float(value)
    return stats


@dataclass
class IdentificationResult:
    """Closed-set 1:N identification.

    Attributes:
        cmc: ``cmc[k]`` is the fraction of probes whose identity is among the ``k + 1`` best-scored
            gallery identities (length = number of gallery identities).
        rank1: ``cmc[0]``.
        rank5: ``cmc[4]`` (1.0 when the gallery has fewer than 5 identities).
        num_probes: probes evaluated (those whose identity is in the gallery).
        num_skipped: probes left out because their identity has no gallery image.
    """

    cmc: np.ndarray
    rank1: float
    rank5: float
    num_probes: int
    num_skipped: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (CMC up to rank 20)."""
        return {
            "rank1": self.rank1,
            "rank5": self.rank5,
            "cmc": self.cmc[:20].tolist(),
            "num_probes": self.num_probes,
            "num_skipped": self.num_skipped,
        }


def identification_metrics(
    gallery: np.ndarray,
    gallery_labels: np.ndarray,
    probe: np.ndarray,
    probe_labels: np.ndarray,
    chunk_size: int = 4096,
) -> IdentificationResult:
    """Rank-1, rank-5 and the CMC curve of probes against a gallery.

    Each gallery identity is scored by its best-matching gallery image (max cosine similarity). A probe's
    rank is 1 + the number of *other* identities scoring at least as high as its own (ties count against
    it). Probes whose identity is absent from the gallery are skipped and counted.

    Args:
        gallery: [G, D] gallery embeddings.
        gallery_labels: [G] identity of each gallery embedding.
        probe: [P, D] probe embeddings.
        probe_labels: [P] identity of each probe.
        chunk_size: probes scored at a time (memory is ``chunk_size x G`` floats).
    """
    gallery_labels = np.asarray(gallery_labels).reshape(-1)
    probe_labels = np.asarray(probe_labels).reshape(-1)
    if len(gallery_labels) != len(gallery) or len(probe_labels) != len(probe):
        raise ValueError(
            f"labels do not match embeddings: gallery {len(gallery)} vs {len(gallery_labels)}, "
            f"probe {len(probe)} vs {len(probe_labels)}"
        )
    identities, gallery_index = np.unique(gallery_labels, return_inverse=True)
    # gallery sorted by identity, so each identity's best score is one maximum.reduceat over its run
    gallery_order = np.argsort(gallery_index, kind="stable")
    run_starts = np.r_[0, np.nonzero(np.diff(gallery_index[gallery_order]))[0] + 1]
    known = np.isin(probe_labels, identities)
    num_skipped = int((~known).sum())
    if num_skipped:
        logger.warning("%d probes have no gallery identity and are skipped", num_skipped)
    probe_n = l2_normalize(np.asarray(probe)[known])
    target = np.searchsorted(identities, probe_labels[known])
    gallery_n = l2_normalize(np.asarray(gallery)[gallery_order])
    if probe_n.shape[0] == 0:
        raise ValueError("no probe has an identity present in the gallery")
    ranks = np.empty(probe_n.shape[0], dtype=np.int64)
    for start in range(0, probe_n.shape[0], chunk_size):
        sims = probe_n[start:start + chunk_size] @ gallery_n.T  # [P_chunk, G]
        per_identity = np.maximum.reduceat(sims, run_starts, axis=1)  # [P_chunk, num_identities]
        own = per_identity[np.arange(sims.shape[0]), target[start:start + chunk_size]]
        ranks[start:start + chunk_size] = (per_identity >= own[:, None]).sum(axis=1)  # includes itself
    cmc = np.array([(ranks <= k).mean() for k in range(1, identities.size + 1)])
    return IdentificationResult(
        cmc=cmc,
        rank1=float(cmc[0]),
        rank5=float(cmc[min(4, cmc.size - 1)]),
        num_probes=int(probe_n.shape[0]),
        num_skipped=num_skipped,
    )

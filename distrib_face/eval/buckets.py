"""Verification accuracy by class size: did the tail of a long-tailed training set learn anything?

Each pair is put in the bucket of its *rarer* identity, by the number of training images that identity had
(``min`` of the two images' counts; a genuine pair has one identity, so this is its count):

- ``head``: count ``>= edges[1]`` (default 100);
- ``torso``: ``edges[0] <= count < edges[1]`` (default 10 .. 99);
- ``tail``: ``1 <= count < edges[0]`` (default 1 .. 9);
- ``unseen``: count 0 (an identity that was not in training, e.g. every pair of a disjoint held-out set).

Pairs with an image of unknown identity (count ``-1``) are in no bucket (counted as ``num_unknown``).

One operating point for every bucket: the threshold of each test fold is the one the 10-fold protocol
chooses on the other folds over *all* pairs (exactly :func:`~distrib_face.eval.metrics.kfold_accuracy`'s),
and a bucket's accuracy is the fraction of its pairs that their fold's threshold gets right. TAR@FAR uses the
threshold that gives FAR ``f`` over all impostor pairs; each bucket reports the TAR of its genuine pairs and
the FAR of its own impostor pairs at that threshold. A deployed system has one threshold, so a bucket
whose scores sit lower shows up as lower accuracy instead of being hidden by a threshold of its own.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from distrib_face.eval.metrics import DEFAULT_FAR_TARGETS, _check_scores, kfold_accuracy

DEFAULT_EDGES: tuple[int, int] = (10, 100)
BUCKETS: tuple[str, ...] = ("head", "torso", "tail", "unseen")


def _check_edges(edges: Sequence[int]) -> tuple[int, int]:
    if len(edges) != 2 or not 1 <= int(edges[0]) < int(edges[1]):
        raise ValueError(f"class-size bucket edges must be two integers 1 <= tail_below < head_from, got {list(edges)}")
    return int(edges[0]), int(edges[1])


def bucket_ranges(edges: Sequence[int] = DEFAULT_EDGES) -> dict[str, tuple[int, float]]:
    """``{bucket: (lowest count, highest count)}`` of each bucket (``inf`` for the head)."""
    low, high = _check_edges(edges)
    return {"head": (high, math.inf), "torso": (low, high - 1), "tail": (1, low - 1), "unseen": (0, 0)}


def tercile_edges(class_counts: Sequence[int]) -> tuple[int, int]:
    """Edges splitting training identities into thirds by image count (for sets whose counts are not
    spread around 10 and 100; fixed edges are the default because they compare across data sets)."""
    counts = np.asarray([c for c in class_counts if c > 0], dtype=np.float64)
    if counts.size < 3:
        raise ValueError(f"terciles need at least 3 training identities with images, got {counts.size}")
    low, high = (int(math.ceil(v)) for v in np.quantile(counts, [1 / 3, 2 / 3]))
    low = max(low, 1)
    return low, max(high, low + 1)


def load_class_counts(path: str | os.PathLike) -> tuple[Mapping[str, int], tuple[int, int]]:
    """Training-image counts per identity name, and the bucket edges.

    Accepted:

    - a JSON object ``{identity name: count}``;
    - a JSON object ``{"counts": {identity name: count}, "edges": [tail_below, head_from]}``;
    - a shard folder or its ``manifest.json`` (the training set itself): ``label_map`` names with
      ``class_counts``; without a label map the labels (as strings) are the names.

    Raises:
        ValueError / FileNotFoundError: the message names the file and what is wrong with it.
    """
    path = Path(path)
    if path.is_dir() or path.name == "manifest.json":
        from distrib_face.data.manifest import read_manifest

        return read_manifest(path).counts_by_name(), DEFAULT_EDGES
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{path}: no such class-counts file") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: class counts must be JSON ({{name: count}}) or a shard manifest: {err}") from err
    edges: Sequence[int] = DEFAULT_EDGES
    if isinstance(raw, dict) and "counts" in raw and isinstance(raw["counts"], dict):
        edges = raw.get("edges", DEFAULT_EDGES)
        if not isinstance(edges, list) or not all(isinstance(e, int) for e in edges):
            raise ValueError(f"{path}: 'edges' must be a list of two integers, got {edges!r}")
        raw = raw["counts"]
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{path}: expected a non-empty JSON object {{identity name: training image count}}")
    counts = {}
    for name, count in raw.items():
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ValueError(f"{path}: count of {name!r} must be an integer >= 0, got {count!r}")
        counts[str(name)] = count
    try:
        return counts, _check_edges(edges)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


def image_counts_of(identities: Sequence[str] | None, image_counts: np.ndarray | None,
                    class_counts: Mapping[str, int] | None) -> np.ndarray | None:
    """Per-image training counts: a pair set's own ``image_counts``, else looked up by identity name.

    An identity missing from ``class_counts`` had no training images (0); an image with no identity name is
    unknown (-1). ``class_counts`` wins over the pair set's own counts when both are given.

    Returns:
        int64 [num_images], or ``None`` when neither source of counts applies.
    """
    if class_counts is not None and identities is not None:
        return np.array([class_counts.get(name, 0) if name else -1 for name in identities], dtype=np.int64)
    if image_counts is not None:
        return np.asarray(image_counts, dtype=np.int64).reshape(-1)
    return None


@dataclass
class BucketResult:
    """Verification numbers of one class-size bucket.

    Attributes:
        name: ``head``, ``torso``, ``tail`` or ``unseen``.
        count_range: ``(lowest, highest)`` training-image count of the bucket's rarer identities.
        num_pairs / num_genuine / num_impostor: pairs in the bucket.
        accuracy: fraction right at each pair's fold threshold (``nan`` for an empty bucket).
        tar_at_far: ``{far: TAR of the bucket's genuine pairs}`` at the all-pairs FAR-``far`` threshold
            (``None``: not measurable over all pairs, or no genuine pair here).
        far_at_far: ``{far: FAR of the bucket's impostor pairs}`` at that threshold (``None`` likewise).
    """

    name: str
    count_range: tuple[int, float]
    num_pairs: int
    num_genuine: int
    num_impostor: int
    accuracy: float
    tar_at_far: dict[float, float | None]
    far_at_far: dict[float, float | None]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        low, high = self.count_range
        return {
            "count_range": [low, None if math.isinf(high) else int(high)],
            "num_pairs": self.num_pairs,
            "num_genuine": self.num_genuine,
            "num_impostor": self.num_impostor,
            "accuracy": None if math.isnan(self.accuracy) else self.accuracy,
            "tar_at_far": {f"{f:.0e}": v for f, v in self.tar_at_far.items()},
            "far_at_far": {f"{f:.0e}": v for f, v in self.far_at_far.items()},
        }


@dataclass
class ClassSizeResult:
    """Verification split by class size (see the module docstring).

    Attributes:
        buckets: ``{bucket name: BucketResult}`` in :data:`BUCKETS` order (empty buckets included).
        edges: ``(tail_below, head_from)``.
        num_unknown: pairs with an image of unknown identity (in no bucket).
        fold_thresholds: the all-pairs threshold of each fold.
        name: the pair set's name.
    """

    buckets: dict[str, BucketResult]
    edges: tuple[int, int]
    num_unknown: int
    fold_thresholds: list[float]
    name: str = ""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"edges": list(self.edges), "num_unknown": self.num_unknown,
                "buckets": {name: b.to_dict() for name, b in self.buckets.items()}, "notes": list(self.notes)}

    def summarize(self, prefix: str = "verify") -> dict[str, float]:
        """Flat metrics for a tracker: ``{prefix}/{set}/{bucket}/accuracy``, ``.../num_pairs``,
        ``.../tar_at_far_{f}`` for non-empty buckets and measurable values."""
        out: dict[str, float] = {}
        base = f"{prefix}/{self.name}" if self.name else prefix
        for name, b in self.buckets.items():
            if not b.num_pairs:
                continue
            out[f"{base}/{name}/accuracy"] = b.accuracy
            out[f"{base}/{name}/num_pairs"] = float(b.num_pairs)
            for far, tar in b.tar_at_far.items():
                if tar is not None:
                    out[f"{base}/{name}/tar_at_far_{far:.0e}"] = tar
        return out


def _fold_ids(n: int, nfolds: int, folds: np.ndarray | None) -> np.ndarray:
    # the same folds kfold_accuracy builds (np.array_split sizes) when none are given
    if folds is not None:
        return np.asarray(folds).reshape(-1)
    return np.concatenate([np.full(len(part), i) for i, part in enumerate(np.array_split(np.arange(n), nfolds))])


def far_thresholds(scores: np.ndarray, issame: np.ndarray, far_targets: Sequence[float]) -> dict[float, float | None]:
    """``{far: cut}``: accepting ``score > cut`` passes at most ``floor(far * N_impostor)`` impostors (the rule
    of :func:`~distrib_face.eval.metrics.tar_at_far`); ``-inf`` accepts all, ``None`` is not measurable."""
    impostor = np.sort(scores[~issame])[::-1]
    cuts: dict[float, float | None] = {}
    for far in far_targets:
        allowed = math.floor(float(far) * impostor.size + 1e-9)
        if allowed < 1:
            cuts[float(far)] = None
        else:
            cuts[float(far)] = -math.inf if allowed >= impostor.size else float(impostor[allowed])
    return cuts


def accuracy_by_class_size(
    scores: np.ndarray,
    issame: np.ndarray,
    image_counts: np.ndarray,
    *,
    folds: np.ndarray | None = None,
    nfolds: int = 10,
    edges: Sequence[int] = DEFAULT_EDGES,
    far_targets: Sequence[float] = DEFAULT_FAR_TARGETS,
    name: str = "",
) -> ClassSizeResult:
    """Verification accuracy, TAR@FAR and pair counts per class-size bucket.

    Args:
        scores: [N] similarity of each pair (e.g. ``cosine_scores(emb[0::2], emb[1::2])``).
        issame: [N] truth.
        image_counts: [2N] training images of each image's identity (images ``2k``, ``2k + 1`` are pair ``k``;
            ``0``: not in training, ``-1``: unknown), or [N, 2].
        folds: fold id per pair (a pair set's own folds), else ``nfolds`` contiguous folds, as
            :func:`~distrib_face.eval.metrics.verification_metrics` uses.
        nfolds: folds when ``folds`` is None.
        edges: ``(tail_below, head_from)``.
        far_targets: FARs of the TAR.
        name: the pair set's name.
    """
    scores, issame = _check_scores(scores, issame)
    counts = np.asarray(image_counts, dtype=np.int64).reshape(-1)
    if counts.size != 2 * scores.size:
        raise ValueError(f"{counts.size} image counts for {scores.size} pairs (need 2 per pair)")
    counts = counts.reshape(-1, 2)  # [N, 2]: the pair's two images
    ranges = bucket_ranges(edges)
    low, high = _check_edges(edges)
    pair_count = np.where((counts < 0).any(axis=1), -1, counts.min(axis=1))  # the rarer identity's count
    fold_accs, fold_thresholds = kfold_accuracy(scores, issame, nfolds=nfolds, folds=folds)
    fold_of = _fold_ids(scores.size, nfolds, folds)
    threshold_of = dict(zip(np.unique(fold_of).tolist(), fold_thresholds))
    correct = (scores >= np.array([threshold_of[f] for f in fold_of.tolist()])) == issame
    cuts = far_thresholds(scores, issame, far_targets)
    members = {
        "head": pair_count >= high,
        "torso": (pair_count >= low) & (pair_count < high),
        "tail": (pair_count >= 1) & (pair_count < low),
        "unseen": pair_count == 0,
    }
    buckets = {}
    for bucket in BUCKETS:
        inside = members[bucket]
        genuine, impostor = inside & issame, inside & ~issame
        tar: dict[float, float | None] = {}
        far: dict[float, float | None] = {}
        for target, cut in cuts.items():
            accept = scores > cut if cut is not None else None
            tar[target] = None if accept is None or not genuine.any() else float(accept[genuine].mean())
            far[target] = None if accept is None or not impostor.any() else float(accept[impostor].mean())
        buckets[bucket] = BucketResult(
            name=bucket, count_range=ranges[bucket], num_pairs=int(inside.sum()), num_genuine=int(genuine.sum()),
            num_impostor=int(impostor.sum()), accuracy=float(correct[inside].mean()) if inside.any() else math.nan,
            tar_at_far=tar, far_at_far=far,
        )
    notes = []
    num_unknown = int((pair_count < 0).sum())
    if num_unknown:
        notes.append(f"{num_unknown} pairs have an image of unknown identity and are in no bucket")
    if any(v is None for v in cuts.values()):
        num_impostor = int((~issame).sum())
        notes.append(f"TAR@FAR < 1/{num_impostor} is not measurable with {num_impostor} impostor pairs (None)")
    return ClassSizeResult(buckets=buckets, edges=(low, high), num_unknown=num_unknown,
                           fold_thresholds=list(fold_thresholds), name=name, notes=notes)


def format_class_size_table(result: ClassSizeResult, far_targets: Sequence[float] = (1e-1, 1e-2)) -> str:
    """One text table: per bucket its count range, pairs (genuine / impostor), accuracy and TAR@FAR."""
    header = ["bucket", "train imgs", "pairs (gen/imp)", "acc %", *[f"TAR@{f:.0e}" for f in far_targets]]
    rows = []
    for b in result.buckets.values():
        low, high = b.count_range
        span = f">= {low}" if math.isinf(high) else (f"{low}" if low == high else f"{low}-{int(high)}")
        cells = [b.name, span, f"{b.num_pairs} ({b.num_genuine}/{b.num_impostor})",
                 "-" if math.isnan(b.accuracy) else f"{100 * b.accuracy:.2f}"]
        for far in far_targets:
            value = b.tar_at_far.get(float(far))
            cells.append("-" if value is None else f"{100 * value:.2f}")
        rows.append(cells)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    title = f"accuracy by class size ({result.name}): pair bucket = its rarer identity's training images"
    return "\n".join([title, *lines, *[f"note: {n}" for n in result.notes]])


def class_size_for_pairset(
    pairset: Any,
    embeddings: np.ndarray,
    class_counts: Mapping[str, int] | None = None,
    *,
    edges: Sequence[int] = DEFAULT_EDGES,
    nfolds: int = 10,
    far_targets: Sequence[float] = DEFAULT_FAR_TARGETS,
) -> ClassSizeResult | None:
    """The class-size split of a pair set from its embeddings (what the trainer's verification calls).

    Args:
        pairset: a :class:`~distrib_face.data.pairset.PairSet`.
        embeddings: [2N, D] embeddings of ``pairset.images`` in order (any norm).
        class_counts: ``{identity name: training images}`` (the training manifest's, for a trainer); without
            it the pair set's own ``image_counts`` are used.
        edges / nfolds / far_targets: as :func:`accuracy_by_class_size` (the folds are the set's own when it
            has them, as ``verification_metrics`` uses).

    Returns:
        The split, or ``None`` when the set has neither identity names (with ``class_counts``) nor counts.
    """
    from distrib_face.eval.metrics import cosine_scores

    counts = image_counts_of(pairset.identities, pairset.image_counts, class_counts)
    if counts is None:
        return None
    by_size = accuracy_by_class_size(cosine_scores(embeddings[0::2], embeddings[1::2]), pairset.issame, counts,
                                     folds=pairset.folds, nfolds=nfolds, edges=edges, far_targets=far_targets,
                                     name=pairset.name)
    if class_counts is not None and pairset.identities is not None and not (counts > 0).any():
        by_size.notes.append("none of the set's identities has training images in the class counts, so every "
                             "pair is 'unseen' (a disjoint held-out set, or names that differ from training's?)")
    return by_size


def evaluate_pairset_by_class_size(
    model: Any,
    pairset: Any,
    class_counts: Mapping[str, int] | None = None,
    edges: Sequence[int] = DEFAULT_EDGES,
    **options: Any,
) -> tuple[Any, ClassSizeResult | None]:
    """:func:`~distrib_face.eval.embed.evaluate_pairset` plus the class-size split, from one embedding pass.

    Args:
        model: see :func:`~distrib_face.eval.embed.embed_images`.
        pairset: a :class:`~distrib_face.data.pairset.PairSet`.
        class_counts: ``{identity name: training images}`` (e.g. from :func:`load_class_counts`); without it
            the pair set's own ``image_counts`` are used when it has them.
        edges: bucket edges.
        options: ``batch_size``, ``device``, ``flip``, ``nfolds``, ``far_targets``, ``image_size``.

    Returns:
        ``(VerificationResult, ClassSizeResult or None)``: ``None`` when the set has neither per-image
        identities (with ``class_counts``) nor image counts.

    Raises:
        ValueError: ``class_counts`` given for a set with neither identity names nor image counts.
    """
    from distrib_face.eval.embed import embed_images
    from distrib_face.eval.metrics import verification_metrics

    if class_counts is not None and pairset.identities is None and pairset.image_counts is None:
        raise ValueError(f"pair set {pairset.name!r} has no per-image identity names, so --class-counts cannot "
                         "apply (pairs.txt sets and pair-set files written with identities have them; .bin files "
                         "do not)")
    nfolds = options.pop("nfolds", 10)
    far_targets = options.pop("far_targets", DEFAULT_FAR_TARGETS)
    embeddings = embed_images(model, pairset.images, **options)
    result = verification_metrics(embeddings[0::2], embeddings[1::2], pairset.issame, nfolds=nfolds,
                                  far_targets=far_targets, folds=pairset.folds, name=pairset.name)
    by_size = class_size_for_pairset(pairset, embeddings, class_counts, edges=edges, nfolds=nfolds,
                                     far_targets=far_targets)
    return result, by_size

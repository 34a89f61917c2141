"""The pair-set file: verification pairs as encoded images, read by the trainer and by ``eval``.

One ``.npz`` file, readable without pickle (``np.load(..., allow_pickle=False)``):

- ``data``: uint8 [total_bytes], the encoded images (JPEG or PNG) concatenated;
- ``offsets``: int64 [2 * num_pairs + 1], image ``i`` is ``data[offsets[i]:offsets[i + 1]]``;
  images ``2k`` and ``2k + 1`` form pair ``k``;
- ``issame``: bool [num_pairs], whether pair ``k`` shows one identity;
- ``name``: a 0-d unicode array, the set's name (e.g. ``lfw``, ``synthetic_holdout``);
- ``folds`` (optional): int64 [num_pairs], the fold of each pair for a fixed k-fold protocol;
- ``identities`` (optional): unicode [2 * num_pairs], the identity name of each image ("" when unknown);
- ``image_counts`` (optional): int64 [2 * num_pairs], how many training images each image's identity has
  (``0``: not a training identity, ``-1``: unknown). Both feed the accuracy-by-class-size split
  (:mod:`distrib_face.eval.buckets`); files without them read as before.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from distrib_face.atomic import atomic_path


@dataclass
class PairSet:
    """Verification pairs: ``images[2k]`` and ``images[2k + 1]`` are pair ``k``, ``issame[k]`` its truth.

    ``identities`` / ``image_counts`` (optional, per image): identity names and training-image counts of the
    images' identities (see the module docstring).
    """

    name: str
    images: list[bytes]
    issame: np.ndarray
    folds: np.ndarray | None = None
    identities: list[str] | None = None
    image_counts: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.issame = np.asarray(self.issame, dtype=bool)
        if len(self.images) != 2 * len(self.issame):
            raise ValueError(
                f"pair set {self.name!r}: {len(self.images)} images for {len(self.issame)} pairs "
                f"(expected {2 * len(self.issame)})"
            )
        if self.folds is not None:
            self.folds = np.asarray(self.folds, dtype=np.int64)
            if self.folds.shape != self.issame.shape:
                raise ValueError(f"pair set {self.name!r}: folds shape {self.folds.shape} != {self.issame.shape}")
        if self.identities is not None:
            self.identities = [str(v) for v in self.identities]
            if len(self.identities) != len(self.images):
                raise ValueError(
                    f"pair set {self.name!r}: {len(self.identities)} identities for {len(self.images)} images"
                )
        if self.image_counts is not None:
            self.image_counts = np.asarray(self.image_counts, dtype=np.int64).reshape(-1)
            if self.image_counts.shape[0] != len(self.images):
                raise ValueError(
                    f"pair set {self.name!r}: {self.image_counts.shape[0]} image counts for {len(self.images)} images"
                )

    @property
    def num_pairs(self) -> int:
        """Number of pairs."""
        return len(self.issame)


def save_pairset(path: str | os.PathLike, pairs: PairSet) -> Path:
    """Write ``pairs`` to ``path`` atomically (a temp file in the same folder, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lengths = np.fromiter((len(b) for b in pairs.images), dtype=np.int64, count=len(pairs.images))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    data = np.frombuffer(b"".join(pairs.images), dtype=np.uint8)
    arrays = {"data": data, "offsets": offsets, "issame": pairs.issame, "name": np.array(pairs.name)}
    if pairs.folds is not None:
        arrays["folds"] = pairs.folds
    if pairs.identities is not None:
        arrays["identities"] = np.array(pairs.identities, dtype=str)
    if pairs.image_counts is not None:
        arrays["image_counts"] = pairs.image_counts
    with atomic_path(path, suffix=".tmp.npz") as tmp:
        np.savez(tmp, **arrays)
    return path


def load_pairset(path: str | os.PathLike) -> PairSet:
    """Read a pair-set file written by :func:`save_pairset` (no pickle is ever loaded)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = {"data", "offsets", "issame", "name"} - set(z.files)
            if missing:
                raise ValueError(f"{path}: not a pair-set file, missing arrays {sorted(missing)}")
            data, offsets = z["data"], z["offsets"]
            images = [data[offsets[i]:offsets[i + 1]].tobytes() for i in range(len(offsets) - 1)]
            folds = z["folds"] if "folds" in z.files else None
            identities = [str(v) for v in z["identities"]] if "identities" in z.files else None
            image_counts = z["image_counts"] if "image_counts" in z.files else None
            return PairSet(name=str(z["name"]), images=images, issame=z["issame"], folds=folds,
                           identities=identities, image_counts=image_counts)
    except (OSError, ValueError) as err:
        if isinstance(err, ValueError) and str(path) in str(err):
            raise
        raise ValueError(f"{path}: cannot read pair-set file: {err}") from err


def pairs_from_images(name: str, images: Sequence[bytes], issame: Sequence[bool]) -> PairSet:
    """Build a :class:`PairSet` from an interleaved image list."""
    return PairSet(name=name, images=list(images), issame=np.asarray(issame, dtype=bool))

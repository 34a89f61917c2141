"""The pair-set file: verification pairs as encoded images, read by the trainer and by ``eval``.

One ``.npz`` file, readable without pickle (``np.load(..., allow_pickle=False)``):

- ``data``: uint8 [total_bytes], the encoded images (JPEG or PNG) concatenated;
- ``offsets``: int64 [2 * num_pairs + 1], image ``i`` is ``data[offsets[i]:offsets[i + 1]]``;
  images ``2k`` and ``2k + 1`` form pair ``k``;
- ``issame``: bool [num_pairs], whether pair ``k`` shows one identity;
- ``name``: a 0-d unicode array, the set's name (e.g. ``lfw``, ``synthetic_holdout``);
- ``folds`` (optional): int64 [num_pairs], the fold of each pair for a fixed k-fold protocol.
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
    """Verification pairs: ``images[2k]`` and ``images[2k + 1]`` are pair ``k``, ``issame[k]`` its truth."""

    name: str
    images: list[bytes]
    issame: np.ndarray
    folds: np.ndarray | None = None

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
            return PairSet(name=str(z["name"]), images=images, issame=z["issame"], folds=folds)
    except (OSError, ValueError) as err:
        if isinstance(err, ValueError) and str(path) in str(err):
            raise
        raise ValueError(f"{path}: cannot read pair-set file: {err}") from err


def pairs_from_images(name: str, images: Sequence[bytes], issame: Sequence[bool]) -> PairSet:
    """Build a :class:`PairSet` from an interleaved image list."""
    return PairSet(name=name, images=list(images), issame=np.asarray(issame, dtype=bool))

"""Embedding files: a source of images -> unit-norm embeddings with labels and names (``distrib-face embed``).

The file is one ``.npz`` readable without pickle (``np.load(..., allow_pickle=False)``):

- ``embeddings``: float32 [N, D], L2-normalised, flip-averaged exactly as ``distrib-face eval`` embeds
  (``embed_images``: PIL decode, bilinear resize, ``(x - 127.5) / 127.5``, ``f(x) + f(mirror(x))``);
- ``labels``: int64 [N], the identity label in the source, ``-1`` when unknown;
- ``names``: str [N], each image's key (path relative to the source folder / list file, or ``SHARD/KEY``);
- ``identities``: str [N], each image's identity name ("" when unknown); ``search`` matches on these;
- ``skipped_names`` / ``skipped_reasons``: str [S], the images that were skipped and why;
- ``skip_reasons`` / ``skip_counts``: the reasons (:data:`~distrib_face.eval.sources.SKIP_REASONS`) and how
  many images each skipped;
- ``source``, ``source_kind``, ``model``: 0-d str; ``flip``: 0-d bool; ``image_size``: int64 [2] (H, W).

Distractor sets for ``search`` are plain embedding files too (their labels and identities are ignored).
"""

from __future__ import annotations

import collections
import logging
import os
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from distrib_face.atomic import atomic_path
from distrib_face.eval.embed import DEFAULT_IMAGE_SIZE, as_embedder, embed_images
from distrib_face.eval.sources import ImageSource, ReaderPool, iter_payloads, scan_image_source

logger = logging.getLogger(__name__)

REQUIRED = ("embeddings", "labels", "names")


@dataclass
class EmbeddingSet:
    """Embeddings of a set of images with what is known about each.

    Attributes:
        embeddings: float32 [N, D], unit norm.
        labels: int64 [N], ``-1`` when unknown.
        names: per-image keys.
        identities: per-image identity names ("" when unknown).
        skipped_names: images that were not embedded.
        skipped_reasons: why, aligned with ``skipped_names``.
        meta: ``source``, ``source_kind``, ``model``, ``flip``, ``image_size`` (when known).
    """

    embeddings: np.ndarray
    labels: np.ndarray
    names: list[str]
    identities: list[str] = field(default_factory=list)
    skipped_names: list[str] = field(default_factory=list)
    skipped_reasons: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.embeddings = np.asarray(self.embeddings, dtype=np.float32)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if self.embeddings.ndim != 2:
            raise ValueError(f"embeddings must be [N, D], got shape {self.embeddings.shape}")
        n = self.embeddings.shape[0]
        if not self.identities:
            self.identities = [""] * n
        for what, value in (("labels", self.labels), ("names", self.names), ("identities", self.identities)):
            if len(value) != n:
                raise ValueError(f"{len(value)} {what} for {n} embeddings")
        if len(self.skipped_names) != len(self.skipped_reasons):
            raise ValueError(f"{len(self.skipped_names)} skipped names but {len(self.skipped_reasons)} reasons")

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def skip_counts(self) -> dict[str, int]:
        """``{reason: images skipped for it}``."""
        return dict(sorted(collections.Counter(self.skipped_reasons).items()))


def save_embeddings(path: str | os.PathLike, emb: EmbeddingSet) -> Path:
    """Write ``emb`` to ``path`` atomically (format: the module docstring)."""
    path = Path(path)
    counts = emb.skip_counts
    arrays: dict[str, np.ndarray] = {
        "embeddings": emb.embeddings,
        "labels": emb.labels,
        "names": np.array(emb.names, dtype=str),
        "identities": np.array(emb.identities, dtype=str),
        "skipped_names": np.array(emb.skipped_names, dtype=str),
        "skipped_reasons": np.array(emb.skipped_reasons, dtype=str),
        "skip_reasons": np.array(list(counts), dtype=str),
        "skip_counts": np.array(list(counts.values()), dtype=np.int64),
    }
    for key in ("source", "source_kind", "model"):
        if key in emb.meta:
            arrays[key] = np.array(str(emb.meta[key]))
    if "flip" in emb.meta:
        arrays["flip"] = np.array(bool(emb.meta["flip"]))
    if "image_size" in emb.meta:
        arrays["image_size"] = np.asarray(emb.meta["image_size"], dtype=np.int64)
    with atomic_path(path, suffix=".tmp.npz") as tmp:
        np.savez(tmp, **arrays)
    return path


def load_embeddings(path: str | os.PathLike) -> EmbeddingSet:
    """Read an embedding file (no pickle is ever loaded).

    Raises:
        ValueError: not an embedding file (the message names the file and the missing arrays).
        FileNotFoundError: no file at ``path``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such embedding file")
    if not zipfile.is_zipfile(path):
        # np.load would read any other file as a pickle and refuse it with advice to allow pickles: wrong here.
        raise ValueError(f"{path}: not an embedding file (an .npz written by distrib-face embed)")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in REQUIRED if k not in z.files]
            if missing:
                raise ValueError(f"{path}: not an embedding file (distrib-face embed), missing arrays {missing}")
            meta: dict[str, Any] = {}
            for key in ("source", "source_kind", "model"):
                if key in z.files:
                    meta[key] = str(z[key])
            if "flip" in z.files:
                meta["flip"] = bool(z["flip"])
            if "image_size" in z.files:
                meta["image_size"] = [int(v) for v in z["image_size"]]
            return EmbeddingSet(
                embeddings=z["embeddings"],
                labels=z["labels"],
                names=[str(v) for v in z["names"]],
                identities=[str(v) for v in z["identities"]] if "identities" in z.files else [],
                skipped_names=[str(v) for v in z["skipped_names"]] if "skipped_names" in z.files else [],
                skipped_reasons=[str(v) for v in z["skipped_reasons"]] if "skipped_reasons" in z.files else [],
                meta=meta,
            )
    except ValueError as err:
        if str(path) in str(err):
            raise
        raise ValueError(f"{path}: cannot read embedding file: {err}") from err
    except OSError as err:  # a zip error on a file that is not an .npz
        raise ValueError(f"{path}: cannot read embedding file: {err}") from err


class ImageProgress:
    """Progress of an image job: a tqdm bar on a terminal, else a log line every ``every_s`` seconds.

    Args:
        total: images to process.
        use_bar: force the bar on / off (default: whether stderr is a TTY).
        every_s: seconds between log lines without a bar.
    """

    def __init__(self, total: int, use_bar: bool | None = None, every_s: float = 10.0) -> None:
        self.total, self.every_s = total, every_s
        self.done = self.skipped = 0
        self.start = self.last_log = time.perf_counter()
        self.bar = None
        if sys.stderr.isatty() if use_bar is None else use_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", dynamic_ncols=True, file=sys.stderr)

    @property
    def rate(self) -> float:
        """Images (embedded + skipped) per second so far."""
        elapsed = time.perf_counter() - self.start
        return (self.done + self.skipped) / elapsed if elapsed > 0 else 0.0

    def update(self, done: int, skipped: int) -> None:
        """Count ``done`` more embedded and ``skipped`` more skipped images."""
        self.done += done
        self.skipped += skipped
        if self.bar is not None:
            self.bar.update(done + skipped)
            self.bar.set_postfix(skipped=self.skipped, refresh=False)
            return
        now = time.perf_counter()
        if now - self.last_log >= self.every_s:
            self.last_log = now
            seen = self.done + self.skipped
            eta = (self.total - seen) / self.rate if self.rate > 0 else float("nan")
            logger.info("embedded %d/%d images (%d skipped) | %.1f img/s | ETA %s", self.done, self.total,
                        self.skipped, self.rate, "?" if eta != eta else f"{eta:.0f} s")

    def close(self) -> None:
        """Finish the bar."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _chunks(source: ImageSource, chunk_size: int, size: tuple[int, int],
            names: list[str], labels: list[int]) -> Iterator[tuple[list[tuple[int, Any]], tuple[int, int]]]:
    """Reader tasks of ``chunk_size`` images; records every image's name and label as it goes."""
    entries: list[tuple[int, Any]] = []
    for position, name, label, payload in iter_payloads(source):
        names.append(name)
        labels.append(label)
        entries.append((position, payload))
        if len(entries) == chunk_size:
            yield entries, size
            entries = []
    if entries:
        yield entries, size


def embed_source(
    model: Any,
    source: str | os.PathLike | ImageSource,
    *,
    kind: str = "auto",
    batch_size: int = 64,
    workers: int = 0,
    flip: bool = True,
    device: str | None = None,
    image_size: tuple[int, int] | None = None,
    chunk_size: int = 64,
    timeout: float = 300.0,
    progress: bool | None = None,
) -> EmbeddingSet:
    """Embed every readable image of ``source``; unreadable ones are skipped and counted by reason.

    Args:
        model: anything :func:`~distrib_face.eval.embed.embed_images` takes (a loaded model, a path, ...).
        source: a path (see :func:`~distrib_face.eval.sources.scan_image_source`) or a scanned source.
        kind: the source kind when ``source`` is a path (``auto`` decides).
        batch_size: images per forward pass (their mirrors ride in the same pass).
        workers: reader processes decoding images (0: decode in this process).
        flip: flip test-time augmentation (as ``eval``).
        device: torch device for a backbone.
        image_size: (H, W) the model takes; default: the model's own, else 112 x 112.
        chunk_size: images per reader task.
        timeout: seconds any one reader task may take before the run fails.
        progress: tqdm bar on / off (default: when stderr is a terminal; log lines otherwise).

    Returns:
        The :class:`EmbeddingSet` (rows in source order, skipped images left out and listed).

    Raises:
        ValueError: no image could be embedded.
    """
    if batch_size < 1 or chunk_size < 1:
        raise ValueError(f"batch_size and chunk_size must be >= 1, got {batch_size} and {chunk_size}")
    scanned = source if isinstance(source, ImageSource) else scan_image_source(source, kind)
    embedder = as_embedder(model, device=device)
    size = tuple(image_size or getattr(embedder, "input_size", DEFAULT_IMAGE_SIZE))
    names: list[str] = []
    labels: list[int] = []
    kept: list[int] = []
    skipped: list[tuple[int, str]] = []
    outputs: list[np.ndarray] = []
    pending: list[np.ndarray] = []  # decoded uint8 [n, H, W, 3] arrays not embedded yet
    bar = ImageProgress(scanned.num_images, use_bar=progress)
    start = time.perf_counter()

    def embed_batch(batch: np.ndarray) -> None:
        raw = embed_images(embedder, batch, batch_size=batch_size, flip=flip, image_size=size)  # [B, D]
        norms = np.linalg.norm(raw.astype(np.float64), axis=1, keepdims=True)
        outputs.append((raw / np.maximum(norms, 1e-12)).astype(np.float32))

    try:
        with ReaderPool(workers, timeout=timeout, describe=lambda at: f"{names[at]} of {scanned.path}") as pool:
            for chunk in pool.map(_chunks(scanned, chunk_size, size, names, labels)):
                for index, reason, message in chunk.skipped:
                    logger.warning("skipping %s: %s (%s)", names[index], reason, message)
                    skipped.append((index, reason))
                kept += chunk.indices
                if chunk.indices:
                    pending.append(chunk.images)
                while sum(len(p) for p in pending) >= batch_size:
                    batch = np.concatenate(pending)
                    embed_batch(batch[:batch_size])
                    pending = [batch[batch_size:]] if len(batch) > batch_size else []
                bar.update(len(chunk.indices), len(chunk.skipped))
            if pending:
                embed_batch(np.concatenate(pending))
    finally:
        bar.close()
    if not outputs:
        raise ValueError(f"{scanned.path}: no image could be embedded ({len(skipped)} skipped)")
    seconds = time.perf_counter() - start
    emb = EmbeddingSet(
        embeddings=np.concatenate(outputs),
        labels=np.array([labels[i] for i in kept], dtype=np.int64),
        names=[names[i] for i in kept],
        identities=[scanned.identity(labels[i]) for i in kept],
        skipped_names=[names[i] for i, _ in skipped],
        skipped_reasons=[reason for _, reason in skipped],
        meta={"source": scanned.path, "source_kind": scanned.kind, "model": str(getattr(embedder, "path", model)),
              "flip": flip, "image_size": list(size)},
    )
    emb.meta["seconds"] = seconds
    emb.meta["images_per_sec"] = (len(emb) + len(skipped)) / seconds if seconds > 0 else float("nan")
    return emb

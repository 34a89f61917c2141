"""Sample streams over webdataset shards: who reads which shard, in which order, and how to resume.

The unit of reading is a *slot*: one DataLoader-style worker of one rank, ``slot = rank * num_workers +
worker``. For an epoch, every rank computes the same plan from the manifest alone (no collective):

- ``split="shard"``: shards are permuted by ``(seed, epoch)`` and dealt to slots, ``perm[slot::num_slots]``;
- ``split="sample"`` (few shards, e.g. a small demo set): every slot reads every shard in the permuted order
  and keeps the samples whose running index is ``slot`` modulo ``num_slots``;
- ``split="auto"``: shard split when there are at least 4 shards per slot, else sample split.

Each rank's epoch is cut to the same number of samples, the smallest rank's count, so that every rank
takes the same number of steps. A slot's stream is then: samples in shard order -> optional long-tail
re-weighting (each sample repeated 0, 1, 2 ... times, deterministically) -> a seeded shuffle buffer ->
positions 0, 1, 2, ... Everything is a function of ``(seed, epoch, pass, slot)``, so a resumed reader skips
the first ``positions[worker]`` samples of each worker's stream (without decoding them) and goes on with
exactly the samples not yet consumed. If the corrupt samples or a truncated shard leave a rank short of
its count, a second *pass* over its shards (another order) fills the epoch.

Rank and world size come from the caller, never from the environment, so DataLoader-style worker
processes (which see no process group) cannot fall back to "every rank reads everything".
"""

from __future__ import annotations

import io
import logging
import math
import random
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Iterator, Sequence

import numpy as np

from distrib_face.data.augment import AugmentConfig, decode_pil

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "pgm", "ppm")
SPLITS = ("auto", "shard", "sample")
REBALANCE = (None, "sqrt", "repeat_factor")


def open_url(url: str) -> BinaryIO:
    """Open a shard for streaming: a local path, ``file://``, ``http(s)://`` (urllib), ``pipe:CMD``
    (webdataset), or any fsspec URL (``s3://``, ``gs://``, ...)."""
    parsed = urllib.parse.urlparse(url)
    if url.startswith("pipe:"):
        from webdataset import gopen

        return gopen.gopen(url, "rb")
    if parsed.scheme in ("http", "https"):
        return urllib.request.urlopen(url, timeout=60)  # noqa: S310 - the user's own shard URL
    if parsed.scheme in ("", "file"):
        return open(parsed.path if parsed.scheme == "file" else url, "rb")
    import fsspec

    return fsspec.open(url, "rb").open()


@dataclass
class ReadErrors:
    """Counts of what reading had to skip."""

    shards: int = 0
    samples: int = 0

    def shard_handler(self, exn: Exception) -> bool:
        """webdataset handler: log, count, and go on with the next shard."""
        self.shards += 1
        log.warning("skipping the rest of a shard after a read error: %s", exn)
        return True


def iter_shard(url: str, errors: ReadErrors, expected: int | None = None) -> Iterator[tuple[str, bytes | None, int | None]]:
    """Yield ``(key, image_bytes, label)`` for each sample of one tar shard, in tar order.

    A sample without an image or with an unreadable label yields ``None`` in that field (the caller counts
    it as skipped); a truncated or unreadable shard logs a warning, counts in ``errors.shards`` and ends.
    Python's streaming tar reader ends quietly at a truncation, so a shard that yields fewer samples than
    ``expected`` (its manifest count) is counted as cut short too.
    """
    from webdataset import tariterators

    try:
        stream = open_url(url)
    except OSError as err:
        errors.shard_handler(OSError(f"{url}: {err}"))
        return
    try:
        files = tariterators.tar_file_expander([{"url": url, "stream": stream}], handler=errors.shard_handler)
        count = 0
        for sample in tariterators.group_by_keys(files, handler=errors.shard_handler):
            image = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
            label: int | None
            try:
                label = int(sample["cls"])
            except (KeyError, ValueError):
                label = None
            count += 1
            yield sample["__key__"], image, label
        if expected is not None and count < expected:
            errors.shard_handler(EOFError(f"{url}: {count} of {expected} samples (truncated shard?)"))
    finally:
        stream.close()


def _rng(*parts: int) -> random.Random:
    """A Python RNG seeded from integers (stable across processes and Python versions)."""
    seq = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts])
    return random.Random(int(seq.generate_state(2, dtype=np.uint64)[0]))


def shard_permutation(num_shards: int, seed: int, epoch: int, pass_index: int, shuffle: bool) -> list[int]:
    """Order of the shards for ``(seed, epoch, pass)``; the same on every rank."""
    order = list(range(num_shards))
    if shuffle:
        _rng(seed, epoch, pass_index, 0x5A4D).shuffle(order)
    return order


def resolve_split(split: str, num_shards: int, num_slots: int) -> str:
    """``auto`` -> ``shard`` with at least 4 shards per slot, else ``sample``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "auto":
        return "shard" if num_shards >= 4 * num_slots else "sample"
    if split == "shard" and num_shards < num_slots:
        raise ValueError(
            f"split='shard' needs at least one shard per reader: {num_shards} shards for {num_slots} "
            "(ranks x workers); use split='sample' or 'auto'"
        )
    return split


def slot_sample_counts(shard_counts: Sequence[int], num_slots: int, split: str, order: Sequence[int]) -> list[int]:
    """Samples each slot reads in one pass (before re-weighting)."""
    if split == "shard":
        return [sum(shard_counts[i] for i in order[slot::num_slots]) for slot in range(num_slots)]
    total = sum(shard_counts)
    return [total // num_slots + (1 if slot < total % num_slots else 0) for slot in range(num_slots)]


def epoch_samples_per_rank(shard_counts: Sequence[int], world_size: int, num_workers: int, seed: int, epoch: int,
                           split: str, shuffle: bool, resampled: bool) -> int:
    """The number of samples every rank takes in ``epoch``: the smallest rank's share (the same on all ranks)."""
    if resampled:
        return sum(shard_counts) // world_size
    num_slots = world_size * num_workers
    split = resolve_split(split, len(shard_counts), num_slots)
    order = shard_permutation(len(shard_counts), seed, epoch, 0, shuffle)
    per_slot = slot_sample_counts(shard_counts, num_slots, split, order)
    return min(sum(per_slot[r * num_workers:(r + 1) * num_workers]) for r in range(world_size))


def class_weights(class_counts: Sequence[int], rebalance: str | None) -> np.ndarray | None:
    """Per-class repeat factor ``f_c`` (expected copies of each sample of class ``c`` per epoch), or None.

    Both modes are normalised so that ``sum_c n_c f_c = N``: the epoch keeps its size, the mix changes.

    - ``sqrt``: class ``c`` is drawn with probability proportional to ``sqrt(n_c)`` instead of ``n_c``,
      so ``f_c = N / (sqrt(n_c) * sum_j sqrt(n_j))``.
    - ``repeat_factor`` (LVIS, Gupta et al. 2019): ``f_c = max(1, sqrt(t / (n_c / N)))`` with ``t`` the
      frequency of the median class, then scaled to keep the epoch size: rare classes are repeated, the
      head is thinned.
    """
    if rebalance not in REBALANCE:
        raise ValueError(f"rebalance must be one of {REBALANCE}, got {rebalance!r}")
    if rebalance is None:
        return None
    counts = np.asarray(class_counts, dtype=np.float64)
    total = counts.sum()
    present = counts > 0
    weights = np.zeros_like(counts)
    if rebalance == "sqrt":
        weights[present] = total / (np.sqrt(counts[present]) * np.sqrt(counts[present]).sum())
    else:
        threshold = float(np.median(counts[present])) / total
        weights[present] = np.maximum(1.0, np.sqrt(threshold / (counts[present] / total)))
        weights *= total / float((counts * weights).sum())
    return weights


@dataclass
class SlotSpec:
    """Everything one reader slot needs to produce its stream (picklable, sent to worker processes)."""

    shards: list[str]
    shard_counts: list[int]
    rank: int
    world_size: int
    worker: int
    num_workers: int
    seed: int
    epoch: int
    pass_index: int = 0
    split: str = "auto"
    shuffle: bool = True
    shuffle_buffer: int = 1000
    resampled: bool = False
    weights: list[float] | None = None
    skip: int = 0
    decode: str = "raw"  # "raw": validated bytes (DALI decodes); "pil": decoded uint8 HWC arrays
    image_size: tuple[int, int] | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    chunk_size: int = 32

    @property
    def slot(self) -> int:
        """This reader's index among all ``world_size * num_workers`` readers."""
        return self.rank * self.num_workers + self.worker

    @property
    def num_slots(self) -> int:
        """Readers over all ranks."""
        return self.world_size * self.num_workers


def _count(spec: SlotSpec, index: int) -> int | None:
    return spec.shard_counts[index] if spec.shard_counts else None


def _ordered_samples(spec: SlotSpec, errors: ReadErrors) -> Iterator[tuple[str, bytes | None, int | None]]:
    """This slot's samples in shard order, before re-weighting and shuffling."""
    if spec.resampled:
        rng = _rng(spec.seed, spec.epoch, spec.pass_index, spec.slot, 0x7E5A)
        while True:  # with replacement, forever; the loader cuts the epoch
            index = rng.randrange(len(spec.shards))
            yield from iter_shard(spec.shards[index], errors, _count(spec, index))
    split = resolve_split(spec.split, len(spec.shards), spec.num_slots)
    order = shard_permutation(len(spec.shards), spec.seed, spec.epoch, spec.pass_index, spec.shuffle)
    if split == "shard":
        for index in order[spec.slot::spec.num_slots]:
            yield from iter_shard(spec.shards[index], errors, _count(spec, index))
        return
    running = 0
    for index in order:
        for sample in iter_shard(spec.shards[index], errors, _count(spec, index)):
            if running % spec.num_slots == spec.slot:
                yield sample
            running += 1


def _reweighted(samples: Iterator[tuple[str, bytes | None, int | None]], weights: Sequence[float] | None,
                rng: random.Random) -> Iterator[tuple[str, bytes | None, int | None]]:
    if weights is None:
        yield from samples
        return
    for sample in samples:
        label = sample[2]
        factor = weights[label] if label is not None and 0 <= label < len(weights) else 1.0
        copies = int(math.floor(factor))
        copies += rng.random() < factor - copies
        for _ in range(copies):
            yield sample


def _shuffled(items: Iterator[Any], buffer_size: int, rng: random.Random) -> Iterator[Any]:
    if buffer_size <= 1:
        yield from items
        return
    buffer: list[Any] = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= buffer_size:
            k = rng.randrange(len(buffer))
            buffer[k], buffer[-1] = buffer[-1], buffer[k]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


def positioned_samples(spec: SlotSpec, errors: ReadErrors) -> Iterator[tuple[int, str, bytes | None, int | None]]:
    """``(position, key, image_bytes, label)`` of this slot's stream, from position ``spec.skip`` on."""
    samples = _ordered_samples(spec, errors)
    samples = _reweighted(samples, spec.weights, _rng(spec.seed, spec.epoch, spec.pass_index, spec.slot, 0x11))
    if spec.shuffle:
        samples = _shuffled(samples, spec.shuffle_buffer, _rng(spec.seed, spec.epoch, spec.pass_index, spec.slot, 0x22))
    for position, (key, image, label) in enumerate(samples):
        if position >= spec.skip:
            yield position, key, image, label


def check_encoded(data: bytes) -> None:
    """Cheap validity check for bytes DALI will decode: a readable header, and for JPEG both end markers.

    Raises:
        ValueError: the bytes are not an image, or a JPEG is truncated.
    """
    from PIL import Image, UnidentifiedImageError

    if data[:3] == b"\xff\xd8\xff":
        if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
            raise ValueError("truncated JPEG (no end-of-image marker)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width < 1 or image.height < 1:
                raise ValueError(f"empty image {image.size}")
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"not a readable image: {err}") from err


@dataclass
class Chunk:
    """What a reader slot sends to the loader: a few consecutive samples of its stream.

    ``images`` is a list of encoded bytes (``decode="raw"``) or a uint8 [k, H, W, 3] array (``"pil"``);
    ``skipped`` counts the corrupt samples dropped since the previous chunk (their positions are covered
    by ``last_position``), ``shard_errors`` the shards cut short.
    """

    worker: int
    positions: list[int]
    labels: list[int]
    images: Any
    keys: list[str]
    skipped: int
    shard_errors: int
    last_position: int


def chunk_stream(spec: SlotSpec) -> Iterator[Chunk]:
    """Decode or validate this slot's samples and group them into :class:`Chunk` s of ``spec.chunk_size``."""
    errors = ReadErrors()
    aug_rng = _rng(spec.seed, spec.epoch, spec.pass_index, spec.slot, 0x33)
    positions: list[int] = []
    labels: list[int] = []
    images: list[Any] = []
    keys: list[str] = []
    skipped = 0
    reported_shard_errors = 0
    last_position = spec.skip - 1
    for position, key, data, label in positioned_samples(spec, errors):
        last_position = position
        if data is None or label is None:
            skipped += 1
            log.warning("skipping sample %s: missing image or label", key)
            continue
        try:
            if spec.decode == "pil":
                image: Any = decode_pil(data, spec.image_size, spec.augment, aug_rng)
            else:
                check_encoded(data)
                image = np.frombuffer(data, dtype=np.uint8)
        except (OSError, ValueError, SyntaxError) as err:
            skipped += 1
            log.warning("skipping corrupt sample %s: %s", key, err)
            continue
        positions.append(position)
        labels.append(label)
        images.append(image)
        keys.append(key)
        if len(positions) >= spec.chunk_size:
            yield _make_chunk(spec, positions, labels, images, keys, skipped,
                              errors.shards - reported_shard_errors, last_position)
            reported_shard_errors = errors.shards
            positions, labels, images, keys, skipped = [], [], [], [], 0
    if positions or skipped or errors.shards > reported_shard_errors:
        yield _make_chunk(spec, positions, labels, images, keys, skipped,
                          errors.shards - reported_shard_errors, last_position)


def _make_chunk(spec: SlotSpec, positions: list[int], labels: list[int], images: list[Any], keys: list[str],
                skipped: int, shard_errors: int, last_position: int) -> Chunk:
    packed: Any = images
    if spec.decode == "pil" and images and all(im.shape == images[0].shape for im in images):
        packed = np.stack(images)
    return Chunk(spec.worker, positions, labels, packed, keys, skipped, shard_errors, last_position)

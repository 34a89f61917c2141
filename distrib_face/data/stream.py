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

Bad samples keep their positions: a sample whose image or label cannot be used (see
:mod:`distrib_face.data.decode` for the reasons), and a marker for the samples a cut-short or missing shard
did not deliver, take a position like any sample and travel to the loader as a skip record
``(position, shard, reason, count)``; the loader counts it when it consumes that position, so a resumed run
counts every skip exactly once, as the uninterrupted run does.

Rank and world size come from the caller, never from the environment, so DataLoader-style worker
processes (which see no process group) cannot fall back to "every rank reads everything".
"""

from __future__ import annotations

import logging
import math
import random
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Iterator, NamedTuple, Sequence

import numpy as np

from distrib_face.data.augment import AugmentConfig, augment_pil, flip_bit
from distrib_face.data.decode import (
    DEFAULT_MAX_IMAGE_PIXELS,
    RESIZED,
    BadSample,
    decode_image,
    encode_png,
    inspect_image,
    parse_label,
    repair_flags,
    resize_rgb,
)

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


class RawSample(NamedTuple):
    """One entry of a reader's stream before decoding.

    A good sample has ``reason=None``; a sample already known to be unusable carries its skip reason
    (``missing_image``, ``missing_label``, ``bad_label``, ``label_out_of_range``). A *marker* (``key=""``)
    stands for ``lost`` samples that a cut-short (``truncated_shard``) or unopenable (``missing_shard``) shard
    did not deliver: it takes one stream position, so it is counted exactly once, like a bad sample.
    """

    key: str
    image: bytes | None
    label: int | None
    shard: int
    reason: str | None = None
    lost: int = 0


class ShardError(OSError):
    """A shard named by the manifest cannot be opened (and ``allow_missing_shards`` is off); exit code 2."""

    exit_code = 2


class TarCut(EOFError):
    """A tar stream broke off; ``key`` is the sample whose member was being read (None: unknown)."""

    def __init__(self, message: str, key: str | None) -> None:
        super().__init__(message)
        self.key = key


def _tar_members(stream: BinaryIO, url: str) -> Iterator[tuple[str, str, bytes]]:
    """``(key, extension, payload)`` of the regular files of a tar stream, in order (webdataset's naming: the
    key is the path up to the first dot of the file name). Ends with :class:`TarCut` if the tar is cut short."""
    import tarfile

    key: str | None = None
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                key = None
                if not member.isreg():
                    continue
                name = member.name
                base = name.rsplit("/", 1)[-1]
                if base.startswith("__") and base.endswith("__"):
                    continue  # webdataset meta files
                dot = base.find(".")
                if dot <= 0:
                    key, ext = name, ""
                else:
                    key, ext = name[:len(name) - len(base) + dot], base[dot + 1:].lower()
                handle = tar.extractfile(member)
                payload = handle.read() if handle is not None else b""
                if len(payload) != member.size:
                    raise EOFError(f"member {name} cut at {len(payload)} of {member.size} bytes")
                yield key, ext, payload
                key = None
    except (tarfile.TarError, EOFError, OSError) as err:
        raise TarCut(f"{url}: tar read stopped: {err}", key) from err


def iter_shard(url: str, shard: int, expected: int | None = None, num_classes: int | None = None,
               allow_missing: bool = False) -> Iterator[RawSample]:
    """The :class:`RawSample` s of one tar shard, in tar order, each checked for an image and a valid label.

    A shard cut short (a read error, or fewer samples than ``expected``, its manifest count: Python's
    streaming tar reader can also end quietly at a truncation) ends with a ``truncated_shard`` marker for
    the samples it did not deliver.

    Raises:
        ShardError: the shard cannot be opened and ``allow_missing`` is off (the message names it). With
            ``allow_missing`` a ``missing_shard`` marker for its ``expected`` samples is yielded instead.
    """
    try:
        stream = open_url(url)
    except OSError as err:
        if not allow_missing:
            raise ShardError(f"{url}: cannot open this shard of the manifest ({err}); set "
                             "data.allow_missing_shards: true to train without it") from err
        log.warning("%s: cannot open shard (%s); going on without it (allow_missing_shards)", url, err)
        if expected:
            yield RawSample("", None, None, shard, "missing_shard", expected)
        return
    count = 0
    group: dict[str, bytes] = {}
    key = None

    def finish(key: str, group: dict[str, bytes]) -> RawSample:
        image = next((group[k] for k in IMAGE_KEYS if k in group), None)
        try:
            label: int | None = parse_label(group.get("cls"), num_classes)
            reason = None if image is not None else "missing_image"
        except BadSample as bad:
            label, reason = None, bad.reason
        return RawSample(key, image, label, shard, reason)

    try:
        try:
            for member_key, ext, payload in _tar_members(stream, url):
                if member_key != key:
                    if key is not None:
                        count += 1
                        yield finish(key, group)
                    key, group = member_key, {}
                group[ext] = payload
        except TarCut as err:
            log.warning("%s", err)
            if err.key is None or err.key == key:
                # the sample being read when the tar broke may be incomplete: it counts among the lost ones
                key = None
        if key is not None:
            count += 1
            yield finish(key, group)
    finally:
        stream.close()
    if expected is not None and count < expected:
        log.warning("%s: %d of %d samples (truncated shard)", url, count, expected)
        yield RawSample("", None, None, shard, "truncated_shard", expected - count)


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
    weights: np.ndarray | None = None  # [C] float64 repeat factor of each class (class_weights)
    skip: int = 0
    decode: str = "raw"  # "raw": checked bytes DALI can decode as they are; "pil": decoded uint8 HWC arrays
    image_size: tuple[int, int] | None = None  # output (H, W) of the PIL path
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    chunk_size: int = 32
    num_classes: int | None = None  # labels outside [0, num_classes) are dropped here
    expected_size: tuple[int, int] | None = None  # the manifest's image size: other sizes are resized to it
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    allow_missing_shards: bool = False
    flip_seed: int = 0  # seed of flip_bit (the same as the DALI feed's)

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


def _read(spec: SlotSpec, index: int) -> Iterator[RawSample]:
    return iter_shard(spec.shards[index], index, _count(spec, index), spec.num_classes, spec.allow_missing_shards)


def _ordered_samples(spec: SlotSpec) -> Iterator[RawSample]:
    """This slot's samples in shard order, before re-weighting and shuffling."""
    if spec.resampled:
        rng = _rng(spec.seed, spec.epoch, spec.pass_index, spec.slot, 0x7E5A)
        while True:  # with replacement, forever; the loader cuts the epoch
            yield from _read(spec, rng.randrange(len(spec.shards)))
    split = resolve_split(spec.split, len(spec.shards), spec.num_slots)
    order = shard_permutation(len(spec.shards), spec.seed, spec.epoch, spec.pass_index, spec.shuffle)
    if split == "shard":
        for index in order[spec.slot::spec.num_slots]:
            yield from _read(spec, index)
        return
    running = 0
    for index in order:
        for sample in _read(spec, index):
            if sample.lost:
                # lost samples would have had running indices running .. running + lost - 1: this slot's share
                first = (spec.slot - running) % spec.num_slots
                share = len(range(first, sample.lost, spec.num_slots))
                running += sample.lost
                if share:
                    yield sample._replace(lost=share)
                continue
            if running % spec.num_slots == spec.slot:
                yield sample
            running += 1


def _reweighted(samples: Iterator[RawSample], weights: np.ndarray | Sequence[float] | None,
                rng: random.Random) -> Iterator[RawSample]:
    if weights is None:
        yield from samples
        return
    for sample in samples:
        label = sample.label
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


def positioned_samples(spec: SlotSpec, on_sample: Callable[[], None] | None = None) -> Iterator[tuple[int, RawSample]]:
    """``(position, sample)`` of this slot's stream, from position ``spec.skip`` on.

    ``on_sample`` is called for every position, the skipped ones included (a heartbeat for the parent).
    """
    samples = _ordered_samples(spec)
    samples = _reweighted(samples, spec.weights, _rng(spec.seed, spec.epoch, spec.pass_index, spec.slot, 0x11))
    if spec.shuffle:
        samples = _shuffled(samples, spec.shuffle_buffer, _rng(spec.seed, spec.epoch, spec.pass_index, spec.slot, 0x22))
    for position, sample in enumerate(samples):
        if on_sample is not None:
            on_sample()
        if position >= spec.skip:
            yield position, sample


@dataclass
class Chunk:
    """What a reader slot sends to the loader: a few consecutive samples of its stream.

    ``images`` is a list of encoded bytes (``decode="raw"``) or a uint8 [k, H, W, 3] array (``"pil"``);
    ``shards`` each sample's shard index; ``flags`` its repair bits (:data:`~distrib_face.data.decode.RESIZED`, ``CONVERTED``);
    ``skips`` are the samples dropped since the previous chunk, as ``(position, shard index, reason,
    count)`` (count > 1 only for a shard's lost samples), so the loader can count each one exactly when its
    position is consumed.
    """

    worker: int
    index: int  # covers positions [index * chunk_size, (index + 1) * chunk_size)
    positions: list[int]
    labels: list[int]
    images: Any
    keys: list[str]
    shards: list[int]
    flags: list[int]
    skips: list[tuple[int, int, str, int]]
    last_position: int


def prepare_sample(data: bytes, spec: SlotSpec, rng: random.Random, position: int) -> tuple[Any, int]:
    """Inspect and decode (``"pil"``) or check (``"raw"``) one image: ``(payload, repair flags)``.

    In ``"raw"`` mode an 8-bit RGB JPEG of the expected size goes to DALI as it is; anything else (grey,
    CMYK, 16-bit, RGBA, PNG, another size) is decoded here and handed over as a lossless RGB PNG of the
    expected size, so DALI only ever sees uniform, plain images and its batch never mixes shapes.

    Raises:
        BadSample: the image cannot be used (its reason says why).
    """
    header = inspect_image(data, spec.max_image_pixels)
    flags = repair_flags(header, spec.expected_size)
    if spec.decode == "pil":
        flip = bool(flip_bit(spec.flip_seed, spec.epoch, (spec.pass_index, spec.worker, position)))
        image = decode_image(data, header, spec.max_image_pixels)
        return augment_pil(image, spec.image_size, spec.augment, rng, flip), flags
    if header.dali_ready and not flags & RESIZED:
        return np.frombuffer(data, dtype=np.uint8), flags
    image = decode_image(data, header, spec.max_image_pixels)
    if spec.expected_size is not None:
        image = resize_rgb(image, spec.expected_size)
    return np.frombuffer(encode_png(image), dtype=np.uint8), flags


def chunk_stream(spec: SlotSpec, on_sample: Callable[[], None] | None = None) -> Iterator[Chunk]:
    """Decode or check this slot's samples and group them into :class:`Chunk` s.

    Chunk ``k`` covers the stream positions ``[k * chunk_size, (k + 1) * chunk_size)`` whatever position the
    reader started at, so a reader resumed mid-epoch cuts its chunks where the uninterrupted one did and the
    loader's round-robin merge of the readers repeats exactly.
    """
    aug_rng = _rng(spec.seed, spec.epoch, spec.pass_index, spec.slot, 0x33)
    size = max(1, spec.chunk_size)
    positions: list[int] = []
    labels: list[int] = []
    images: list[Any] = []
    keys: list[str] = []
    shards: list[int] = []
    flags: list[int] = []
    skips: list[tuple[int, int, str, int]] = []
    index = spec.skip // size
    last_position = spec.skip - 1
    for position, sample in positioned_samples(spec, on_sample):
        if position // size != index:
            if positions or skips:
                yield _make_chunk(spec, index, positions, labels, images, keys, shards, flags, skips, last_position)
            positions, labels, images, keys, shards, flags, skips = [], [], [], [], [], [], []
            index = position // size
        last_position = position
        if sample.reason is not None:
            skips.append((position, sample.shard, sample.reason, max(1, sample.lost)))
            if not sample.lost:
                log.warning("skipping sample %s of %s: %s", sample.key, spec.shards[sample.shard], sample.reason)
            continue
        assert sample.image is not None and sample.label is not None
        try:
            image, flag = prepare_sample(sample.image, spec, aug_rng, position)
        except BadSample as bad:
            skips.append((position, sample.shard, bad.reason, 1))
            log.warning("skipping sample %s of %s: %s", sample.key, spec.shards[sample.shard], bad)
            continue
        positions.append(position)
        labels.append(sample.label)
        images.append(image)
        keys.append(sample.key)
        shards.append(sample.shard)
        flags.append(flag)
    if positions or skips:
        yield _make_chunk(spec, index, positions, labels, images, keys, shards, flags, skips, last_position)


def _make_chunk(spec: SlotSpec, index: int, positions: list[int], labels: list[int], images: list[Any],
                keys: list[str], shards: list[int], flags: list[int], skips: list[tuple[int, int, str, int]],
                last_position: int) -> Chunk:
    packed: Any = images
    if spec.decode == "pil" and images and all(im.shape == images[0].shape for im in images):
        packed = np.stack(images)
    return Chunk(spec.worker, index, positions, labels, packed, keys, shards, flags, skips, last_position)

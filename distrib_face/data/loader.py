"""The training loader: shards -> reader processes -> batches (DALI or PIL decoding) -> tensors on a device.

See :mod:`distrib_face.data.stream` for who reads what and how resuming works. Reader slots run in worker
processes (``num_workers``; 0 reads in the calling process); their chunks are merged in strict round-robin
order, so a batch sequence is a function of ``(seed, epoch)`` and the configuration alone.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import os
import queue as queue_module
import random
import sys
import traceback
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from distrib_face.data.augment import AugmentConfig, decode_pil, resolve_augment
from distrib_face.data.manifest import Manifest, read_manifest
from distrib_face.data.stream import (
    REBALANCE,
    Chunk,
    SlotSpec,
    chunk_stream,
    class_weights,
    epoch_samples_per_rank,
)
from distrib_face.dtypes import parse_dtype

log = logging.getLogger(__name__)

STATE_VERSION = 1


def _worker_main(spec: SlotSpec, out: Any) -> None:
    try:
        for chunk in chunk_stream(spec):
            out.put(("chunk", chunk))
        out.put(("end", None))
    except BaseException:  # noqa: BLE001 - forwarded to the loader with its traceback
        out.put(("error", traceback.format_exc()))


class _ReaderPool:
    """Runs one reader slot per process and merges their chunks in round-robin order."""

    def __init__(self, specs: Sequence[SlotSpec], prefetch_chunks: int) -> None:
        self.specs = list(specs)
        self.prefetch_chunks = prefetch_chunks
        self.processes: list[Any] = []

    def __iter__(self) -> Iterator[Chunk]:
        if len(self.specs) == 1 and self.specs[0].num_workers == 1 and self.prefetch_chunks == 0:
            yield from chunk_stream(self.specs[0])
            return
        method = "fork" if sys.platform.startswith("linux") else "spawn"
        ctx = mp.get_context(method)
        queues = [ctx.Queue(maxsize=max(1, self.prefetch_chunks)) for _ in self.specs]
        self.processes = [ctx.Process(target=_worker_main, args=(spec, q), daemon=True)
                          for spec, q in zip(self.specs, queues)]
        try:
            for process in self.processes:
                process.start()
            active = list(range(len(self.specs)))
            while active:
                for index in list(active):
                    kind, payload = self._get(index, queues[index])
                    if kind == "chunk":
                        yield payload
                    elif kind == "end":
                        active.remove(index)
                    else:
                        raise RuntimeError(f"data reader worker {index} failed:\n{payload}")
        finally:
            self.close()

    def _get(self, index: int, source: Any) -> tuple[str, Any]:
        while True:
            try:
                return source.get(timeout=1.0)
            except queue_module.Empty:
                process = self.processes[index]
                if not process.is_alive():
                    raise RuntimeError(
                        f"data reader worker {index} (pid {process.pid}) died with exit code {process.exitcode}"
                    ) from None

    def close(self) -> None:
        """Stop the reader processes this pool started."""
        for process in self.processes:
            if process.is_alive():
                process.terminate()
        for process in self.processes:
            process.join(timeout=5)
        self.processes = []


@dataclass
class _RawBatch:
    """A batch before decoding (DALI) or after (PIL): labels, images, and where each sample came from."""

    labels: list[int]
    images: list[Any]
    origins: list[tuple[int, int, int]]  # (pass, worker, position)


@dataclass
class _Progress:
    """Where the loader stands within an epoch (what ``state_dict`` saves)."""

    epoch: int
    batches: int = 0
    samples: int = 0
    pass_index: int = 0
    positions: list[int] = field(default_factory=list)

    def advance(self, batch: _RawBatch, num_slots: int) -> None:
        for pass_index, worker, position in batch.origins:
            if pass_index > self.pass_index:
                self.pass_index = pass_index
                self.positions = [0] * num_slots
            self.positions[worker] = max(self.positions[worker], position + 1)
        self.samples += len(batch.origins)  # dropped corrupt samples were taken from the stream too
        self.batches += 1


class TrainLoader:
    """Iterates one rank's share of an epoch as ``(images, labels)`` batches.

    ``images`` is float [B, 3, H, W] in [-1, 1] on ``device`` in ``dtype``; ``labels`` int64 [B]. Every rank
    yields ``len(loader)`` batches per epoch. After a full pass the loader moves to the next epoch by itself;
    ``set_epoch`` picks one explicitly. ``state_dict()`` taken between batches and given to
    ``load_state_dict`` of a fresh loader (same data, ranks, workers, batch size, seed) continues the epoch
    with exactly the samples not yet seen. Build it with :func:`build_loader`.
    """

    def __init__(self, manifest: Manifest, *, batch_size: int, rank: int, world_size: int, num_workers: int,
                 seed: int, epoch: int, decoder: str, device: torch.device, dtype: torch.dtype,
                 augment: AugmentConfig, rebalance: str | None, resampled: bool, drop_last: bool,
                 dali_threads: int, image_size: tuple[int, int], shuffle: bool, shuffle_buffer: int,
                 split: str, chunk_size: int, prefetch_chunks: int) -> None:
        self.manifest = manifest
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.num_slots = max(1, num_workers)
        self.seed = seed
        self.decoder = decoder
        self.device = device
        self.dtype = dtype
        self.augment = augment
        self.rebalance = rebalance
        self.resampled = resampled
        self.drop_last = drop_last
        self.dali_threads = dali_threads
        self.image_size = image_size
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.split = split
        self.chunk_size = chunk_size
        self.prefetch_chunks = prefetch_chunks
        weights = class_weights(manifest.class_counts, rebalance)
        self._weights = None if weights is None else [float(w) for w in weights]
        self._progress = _Progress(epoch, positions=[0] * self.num_slots)
        self._num_skipped = 0
        self._num_shard_errors = 0
        self._pipe: Any = None
        self._feed: _DaliFeed | None = None
        self._pipe_needs_reset = False
        self._aug_rng = random.Random(seed)

    # ----------------------------------------------------------------------------------------- sizes
    @property
    def epoch(self) -> int:
        """The epoch the next iteration reads (or is reading)."""
        return self._progress.epoch

    @property
    def num_skipped(self) -> int:
        """Corrupt samples this loader skipped so far (images that did not decode, samples without a label)."""
        return self._num_skipped

    @property
    def num_shard_errors(self) -> int:
        """Shards that could not be opened or were cut short (truncated tar)."""
        return self._num_shard_errors

    def samples_per_epoch(self, epoch: int | None = None) -> int:
        """Samples this rank takes in ``epoch`` (the same on every rank)."""
        epoch = self.epoch if epoch is None else epoch
        per_rank = epoch_samples_per_rank(self.manifest.shard_counts, self.world_size, self.num_slots, self.seed,
                                          epoch, self.split, self.shuffle, self.resampled)
        if self.drop_last:
            return per_rank // self.batch_size * self.batch_size
        return per_rank

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        return math.ceil(self.samples_per_epoch() / self.batch_size)

    # ----------------------------------------------------------------------------------------- state
    def set_epoch(self, epoch: int) -> None:
        """Read ``epoch`` next; a saved mid-epoch position is kept only if it belongs to this epoch."""
        if epoch != self._progress.epoch:
            self._progress = _Progress(int(epoch), positions=[0] * self.num_slots)

    def state_dict(self) -> dict[str, Any]:
        """JSON-able position of this rank's loader: load it into a fresh loader to go on from here."""
        p = self._progress
        return {
            "version": STATE_VERSION, "epoch": p.epoch, "batches": p.batches, "samples": p.samples,
            "pass": p.pass_index, "positions": list(p.positions), "rank": self.rank,
            "world_size": self.world_size, "num_workers": self.num_workers, "batch_size": self.batch_size,
            "seed": self.seed, "content_hash": self.manifest.content_hash, "num_skipped": self._num_skipped,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state`` (this rank's ``state_dict()``, or ``{"per_rank": [state_0, state_1, ...]}``).

        Raises:
            ValueError: the state was saved with another world size, worker count, batch size, seed or data.
        """
        if "per_rank" in state:
            per_rank = state["per_rank"]
            if len(per_rank) != self.world_size:
                raise ValueError(f"loader state: per_rank has {len(per_rank)} entries for world_size {self.world_size}")
            state = per_rank[self.rank]
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state: version {state.get('version')!r} is not {STATE_VERSION}")
        expected = {"rank": self.rank, "world_size": self.world_size, "num_workers": self.num_workers,
                    "batch_size": self.batch_size, "seed": self.seed, "content_hash": self.manifest.content_hash}
        for name, value in expected.items():
            if state.get(name) != value:
                raise ValueError(
                    f"loader state: {name}={state.get(name)!r} but this loader has {name}={value!r}; "
                    "a mid-epoch position only resumes with the same data and layout"
                )
        self._progress = _Progress(int(state["epoch"]), int(state["batches"]), int(state["samples"]),
                                   int(state["pass"]), [int(p) for p in state["positions"]])
        self._num_skipped = int(state.get("num_skipped", 0))
        self._discard_pipeline()

    # ----------------------------------------------------------------------------------------- reading
    def _specs(self, epoch: int, pass_index: int, skips: Sequence[int]) -> list[SlotSpec]:
        return [
            SlotSpec(
                shards=list(self.manifest.shards), shard_counts=list(self.manifest.shard_counts), rank=self.rank,
                world_size=self.world_size, worker=w, num_workers=self.num_slots, seed=self.seed, epoch=epoch,
                pass_index=pass_index, split=self.split, shuffle=self.shuffle, shuffle_buffer=self.shuffle_buffer,
                resampled=self.resampled, weights=self._weights, skip=int(skips[w]),
                decode="pil" if self.decoder == "pil" else "raw", image_size=self.image_size,
                augment=self.augment, chunk_size=self.chunk_size,
            )
            for w in range(self.num_slots)
        ]

    def _raw_batches(self, start: _Progress, target: int) -> Iterator[_RawBatch]:
        """Batches of this rank's epoch from ``start`` until ``target`` samples, filling from further passes."""
        taken = start.samples
        pass_index = start.pass_index
        skips = list(start.positions)
        labels: list[int] = []
        images: list[Any] = []
        origins: list[tuple[int, int, int]] = []
        while taken < target:
            got = 0
            pool = _ReaderPool(self._specs(start.epoch, pass_index, skips),
                               prefetch_chunks=self.prefetch_chunks if self.num_workers > 0 else 0)
            try:
                for chunk in pool:
                    self._num_skipped += chunk.skipped
                    self._num_shard_errors += chunk.shard_errors
                    rows: Any = chunk.images
                    for i, label in enumerate(chunk.labels):
                        labels.append(label)
                        images.append(rows[i])
                        origins.append((pass_index, chunk.worker, chunk.positions[i]))
                        got += 1
                        taken += 1
                        if len(labels) == self.batch_size or taken == target:
                            yield _RawBatch(labels, images, origins)
                            labels, images, origins = [], [], []
                        if taken == target:
                            return
            finally:
                pool.close()
            if got == 0:
                raise RuntimeError(
                    f"rank {self.rank}: no readable sample in pass {pass_index} of epoch {start.epoch} "
                    f"({taken} of {target} taken); check the shards of {self.manifest.location}"
                )
            log.warning("rank %d epoch %d: pass %d ended %d samples short (corrupt samples or shards); "
                        "filling from another pass", self.rank, start.epoch, pass_index, target - taken)
            pass_index += 1
            skips = [0] * self.num_slots

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        target = self.samples_per_epoch()
        start = replace(self._progress, positions=list(self._progress.positions))
        if self.decoder == "dali":
            batches = self._iter_dali(self._raw_batches(start, target))
        else:
            batches = self._iter_pil(self._raw_batches(start, target))
        for raw, images, labels in batches:
            self._progress.advance(raw, self.num_slots)
            yield images, labels
        self._progress = _Progress(start.epoch + 1, positions=[0] * self.num_slots)

    def _to_tensor(self, batch: np.ndarray) -> torch.Tensor:
        # uint8 [B, H, W, 3] -> [B, 3, H, W] in [-1, 1]
        images = torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2))).to(self.device)
        return images.to(torch.float32).sub_(127.5).div_(127.5).to(self.dtype)

    def _iter_pil(self, raw_batches: Iterator[_RawBatch]) -> Iterator[tuple[_RawBatch, torch.Tensor, torch.Tensor]]:
        for raw in raw_batches:
            labels = torch.tensor(raw.labels, dtype=torch.int64, device=self.device)
            yield raw, self._to_tensor(np.stack(raw.images)), labels

    # ----------------------------------------------------------------------------------------- DALI
    def _discard_pipeline(self) -> None:
        self._pipe = None
        self._feed = None
        self._pipe_needs_reset = False

    def _ensure_pipeline(self) -> tuple[Any, _DaliFeed]:
        from distrib_face.data.dali import build_pipeline

        if self._pipe is None:
            self._feed = _DaliFeed(flip=self.augment.flip, seed=self.seed * 1000003 + self.rank)
            resize = self.manifest.image_size is None or tuple(self.manifest.image_size) != tuple(self.image_size)
            self._pipe = build_pipeline(
                self._feed, batch_size=self.batch_size, image_size=self.image_size, resize=resize,
                augment=self.augment, device=self.device, num_threads=self.dali_threads,
                seed=(self.seed * 1000003 + self.rank) % (2**31 - 1), half=self.dtype == torch.float16,
            )
            self._pipe_needs_reset = False
        assert self._feed is not None
        return self._pipe, self._feed

    def _iter_dali(self, raw_batches: Iterator[_RawBatch]) -> Iterator[tuple[_RawBatch, torch.Tensor, torch.Tensor]]:
        from distrib_face.data.dali import outputs_to_torch

        pipe, feed = self._ensure_pipeline()
        feed.start(raw_batches, self._progress.epoch)
        if self._pipe_needs_reset:
            pipe.reset()
        finished = False
        try:
            while True:
                try:
                    images, labels = pipe.run()
                except StopIteration:
                    finished = True
                    break
                except RuntimeError as err:
                    # a sample DALI could not decode although its header looked fine: decode that batch
                    # with PIL, drop what fails there too (the batch comes out short by those samples)
                    raw = feed.inflight.popleft()
                    log.warning("DALI failed on a batch (%s); decoding it with PIL instead",
                                str(err).splitlines()[0])
                    fallback = self._pil_fallback(raw)
                    if fallback is not None:
                        yield fallback
                    continue
                raw = feed.inflight.popleft()
                image_tensor, label_tensor = outputs_to_torch(images, labels, self.device, self.dtype)
                yield raw, image_tensor, label_tensor
        finally:
            if finished:
                self._pipe_needs_reset = True
                feed.stop()
            else:  # abandoned mid-epoch: DALI holds prefetched batches, so start from a fresh pipeline
                feed.stop()
                self._discard_pipeline()

    def _pil_fallback(self, raw: _RawBatch) -> tuple[_RawBatch, torch.Tensor, torch.Tensor] | None:
        kept = _RawBatch([], [], [])
        arrays = []
        for label, data, origin in zip(raw.labels, raw.images, raw.origins):
            try:
                arrays.append(decode_pil(bytes(data), self.image_size, self.augment, self._aug_rng))
            except (OSError, ValueError, SyntaxError) as err:
                self._num_skipped += 1
                log.warning("skipping a corrupt sample (worker %d, position %d): %s", origin[1], origin[2], err)
                continue
            kept.labels.append(label)
            kept.images.append(data)
            kept.origins.append(origin)
        # positions of dropped samples are consumed too: keep them in the origins for the resume state
        kept.origins = list(raw.origins)
        if not arrays:
            return None
        labels = torch.tensor(kept.labels, dtype=torch.int64, device=self.device)
        return kept, self._to_tensor(np.stack(arrays)), labels


class _DaliFeed:
    """The ``external_source`` iterable: hands DALI the loader's batches and remembers which are in flight."""

    def __init__(self, flip: bool, seed: int) -> None:
        self.source: Iterator[_RawBatch] | None = None
        self.inflight: deque[_RawBatch] = deque()
        self.flip, self.seed, self.epoch = flip, seed, 0

    def start(self, source: Iterator[_RawBatch], epoch: int) -> None:
        self.source = source
        self.epoch = epoch
        self.inflight.clear()

    def stop(self) -> None:
        if self.source is not None and hasattr(self.source, "close"):
            self.source.close()  # type: ignore[union-attr]
        self.source = None

    def __iter__(self) -> _DaliFeed:
        return self

    def __next__(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        if self.source is None:
            raise StopIteration
        raw = next(self.source)
        self.inflight.append(raw)
        labels = [np.array(label, dtype=np.int64) for label in raw.labels]
        if not self.flip:
            return list(raw.images), labels
        flags = [np.array(flip_bit(self.seed, self.epoch, origin), dtype=np.int32) for origin in raw.origins]
        return list(raw.images), labels, flags


def flip_bit(seed: int, epoch: int, origin: tuple[int, ...]) -> int:
    """Whether to mirror the sample at ``origin`` (pass, worker, position) in ``epoch``: a fair coin that is a
    pure function of its arguments (splitmix64), so resuming mid-epoch repeats the same flips."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    for part in origin:
        x = (x ^ (int(part) + 0x94D049BB133111EB)) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return int(x >> 63)


def _parse_device(device: str | torch.device) -> torch.device:
    parsed = torch.device(device)
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda[:N], got {device!r}")
    return parsed


def _parse_image_size(image_size: int | Sequence[int] | None, manifest: Manifest) -> tuple[int, int]:
    if image_size is None:
        return tuple(manifest.image_size) if manifest.image_size else (112, 112)  # type: ignore[return-value]
    if isinstance(image_size, int):
        return image_size, image_size
    if len(image_size) != 2:
        raise ValueError(f"image_size must be an int or (H, W), got {image_size!r}")
    return int(image_size[0]), int(image_size[1])


def _manifest_for(shards_or_dir: Any) -> Manifest:
    """A manifest for a shard folder / manifest / URL, a Manifest, or a shard list (brace patterns allowed)."""
    if isinstance(shards_or_dir, Manifest):
        return shards_or_dir
    if isinstance(shards_or_dir, (str, os.PathLike)) and "{" not in str(shards_or_dir) \
            and not str(shards_or_dir).endswith(".tar"):
        return read_manifest(shards_or_dir)
    import braceexpand

    patterns = [shards_or_dir] if isinstance(shards_or_dir, (str, os.PathLike)) else list(shards_or_dir)
    shards = [url for pattern in patterns for url in braceexpand.braceexpand(str(pattern))]
    if not shards:
        raise ValueError(f"no shards in {shards_or_dir!r}")
    parent = shards[0].rsplit("/", 1)[0] if "/" in shards[0] else "."
    full = read_manifest(parent)
    counts = {path.rsplit("/", 1)[-1]: count for path, count in zip(full.shards, full.shard_counts)}
    missing = [s for s in shards if s.rsplit("/", 1)[-1] not in counts]
    if missing:
        raise ValueError(f"shards {missing[:3]} are not listed in {full.location}")
    shard_counts = [counts[s.rsplit("/", 1)[-1]] for s in shards]
    # class counts of a subset are unknown without reading it: scale the full set's (used only to re-weight)
    scale = sum(shard_counts) / max(1, full.num_samples)
    class_counts = [int(round(c * scale)) for c in full.class_counts]
    class_counts[int(np.argmax(class_counts))] += sum(shard_counts) - sum(class_counts)
    return Manifest(full.num_classes, sum(shard_counts), shards, shard_counts, class_counts, full.label_map,
                    full.source, full.content_hash, full.image_size, full.location)


def build_loader(
    shards_or_dir: str | os.PathLike | Sequence[str] | Manifest,
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    num_workers: int = 2,
    seed: int = 0,
    epoch: int = 0,
    decoder: str = "dali",
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    augment: AugmentConfig | Mapping[str, Any] | bool | None = None,
    rebalance: str | None = None,
    resampled: bool = False,
    drop_last: bool = True,
    dali_threads: int = 2,
    image_size: int | Sequence[int] | None = None,
    shuffle: bool = True,
    shuffle_buffer: int = 1000,
    split: str = "auto",
    chunk_size: int = 32,
    prefetch_chunks: int = 8,
) -> TrainLoader:
    """Build the training loader for one rank.

    Args:
        shards_or_dir: a shard folder, its ``manifest.json``, either as a URL (``http(s)://``, ``s3://``,
            ``gs://`` ...), a :class:`Manifest`, or a list / brace pattern of shards beside a manifest.
        batch_size: samples per batch on this rank.
        rank: this rank (from the trainer's process context; never read from the environment here).
        world_size: number of ranks.
        num_workers: reader processes on this rank (0 reads in this process).
        seed: seed of the shard order, shuffle buffer, re-weighting and augmentations.
        epoch: the first epoch to read.
        decoder: ``"dali"`` (DALI pipeline) or ``"pil"`` (PIL in the reader processes).
        device: where batches land; ``cuda[:N]`` also makes DALI decode on ``mixed`` on that GPU.
        dtype: image dtype (float32, bfloat16, float16, or their names).
        augment: ``None`` (random flip only), ``False`` (nothing), or :class:`AugmentConfig` fields.
        rebalance: ``None``, ``"sqrt"`` or ``"repeat_factor"`` long-tail re-weighting of identities.
        resampled: draw shards with replacement (an endless stream cut to the epoch's length).
        drop_last: drop the last partial batch of the epoch.
        dali_threads: DALI CPU threads.
        image_size: output size (int or (H, W)); default: the manifest's, else 112.
        shuffle: shuffle shards and samples (off: manifest order, for inspection).
        shuffle_buffer: samples in each reader's shuffle buffer.
        split: ``"auto"``, ``"shard"`` or ``"sample"`` (see :mod:`distrib_face.data.stream`).
        chunk_size: samples a reader hands over at a time.
        prefetch_chunks: chunks each reader process may prepare ahead.

    Returns:
        A :class:`TrainLoader`.

    Raises:
        ValueError: a bad argument (the message names it and its value).
        FileNotFoundError: no manifest where the shards are.
    """
    if decoder not in ("dali", "pil"):
        raise ValueError(f"decoder must be 'dali' or 'pil', got {decoder!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if rebalance not in REBALANCE:
        raise ValueError(f"rebalance must be one of {REBALANCE}, got {rebalance!r}")
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    manifest = _manifest_for(shards_or_dir)
    return TrainLoader(
        manifest, batch_size=batch_size, rank=rank, world_size=world_size, num_workers=num_workers, seed=seed,
        epoch=epoch, decoder=decoder, device=_parse_device(device), dtype=dtype, augment=resolve_augment(augment),
        rebalance=rebalance, resampled=resampled, drop_last=drop_last, dali_threads=dali_threads,
        image_size=_parse_image_size(image_size, manifest), shuffle=shuffle, shuffle_buffer=shuffle_buffer,
        split=split, chunk_size=chunk_size, prefetch_chunks=prefetch_chunks,
    )

"""The training loader: shards -> reader processes -> batches (DALI or PIL decoding) -> tensors on a device.

See :mod:`distrib_face.data.stream` for who reads what and how resuming works. Reader slots run in worker
processes (``num_workers``; 0 reads in the calling process) started by :mod:`distrib_face.data.procs`
(``forkserver``, watching their parent, every wait bounded); their chunks are merged in strict round-robin
order, so a batch sequence is a function of ``(seed, epoch)`` and the configuration alone.

Bad samples are dropped in the readers and counted by reason (:mod:`distrib_face.data.decode`) in the
loader's :class:`~distrib_face.data.quality.DataCounts` (``loader.counts``, saved in ``state_dict``);
more than ``max_skip_fraction`` of them stops the loader with a
:class:`~distrib_face.data.quality.DataQualityError` naming the worst shard. A batch DALI fails on is
decoded with PIL and counted (``dali_fallback_batches``); DALI failing for no fault in the data on more
than ``max_fallback_fraction`` of the batches stops the loader with DALI's own message
(:class:`~distrib_face.data.quality.DaliFallbackError`).
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from distrib_face.data.augment import AugmentConfig, augment_pil, flip_bit, resolve_augment
from distrib_face.data.decode import DEFAULT_MAX_IMAGE_PIXELS, BadSample, decode_image, flag_names
from distrib_face.data.manifest import Manifest, content_hash, is_remote, read_manifest
from distrib_face.data.procs import (
    DEFAULT_STALL_TIMEOUT,
    WorkerError,
    reader_main,
    receive,
    start_worker,
    stop_processes,
    worker_context,
)
from distrib_face.data.quality import (
    DEFAULT_MAX_SKIP_FRACTION,
    DEFAULT_SKIP_CHECK_AFTER,
    DaliFallbackError,
    DataCounts,
    DataQualityError,
    check_skip_fraction,
    format_reasons,
)
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
DEFAULT_MAX_FALLBACK_FRACTION = 0.01
MIN_FALLBACKS_TO_ABORT = 3

__all__ = ["DaliFallbackError", "DataQualityError", "TrainLoader", "WorkerError", "build_loader", "flip_bit"]


class _ReaderPool:
    """Runs one reader slot per process and merges their chunks in round-robin order.

    The merge takes chunk ``k`` of worker 0, 1, ..., then chunk ``k + 1`` of each, starting at ``cursor``
    (chunk index, worker): a resumed loader starts at the chunk it was consuming. A reader resumed inside a
    chunk first sends what is left of it; an earlier chunk it sends (only skips, beyond the saved position)
    is passed on at once.
    """

    def __init__(self, specs: Sequence[SlotSpec], prefetch_chunks: int, stall_timeout: float,
                 cursor: tuple[int, int] = (0, 0)) -> None:
        self.specs = list(specs)
        self.prefetch_chunks = prefetch_chunks
        self.stall_timeout = stall_timeout
        self.cursor = cursor
        self.processes: list[Any] = []

    def __iter__(self) -> Iterator[Chunk]:
        if len(self.specs) == 1 and self.specs[0].num_workers == 1 and self.prefetch_chunks == 0:
            yield from chunk_stream(self.specs[0])
            return
        ctx = worker_context()
        queues = [ctx.Queue(maxsize=max(1, self.prefetch_chunks)) for _ in self.specs]
        progress = [ctx.RawValue("q", 0) for _ in self.specs]
        self.processes = [ctx.Process(target=reader_main, args=(spec, q, counter, os.getpid()), daemon=True,
                                      name=f"data reader {spec.worker}")
                          for spec, q, counter in zip(self.specs, queues, progress)]
        ahead: dict[int, Chunk] = {}  # a chunk received for a later round

        def next_chunk(index: int) -> Chunk | None:
            if index in ahead:
                return ahead.pop(index)
            spec = self.specs[index]
            name = f"data reader worker {index} (rank {spec.rank}, epoch {spec.epoch}, pass {spec.pass_index})"
            kind, payload = receive(queues[index], self.processes[index], name, progress[index], self.stall_timeout)
            if kind == "chunk":
                return payload
            if kind == "end":
                return None
            raise WorkerError(f"{name} (pid {self.processes[index].pid}) failed:\n{payload}")

        try:
            for process in self.processes:
                start_worker(process)
            active = set(range(len(self.specs)))
            round_index, worker = self.cursor
            while active:
                if worker in active:
                    chunk = next_chunk(worker)
                    while chunk is not None and chunk.index < round_index:
                        yield chunk
                        chunk = next_chunk(worker)
                    if chunk is None:
                        active.discard(worker)
                    elif chunk.index == round_index:
                        yield chunk
                    else:
                        ahead[worker] = chunk
                worker += 1
                if worker == len(self.specs):
                    worker, round_index = 0, round_index + 1
        finally:
            self.close()

    def close(self) -> None:
        """Stop the reader processes this pool started (every wait bounded)."""
        stop_processes(self.processes)
        self.processes = []


@dataclass
class _RawBatch:
    """A batch before decoding (DALI) or after (PIL): labels, images, and where each sample came from.

    ``origins`` cover every stream sample the batch consumed (also those a PIL fallback dropped: their
    positions are consumed too); the other lists hold the samples actually in the batch.
    """

    labels: list[int]
    images: list[Any]
    origins: list[tuple[int, int, int]]  # (pass, worker, position)
    shards: list[int] = field(default_factory=list)
    flags: list[int] = field(default_factory=list)
    dropped: list[tuple[int, str]] = field(default_factory=list)  # (shard, reason) dropped by a PIL fallback
    fallback: bool = False


@dataclass
class _Progress:
    """Where the loader stands within an epoch (what ``state_dict`` saves)."""

    epoch: int
    batches: int = 0
    samples: int = 0
    pass_index: int = 0
    positions: list[int] = field(default_factory=list)
    last_worker: int = 0  # the reader of the last sample consumed (where the round-robin merge stands)

    def advance(self, batch: _RawBatch, num_slots: int) -> None:
        for pass_index, worker, position in batch.origins:
            if pass_index > self.pass_index:
                self.pass_index = pass_index
                self.positions = [0] * num_slots
            self.positions[worker] = max(self.positions[worker], position + 1)
            self.last_worker = worker
        self.samples += len(batch.origins)  # dropped corrupt samples were taken from the stream too
        self.batches += 1


def dali_error_text(err: BaseException) -> str:
    """DALI's message without its boilerplate ("Critical error in pipeline:", the Python traceback of the
    pipeline definition, "Current pipeline object is no longer valid.")."""
    kept, in_traceback = [], False
    for line in str(err).splitlines():
        stripped = line.strip()
        if stripped in ("", "Critical error in pipeline:", "Current pipeline object is no longer valid."):
            continue
        if stripped.startswith("which was used in the pipeline definition"):
            in_traceback = True
            continue
        if in_traceback:
            if stripped == "encountered:":
                in_traceback = False
            continue
        kept.append(stripped)
    return " ".join(kept) or str(err) or type(err).__name__


class TrainLoader:
    """Iterates one rank's share of an epoch as ``(images, labels)`` batches.

    ``images`` is float [B, 3, H, W] in [-1, 1] on ``device`` in ``dtype``; ``labels`` int64 [B], always in
    ``[0, manifest.num_classes)``. Every rank yields ``len(loader)`` batches per epoch. After a full pass the
    loader moves to the next epoch by itself; ``set_epoch`` picks one explicitly. ``state_dict()`` taken
    between batches and given to ``load_state_dict`` of a fresh loader (same data, ranks, workers, batch size,
    seed) continues the epoch with exactly the samples not yet seen, and keeps the counts of what was skipped.
    Build it with :func:`build_loader`.
    """

    def __init__(self, manifest: Manifest, *, batch_size: int, rank: int, world_size: int, num_workers: int,
                 seed: int, epoch: int, decoder: str, device: torch.device, dtype: torch.dtype,
                 augment: AugmentConfig, rebalance: str | None, resampled: bool, drop_last: bool,
                 dali_threads: int, image_size: tuple[int, int], shuffle: bool, shuffle_buffer: int,
                 split: str, chunk_size: int, prefetch_chunks: int,
                 max_skip_fraction: float = DEFAULT_MAX_SKIP_FRACTION,
                 skip_check_after: int = DEFAULT_SKIP_CHECK_AFTER,
                 max_fallback_fraction: float = DEFAULT_MAX_FALLBACK_FRACTION,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, allow_missing_shards: bool = False,
                 stall_timeout: float = DEFAULT_STALL_TIMEOUT, missing_shards: Sequence[str] = ()) -> None:
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
        self.max_skip_fraction = max_skip_fraction
        self.skip_check_after = skip_check_after
        self.max_fallback_fraction = max_fallback_fraction
        self.max_image_pixels = max_image_pixels
        self.allow_missing_shards = allow_missing_shards
        self.stall_timeout = stall_timeout
        # [C] float64 or None: sent to every reader process as one array (8 bytes a class), not a list
        self._weights = class_weights(manifest.class_counts, rebalance)
        self._progress = _Progress(epoch, positions=[0] * self.num_slots)
        self.counts = DataCounts(missing_shards=list(missing_shards))
        """What this loader delivered, skipped (by reason and shard), repaired, and fell back on."""
        # skips received from the readers but not yet counted: (pass, worker) -> deque of
        # (position, shard, reason, count); a skip counts once the loader consumed past its position
        self._pending: dict[tuple[int, int], deque[tuple[int, int, str, int]]] = {}
        self._batches_seen = 0
        self._unexplained_fallbacks = 0
        self._pipe_builds = 0
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
        """Samples this loader skipped so far, all reasons (see :meth:`skip_counts`)."""
        return self.counts.skipped_total

    @property
    def num_shard_errors(self) -> int:
        """Samples lost to shards cut short or impossible to open."""
        return self.counts.skipped["truncated_shard"] + self.counts.skipped["missing_shard"]

    @property
    def samples_read(self) -> int:
        """Samples taken from the shards so far: delivered plus skipped."""
        return self.counts.samples_read

    def skip_counts(self) -> dict[str, int]:
        """Samples skipped so far by reason (only reasons that occurred), over this loader's life."""
        return self.counts.to_dict()["skipped"]

    def data_report(self) -> dict[str, Any]:
        """JSON-able counts: :meth:`DataCounts.to_dict <distrib_face.data.quality.DataCounts.to_dict>`."""
        return self.counts.to_dict()

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
        """JSON-able position of this rank's loader (and its counts): load it into a fresh loader to go on."""
        p = self._progress
        self._commit_skips()
        return {
            "version": STATE_VERSION, "epoch": p.epoch, "batches": p.batches, "samples": p.samples,
            "pass": p.pass_index, "positions": list(p.positions), "rank": self.rank,
            "world_size": self.world_size, "num_workers": self.num_workers, "batch_size": self.batch_size,
            "seed": self.seed, "content_hash": self.manifest.content_hash, "num_skipped": self.counts.skipped_total,
            "last_worker": p.last_worker, "chunk_size": self.chunk_size, "counts": self.counts.to_dict(),
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
                    "batch_size": self.batch_size, "seed": self.seed, "content_hash": self.manifest.content_hash,
                    "chunk_size": self.chunk_size}
        for name, value in expected.items():
            if name == "chunk_size" and name not in state:
                continue  # states written before chunk_size was saved
            if state.get(name) != value:
                raise ValueError(
                    f"loader state: {name}={state.get(name)!r} but this loader has {name}={value!r}; "
                    "a mid-epoch position only resumes with the same data and layout"
                )
        self._progress = _Progress(int(state["epoch"]), int(state["batches"]), int(state["samples"]),
                                   int(state["pass"]), [int(p) for p in state["positions"]],
                                   int(state.get("last_worker", 0)))
        missing = self.counts.missing_shards
        self.counts = DataCounts.from_dict(state.get("counts", {}))
        self.counts.missing_shards = missing
        self._pending.clear()
        self._discard_pipeline()

    # ----------------------------------------------------------------------------------------- counting
    def _commit_skips(self) -> None:
        """Count the pending skips whose positions the loader has consumed (see ``_pending``)."""
        p = self._progress
        for key in list(self._pending):
            pass_index, worker = key
            pending = self._pending[key]
            # a later pass's skips wait for that pass: DALI's feed reads batches ahead, into the next pass,
            # while the consumed positions still count the current one
            while pending and (pass_index < p.pass_index
                               or (pass_index == p.pass_index and pending[0][0] < p.positions[worker])):
                _, shard, reason, count = pending.popleft()
                self.counts.add_skip(self._shard_name(shard), reason, count)
            if not pending:
                del self._pending[key]

    def _shard_name(self, index: int) -> str:
        return self.manifest.shards[index].rsplit("/", 1)[-1]

    def _account(self, raw: _RawBatch) -> None:
        """Count a consumed batch: delivered samples, repairs, fallback drops, then the skips it passed."""
        self.counts.delivered += len(raw.labels)
        for flags in raw.flags:
            for name in flag_names(flags):
                self.counts.repaired[name] += 1
        for shard, reason in raw.dropped:
            self.counts.add_skip(self._shard_name(shard), reason)
        if raw.fallback:
            self.counts.dali_fallback_batches += 1
        self._commit_skips()
        check_skip_fraction(self.counts, self.max_skip_fraction, self.skip_check_after, where=f"rank {self.rank}: ")

    # ----------------------------------------------------------------------------------------- reading
    def _specs(self, epoch: int, pass_index: int, skips: Sequence[int]) -> list[SlotSpec]:
        return [
            SlotSpec(
                shards=list(self.manifest.shards), shard_counts=list(self.manifest.shard_counts), rank=self.rank,
                world_size=self.world_size, worker=w, num_workers=self.num_slots, seed=self.seed, epoch=epoch,
                pass_index=pass_index, split=self.split, shuffle=self.shuffle, shuffle_buffer=self.shuffle_buffer,
                resampled=self.resampled, weights=self._weights, skip=int(skips[w]),
                decode="pil" if self.decoder == "pil" else "raw", image_size=self.image_size,
                augment=self.augment, chunk_size=self.chunk_size, num_classes=self.manifest.num_classes,
                expected_size=self.manifest.image_size, max_image_pixels=self.max_image_pixels,
                allow_missing_shards=self.allow_missing_shards, flip_seed=self._flip_seed,
            )
            for w in range(self.num_slots)
        ]

    @property
    def _flip_seed(self) -> int:
        return self.seed * 1000003 + self.rank

    def _raw_batches(self, start: _Progress, target: int) -> Iterator[_RawBatch]:
        """Batches of this rank's epoch from ``start`` until ``target`` samples, filling from further passes."""
        taken = start.samples
        pass_index = start.pass_index
        skips = list(start.positions)
        # the merge resumes at the chunk of the last consumed sample (chunks cover fixed position ranges)
        last = start.positions[start.last_worker] if start.positions else 0
        cursor = ((last - 1) // max(1, self.chunk_size), start.last_worker) if last > 0 else (0, 0)
        batch = _RawBatch([], [], [])
        while taken < target:
            got = 0
            pass_skips: Counter = Counter()
            pool = _ReaderPool(self._specs(start.epoch, pass_index, skips),
                               prefetch_chunks=self.prefetch_chunks if self.num_workers > 0 else 0,
                               stall_timeout=self.stall_timeout, cursor=cursor)
            try:
                for chunk in pool:
                    if chunk.skips:
                        self._pending.setdefault((pass_index, chunk.worker), deque()).extend(chunk.skips)
                        for _, _, reason, count in chunk.skips:
                            pass_skips[reason] += count
                    rows: Any = chunk.images
                    for i, label in enumerate(chunk.labels):
                        batch.labels.append(label)
                        batch.images.append(rows[i])
                        batch.origins.append((pass_index, chunk.worker, chunk.positions[i]))
                        batch.shards.append(chunk.shards[i])
                        batch.flags.append(chunk.flags[i])
                        got += 1
                        taken += 1
                        if len(batch.labels) == self.batch_size or taken == target:
                            yield batch
                            batch = _RawBatch([], [], [])
                        if taken == target:
                            return
            finally:
                pool.close()
            if got == 0:
                raise DataQualityError(
                    f"rank {self.rank}: no usable sample in pass {pass_index} of epoch {start.epoch} "
                    f"({taken} of {target} taken; skipped: {format_reasons(pass_skips) or 'nothing'}); "
                    f"check the shards of {self.manifest.location} with `distrib-face data verify`"
                )
            log.warning("rank %d epoch %d: pass %d ended %d samples short (skipped: %s); filling from another pass",
                        self.rank, start.epoch, pass_index, target - taken, format_reasons(pass_skips) or "nothing")
            pass_index += 1
            skips = [0] * self.num_slots
            cursor = (0, 0)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        target = self.samples_per_epoch()
        start = replace(self._progress, positions=list(self._progress.positions))
        self._pending.clear()  # skips of an abandoned iteration lie beyond the saved position: read again
        if self.decoder == "dali":
            batches = self._iter_dali(self._raw_batches(start, target))
        else:
            batches = self._iter_pil(self._raw_batches(start, target))
        try:
            for raw, images, labels in batches:
                self._progress.advance(raw, self.num_slots)
                self._batches_seen += 1
                self._account(raw)
                yield images, labels
        finally:
            batches.close()  # stops the reader processes now, also on an abort or an abandoned epoch
        # skips after the last consumed position of a reader are not counted (a resumed run cannot see them
        # either); everything before it is
        self._commit_skips()
        self._pending.clear()
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
            self._feed = _DaliFeed(flip=self.augment.flip, seed=self._flip_seed)
            resize = self.manifest.image_size is None or tuple(self.manifest.image_size) != tuple(self.image_size)
            # a pipeline rebuilt after a failure draws new augmentation parameters (another seed)
            seed = (self.seed * 1000003 + self.rank + 7919 * self._pipe_builds) % (2**31 - 1)
            self._pipe = build_pipeline(
                self._feed, batch_size=self.batch_size, image_size=self.image_size, resize=resize,
                augment=self.augment, device=self.device, num_threads=self.dali_threads,
                seed=seed, half=self.dtype == torch.float16,
            )
            self._pipe_builds += 1
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
                except Exception as err:
                    if feed.source_error is not None:
                        raise feed.source_error from None  # the readers failed, not DALI
                    if not isinstance(err, RuntimeError) or not feed.inflight:
                        raise
                    # DALI's pipeline is dead after an error ("Current pipeline object is no longer valid"):
                    # decode the failed batch with PIL, then go on in a fresh pipeline, first with the
                    # batches the dead one had already taken from the feed
                    failed = feed.inflight.popleft()
                    replay = list(feed.inflight)
                    feed.source = None  # the dead pipeline must not close the shared reader generator
                    self._discard_pipeline()
                    yield self._pil_fallback(failed, err)
                    pipe, feed = self._ensure_pipeline()
                    feed.start(raw_batches, self._progress.epoch, replay=replay)
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

    def _pil_fallback(self, raw: _RawBatch, err: BaseException) -> tuple[_RawBatch, torch.Tensor, torch.Tensor]:
        """Decode a batch DALI failed on with PIL; samples PIL cannot decode either are dropped and counted.

        Raises:
            DaliFallbackError: DALI failed on this batch although PIL decoded every sample, and such
                unexplained failures now exceed ``max_fallback_fraction`` of the batches (at least 3).
            DataQualityError: PIL could decode no sample of the batch.
        """
        text = dali_error_text(err)
        kept = _RawBatch([], [], list(raw.origins), fallback=True)  # every origin was consumed
        arrays = []
        for label, data, origin, shard, flags in zip(raw.labels, raw.images, raw.origins, raw.shards, raw.flags):
            flip = bool(flip_bit(self._flip_seed, self._progress.epoch, origin)) if self.augment.flip else False
            try:
                image = decode_image(bytes(data), max_pixels=self.max_image_pixels)
                arrays.append(augment_pil(image, self.image_size, self.augment, self._aug_rng, flip))
            except BadSample as bad:
                kept.dropped.append((shard, bad.reason))
                log.warning("skipping a sample DALI and PIL both failed on (worker %d, position %d, shard %s): %s",
                            origin[1], origin[2], self._shard_name(shard), bad)
                continue
            kept.labels.append(label)
            kept.images.append(data)
            kept.shards.append(shard)
            kept.flags.append(flags)
        fallbacks = self.counts.dali_fallback_batches + 1
        if not kept.dropped:
            self._unexplained_fallbacks += 1
            limit = max(MIN_FALLBACKS_TO_ABORT, self.max_fallback_fraction * (self._batches_seen + 1))
            if self._unexplained_fallbacks >= limit:
                raise DaliFallbackError(
                    f"rank {self.rank}: DALI failed on {self._unexplained_fallbacks} of {self._batches_seen + 1} "
                    f"batches whose every image PIL decodes (more than {self.max_fallback_fraction:.0%}): the DALI "
                    f"pipeline itself is broken, not the data. DALI's error: {text}"
                )
        log.warning("DALI failed on a batch (%s); decoded it with PIL instead (fallback batch %d%s)",
                    text, fallbacks, f"; dropped {format_reasons(Counter(r for _, r in kept.dropped))}"
                    if kept.dropped else "")
        if not arrays:
            raise DataQualityError(f"rank {self.rank}: no sample of a batch could be decoded by DALI or PIL "
                                   f"(DALI's error: {text}); check the shards with `distrib-face data verify`")
        # Every rank's batch keeps the size all ranks agree on (the classifier's gathers rely on it): the
        # samples PIL dropped are stood in for by kept ones, repeated in order (the drops are counted above).
        labels_out, arrays_out = list(kept.labels), list(arrays)
        for i in range(len(raw.labels) - len(arrays)):
            labels_out.append(kept.labels[i % len(kept.labels)])
            arrays_out.append(arrays[i % len(arrays)])
        labels = torch.tensor(labels_out, dtype=torch.int64, device=self.device)
        return kept, self._to_tensor(np.stack(arrays_out)), labels


class _DaliFeed:
    """The ``external_source`` iterable: hands DALI the loader's batches and remembers which are in flight."""

    def __init__(self, flip: bool, seed: int) -> None:
        self.source: Iterator[_RawBatch] | None = None
        self.replay: deque[_RawBatch] = deque()
        self.inflight: deque[_RawBatch] = deque()
        self.source_error: BaseException | None = None
        self.flip, self.seed, self.epoch = flip, seed, 0

    def start(self, source: Iterator[_RawBatch], epoch: int, replay: Sequence[_RawBatch] = ()) -> None:
        """Feed ``replay`` first, then ``source``."""
        self.source = source
        self.epoch = epoch
        self.replay = deque(replay)
        self.inflight.clear()

    def stop(self) -> None:
        if self.source is not None and hasattr(self.source, "close"):
            self.source.close()  # type: ignore[union-attr]
        self.source = None

    def __iter__(self) -> _DaliFeed:
        return self

    def __next__(self) -> tuple[list[np.ndarray], ...]:
        if self.replay:
            raw = self.replay.popleft()
        elif self.source is None:
            raise StopIteration
        else:
            try:
                raw = next(self.source)
            except StopIteration:
                raise
            except BaseException as err:  # a reader failure: the loader re-raises it, never a decode failure
                self.source_error = err
                raise
        self.inflight.append(raw)
        labels = [np.array(label, dtype=np.int64) for label in raw.labels]
        if not self.flip:
            return list(raw.images), labels
        flags = [np.array(flip_bit(self.seed, self.epoch, origin), dtype=np.int32) for origin in raw.origins]
        return list(raw.images), labels, flags


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


def _scaled_class_counts(class_counts: np.ndarray, total: int) -> np.ndarray:
    """``class_counts`` scaled to sum to ``total`` (largest remainders; never negative). A subset's true class
    counts are unknown without reading it; they are used only to re-weight the long tail."""
    full = int(class_counts.sum())
    if full == 0:
        return np.zeros(len(class_counts), dtype=np.int64)
    exact = np.asarray(class_counts, dtype=np.float64) * (total / full)
    counts = np.floor(exact).astype(np.int64)
    remainder = int(total - counts.sum())
    if remainder > 0:
        counts[np.argsort(-(exact - counts), kind="stable")[:remainder]] += 1
    return counts


def _subset(full: Manifest, shards: Sequence[str], counts: Sequence[int], content: str) -> Manifest:
    total = int(sum(counts))
    return full.with_shards(shards, counts, _scaled_class_counts(full.class_counts, total), content)


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
    return _subset(full, shards, [counts[s.rsplit("/", 1)[-1]] for s in shards], full.content_hash)


def _drop_missing_shards(manifest: Manifest, allow: bool) -> tuple[Manifest, list[str]]:
    """``manifest`` without its local shards that do not exist (remote ones are found out when opened).

    Raises:
        FileNotFoundError: a shard is missing and ``allow`` is off (the message names it).
    """
    missing = [path for path in manifest.shards if not is_remote(path) and not os.path.exists(path)]
    if not missing:
        return manifest, []
    where = manifest.location or "the manifest"
    if not allow:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"{missing[0]}: shard listed in {where} is missing{more}; set "
                                "data.allow_missing_shards: true to train without it")
    keep = [i for i, path in enumerate(manifest.shards) if path not in set(missing)]
    if not keep:
        raise FileNotFoundError(f"{where}: all {len(missing)} shards are missing")
    lost = sum(manifest.shard_counts[i] for i, path in enumerate(manifest.shards) if path in set(missing))
    log.warning("%d of %d shards listed in %s are missing (%d samples); training without them "
                "(data.allow_missing_shards): %s", len(missing), len(manifest.shards), where, lost,
                ", ".join(p.rsplit("/", 1)[-1] for p in missing[:10]) + (" ..." if len(missing) > 10 else ""))
    # another set of shards is another data set: a checkpoint of the full set must not resume on it
    content = content_hash([manifest.content_hash, "missing:" + ",".join(p.rsplit("/", 1)[-1] for p in missing)])
    return _subset(manifest, [manifest.shards[i] for i in keep], [manifest.shard_counts[i] for i in keep],
                   content), [p.rsplit("/", 1)[-1] for p in missing]


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
    max_skip_fraction: float = DEFAULT_MAX_SKIP_FRACTION,
    skip_check_after: int = DEFAULT_SKIP_CHECK_AFTER,
    allow_missing_shards: bool = False,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_fallback_fraction: float = DEFAULT_MAX_FALLBACK_FRACTION,
    stall_timeout: float = DEFAULT_STALL_TIMEOUT,
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
        max_skip_fraction: stop with :class:`DataQualityError` once more than this fraction of the samples
            read was skipped (checked after ``skip_check_after`` samples).
        skip_check_after: samples read before the skip fraction is checked.
        allow_missing_shards: go on without shards the manifest names but that are missing (said once in
            the log); off: a missing shard is a ``FileNotFoundError`` naming it.
        max_image_pixels: largest ``width * height`` an image header may claim (decompression bombs).
        max_fallback_fraction: stop with :class:`DaliFallbackError` once DALI failed on more than this
            fraction of the batches for no fault in the data (at least 3).
        stall_timeout: seconds a reader process may go without progress before it counts as stuck.

    Returns:
        A :class:`TrainLoader`.

    Raises:
        ValueError: a bad argument (the message names it and its value).
        FileNotFoundError: no manifest where the shards are, or a missing shard (``allow_missing_shards`` off).
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
    if not 0 <= max_skip_fraction <= 1:
        raise ValueError(f"max_skip_fraction must be in [0, 1], got {max_skip_fraction}")
    if not 0 <= max_fallback_fraction <= 1:
        raise ValueError(f"max_fallback_fraction must be in [0, 1], got {max_fallback_fraction}")
    if max_image_pixels < 1:
        raise ValueError(f"max_image_pixels must be >= 1, got {max_image_pixels}")
    if not stall_timeout > 0:
        raise ValueError(f"stall_timeout must be > 0, got {stall_timeout}")
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    manifest, missing = _drop_missing_shards(_manifest_for(shards_or_dir), allow_missing_shards)
    return TrainLoader(
        manifest, batch_size=batch_size, rank=rank, world_size=world_size, num_workers=num_workers, seed=seed,
        epoch=epoch, decoder=decoder, device=_parse_device(device), dtype=dtype, augment=resolve_augment(augment),
        rebalance=rebalance, resampled=resampled, drop_last=drop_last, dali_threads=dali_threads,
        image_size=_parse_image_size(image_size, manifest), shuffle=shuffle, shuffle_buffer=shuffle_buffer,
        split=split, chunk_size=chunk_size, prefetch_chunks=prefetch_chunks, max_skip_fraction=max_skip_fraction,
        skip_check_after=skip_check_after, max_fallback_fraction=max_fallback_fraction,
        max_image_pixels=max_image_pixels, allow_missing_shards=allow_missing_shards, stall_timeout=stall_timeout,
        missing_shards=missing,
    )

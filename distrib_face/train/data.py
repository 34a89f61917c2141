"""The trainer's view of its input: a loader of ``(images, labels)`` batches with a resumable position.

``data.source: shards`` reads webdataset shards through :func:`distrib_face.data.build_loader` (DALI or
PIL decoding). ``data.source: random`` makes class-dependent random images in memory -- no files and no
decoding -- so a benchmark can time the step alone and a quick check needs nothing on disk.

Position after a world-size change. A loader's state is per rank and only meaningful for the world size
that wrote it (the shard loader refuses any other). When the number of ranks changes, the position is
re-derived from what every world size agrees on: the epoch in progress and the images the whole job had
consumed in it (``samples_in_epoch``). The shard loader then starts the *next* epoch (the rest of the
interrupted one is skipped: the new ranks would split it differently, so "the images not yet seen" has no
exact meaning; the step count and the LR schedule are unaffected). The random source, whose epoch order
does not depend on the split, continues the same epoch ``floor(samples_in_epoch / (B x W_new))`` batches in.
An unchanged world size restores each rank's exact position.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Protocol, runtime_checkable

import torch

from distrib_face.config import Config

if TYPE_CHECKING:
    from distrib_face.data.manifest import Manifest

logger = logging.getLogger(__name__)


@runtime_checkable
class BatchSource(Protocol):
    """What the trainer draws batches from: the shard loader (:class:`distrib_face.data.TrainLoader`) and
    :class:`RandomBatches` both satisfy it.

    Iterating yields one epoch of ``(images [B, 3, H, W] float, labels [B] int64)`` on this rank; after a full
    pass the source is at the next epoch. ``state_dict`` / ``load_state_dict`` carry the position, JSON-able.
    """

    @property
    def epoch(self) -> int:
        """The epoch the next iteration reads."""

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The rest of the current epoch."""

    def set_epoch(self, epoch: int) -> None:
        """Read ``epoch`` next, from its start."""

    def state_dict(self) -> dict[str, Any]:
        """The position, JSON-able."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` output."""


class RandomBatches:
    """Class-dependent random images, generated per batch from a seed: an in-memory, resumable loader.

    Image ``i`` has label ``i mod num_classes`` and is a smooth class prototype (an 8 x 8 pattern
    upsampled) plus per-image noise, so a network can learn it. Rank ``r`` reads images ``r, r + W, ...``
    of each epoch's permutation.

    Args:
        num_classes: identities.
        num_samples: images per epoch (all ranks together).
        batch_size: images per batch on this rank.
        image_size: side of the square images.
        rank, world_size: this rank's slice.
        seed: seeds the prototypes, the per-epoch order and the noise.
        device: where batches are made.
    """

    def __init__(self, *, num_classes: int, num_samples: int, batch_size: int, image_size: int, rank: int,
                 world_size: int, seed: int = 0, device: torch.device | str = "cpu") -> None:
        self.num_classes, self.num_samples, self.batch_size = num_classes, num_samples, batch_size
        self.image_size, self.rank, self.world_size, self.seed = image_size, rank, world_size, seed
        self.device = torch.device(device)
        gen = torch.Generator().manual_seed(seed)
        self._prototypes = torch.rand(num_classes, 3, 8, 8, generator=gen) * 2 - 1  # [C, 3, 8, 8]
        self.epoch, self.batch_index = 0, 0
        if len(self) == 0:
            raise ValueError(
                f"data.random_num_samples={num_samples} gives no full batch of {batch_size} on each of {world_size} ranks"
            )

    def __len__(self) -> int:
        return self.num_samples // self.world_size // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its first batch."""
        self.epoch, self.batch_index = int(epoch), 0

    def state_dict(self) -> dict[str, Any]:
        """JSON-able position: the epoch and the next batch index in it."""
        return {"epoch": self.epoch, "batch_index": self.batch_index, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` output."""
        self.epoch, self.batch_index = int(state["epoch"]), int(state["batch_index"])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch))
        mine = order[self.rank::self.world_size]
        while self.batch_index < len(self):
            start = self.batch_index * self.batch_size
            index = mine[start:start + self.batch_size]
            self.batch_index += 1
            yield self._make(index)
        self.epoch, self.batch_index = self.epoch + 1, 0  # like the shard loader: the next pass is the next epoch

    def _make(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        labels = index % self.num_classes
        size = self.image_size
        base = torch.nn.functional.interpolate(self._prototypes[labels], size=(size, size), mode="bilinear",
                                               align_corners=False)
        noise_gen = torch.Generator().manual_seed(self.seed * 7919 + int(index[0]) * 104_729 + self.epoch)
        images = (base + 0.3 * torch.randn(base.shape, generator=noise_gen)).clamp_(-1, 1)
        return images.to(self.device), labels.to(self.device)


@dataclass
class TrainData:
    """The loader and what the trainer needs to know about the data."""

    loader: BatchSource
    num_classes: int
    manifest: Manifest | None
    """The shard manifest (``source: shards``), for the class-size histogram."""


def build_train_data(cfg: Config, rank: int, world_size: int, device: torch.device, epoch: int = 0) -> TrainData:
    """Build this rank's loader for ``cfg.data`` (positioned at the start of ``epoch``)."""
    data = cfg.data
    if data.source == "random":
        loader = RandomBatches(
            num_classes=data.random_num_classes, num_samples=data.random_num_samples, batch_size=data.batch_size,
            image_size=data.image_size, rank=rank, world_size=world_size, seed=cfg.train.seed, device=device,
        )
        loader.set_epoch(epoch)
        return TrainData(loader=loader, num_classes=data.random_num_classes, manifest=None)
    from distrib_face.data import build_loader, read_manifest

    manifest = read_manifest(data.shards)
    # Labels outside [0, manifest.num_classes) are dropped by the readers (counted as label_out_of_range), so
    # the classifier never sees one; loader.counts holds what was skipped (see distrib_face.data.quality).
    # With several ranks the skip fraction is checked by the trainer on the counts of all ranks (every rank
    # then stops together instead of one rank leaving the others in a collective), not by each loader.
    loader = build_loader(
        data.shards, batch_size=data.batch_size, rank=rank, world_size=world_size, num_workers=data.num_workers,
        seed=cfg.train.seed, epoch=epoch, decoder=data.decoder, device=str(device), dtype=torch.float32,
        augment=data.augment, rebalance=data.rebalance, resampled=data.resampled, drop_last=True,
        shuffle=data.shuffle, dali_threads=data.dali_threads, image_size=data.image_size,
        max_skip_fraction=data.max_skip_fraction if world_size == 1 else 1.0, skip_check_after=data.skip_check_after,
        allow_missing_shards=data.allow_missing_shards, max_image_pixels=data.max_image_pixels,
    )
    if len(loader) == 0:
        raise ValueError(
            f"data.shards {data.shards!r}: {manifest.num_samples} images give no full batch of "
            f"{data.batch_size} on each of {world_size} ranks (lower data.batch_size)"
        )
    return TrainData(loader=loader, num_classes=manifest.num_classes, manifest=manifest)


def restore_loader(loader: BatchSource, saved: list[dict[str, Any] | None], rank: int, world_size: int, *, epoch: int,
                   samples_in_epoch: int, batch_size: int) -> None:
    """Put ``loader`` where the checkpointed run stopped (see the module docstring for a new world size).

    Args:
        loader: this rank's fresh loader.
        saved: every saving rank's ``loader.state_dict()``, in rank order.
        rank, world_size: this rank and the current world size.
        epoch: the epoch in progress at the checkpoint.
        samples_in_epoch: images of that epoch consumed by all ranks together.
        batch_size: images per batch per rank now.
    """
    if len(saved) == world_size and saved[rank] is not None:
        loader.load_state_dict(saved[rank])
        return
    if isinstance(loader, RandomBatches):
        loader.set_epoch(epoch)
        loader.batch_index = min(len(loader), samples_in_epoch // (batch_size * world_size))
        where = f"epoch {epoch}, batch {loader.batch_index}"
    else:
        next_epoch = epoch + 1 if samples_in_epoch > 0 else epoch
        loader.set_epoch(next_epoch)
        where = f"the start of epoch {next_epoch}"
    logger.info("rank %d: %d ranks wrote the checkpoint, %d run now: the loader starts at %s",
                rank, len(saved), world_size, where)


def epochs_to_steps(epochs: float, batches_per_epoch: int, grad_accum: int) -> int:
    """Optimiser steps in ``epochs`` epochs (at least 1)."""
    return max(1, math.ceil(epochs * batches_per_epoch / grad_accum))

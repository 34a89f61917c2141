"""Both loaders the trainer draws from satisfy :class:`distrib_face.train.data.BatchSource`.

``isinstance`` on a ``runtime_checkable`` protocol only checks that the members exist, so each loader is
also run through the protocol's contract: one epoch of ``(images [B, 3, H, W] float, labels [B] int64)``,
``len`` batches of it, then the next epoch, and a JSON-able position that a fresh loader continues from.
"""

from __future__ import annotations

import json

import pytest
import torch

from distrib_face.data import TrainLoader, build_loader
from distrib_face.data.testing import write_indexed_shards
from distrib_face.train.data import BatchSource, RandomBatches

SIZE = 16


def _shard_loader(tmp_path) -> TrainLoader:
    if not (tmp_path / "shards").exists():
        write_indexed_shards(tmp_path / "shards", [7, 9], image_size=SIZE)  # 16 samples, label i is sample i
    return build_loader(tmp_path / "shards", batch_size=4, rank=0, world_size=1, num_workers=0, decoder="pil",
                        augment=False)


def _random_batches(tmp_path) -> RandomBatches:
    return RandomBatches(num_classes=5, num_samples=16, batch_size=4, image_size=SIZE, rank=0, world_size=1)


@pytest.mark.parametrize("make", [_shard_loader, _random_batches], ids=["TrainLoader", "RandomBatches"])
def test_loaders_are_batch_sources(make, tmp_path):
    loader = make(tmp_path)
    assert isinstance(loader, BatchSource)
    assert loader.epoch == 0 and len(loader) == 4  # 16 samples, batches of 4, one rank
    batches = list(loader)
    assert len(batches) == 4 and loader.epoch == 1
    for images, labels in batches:
        assert images.shape == (4, 3, SIZE, SIZE) and images.is_floating_point()
        assert labels.shape == (4,) and labels.dtype == torch.int64
    loader.set_epoch(0)
    it = iter(loader)
    next(it)
    state = json.loads(json.dumps(loader.state_dict()))  # JSON-able
    resumed = make(tmp_path)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == 3
    assert [lab.tolist() for _, lab in rest] == [lab.tolist() for _, lab in batches[1:]]


def test_the_protocol_check_can_fail():
    class NoResume:
        epoch = 0

        def __len__(self) -> int:
            return 0

        def __iter__(self):
            return iter(())

        def set_epoch(self, epoch: int) -> None:
            pass

        def state_dict(self) -> dict:
            return {}

    assert not isinstance(NoResume(), BatchSource)  # no load_state_dict

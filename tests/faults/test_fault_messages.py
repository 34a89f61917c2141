"""The log lines docs/faults.md promises for bad data, read from the real loader (one rank, PIL, no reader
processes, so every record is logged in this process): a decompression bomb is one line with the size its header
claims and the limit, and ``data.allow_missing_shards: true`` says once which shards are missing."""

from __future__ import annotations

import logging

import pytest

from distrib_face.data import build_loader
from tests.faults.shardset import write_fault_set

LIMIT = 36_000_000  # DataConfig.max_image_pixels' default, given explicitly (the loader's default is the same)


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    return write_fault_set(tmp_path_factory.mktemp("faults"))


def _one_epoch(faults, caplog) -> list[logging.LogRecord]:
    """The warnings of building the loader and reading one epoch (both passes) of the fault set.

    The second pass fills the epoch's last 14 samples from the clean first shard (20 samples, manifest order);
    chunks of 4 keep its reader from reading ahead into part-000001.tar (a chunk of 32 would read, and log,
    the bombs again, without counting them: they lie past the last consumed position)."""
    with caplog.at_level(logging.WARNING, logger="distrib_face"):
        loader = build_loader(faults.root, batch_size=8, rank=0, world_size=1, num_workers=0, decoder="pil",
                              shuffle=False, chunk_size=4, allow_missing_shards=True, max_skip_fraction=1.0,
                              augment=False, max_image_pixels=LIMIT)
        batches = sum(1 for _ in loader)
    assert batches == len(loader) > 0
    assert loader.counts.skipped["too_large"] == 2  # the two bombs of part-000001.tar, read once
    assert loader.counts.missing_shards == [faults.missing_shard]
    return [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_bomb_is_one_log_line_with_its_claimed_size_and_the_limit(faults, caplog):
    lines = [r.getMessage() for r in _one_epoch(faults, caplog) if "too_large: " in r.getMessage()]
    # shardset.py: a 60000 x 60000 and a 12000 x 12000 frame header over a 16 x 16 body
    for width, height in ((60000, 60000), (12000, 12000)):
        claim = f"{width}x{height} = {width * height} pixels"
        mine = [line for line in lines if claim in line]
        assert len(mine) == 1, lines
        assert f"above the limit of {LIMIT} (data.max_image_pixels)" in mine[0]
        assert "part-000001.tar" in mine[0]  # and where it is
    assert len(lines) == 2, lines


def test_allowed_missing_shards_are_named_in_one_warning(faults, caplog):
    records = _one_epoch(faults, caplog)
    named = [r.getMessage() for r in records if faults.missing_shard in r.getMessage()]
    assert len(named) == 1, named  # not once per pass or per reader
    assert "1 of 5 shards listed in" in named[0] and "(5 samples)" in named[0]
    assert "training without them (data.allow_missing_shards)" in named[0]

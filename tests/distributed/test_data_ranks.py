"""Three gloo ranks in separate processes, two reader processes each: the epoch is split without overlap,
every rank takes the same number of batches, and the union is the whole shard set (label i is sample i)."""

from __future__ import annotations

from distrib_face.data import build_loader
from distrib_face.data.testing import write_indexed_shards
from tests.spawn import run_world


def _read_epoch(rank: int, world_size: int, shard_dir: str, split: str) -> dict:
    loader = build_loader(shard_dir, batch_size=4, rank=rank, world_size=world_size, num_workers=2,
                          decoder="pil", seed=9, split=split, drop_last=False)
    num_batches = len(loader)
    batches = [[int(v) for v in labels] for _, labels in loader]
    return {"num_batches": num_batches, "batches": batches}


def test_three_ranks_two_workers_read_each_sample_once(tmp_path):
    # 12 shards of 10 = 120 samples: shard split gives each of the 6 readers 2 shards, 40 samples a rank
    write_indexed_shards(tmp_path / "shards", [10] * 12, image_size=8)
    results = run_world(_read_epoch, 3, tmp_path, args=(str(tmp_path / "shards"), "shard"))
    assert {len(r["batches"]) for r in results} == {results[0]["num_batches"]} == {10}
    flat = [v for r in results for batch in r["batches"] for v in batch]
    assert sorted(flat) == list(range(120))

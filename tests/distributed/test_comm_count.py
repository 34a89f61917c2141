"""The communication model of docs/scale.md, checked: one training step's collectives, counted by
CollectiveCounter on 3 gloo ranks (Partial FC, ZeRO 0), carry exactly the bytes the formula says."""

from __future__ import annotations

from tests.distributed.test_train import _config, _quiet
from tests.spawn import run_world


def _count(rank: int, world_size: int, cfg_dict: dict) -> dict:
    _quiet()
    from distrib_face.config import Config
    from distrib_face.parallel import init_distributed
    from distrib_face.train.bench import bench_comm

    return bench_comm(Config.from_dict(cfg_dict), init_distributed(device="cpu"))


def _counter_alone(rank: int, world_size: int) -> list[dict]:
    import torch

    from distrib_face.parallel.collectives import CollectiveCounter, all_gather_variable, all_reduce_tensor

    with CollectiveCounter(world_size) as counter:
        all_reduce_tensor(torch.ones(10), "sum")  # 40 bytes
        all_gather_variable(torch.ones(3, 4), equal_sizes=True)  # output 3 x world x 4 floats
    all_reduce_tensor(torch.ones(10), "sum")  # outside the block: not counted, nothing stays wrapped
    return counter.rows()


def test_counter_counts_payload_and_ring_wire_bytes(tmp_path):
    rows = {r["name"]: r for r in run_world(_counter_alone, 2, tmp_path)[0]}
    assert rows["all_reduce"]["calls"] == 1 and rows["all_reduce"]["payload_bytes"] == 40
    assert rows["all_reduce"]["wire_bytes"] == 40.0  # 2 (W-1)/W = 1 at W = 2
    assert rows["all_gather_single"]["payload_bytes"] == 3 * 2 * 4 * 4 and rows["all_gather_single"]["calls"] == 1


def test_one_step_moves_what_the_formula_says(tmp_path):
    cfg = _config(tmp_path, "comm", data={"random_num_classes": 300, "random_num_samples": 96},
                  loss={"sample_rate": 0.2})
    results = run_world(_count, 3, tmp_path, (cfg,))
    for result in results:
        assert result["counted"] == result["expected"], (result["rows"], result["expected"])
    assert results[0]["expected"]["all_gather"] == 24 * 32 * 4 + 24 * 8  # batch 8 x 3 ranks, 32-d embeddings

"""Checkpoints on nodes that do not share a file system: every node publishes its own copy, once.

Three gloo ranks play two nodes: rank 0 alone on "node A" (its own output folder), ranks 1 and 2 on "node B"
(local ranks 0 and 1, a folder of their own that rank 0 never sees). Each node's folder must end with the
newest step published, holding exactly the rank files written there, ``latest`` naming it, no ``.tmp`` left,
and only the ``keep`` newest steps.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.spawn import run_world

pytestmark = pytest.mark.slow

KEEP = 2


def _node_worker(rank: int, world_size: int, base: str) -> int:
    os.environ["LOCAL_RANK"] = "0" if rank < 2 else "1"
    from distrib_face.parallel import init_distributed
    from distrib_face.train.checkpoint import TrainerState, save_checkpoint
    from tests.faults.test_checkpoint_safety import _components, _quiet, _train

    _quiet()
    ctx = init_distributed(device="cpu")
    root = Path(base) / ("node_a" if rank == 0 else "node_b")
    bundle, classifier, shard_optimizer, aux, aux_optimizer = _components(ctx, 0, "fp32", auxiliary=False)
    for step in (1, 2, 3):
        _train(range(step - 1, step), ctx, bundle, classifier, shard_optimizer, aux, aux_optimizer)
        save_checkpoint(root, ctx=ctx, engine=bundle.engine, classifier=classifier, shard_optimizer=shard_optimizer,
                        trainer_state=TrainerState(step=step, world_size=ctx.world_size), loader_state=None,
                        config={}, ds_config=bundle.ds_config, backbone_file=None, keep=KEEP)
    return ctx.local_rank


def test_each_node_publishes_its_own_copy_once(tmp_path):
    assert run_world(_node_worker, 3, tmp_path, args=(str(tmp_path),)) == [0, 0, 1]
    for node, ranks in (("node_a", [0]), ("node_b", [1, 2])):
        root = tmp_path / node
        steps = sorted(p.name for p in root.iterdir() if p.name.startswith("step_"))
        assert len(steps) == KEEP and not [s for s in steps if s.endswith(".tmp")], (node, steps)
        latest = (root / "latest").read_text().strip()
        assert latest == steps[-1] == "step_000000003", (node, steps, latest)
        rank_files = sorted(p.name for p in (root / latest / "ranks").iterdir())
        assert sorted({name[:len("rank_00000")] for name in rank_files}) == [
            f"rank_{r:05d}" for r in ranks], (node, rank_files)

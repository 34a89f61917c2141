"""Shard checkpoints move between world sizes: 4 -> 3 -> 1 and 1 -> 2, and training continues identically."""

from __future__ import annotations

import torch

from distrib_face.losses import create_margin
from distrib_face.parallel.checkpoint import load_full_matrix, read_shards, reshard
from tests.spawn import run_world

NUM_CLASSES, DIM, BATCH = 31, 6, 12


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, DIM, generator=gen, dtype=torch.float64), torch.randint(0, NUM_CLASSES, (BATCH,), generator=gen)


def _local(tensor: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return tensor.tensor_split(world)[rank]  # uneven rows when BATCH % world != 0


def _make(seed: int = 3):
    from distrib_face.parallel import ShardedMarginClassifier
    from distrib_face.parallel.optim import ShardOptimizer

    clf = ShardedMarginClassifier(NUM_CLASSES, DIM, margin=create_margin("arcface", scale=8.0), dtype=torch.float64,
                                  seed=seed, sample_rate=0.6)
    return clf, ShardOptimizer(clf, "sgd", lr=0.2, momentum=0.9, weight_decay=1e-3)


def _step(clf, opt, step: int, rank: int, world: int) -> float:
    emb, labels = _batch(step)
    loss = clf(_local(emb, rank, world), _local(labels, rank, world))
    loss.backward()
    opt.step()
    opt.zero_grad()
    return float(loss.detach())


def _train_and_save(rank: int, world: int, out: str) -> list[float]:
    from distrib_face.parallel.checkpoint import save_shard

    clf, opt = _make()
    losses = [_step(clf, opt, s, rank, world) for s in range(2)]
    save_shard(out, clf, opt)
    # The step a resumed run must reproduce. Without sampling: which negatives Partial FC draws depends
    # on the shard sizes, so only the full softmax is comparable across world sizes.
    clf.sample_rate = 1.0
    losses.append(_step(clf, opt, 2, rank, world))
    return losses


def _resume_one_step(rank: int, world: int, src: str) -> float:
    from distrib_face.parallel.checkpoint import load_shard_from_dir

    clf, opt = _make(seed=999)  # a different init: everything must come from the checkpoint
    load_shard_from_dir(src, clf, opt)
    clf.sample_rate = 1.0
    return _step(clf, opt, 2, rank, world)


def test_reshard_round_trip_and_continued_training(tmp_path):
    four, three, one, two = (tmp_path / n for n in ("w4", "w3", "w1", "w2"))
    losses4 = run_world(_train_and_save, 4, tmp_path, args=(str(four),))
    reshard(four, three, 3)
    reshard(three, one, 1)
    reshard(one, two, 2)

    full = load_full_matrix(four)
    for folder in (three, one, two):
        assert torch.equal(load_full_matrix(folder), full)
    # Optimizer state (momentum rows and per-class step counts) survives every hop bit for bit.
    def optimizer_rows(folder):
        shards = read_shards(folder)
        return (torch.cat([s.payload["optimizer"]["buffers"]["momentum_buffer"] for s in shards]),
                torch.cat([s.payload["optimizer"]["row_steps"] for s in shards]))
    momentum4, steps4 = optimizer_rows(four)
    assert momentum4.abs().sum() > 0
    for folder in (three, one, two):
        momentum, steps = optimizer_rows(folder)
        assert torch.equal(momentum, momentum4) and torch.equal(steps, steps4)

    # Training continues with the same loss at 3 ranks (explicit reshard), 2 ranks, and 1 rank
    # loading the 4-rank files directly (resharding on load).
    expected = losses4[0][2]
    assert all(abs(l[2] - expected) < 1e-10 * abs(expected) for l in losses4)
    for world, folder in ((3, three), (2, two)):
        for loss in run_world(_resume_one_step, world, tmp_path, args=(str(folder),)):
            assert abs(loss - expected) < 1e-10 * abs(expected), (world, loss, expected)
    clf, opt = _make(seed=999)
    from distrib_face.parallel.checkpoint import load_shard_from_dir

    load_shard_from_dir(four, clf, opt)
    clf.sample_rate = 1.0
    assert abs(_step(clf, opt, 2, 0, 1) - expected) < 1e-10 * abs(expected)


def test_resume_at_same_world_size_repeats_the_sampling(tmp_path):
    from distrib_face.parallel.checkpoint import load_shard_from_dir, save_shard

    clf, opt = _make()
    for step in range(2):
        _step(clf, opt, step, 0, 1)
    save_shard(tmp_path, clf, opt)
    expected = [_step(clf, opt, step, 0, 1) for step in (2, 3)]
    resumed, resumed_opt = _make(seed=999)
    load_shard_from_dir(tmp_path, resumed, resumed_opt)
    assert [_step(resumed, resumed_opt, step, 0, 1) for step in (2, 3)] == expected
    assert torch.equal(resumed.weight, clf.weight)


def _make_bf16(seed: int = 3):
    from distrib_face.parallel import ShardedMarginClassifier
    from distrib_face.parallel.optim import ShardOptimizer

    clf = ShardedMarginClassifier(NUM_CLASSES, DIM, margin=create_margin("arcface", scale=8.0), dtype=torch.bfloat16,
                                  seed=seed, sample_rate=0.6)
    return clf, ShardOptimizer(clf, "sgd", lr=0.2, momentum=0.9, weight_decay=1e-3)


def _bf16_step(clf, opt, step: int, rank: int, world: int) -> float:
    emb, labels = _batch(step)
    loss = clf(_local(emb, rank, world).float(), _local(labels, rank, world))
    loss.backward()
    opt.step()
    opt.zero_grad()
    return float(loss.detach())


def _bf16_train_and_save(rank: int, world: int, out: str) -> list[float]:
    from distrib_face.parallel.checkpoint import save_shard

    clf, opt = _make_bf16()
    losses = [_bf16_step(clf, opt, s, rank, world) for s in range(2)]
    save_shard(out, clf, opt)
    clf.sample_rate = 1.0
    losses.append(_bf16_step(clf, opt, 2, rank, world))
    return losses


def _bf16_resume(rank: int, world: int, src: str) -> float:
    from distrib_face.parallel.checkpoint import load_shard_from_dir

    clf, opt = _make_bf16(seed=999)
    load_shard_from_dir(src, clf, opt)
    assert clf.weight.dtype == torch.bfloat16
    clf.sample_rate = 1.0
    return _bf16_step(clf, opt, 2, rank, world)


def test_bf16_shards_reshard_bit_for_bit_and_resume(tmp_path):
    three, two, one = (tmp_path / n for n in ("w3", "w2", "w1"))
    losses3 = run_world(_bf16_train_and_save, 3, tmp_path, args=(str(three),))
    reshard(three, two, 2)
    reshard(two, one, 1)
    full = load_full_matrix(three)
    assert full.dtype == torch.bfloat16
    momentum3 = torch.cat([s.payload["optimizer"]["buffers"]["momentum_buffer"] for s in read_shards(three)])
    assert momentum3.dtype == torch.bfloat16 and momentum3.abs().sum() > 0
    for folder in (two, one):
        assert torch.equal(load_full_matrix(folder), full)
        shards = read_shards(folder)
        assert torch.equal(torch.cat([s.payload["optimizer"]["buffers"]["momentum_buffer"] for s in shards]), momentum3)
        assert all(s.meta["weight_dtype"] == "bf16" for s in shards)
    # The next step from the resharded files: the same loss at 2 ranks as at 3 (fp32 statistics).
    expected = losses3[0][2]
    for loss in run_world(_bf16_resume, 2, tmp_path, args=(str(two),)):
        assert abs(loss - expected) < 1e-5 * abs(expected), (loss, expected)

"""LR schedules against their closed forms, LR scaling, the DeepSpeed config, pair splitting, checkpoint pointers."""

from __future__ import annotations

import math

import pytest

from distrib_face.config import Config
from distrib_face.train.schedule import LRSchedule, peak_learning_rates


def _cfg(**sections) -> Config:
    base = {"data": {"source": "random", "batch_size": 64}, "train": {"total_steps": 100}}
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return Config.from_dict(base)


def test_poly_with_warmup():
    s = LRSchedule(kind="poly", total_steps=100, warmup_steps=10, power=2.0)
    assert [s.factor(i) for i in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    for step in (10, 40, 77, 99):
        assert s.factor(step) == pytest.approx((1 - (step - 10) / 90) ** 2)
    assert s.factor(100) == 0.0


def test_cosine_floor_and_steps():
    s = LRSchedule(kind="cosine", total_steps=50, min_ratio=0.1)
    for step in (0, 13, 25, 49):
        assert s.factor(step) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / 50)))
    steps = LRSchedule(kind="steps", total_steps=100, milestones=(30, 60), gamma=0.1)
    assert [steps.factor(i) for i in (0, 29, 30, 59, 60, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_epoch_fields_convert_to_steps():
    cfg = _cfg(schedule={"kind": "steps", "milestone_epochs": [1.5, 3], "warmup_epochs": 0.5})
    s = LRSchedule.from_config(cfg.schedule, total_steps=100, steps_per_epoch=20)
    assert s.milestones == (30, 60) and s.warmup_steps == 10
    with pytest.raises(ValueError, match="schedule.warmup_epochs needs a data source"):
        LRSchedule.from_config(cfg.schedule, total_steps=100, steps_per_epoch=None)


def test_lr_scaling_by_global_batch():
    cfg = _cfg(optim={"lr": 0.1, "scale_lr_by_batch": True, "reference_batch": 512, "grad_accum": 2,
                      "classifier_lr_mult": 10.0})
    backbone, classifier = peak_learning_rates(cfg, world_size=4)
    assert backbone == pytest.approx(0.1 * 64 * 4 * 2 / 512)
    assert classifier == pytest.approx(10 * backbone)
    assert peak_learning_rates(_cfg(), world_size=8) == (0.1, 0.1)


def test_deepspeed_config():
    from distrib_face.train.engine import deepspeed_config

    ds = deepspeed_config(_cfg(deepspeed={"zero_stage": 2, "precision": "bf16"}, optim={"grad_accum": 2}), 4)
    assert ds["train_batch_size"] == 64 * 2 * 4 and ds["gradient_accumulation_steps"] == 2
    assert ds["bf16"] == {"enabled": True} and ds["data_types"] == {"buffer_dtype": "bf16"}
    assert ds["zero_allow_untested_optimizer"] is True and ds["zero_optimization"]["stage"] == 2
    assert ds["gradient_clipping"] == 0.0 and "optimizer" not in ds
    clipped = deepspeed_config(_cfg(optim={"grad_clip": 5.0}, deepspeed={"extra": {"zero_optimization": {"reduce_bucket_size": 7}}}), 1)
    assert clipped["gradient_clipping"] == 5.0 and clipped["zero_optimization"] == {"stage": 0, "reduce_bucket_size": 7}
    fp16 = deepspeed_config(Config.from_dict({**_cfg().to_dict(), "deepspeed": {"precision": "fp16"}, "device": "cuda"}), 1)
    assert fp16["fp16"]["enabled"] and fp16["fp16"]["initial_scale_power"] == 16


def test_even_split_covers_every_item_once():
    from distrib_face.parallel.shard import even_split

    for num_pairs in (0, 1, 5, 600):
        for world in (1, 2, 3, 7):
            ranges = [even_split(num_pairs, r, world) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == num_pairs
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            sizes = [b - a for a, b in ranges]
            assert max(sizes) - min(sizes) <= 1


def test_latest_pointer_resolution(tmp_path):
    from distrib_face.train.checkpoint import CheckpointError, resolve_checkpoint

    assert resolve_checkpoint(tmp_path) is None
    step = tmp_path / "step_000000005"
    step.mkdir()
    (step / "trainer.json").write_text("{}")
    (tmp_path / "latest").write_text("step_000000005\n")
    assert resolve_checkpoint(tmp_path) == step
    assert resolve_checkpoint(step) == step
    (tmp_path / "latest").write_text("step_000000009\n")
    with pytest.raises(CheckpointError, match="points to 'step_000000009'"):
        resolve_checkpoint(tmp_path)


def test_random_batches_resume_and_rederive():
    import torch

    from distrib_face.train.data import RandomBatches, restore_loader

    def make(rank, world):
        return RandomBatches(num_classes=5, num_samples=64, batch_size=4, image_size=16, rank=rank, world_size=world)

    full = make(0, 2)
    batches = list(full)
    assert len(batches) == 8 and full.epoch == 1
    part = make(0, 2)
    it = iter(part)
    for _ in range(3):
        next(it)
    resumed = make(0, 2)
    resumed.load_state_dict(part.state_dict())
    assert all(torch.equal(a[0], b[0]) for a, b in zip(list(resumed), batches[3:]))
    one = make(0, 1)
    restore_loader(one, [part.state_dict(), None], 0, 1, epoch=0, samples_in_epoch=24, batch_size=4)
    assert one.epoch == 0 and one.batch_index == 6

"""run_training on gloo ranks: data-parallel correctness against a one-process reference, mixed precision,
resume equivalence, resuming at another world size, and the non-finite-loss guard.

The reference of the data-parallel test is written here from scratch: one process runs the backbone on
each rank's micro-batch (so BatchNorm sees the same per-rank batches), a plain CosFace cross-entropy over
the whole weight matrix, and torch.optim.SGD on both the backbone and the matrix.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.spawn import run_world

SCALE, MARGIN = 16.0, 0.2


def _config(tmp: Path, name: str, **sections) -> dict:
    cfg = {
        "data": {"source": "random", "random_num_classes": 12, "random_num_samples": 256, "batch_size": 8,
                 "image_size": 32},
        "model": {"backbone": "iresnet_tiny", "embedding_size": 32},
        "loss": {"margin": "cosface", "scale": SCALE, "additive_margin": MARGIN},
        "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
        "schedule": {"kind": "steps", "milestones": [100000]},  # a constant learning rate
        "deepspeed": {"zero_stage": 0, "precision": "fp32"},
        "train": {"total_steps": 3, "output_dir": str(tmp / name), "log_every": 1, "eval_at_start": False,
                  "export_onnx": False, "resume": "never"},
        "tracking": {"enabled": False},
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return cfg


def _quiet() -> None:
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _train_worker(rank: int, world_size: int, cfg_dict: dict, resume_from: str | None = None) -> dict:
    _quiet()
    from distrib_face.config import Config
    from distrib_face.parallel import init_distributed
    from distrib_face.train import run_training

    ctx = init_distributed(device="cpu")
    return run_training(Config.from_dict(cfg_dict), ctx, resume_from=resume_from)


def _final_weights(output_dir: Path) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    from distrib_face.models.io import read_backbone_file
    from distrib_face.parallel.checkpoint import load_full_matrix
    from distrib_face.train.checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint(output_dir / "checkpoints")
    state = read_backbone_file(ckpt / "backbone.pt")["state_dict"]
    return state, load_full_matrix(ckpt / "classifier").reshape(-1, state["fc.weight"].shape[0])


def _loss_history(output_dir: Path) -> list[list[float]]:
    from distrib_face.train.checkpoint import resolve_checkpoint

    return json.loads((resolve_checkpoint(output_dir / "checkpoints") / "trainer.json").read_text())["loss_history"]


def _reference(cfg_dict: dict, world_size: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, list[float]]:
    """Data-parallel SGD written out in one process (see the module docstring)."""
    from distrib_face.config import Config
    from distrib_face.parallel.shard import init_class_rows
    from distrib_face.train.data import RandomBatches
    from distrib_face.train.engine import build_backbone

    cfg = Config.from_dict(cfg_dict)
    torch.manual_seed(cfg.train.seed)
    backbone = build_backbone(cfg)
    num_classes, dim = cfg.data.random_num_classes, cfg.model.embedding_size
    weight = init_class_rows(0, num_classes, (1, dim), seed=cfg.train.seed, dtype=torch.float32,
                             device=torch.device("cpu")).view(num_classes, dim).clone().requires_grad_(True)
    params = [p for p in backbone.parameters() if p.requires_grad]
    sgd = dict(lr=cfg.optim.lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)
    opt_backbone, opt_weight = torch.optim.SGD(params, **sgd), torch.optim.SGD([weight], **sgd)
    loaders = [iter(RandomBatches(num_classes=num_classes, num_samples=cfg.data.random_num_samples,
                                  batch_size=cfg.data.batch_size, image_size=cfg.data.image_size, rank=r,
                                  world_size=world_size, seed=cfg.train.seed)) for r in range(world_size)]
    losses = []
    for _ in range(cfg.train.total_steps):
        batches = [next(it) for it in loaders]
        embeddings = torch.cat([backbone(x) for x, _ in batches])  # BatchNorm per rank's micro-batch
        labels = torch.cat([y for _, y in batches])
        cos = F.normalize(embeddings) @ F.normalize(weight).t()
        loss = F.cross_entropy(SCALE * (cos - MARGIN * F.one_hot(labels, num_classes)), labels)
        opt_backbone.zero_grad()
        opt_weight.zero_grad()
        loss.backward()
        opt_backbone.step()
        opt_weight.step()
        losses.append(float(loss.detach()))
    return {k: v.detach() for k, v in backbone.state_dict().items()}, weight.detach(), losses


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_two_ranks_match_one_process_reference(tmp_path, zero_stage):
    # lr 0.02: at 0.1 three momentum steps of this tiny BatchNorm net amplify float32 rounding to 1e-4.
    cfg = _config(tmp_path, f"z{zero_stage}", deepspeed={"zero_stage": zero_stage}, optim={"lr": 0.02})
    summaries = run_world(_train_worker, 2, tmp_path, (cfg,))
    assert [s["steps"] for s in summaries] == [3, 3]
    backbone, weight = _final_weights(tmp_path / f"z{zero_stage}")
    ref_backbone, ref_weight, ref_losses = _reference(cfg, world_size=2)
    losses = [loss for _, loss in _loss_history(tmp_path / f"z{zero_stage}")]
    # Only float32 summation order differs (~1e-7); a wrong gradient scale, clipping or step is off by >1e-3.
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    for name, value in ref_backbone.items():
        if "running" in name or "num_batches" in name:
            continue  # BatchNorm statistics are per rank in data-parallel training
        torch.testing.assert_close(backbone[name], value, rtol=1e-5, atol=2e-6, msg=lambda m: f"backbone {name}: {m}")
    torch.testing.assert_close(weight, ref_weight, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("zero_stage", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_bf16_training_decreases_the_loss(tmp_path, zero_stage):
    cfg = _config(tmp_path, "bf16", deepspeed={"zero_stage": zero_stage, "precision": "bf16"},
                  train={"total_steps": 12, "log_every": 1})
    summaries = run_world(_train_worker, 2, tmp_path, (cfg,))
    assert summaries[0]["final_loss"] == summaries[1]["final_loss"]  # one global loss on every rank
    losses = [loss for _, loss in _loss_history(tmp_path / "bf16")]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    backbone, _ = _final_weights(tmp_path / "bf16")
    assert all(v.dtype != torch.bfloat16 for v in backbone.values())  # backbone.pt is consolidated in fp32


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> Path:
    from distrib_face.data import write_synthetic

    out = tmp_path_factory.mktemp("shards")
    write_synthetic(out, num_identities=16, min_images=4, max_images=12, holdout_identities=6, image_size=32,
                    num_pairs=40, samples_per_shard=40, seed=3)
    return out


def _resume_config(tmp: Path, name: str, shards: Path, **train) -> dict:
    return _config(
        tmp, name,
        # Random horizontal flips on: their flags are a function of (seed, epoch, sample position), so the
        # resumed run flips exactly what the uninterrupted one did.
        data={"source": "shards", "shards": str(shards), "decoder": "dali", "num_workers": 0, "dali_threads": 1,
              "batch_size": 8, "augment": {"flip": True}},
        loss={"sample_rate": 0.5},
        deepspeed={"zero_stage": 1},
        schedule={"kind": "poly", "warmup_steps": 2},
        train={"total_steps": 6, "checkpoint_every": 3, "deterministic": True, "resume": "auto", **train},
    )


@pytest.mark.slow
def test_resume_is_equivalent_and_survives_a_world_size_change(tmp_path, tiny_shards):
    whole = _resume_config(tmp_path, "whole", tiny_shards)
    # A fresh folder per run_world: its file:// store is named by pid and function, so a second world in
    # the same folder would find the first one's store.
    run_world(_train_worker, 2, tmp_path / "world_a", (whole,))
    first = _resume_config(tmp_path, "split", tiny_shards, max_steps_this_run=3)
    stopped = run_world(_train_worker, 2, tmp_path / "world_b1", (first,))
    assert stopped[0]["steps"] == 3 and not stopped[0]["finished"]
    second = _resume_config(tmp_path, "split", tiny_shards)
    resumed = run_world(_train_worker, 2, tmp_path / "world_b2", (second,))
    assert resumed[0]["steps"] == 6 and resumed[0]["steps_this_run"] == 3 and resumed[0]["finished"]

    backbone_a, weight_a = _final_weights(tmp_path / "whole")
    backbone_b, weight_b = _final_weights(tmp_path / "split")
    for name, value in backbone_a.items():
        assert torch.equal(value, backbone_b[name]), name
    assert torch.equal(weight_a, weight_b)
    assert _loss_history(tmp_path / "whole") == _loss_history(tmp_path / "split")

    # 2 ranks -> 1 rank from the step-3 checkpoint: the classifier is resharded, the loader re-derived.
    step3 = tmp_path / "split" / "checkpoints" / "step_000000003"
    one = _resume_config(tmp_path, "one", tiny_shards)
    (summary,) = run_world(_train_worker, 1, tmp_path / "world_c", (one, str(step3)))
    assert summary["steps"] == 6 and summary["steps_this_run"] == 3 and summary["world_size"] == 1
    assert summary["resumed_from"] == str(step3)
    _, weight_one = _final_weights(tmp_path / "one")
    assert weight_one.shape == weight_a.shape and torch.isfinite(weight_one).all()


def _nan_worker(rank: int, world_size: int, cfg_dict: dict) -> dict:
    _quiet()
    from distrib_face.config import Config
    from distrib_face.parallel import init_distributed
    from distrib_face.train import NonFiniteLossError, run_training

    from distrib_face.train.faults import ENV_VAR

    ctx = init_distributed(device="cpu")
    cfg = Config.from_dict(cfg_dict)
    out = {}
    one = cfg.replace(["train.max_bad_steps=3", "train.total_steps=4"])
    os.environ[ENV_VAR] = '{"nan_micro_steps": [2]}'  # the test-only fault hook, never the product config
    out["one_bad"] = run_training(one, ctx)
    many = cfg.replace(["train.max_bad_steps=3", "train.total_steps=6", f"train.output_dir={cfg.train.output_dir}_abort"])
    os.environ[ENV_VAR] = '{"nan_micro_steps": [1, 2, 3]}'
    try:
        run_training(many, ctx)
        out["error"] = None
    except NonFiniteLossError as err:
        out["error"] = str(err)
    return out


def test_non_finite_losses_are_skipped_then_abort(tmp_path):
    cfg = _config(tmp_path, "nan")
    (out,) = run_world(_nan_worker, 2, tmp_path, (cfg,))[:1]
    assert out["one_bad"]["steps"] == 4 and out["one_bad"]["skipped_steps"] == 1
    assert out["error"] is not None
    assert "non-finite for 3 micro-batches in a row" in out["error"]
    assert "train.max_bad_steps=3" in out["error"]
    assert "at step 1" in out["error"]  # micro-batches 0 gave step 1; 1, 2, 3 were NaN

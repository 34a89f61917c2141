"""Auxiliary losses in the trainer: added to the margin softmax, their sharded state checkpointed and resumed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.distributed.test_train import _config, _final_weights, _train_worker
from tests.spawn import run_world

AUXILIARY = [{"name": "center", "weight": 0.05}, {"name": "triplet", "weight": 0.5, "options": {"margin": 0.3}}]


def _aux_config(tmp: Path, name: str, auxiliary: list, **train) -> dict:
    return _config(
        tmp, name, loss={"auxiliary": auxiliary},
        train={"total_steps": 4, "checkpoint_every": 2, "deterministic": True, "resume": "auto", **train},
    )


def _history(output_dir: Path) -> list:
    from distrib_face.train.checkpoint import resolve_checkpoint

    return json.loads((resolve_checkpoint(output_dir / "checkpoints") / "trainer.json").read_text())["loss_history"]


def _centres(output_dir: Path, rank: int) -> torch.Tensor:
    from distrib_face.train.checkpoint import resolve_checkpoint

    path = resolve_checkpoint(output_dir / "checkpoints") / "ranks" / f"rank_{rank:05d}_aux.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)["module"]
    return torch.cat([v.flatten() for _, v in sorted(state.items())])


@pytest.mark.slow
def test_auxiliary_losses_train_and_resume_bit_identically(tmp_path):
    plain = _aux_config(tmp_path, "plain", [])
    run_world(_train_worker, 2, tmp_path / "w_plain", (plain,))
    whole = _aux_config(tmp_path, "whole", AUXILIARY)
    run_world(_train_worker, 2, tmp_path / "w_whole", (whole,))
    first = _aux_config(tmp_path, "split", AUXILIARY, max_steps_this_run=2)
    run_world(_train_worker, 2, tmp_path / "w_split1", (first,))
    second = _aux_config(tmp_path, "split", AUXILIARY)
    run_world(_train_worker, 2, tmp_path / "w_split2", (second,))

    # Same initial weights and data: the first loss differs from the plain run's by the auxiliary terms,
    # which are positive (a centre loss and a triplet hinge at initialisation).
    plain_first, aux_first = _history(tmp_path / "plain")[0][1], _history(tmp_path / "whole")[0][1]
    assert aux_first > plain_first

    # Stopping after 2 steps and resuming gives the uninterrupted run bit for bit, class centres included.
    backbone_a, weight_a = _final_weights(tmp_path / "whole")
    backbone_b, weight_b = _final_weights(tmp_path / "split")
    for name, value in backbone_a.items():
        assert torch.equal(value, backbone_b[name]), name
    assert torch.equal(weight_a, weight_b)
    assert _history(tmp_path / "whole") == _history(tmp_path / "split")
    for rank in range(2):
        assert torch.equal(_centres(tmp_path / "whole", rank), _centres(tmp_path / "split", rank))


def test_bad_auxiliary_loss_is_named_before_any_worker():
    from distrib_face.config import Config, ConfigError

    cfg = _config(Path("/tmp"), "bad", loss={"auxiliary": [{"name": "centre", "weight": 1.0}]})
    with pytest.raises(ConfigError, match=r"loss.auxiliary\[0\]: unknown auxiliary loss 'centre'"):
        Config.from_dict(cfg)

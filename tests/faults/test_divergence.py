"""A diverged run never poisons its checkpoints, end to end in the trainer (2 gloo ranks), with the test-only
fault hook: NaN in a BatchNorm running mean on rank 1 (losses stay finite: only the state is bad) is found when
the next checkpoint is due, every rank stops and ``latest`` keeps the last good checkpoint; NaN in one class row
on rank 1 makes every later loss NaN, and with ``train.on_divergence: rollback`` the trainer goes back to the
last good checkpoint, halves the learning rates and finishes, saying so in MLflow (a tag and two metrics)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.distributed.test_train import _config, _quiet
from tests.spawn import run_world

def _train(rank: int, world_size: int, cfg_dict: dict, fault: dict) -> dict:
    _quiet()
    from distrib_face.config import Config
    from distrib_face.parallel import init_distributed
    from distrib_face.train import run_training
    from distrib_face.train import NonFiniteLossError
    from distrib_face.train.divergence import NonFiniteStateError
    from distrib_face.train.faults import ENV_VAR

    os.environ[ENV_VAR] = json.dumps({**fault, "nan_rank": 1})
    ctx = init_distributed(device="cpu")
    try:
        return {"summary": run_training(Config.from_dict(cfg_dict), ctx)}
    except (NonFiniteStateError, NonFiniteLossError) as err:
        return {"error": str(err), "exit_code": err.exit_code}


def _cfg(tmp_path: Path, on_divergence: str, **sections) -> dict:
    return _config(tmp_path, on_divergence, train={"total_steps": 6, "checkpoint_every": 2, "max_bad_steps": 2,
                                                   "on_divergence": on_divergence, "rollback_lr_factor": 0.5},
                   **sections)


def _trainer_json(folder: Path) -> dict:
    return json.loads((folder / "trainer.json").read_text())


def test_abort_publishes_nothing_and_names_the_last_good_checkpoint(tmp_path):
    results = run_world(_train, 2, tmp_path, (_cfg(tmp_path, "abort"), {"nan_buffer_at_step": 3}))
    root = tmp_path / "abort" / "checkpoints"
    for result in results:  # every rank stops with the same verdict
        assert result["exit_code"] == 1
        assert "step 4: the training state is not finite" in result["error"]
        assert "rank 1: backbone " in result["error"] and "rank 0:" not in result["error"]
        assert str(root / "step_000000002") in result["error"]
    assert (root / "latest").read_text().strip() == "step_000000002"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000000002"]  # no step_4, no .tmp


def test_rollback_goes_back_halves_the_learning_rates_and_finishes(tmp_path):
    store = f"sqlite:///{tmp_path / 'mlruns.db'}"
    tracking = {"enabled": True, "tracking_uri": store, "experiment": "rollback",
                "artifact_location": str(tmp_path / "artifacts")}
    nan_at = 3  # NaN in a class row after step 3: the two micro-batches of step 4 are NaN, max_bad_steps=2
    cfg = _cfg(tmp_path, "rollback", tracking=tracking)
    results = run_world(_train, 2, tmp_path, (cfg, {"nan_weights_at_step": nan_at}))
    summary = results[0]["summary"]
    assert summary["finished"] and summary["steps"] == 6 and results[1]["summary"]["steps"] == 6
    final = _trainer_json(Path(summary["checkpoint"]))
    assert final["rollbacks"] == 1 and final["lr_scale"] == 0.5
    # The constant schedule of the test config runs at 0.1; after the rollback (from step 3, where the losses
    # went NaN, to the checkpoint of step 2) at 0.05.
    rates = {int(step): (lr, lr_classifier) for step, lr, lr_classifier in final["lr_history"]}
    assert rates[1] == rates[2] == (0.1, 0.1)
    assert rates[3] == rates[4] == rates[5] == rates[6] == (0.05, 0.05)
    import torch

    from distrib_face.parallel.checkpoint import load_full_matrix

    assert torch.isfinite(load_full_matrix(Path(summary["checkpoint"]) / "classifier")).all()

    # MLflow, read back through its client: one tag naming the step that diverged and the one rolled back to,
    # and the metrics logged at the step the run went on from (the checkpoint's).
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    run = client.get_run(summary["mlflow_run_id"])
    tags = {k: v for k, v in run.data.tags.items() if k.startswith("rolled_back_at_step_")}
    assert list(tags) == [f"rolled_back_at_step_{nan_at}"], run.data.tags
    assert tags[f"rolled_back_at_step_{nan_at}"].startswith(f"to step 2: aborting at step {nan_at}: the loss was "
                                                            "non-finite for 2 micro-batches in a row")
    for key, value in (("rollbacks", 1), ("lr_scale", cfg["train"]["rollback_lr_factor"])):
        assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)] == [(2, value)], key

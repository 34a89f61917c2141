"""run_training end to end in one process: DALI-decoded synthetic shards, verification on the held-out pairs
(flip TTA) before and after, MLflow (a real sqlite store) with params, metrics and artifacts, and fine-tuning
from the trained backbone with a new classifier."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.spawn import run_world


def _worker(rank: int, world_size: int, shards: str, out: str, db: str) -> dict:
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from distrib_face.config import Config
    from distrib_face.parallel import init_distributed
    from distrib_face.train import run_training

    base = {
        "data": {"shards": shards, "decoder": "dali", "num_workers": 0, "dali_threads": 1, "batch_size": 16,
                 "image_size": 32},
        "model": {"backbone": "iresnet_tiny", "embedding_size": 32},
        "loss": {"margin": "cosface", "scale": 16.0, "additive_margin": 0.2},
        "optim": {"lr": 0.05},
        "schedule": {"warmup_steps": 2},
        "train": {"total_steps": 6, "output_dir": f"{out}/first", "log_every": 2, "eval_every": 3,
                  "eval_pairsets": [f"{shards}/holdout_pairs.npz", f"{shards}/seen_pairs.npz"], "eval_batch_size": 32},
        "tracking": {"enabled": True, "tracking_uri": f"sqlite:///{db}", "experiment": "test_train",
                     "artifact_location": f"{out}/artifacts"},
    }
    ctx = init_distributed(device="cpu")
    first = run_training(Config.from_dict(base), ctx)
    tune = Config.from_dict(base).replace([
        f"train.output_dir={out}/tuned", f"train.init_backbone={out}/first", "train.total_steps=2",
        "train.eval_every=0", "tracking.enabled=false", "train.export_onnx=false",
    ])
    tuned = run_training(tune, ctx)
    return {"first": first, "tuned": tuned}


@pytest.mark.slow
def test_verification_tracking_and_fine_tuning(tmp_path):
    from distrib_face.data import write_synthetic

    shards = tmp_path / "shards"
    write_synthetic(shards, num_identities=12, min_images=4, max_images=10, holdout_identities=6, image_size=32,
                    num_pairs=40, samples_per_shard=50, seed=1, seen_pairs=20)
    db = tmp_path / "mlruns.db"
    (out,) = run_world(_worker, 1, tmp_path, (str(shards), str(tmp_path), str(db)))
    first, tuned = out["first"], out["tuned"]
    assert first["steps"] == 6 and first["finished"]
    assert (set(first["verification_before"]) == {"synthetic_holdout", "synthetic_seen"}
            == set(first["verification_after"]))
    assert 0.0 <= first["verification_after"]["synthetic_holdout"] <= 1.0
    # Fine-tuning starts from the first run's final backbone: its "before" is the first run's "after".
    assert tuned["verification_before"] == first["verification_after"]
    assert Path(first["backbone"]).is_file() and Path(tmp_path / "first" / "deepspeed_config.json").is_file()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    run = client.get_run(first["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.05" and run.data.params["model.backbone"] == "iresnet_tiny"
    assert {"loss", "lr", "images_per_sec", "grad_norm", "verify/synthetic_holdout/accuracy"} <= set(run.data.metrics)
    # One name per quantity (docs/tracking.md): the old throughput / final-loss names are not logged.
    assert not {"img_s", "images_per_sec_run", "final_loss"} & set(run.data.metrics)
    history = client.get_metric_history(run.info.run_id, "verify/synthetic_holdout/accuracy")
    assert sorted(m.step for m in history) == [0, 3, 6]
    assert history[-1].value == pytest.approx(first["verification_after"]["synthetic_holdout"])
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "deepspeed_config.json" in top
    assert {"plots/class_sizes.png", "plots/training.png", "plots/roc.png"} <= plots
    # One definition of the final loss: the last logged loss point, logged at the last step.
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert max(m.step for m in losses) == first["steps"]
    assert first["final_loss"] == pytest.approx(max(losses, key=lambda m: m.step).value, rel=1e-12)
    # The seen pairs name training identities: accuracy per class-size bucket, every pair in one bucket.
    buckets = {k.split("/")[2]: v for k, v in run.data.metrics.items()
               if k.startswith("verify/synthetic_seen/") and k.endswith("/num_pairs")}
    assert set(buckets) <= {"tail", "torso", "head"} and sum(buckets.values()) == 20
    assert run.info.run_name.startswith("iresnet_tiny-cosface-synthetic-")  # says what ran (data: the manifest)
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.digest and "12" in dataset.dataset.profile
    # train.export_onnx defaults to true: a finished run has its ONNX model (the fine-tuning turned it off).
    assert first["onnx"] is not None and Path(first["onnx"]).is_file() and tuned["onnx"] is None


def _stopped_then_resumed_worker(rank: int, world_size: int, out: str, db: str) -> dict:
    """A job stopped by ``train.max_steps_this_run``, then a job that resumes it to the end; the MLflow run's
    status as the store holds it after each (read through a client of its own, not the tracker)."""
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from mlflow.tracking import MlflowClient

    from distrib_face.config import Config
    from distrib_face.parallel import init_distributed
    from distrib_face.train import run_training

    cfg = Config.from_dict({
        "data": {"source": "random", "random_num_classes": 8, "random_num_samples": 64, "batch_size": 4,
                 "image_size": 32},
        "model": {"backbone": "iresnet_tiny", "embedding_size": 16},
        "deepspeed": {"zero_stage": 0, "precision": "fp32"},
        "train": {"total_steps": 4, "checkpoint_every": 2, "output_dir": f"{out}/run", "log_every": 1,
                  "eval_at_start": False, "export_onnx": False, "resume": "auto"},
        "tracking": {"enabled": True, "tracking_uri": f"sqlite:///{db}", "experiment": "stop_and_resume",
                     "artifact_location": f"{out}/artifacts"},
    })
    ctx = init_distributed(device="cpu")
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    first = run_training(cfg.replace(["train.max_steps_this_run=2"]), ctx)
    stopped = client.get_run(first["mlflow_run_id"])
    second = run_training(cfg, ctx)
    done = client.get_run(second["mlflow_run_id"])
    return {"first": first, "second": second, "stopped_status": stopped.info.status,
            "stopped_tags": dict(stopped.data.tags), "done_status": done.info.status}


def test_a_job_stopped_by_max_steps_this_run_leaves_the_run_scheduled_until_resumed(tmp_path):
    (out,) = run_world(_stopped_then_resumed_worker, 1, tmp_path, (str(tmp_path), str(tmp_path / "mlruns.db")))
    first, second = out["first"], out["second"]
    assert first["steps"] == 2 and not first["finished"]  # the job ended at max_steps_this_run, not the end
    assert out["stopped_status"] == "SCHEDULED" and out["stopped_tags"]["stopped_at_step"] == "2"
    assert second["steps"] == 4 and second["steps_this_run"] == 2 and second["finished"]
    assert second["mlflow_run_id"] == first["mlflow_run_id"]  # the resumed job continued the same run
    assert out["done_status"] == "FINISHED"
    # The Ray driver ends its run from rank 0's summary the same way (ray_backend.job_status).
    from ray.train import Result

    from distrib_face.train.ray_backend import job_status

    for summary, status in ((first, "stopped_status"), (second, "done_status")):
        result = Result(metrics={}, checkpoint=None, error=None, path=str(tmp_path), return_value=summary)
        assert job_status(result) == out[status]

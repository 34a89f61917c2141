"""The trainer on dirty data, 2 gloo ranks: every bad-sample kind of tests/faults/shardset.py is skipped and
counted, the counts of all ranks reach the summary, MLflow and the progress line, and too many skips stop every
rank together with the worst shard named."""

from __future__ import annotations

import logging

import pytest

from tests.distributed.test_train import _config, _quiet
from tests.faults.shardset import IMAGE_SIZE, write_fault_set
from tests.spawn import run_world


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    return write_fault_set(tmp_path_factory.mktemp("faults"))


def _dirty_config(tmp_path, faults, decoder="pil", **data) -> dict:
    return _config(
        tmp_path, "dirty",
        data={"source": "shards", "shards": str(faults.root), "decoder": decoder, "num_workers": 0, "batch_size": 4,
              "image_size": IMAGE_SIZE, "allow_missing_shards": True, "augment": False, **data},
        model={"backbone": "iresnet_tiny", "embedding_size": 16},
        train={"total_steps": 5, "log_every": 1, "output_dir": str(tmp_path / "dirty")},
        tracking={"enabled": True, "tracking_uri": f"sqlite:///{tmp_path / 'mlruns.db'}", "experiment": "dirty",
                  "artifact_location": str(tmp_path / "artifacts")},
    )


def _train(rank: int, world_size: int, cfg_dict: dict) -> dict:
    _quiet()
    from distrib_face.config import Config
    from distrib_face.data.quality import DataQualityError
    from distrib_face.parallel import init_distributed
    from distrib_face.train import Trainer

    ctx = init_distributed(device="cpu")
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    progress = logging.getLogger("distrib_face.train.progress")
    progress.setLevel(logging.INFO)
    progress.addHandler(Keep())
    trainer = Trainer(Config.from_dict(cfg_dict), ctx)
    try:
        summary = trainer.train()
    except DataQualityError as err:
        return {"error": str(err), "exit_code": err.exit_code}
    return {"summary": summary, "own_counts": trainer.parts.data.loader.counts.to_dict(), "lines": records}


@pytest.mark.parametrize("decoder", ["pil", "dali"])
def test_counts_of_every_rank_reach_the_summary_mlflow_and_the_progress_line(tmp_path, faults, decoder):
    """With DALI, the rank that meets the undecodable JPEG decodes that batch with PIL: the batch keeps its
    size, so the classifier's equal-size gathers go on."""
    from mlflow.tracking import MlflowClient

    from distrib_face.data.quality import DataCounts

    cfg = _dirty_config(tmp_path, faults, decoder, max_skip_fraction=1.0)
    results = run_world(_train, 2, tmp_path, (cfg,))
    summary = results[0]["summary"]
    assert summary["finished"] and summary["data"] == results[1]["summary"]["data"]
    # The reference: each rank's own loader counts, merged here.
    expected = DataCounts.merged([r["own_counts"] for r in results]).to_dict()
    assert summary["data"] == expected
    assert expected["skipped_total"] > 0 and expected["missing_shards"] == [faults.missing_shard]
    assert set(expected["skipped"]) <= set(faults.skipped)  # only the planted reasons, nothing invented
    if decoder == "dali":
        assert expected["dali_fallback_batches"] == 1
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}").get_run(summary["mlflow_run_id"])
    for reason, count in expected["skipped"].items():
        assert run.data.metrics[f"data/skipped/{reason}"] == count  # the last log step is the last step
    assert run.data.metrics["data/skipped_total"] == expected["skipped_total"]
    note = DataCounts.from_dict(expected).progress_text()
    assert note and any(line.startswith("step 5/5") and line.endswith(note) for line in results[0]["lines"])


def test_too_many_skips_stop_every_rank_naming_the_worst_shard(tmp_path, faults):
    cfg = _dirty_config(tmp_path, faults, max_skip_fraction=0.01, skip_check_after=8)
    results = run_world(_train, 2, tmp_path, (cfg,))
    for result in results:  # the same verdict on both ranks: neither is left waiting in a collective
        assert result["exit_code"] == 2
        assert "all ranks: " in result["error"] and "above data.max_skip_fraction=0.01" in result["error"]
        assert "worst shard part-000001.tar" in result["error"] or "worst shard part-000002.tar" in result["error"]
    assert results[0]["error"] == results[1]["error"]

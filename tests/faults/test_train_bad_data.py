"""The trainer on dirty data, 2 gloo ranks: every bad-sample kind of tests/faults/shardset.py is skipped and
counted exactly once over one epoch, the counts of all ranks reach the summary, MLflow and the progress line,
and too many skips stop every rank together with the worst shard named."""

from __future__ import annotations

import logging

import pytest

from tests.distributed.test_train import _config, _quiet
from tests.faults.shardset import IMAGE_SIZE, write_fault_set
from tests.spawn import run_world

# One epoch of the counting test's layout, by hand: 2 ranks without reader processes (2 reader slots), the
# shards in manifest order (data.shuffle: false). The 4 present shards hold 20 + 13 + 12 + 6 = 51 samples;
# with fewer than 4 shards per slot the split is by sample, dealt alternately (26 and 25), and every rank
# takes the smaller share cut to full batches of 4 (the trainer's drop_last): 24 samples, 6 steps. The first pass of
# each rank delivers fewer good samples (22 and 15: the bad ones of part-000001.tar all fall on rank 1), so
# both ranks refill from a second pass, which starts again with the clean part-000000.tar (10 samples per
# rank, more than either needs): every planted bad sample is read exactly once in the epoch.
BATCH = 4
EPOCH_PER_RANK = 24
EPOCH_STEPS = EPOCH_PER_RANK // BATCH


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    return write_fault_set(tmp_path_factory.mktemp("faults"))


def _dirty_config(tmp_path, faults, decoder="pil", total_steps=5, **data) -> dict:
    return _config(
        tmp_path, "dirty",
        data={"source": "shards", "shards": str(faults.root), "decoder": decoder, "num_workers": 0,
              "batch_size": BATCH, "image_size": IMAGE_SIZE, "allow_missing_shards": True, "augment": False, **data},
        model={"backbone": "iresnet_tiny", "embedding_size": 16},
        train={"total_steps": total_steps, "log_every": 1, "output_dir": str(tmp_path / "dirty")},
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
    """One epoch (see EPOCH_PER_RANK): the summary holds the planted counts of the fault set, MLflow's metrics
    the same numbers. With DALI, the rank that meets the undecodable JPEG decodes that batch with PIL: the batch
    keeps its size, so the classifier's equal-size gathers go on."""
    from mlflow.tracking import MlflowClient

    from distrib_face.data.decode import REPAIR_REASONS, SKIP_REASONS
    from distrib_face.data.quality import DataCounts

    cfg = _dirty_config(tmp_path, faults, decoder, total_steps=EPOCH_STEPS, max_skip_fraction=1.0, shuffle=False)
    results = run_world(_train, 2, tmp_path, (cfg,))
    summary = results[0]["summary"]
    assert summary["finished"] and summary["data"] == results[1]["summary"]["data"]
    data = summary["data"]
    # The ranks' own loader counts, merged here, are what the summary says ...
    assert data == DataCounts.merged([r["own_counts"] for r in results]).to_dict()
    # ... and what the fault set planted, counted by hand: every bad sample once, nothing invented.
    assert data["skipped"] == faults.skipped
    assert data["per_shard"] == faults.skipped_by_shard
    assert data["repaired"] == faults.repaired
    assert data["missing_shards"] == [faults.missing_shard]
    fallbacks = 1 if decoder == "dali" else 0  # DALI fails on the broken Huffman table; PIL then drops it
    assert data["dali_fallback_batches"] == fallbacks
    # Every rank took its 24 positions of good samples; the stand-in for the dropped JPEG is not counted.
    skipped_total = sum(faults.skipped.values())
    delivered = 2 * EPOCH_PER_RANK - fallbacks
    assert data["delivered"] == delivered and data["skipped_total"] == skipped_total
    assert data["samples_read"] == delivered + skipped_total
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}").get_run(summary["mlflow_run_id"])
    metrics = run.data.metrics  # the latest values: the last log step is the last step
    for reason in SKIP_REASONS:  # the reasons nothing was skipped for are there, as 0
        assert metrics[f"data/skipped/{reason}"] == faults.skipped.get(reason, 0), reason
    for reason in REPAIR_REASONS:
        assert metrics[f"data/repaired/{reason}"] == faults.repaired.get(reason, 0), reason
    assert metrics["data/skipped_total"] == skipped_total
    assert metrics["data/samples_read"] == delivered + skipped_total
    assert metrics["data/skip_fraction"] == pytest.approx(skipped_total / (delivered + skipped_total), rel=1e-12)
    assert metrics["data/dali_fallback_batches"] == fallbacks
    note = DataCounts.from_dict(data).progress_text()
    assert note and any(line.startswith(f"step {EPOCH_STEPS}/{EPOCH_STEPS}") and line.endswith(note)
                        for line in results[0]["lines"])


def test_too_many_skips_stop_every_rank_naming_the_worst_shard(tmp_path, faults):
    cfg = _dirty_config(tmp_path, faults, max_skip_fraction=0.01, skip_check_after=8)
    results = run_world(_train, 2, tmp_path, (cfg,))
    for result in results:  # the same verdict on both ranks: neither is left waiting in a collective
        assert result["exit_code"] == 2
        assert "all ranks: " in result["error"] and "above data.max_skip_fraction=0.01" in result["error"]
        assert "worst shard part-000001.tar" in result["error"] or "worst shard part-000002.tar" in result["error"]
    assert results[0]["error"] == results[1]["error"]

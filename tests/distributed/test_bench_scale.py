"""``distrib-face bench scale`` at 20k identities: synth -> data verify -> 2 gloo ranks (Partial FC 0.1) ->
checkpoint -> reshard 2 -> 3 -> resume on 3 ranks -> eval, every phase the real command, measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distrib_face.parallel.checkpoint import load_full_matrix, read_shards
from distrib_face.train.scale import PHASES

ROOT = Path(__file__).resolve().parents[2]
IDENTITIES, STEPS, RESUME_STEPS = 20_000, 2, 2


@pytest.mark.slow
def test_bench_scale_runs_every_phase_and_reshards_exactly(tmp_path):
    out = tmp_path / "scale"
    proc = subprocess.run([sys.executable, "-m", "distrib_face", "bench", "scale", "--identities", str(IDENTITIES),
                           "--steps", str(STEPS), "--resume-steps", str(RESUME_STEPS), "--out", str(out),
                           "--holdout", "20", "--pairs", "100"],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((out / "scale.json").read_text())
    assert result["num_classes"] == IDENTITIES
    phases = {p["name"]: p for p in result["phases"]}
    assert list(phases) == list(PHASES)
    for name, phase in phases.items():
        assert phase["returncode"] == 0 and phase["wall_s"] > 0 and phase["peak_rss_bytes"] > 0, name
        assert name in proc.stdout
    # the training phases ran their ranks (and each rank its reader's fork server) inside the measured tree
    assert phases["train@2"]["by_kind"]["rank"][0] == 2 and phases["train@3"]["by_kind"]["rank"][0] == 3
    assert phases["train@2"]["images_per_sec"] > 0 and phases["train@3"]["images_per_sec"] > 0
    assert "no problems" in (out / "logs" / "verify.log").read_text()

    # the resharded checkpoint: 3 shard files covering every class exactly once, the same matrix as before
    before, after = Path(result["checkpoint_2"]) / "classifier", Path(result["checkpoint_3"]) / "classifier"
    assert len(list(before.glob("classifier-*-of-00002.pt"))) == 2
    assert len(list(after.glob("classifier-*-of-00003.pt"))) == 3
    ranges = sorted((s.meta["class_start"], s.meta["class_stop"]) for s in read_shards(after))
    assert ranges[0][0] == 0 and ranges[-1][1] == IDENTITIES
    assert all(stop == start for (_, stop), (start, _) in zip(ranges, ranges[1:]))
    assert torch.equal(load_full_matrix(before), load_full_matrix(after))

    # the resumed run started from that checkpoint's step and trained to the end on 3 ranks
    s2, s3 = result["summary_2"], result["summary_3"]
    assert s2["world_size"] == 2 and s2["steps"] == STEPS and not s2["finished"]
    assert s3["world_size"] == 3 and s3["resumed_from"] == result["checkpoint_3"]
    assert s3["steps"] - s3["steps_this_run"] == STEPS and s3["steps"] == STEPS + RESUME_STEPS and s3["finished"]
    final = Path(s3["checkpoint"])
    assert json.loads((final / "trainer.json").read_text())["step"] == STEPS + RESUME_STEPS
    assert len(list((final / "classifier").glob("classifier-*-of-00003.pt"))) == 3

    # eval printed its numbers for the held-out pairs
    (evaluated,) = result["eval"]
    assert evaluated["name"] == "synthetic_holdout" and evaluated["num_pairs"] == 100
    assert 0.0 <= evaluated["accuracy"] <= 1.0
    assert "synthetic_holdout" in (out / "logs" / "eval.log").read_text()
    assert f"eval synthetic_holdout: accuracy {100 * evaluated['accuracy']:.2f}%" in proc.stdout


def test_bench_scale_refuses_bad_arguments(tmp_path):
    from distrib_face.cli import main

    assert main(["bench", "scale", "--identities", "10", "--steps", "0", "--out", str(tmp_path)]) == 2
    assert main(["bench", "scale", "--shards", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2

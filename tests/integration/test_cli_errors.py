"""The CLI as a user meets it: a wrong path or a wrong file kind is one line naming it, exit 2, no traceback.

Each case runs ``python -m distrib_face ...`` in a subprocess (the real entry point, its real stderr). The
subprocesses start together (a small pool), since each pays Python's and torch's import time.
"""

from __future__ import annotations

import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
# "distrib-face: error: ..." or, for the training command (as argparse names a subcommand),
# "distrib-face train: error: ..."
PREFIX = re.compile(r"^distrib-face( train)?: error: ")


def _workspace(root: Path) -> dict[str, Path]:
    """Files of every kind a user could mix up: shards + manifest, a pair set, a backbone, a run's folders, an
    embedding file."""
    from distrib_face.data.pairset import save_pairset
    from distrib_face.data.synthetic import holdout_pairset
    from distrib_face.data.testing import write_indexed_shards
    from distrib_face.eval.embedset import EmbeddingSet, save_embeddings
    from distrib_face.models import create_backbone, save_backbone

    shards = root / "shards"
    write_indexed_shards(shards, [2, 2])
    pairs = save_pairset(root / "pairs.npz", holdout_pairset(4, 2, 6, 32, seed=0))
    torch.manual_seed(0)
    step = root / "run" / "checkpoints" / "step_000000004"
    save_backbone(step / "backbone.pt", create_backbone("iresnet_tiny", embedding_size=8, input_size=32),
                  "iresnet_tiny", {"embedding_size": 8, "input_size": 32})
    (root / "run" / "checkpoints" / "latest").write_text("step_000000004\n")
    (root / "empty").mkdir()
    vectors = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)  # [N, D]
    embeddings = save_embeddings(root / "emb.npz", EmbeddingSet(
        embeddings=vectors / np.linalg.norm(vectors, axis=1, keepdims=True), labels=np.arange(4),
        names=[f"img{i}" for i in range(4)]))
    # a shard folder whose manifest is inconsistent (a negative sample count): refused, the field named
    import json
    import shutil

    bad = shutil.copytree(shards, root / "bad_manifest")
    raw = json.loads((bad / "manifest.json").read_text())
    raw["num_samples"] = -3
    (bad / "manifest.json").write_text(json.dumps(raw))
    (root / "train_bad_manifest.yaml").write_text(
        f"data: {{shards: {bad}, image_size: 32}}\n"
        "model: {backbone: iresnet_tiny, embedding_size: 8}\n"
        "train: {total_steps: 2}\n"
        "tracking: {enabled: false}\n"
    )
    config = root / "train.yaml"
    config.write_text(
        f"data: {{shards: {root / 'not_made_yet'}, image_size: 32}}\n"
        "model: {backbone: iresnet_tiny, embedding_size: 8}\n"
        "train: {total_steps: 2}\n"
        "tracking: {enabled: false}\n"
    )
    return {"root": root, "shards": shards, "manifest": shards / "manifest.json", "pairs": pairs,
            "step": step, "checkpoints": root / "run" / "checkpoints", "config": config, "empty": root / "empty",
            "embeddings": embeddings, "bad_config": root / "train_bad_manifest.yaml",
            "bad_manifest": bad / "manifest.json"}


# (id, argv with {placeholders}, a text the one line must contain)
CASES = [
    ("train-before-synth", ["train", "--config", "{config}"], "not_made_yet"),
    ("train-missing-config", ["train", "--config", "{root}/nope.yaml"], "nope.yaml"),
    ("train-on-an-inconsistent-manifest", ["train", "--config", "{bad_config}"], "num_samples"),
    ("data-verify-an-inconsistent-manifest", ["data", "verify", "{bad_manifest}"], "num_samples"),
    ("config-show-bad-value", ["config", "show", "--config", "{config}", "--set", "optim.lr=-1"], "optim.lr"),
    ("reshard-step-without-shards", ["reshard", "{step}", "{root}/resharded", "--world-size", "1"], "step_000000004"),
    ("reshard-missing", ["reshard", "{root}/nope", "{root}/out", "--world-size", "1"], "nope"),
    ("eval-pairs-is-a-manifest", ["eval", "--model", "{step}/backbone.pt", "--pairs", "{manifest}"], "manifest.json"),
    ("eval-model-is-a-manifest", ["eval", "--model", "{manifest}", "--pairs", "{pairs}"], "manifest.json"),
    ("eval-model-is-an-empty-folder", ["eval", "--model", "{empty}", "--pairs", "{pairs}"], "empty"),
    ("eval-model-missing", ["eval", "--model", "{root}/nope.onnx", "--pairs", "{pairs}"], "nope.onnx"),
    ("export-from-a-manifest", ["export", "--checkpoint", "{manifest}", "--output", "{root}/x.onnx"], "manifest.json"),
    ("export-from-an-empty-folder", ["export", "--checkpoint", "{empty}", "--output", "{root}/x.onnx"], "empty"),
    ("data-stats-on-a-pair-set", ["data", "stats", "{pairs}"], "pairs.npz"),
    ("data-stats-missing", ["data", "stats", "{root}/nope"], "nope"),
    ("pack-missing-source", ["pack", "{root}/nope", "{root}/packed"], "nope"),
    ("pack-pairs-missing-bin", ["pack-pairs", "--bin", "{root}/nope.bin", "--output", "{root}/p.npz"], "nope.bin"),
    ("toy-unknown-loss", ["toy", "--loss", "nope", "--output", "{root}/toy"], "nope"),
    ("clean-subcenters-missing", ["clean-subcenters", "--weights", "{root}/w.npy", "--embeddings", "{root}/e.npz",
                                  "--output", "{root}/o"], "w.npy"),
    ("bench-unknown-backbone", ["bench", "backbones", "nope_net"], "nope_net"),
    ("embed-model-missing", ["embed", "{shards}", "--model", "{root}/nope.onnx", "--output", "{root}/e.npz"],
     "nope.onnx"),
    ("embed-model-is-a-manifest", ["embed", "{shards}", "--model", "{manifest}", "--output", "{root}/e.npz"],
     "manifest.json"),
    ("embed-source-missing", ["embed", "{root}/nowhere", "--model", "{step}/backbone.pt", "--output", "{root}/e.npz"],
     "nowhere"),
    ("search-gallery-missing", ["search", "--gallery", "{root}/nope.npz", "--probes", "{pairs}"], "nope.npz"),
    ("search-gallery-is-a-pair-set", ["search", "--gallery", "{pairs}", "--probes", "{pairs}"], "pairs.npz"),
    ("search-probes-is-a-manifest", ["search", "--gallery", "{embeddings}", "--probes", "{manifest}"],
     "manifest.json"),
    ("search-distractors-is-a-manifest", ["search", "--gallery", "{embeddings}", "--probes", "{embeddings}",
                                          "--distractors", "{manifest}"], "manifest.json"),
    ("data-verify-missing", ["data", "verify", "{root}/nope"], "nope"),
    ("data-verify-on-a-pair-set", ["data", "verify", "{pairs}"], "pairs.npz"),
    ("synth-onto-a-file", ["synth", "{pairs}"], "pairs.npz"),
    ("synth-under-a-file", ["synth", "{pairs}/sub"], "pairs.npz"),
]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    files = _workspace(tmp_path_factory.mktemp("cli_errors"))

    def run(case):
        argv = [part.format(**files) for part in case[1]]
        return subprocess.run([sys.executable, "-m", "distrib_face", *argv], cwd=files["root"], capture_output=True,
                              text=True, timeout=300, env=_env())

    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(run, CASES))
    return {case[0]: (result, files) for case, result in zip(CASES, results)}


def _env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONWARNINGS"] = "ignore"  # third-party import-time warnings are not the CLI's output
    return env


@pytest.mark.parametrize("case_id, argv, needle", CASES, ids=[c[0] for c in CASES])
def test_wrong_input_is_one_line_and_exit_2(outcomes, case_id, argv, needle):
    proc, _ = outcomes[case_id]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if PREFIX.match(line)]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1, lines
    assert needle in errors[0], errors[0]
    assert "pickle" not in errors[0] and "weights_only" not in errors[0], errors[0]


def test_version_and_config_show(tmp_path):
    import yaml

    from distrib_face import __version__
    from distrib_face.config import load_config

    version = subprocess.run([sys.executable, "-m", "distrib_face", "--version"], capture_output=True, text=True,
                             timeout=120, env=_env())
    assert version.returncode == 0 and version.stdout.strip() == f"distrib-face {__version__}"

    shown = subprocess.run(
        [sys.executable, "-m", "distrib_face", "config", "show", "--config", str(ROOT / "configs" / "tiny_cpu.yaml"),
         "--set", "optim.lr=0.05", "--set", "train.total_steps=7"],
        capture_output=True, text=True, timeout=120, env=_env(),
    )
    assert shown.returncode == 0, shown.stderr
    expected = load_config(ROOT / "configs" / "tiny_cpu.yaml", ["optim.lr=0.05", "train.total_steps=7"])
    assert yaml.safe_load(shown.stdout) == expected.to_dict()  # every default filled in, overrides applied
    (tmp_path / "shown.yaml").write_text(shown.stdout)
    assert load_config(tmp_path / "shown.yaml") == expected  # and it reads back as the same config
    assert "\n" not in shown.stderr.strip()  # nothing but (at most) one line of logging


def test_reshard_takes_a_training_checkpoint_folder(tmp_path):
    from distrib_face.losses.margins import create_margin
    from distrib_face.parallel import ShardedMarginClassifier
    from distrib_face.parallel.checkpoint import load_full_matrix, save_shard
    from distrib_face.parallel.optim import ShardOptimizer

    classifier = ShardedMarginClassifier(10, 4, margin=create_margin("arcface", scale=8.0), dtype=torch.float64,
                                         seed=1)
    save_shard(tmp_path / "step_000000004" / "classifier", classifier, ShardOptimizer(classifier, "sgd", lr=0.1))
    proc = subprocess.run([sys.executable, "-m", "distrib_face", "reshard", str(tmp_path / "step_000000004"),
                           str(tmp_path / "two"), "--world-size", "2"], capture_output=True, text=True, timeout=120,
                          env=_env())
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(load_full_matrix(tmp_path / "two").numpy(),
                                  load_full_matrix(tmp_path / "step_000000004" / "classifier").numpy())

"""Train on real faces, verify on held-out real identities: better than the untrained network.

Identity-disjoint split of ../shared/data (as its README suggests): train on Extended Yale B (38 identities,
the first 12 images each) plus ORL s1..s30; verify on every genuine pair of ORL s31..s40 and as many
impostor pairs. Skipped when ../shared/data is absent.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import numpy as np
import pytest

from distrib_face.data.pairset import PairSet, save_pairset


def _train_tree(shared: Path, out: Path) -> Path:
    tree = out / "train_tree"
    for identity in sorted((shared / "extended_yaleb_cropped").iterdir()):
        if identity.is_dir():
            images = sorted(identity.glob("*.png"))[:12]
            (tree / identity.name).mkdir(parents=True)
            for image in images:
                (tree / identity.name / image.name).symlink_to(image)
    for k in range(1, 31):
        src = shared / "orl_faces" / f"s{k}"
        (tree / src.name).mkdir(parents=True)
        for image in sorted(src.glob("*.png")):
            (tree / src.name / image.name).symlink_to(image)
    return tree


def _holdout_pairs(shared: Path, path: Path) -> Path:
    rng = random.Random(0)
    people = [sorted((shared / "orl_faces" / f"s{k}").glob("*.png")) for k in range(31, 41)]
    genuine = [(a, b) for images in people for a, b in itertools.combinations(images, 2)]
    impostor = set()
    while len(impostor) < len(genuine):
        i, j = rng.sample(range(len(people)), 2)
        impostor.add((rng.choice(people[i]), rng.choice(people[j])))
    pairs = [(a, b, True) for a, b in genuine] + [(a, b, False) for a, b in sorted(impostor)]
    rng.shuffle(pairs)
    images = [p.read_bytes() for a, b, _ in pairs for p in (a, b)]
    return save_pairset(path, PairSet("orl_holdout", images, np.array([s for _, _, s in pairs])))


@pytest.mark.slow
def test_training_on_real_faces_beats_the_untrained_network(shared_data, tmp_path):
    from distrib_face.config import Config
    from distrib_face.data.pack import pack
    from distrib_face.parallel import init_distributed
    from distrib_face.train import run_training

    result = pack(_train_tree(shared_data, tmp_path), tmp_path / "shards", image_size=64, workers=1, progress=False)
    assert result.manifest.num_classes == 68 and result.manifest.num_samples == 38 * 12 + 300
    pairs = _holdout_pairs(shared_data, tmp_path / "orl_holdout.npz")
    cfg = Config.from_dict({
        "data": {"source": "shards", "shards": str(tmp_path / "shards"), "decoder": "dali", "image_size": 64,
                 "batch_size": 32, "num_workers": 0, "dali_threads": 1},
        "model": {"backbone": "iresnet_tiny", "embedding_size": 64},
        "loss": {"margin": "cosface", "scale": 32.0, "additive_margin": 0.2},
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
        "schedule": {"kind": "poly", "warmup_steps": 10},
        "deepspeed": {"zero_stage": 0, "precision": "fp32"},
        "train": {"total_steps": 400, "output_dir": str(tmp_path / "run"), "log_every": 50, "eval_every": 0,
                  "eval_pairsets": [str(pairs)], "eval_at_start": True, "export_onnx": False, "resume": "never"},
        "tracking": {"enabled": False},
        "device": "cpu",
    })
    summary = run_training(cfg, init_distributed(device="cpu"))
    before = summary["verification_before"]["orl_holdout"]
    after = summary["verification_after"]["orl_holdout"]
    # Measured here: 0.811 untrained -> 0.881 trained (a random network already does well on aligned ORL).
    assert after > before + 0.03, (before, after)

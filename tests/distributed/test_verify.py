"""Verification during training (train/verify.py) at 1-3 gloo ranks equals ``distrib-face eval``'s code path
(``load_model`` + ``evaluate_pairset``) on the saved backbone in one process, to 1e-6.

The ranks share parameters (data parallelism) but not BatchNorm's running statistics: each rank's training
forwards update its own. The test makes them differ on purpose (train-mode forwards on rank-specific
images), saves rank 0's backbone as the trainer does, and splits the pairs unevenly over the ranks
(41 pairs: 21/20 at 2 ranks, 14/14/13 at 3; a second set of 23 pairs without folds).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.spawn import run_world

IMAGE_SIZE, EMBEDDING = 32, 16


def _pairsets(folder: Path) -> list[Path]:
    from distrib_face.data.pairset import PairSet, save_pairset
    from distrib_face.data.synthetic import holdout_pairset

    with_folds = holdout_pairset(8, 4, 41, IMAGE_SIZE, seed=3)
    other = holdout_pairset(6, 3, 23, IMAGE_SIZE, seed=4)
    no_folds = PairSet(name="no_folds", images=other.images, issame=other.issame, folds=None)
    return [save_pairset(folder / "a.npz", with_folds), save_pairset(folder / "b.npz", no_folds)]


def _worker(rank: int, world_size: int, pair_paths: list[str], backbone_path: str) -> dict:
    from distrib_face.models import create_backbone, save_backbone
    from distrib_face.parallel import ProcessContext
    from distrib_face.train.verify import load_pairsets, verify

    torch.manual_seed(0)  # identical parameters on every rank
    module = create_backbone("iresnet_tiny", embedding_size=EMBEDDING, input_size=IMAGE_SIZE)
    generator = torch.Generator().manual_seed(100 + rank)  # rank-specific batches -> rank-specific BN stats
    with torch.no_grad():
        for _ in range(3):
            module(torch.rand(8, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) * 2 - 1)
    if rank == 0:
        save_backbone(backbone_path, module, "iresnet_tiny", {"embedding_size": EMBEDDING, "input_size": IMAGE_SIZE})
    before = {k: v.clone() for k, v in module.named_buffers()}
    ctx = ProcessContext(rank=rank, world_size=world_size, device=torch.device("cpu"))
    results = verify(module, load_pairsets(pair_paths), ctx, embedding_size=EMBEDDING, image_size=IMAGE_SIZE,
                     batch_size=5)
    restored = all(torch.equal(before[k], v) for k, v in module.named_buffers())
    return {
        "running_means": torch.cat([v.reshape(-1) for k, v in module.named_buffers() if k.endswith("running_mean")]),
        "restored": restored,
        "training": module.training,
        "results": {name: (r.to_dict(), r.roc.fpr, r.roc.tpr) for name, r in results.items()},
    }


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_verification_equals_eval_on_the_saved_backbone(tmp_path, world_size):
    from distrib_face.data.pairset import load_pairset
    from distrib_face.eval.embed import evaluate_pairset, load_model

    pair_paths = [str(p) for p in _pairsets(tmp_path)]
    backbone = tmp_path / "backbone.pt"
    out = run_world(_worker, world_size, tmp_path, (pair_paths, str(backbone)))

    if world_size > 1:  # the precondition that made the numbers differ: ranks hold different BN statistics
        assert not torch.allclose(out[0]["running_means"], out[1]["running_means"])
    for rank in out:
        assert rank["restored"], "verify() must give each rank its own BN statistics back"
        assert rank["training"], "verify() must leave the module in training mode"

    model = load_model(backbone)  # `distrib-face eval --model backbone.pt --pairs ...`
    for path in pair_paths:
        pairs = load_pairset(path)
        reference = evaluate_pairset(model, pairs, batch_size=7)
        for rank in out:  # every rank holds the same result
            got, fpr, tpr = rank["results"][pairs.name]
            want = reference.to_dict()
            for key in ("accuracy", "accuracy_std", "auc", "eer", "eer_threshold", "threshold"):
                assert got[key] == pytest.approx(want[key], abs=1e-6), (pairs.name, key)
            np.testing.assert_allclose(got["fold_accuracies"], want["fold_accuracies"], atol=1e-6)
            assert got["tar_at_far"].keys() == want["tar_at_far"].keys()
            for far, tar in want["tar_at_far"].items():
                assert (got["tar_at_far"][far] is None) == (tar is None)
                if tar is not None:
                    assert got["tar_at_far"][far] == pytest.approx(tar, abs=1e-6), (pairs.name, far)
            np.testing.assert_allclose(fpr, reference.roc.fpr, atol=1e-6)
            np.testing.assert_allclose(tpr, reference.roc.tpr, atol=1e-6)

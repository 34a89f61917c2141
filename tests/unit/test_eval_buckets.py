"""Verification accuracy by class size: a hand-computed case, consistency with the overall metrics, formats."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from distrib_face.cli import main
from distrib_face.data.manifest import Manifest, write_manifest
from distrib_face.data.pairset import PairSet, load_pairset, save_pairset
from distrib_face.eval.buckets import (
    accuracy_by_class_size,
    bucket_ranges,
    class_size_for_pairset,
    format_class_size_table,
    image_counts_of,
    load_class_counts,
    tercile_edges,
)
from distrib_face.eval.metrics import cosine_scores, verification_metrics_from_scores

# (score, same, count of image 1, count of image 2, fold); worked through by hand in test_hand_computed_case
HAND = [
    (0.9, True, 150, 150, 0), (0.8, True, 20, 20, 0), (0.45, True, 3, 3, 0),
    (0.1, False, 200, 5, 0), (0.2, False, 150, 120, 0), (0.5, False, 50, 0, 0),
    (0.7, True, 0, 0, 1), (0.6, True, 100, 100, 1), (0.3, True, 9, 9, 1),
    (0.35, False, 10, 99, 1), (0.05, False, -1, 30, 1), (0.15, False, 99, 500, 1),
]


def test_hand_computed_case():
    scores = np.array([h[0] for h in HAND])
    issame = np.array([h[1] for h in HAND])
    counts = np.array([[h[2], h[3]] for h in HAND]).reshape(-1)  # per image, pair k = images 2k, 2k + 1
    folds = np.array([h[4] for h in HAND])
    r = accuracy_by_class_size(scores, issame, counts, folds=folds, far_targets=(0.5, 0.2, 0.1))
    # fold 1 (sorted 0.05i 0.15i 0.3g 0.35i 0.6g 0.7g): 0.225 and 0.475 both get 5 of 6 right, the lower wins;
    # it is fold 0's threshold. Fold 0 (0.1i 0.2i 0.45g 0.5i 0.8g 0.9g): 0.325 (and 0.65), fold 1's threshold.
    assert r.fold_thresholds == pytest.approx([0.225, 0.325])
    # at 0.225 fold 0 gets all right but impostor 0.5; at 0.325 fold 1 misses genuine 0.3 and impostor 0.35
    b = r.buckets
    assert (b["head"].num_pairs, b["head"].num_genuine, b["head"].num_impostor, b["head"].accuracy) == (3, 2, 1, 1.0)
    assert (b["torso"].num_pairs, b["torso"].num_genuine, b["torso"].accuracy) == (3, 1, pytest.approx(2 / 3))
    assert (b["tail"].num_pairs, b["tail"].num_genuine, b["tail"].accuracy) == (3, 2, pytest.approx(2 / 3))
    assert (b["unseen"].num_pairs, b["unseen"].accuracy) == (2, 0.5)
    assert r.num_unknown == 1 and r.notes
    # FAR 0.2 of 6 impostors: 1 may pass, the cut is the 2nd highest impostor score (0.35), accepted above it
    assert [b[k].tar_at_far[0.2] for k in ("head", "torso", "tail", "unseen")] == [1.0, 1.0, 0.5, 1.0]
    assert [b[k].far_at_far[0.2] for k in ("head", "torso", "tail", "unseen")] == [0.0, 0.0, 0.0, 1.0]
    # FAR 0.5: 3 may pass, cut at the 4th highest (0.15): both tail genuine pairs pass, one of two torso impostors
    assert b["tail"].tar_at_far[0.5] == 1.0 and b["torso"].far_at_far[0.5] == 0.5
    assert all(b[k].tar_at_far[0.1] is None for k in b)  # FAR 0.1 needs 10 impostor pairs
    assert bucket_ranges() == {"head": (100, math.inf), "torso": (10, 99), "tail": (1, 9), "unseen": (0, 0)}
    d = r.to_dict()
    assert d["buckets"]["head"]["count_range"] == [100, None]
    assert d["buckets"]["tail"]["accuracy"] == pytest.approx(2 / 3)
    flat = r.summarize("verify")
    assert flat["verify/tail/accuracy"] == pytest.approx(2 / 3) and flat["verify/head/num_pairs"] == 3.0
    assert flat["verify/tail/tar_at_far_2e-01"] == 0.5 and "verify/tail/tar_at_far_1e-01" not in flat
    table = format_class_size_table(r, far_targets=(0.2,))
    assert "tail" in table and "1-9" in table and "66.67" in table
    # other edges move pairs: with (5, 50) the count-9 and -20 pairs are torso, count 50 would be head
    moved = accuracy_by_class_size(scores, issame, counts, folds=folds, edges=(5, 50))
    assert moved.buckets["tail"].num_pairs == 1 and moved.buckets["torso"].num_pairs == 4
    with pytest.raises(ValueError, match="bucket edges"):
        accuracy_by_class_size(scores, issame, counts, edges=(10, 10))
    with pytest.raises(ValueError, match="23 image counts for 12 pairs"):
        accuracy_by_class_size(scores, issame, counts[:-1], folds=folds)


@pytest.mark.parametrize("folds", [None, "own"])
def test_buckets_add_up_to_the_overall_metrics(folds):
    rng = np.random.default_rng(0)
    n = 997  # uneven contiguous folds
    issame = rng.random(n) < 0.4
    scores = rng.normal(issame * 1.5, 1.0)
    counts = rng.integers(-1, 300, size=2 * n)
    fold_ids = rng.integers(0, 7, n) if folds == "own" else None
    overall = verification_metrics_from_scores(scores, issame, folds=fold_ids, far_targets=(1e-1, 1e-2))
    r = accuracy_by_class_size(scores, issame, counts, folds=fold_ids, far_targets=(1e-1, 1e-2))
    assert r.fold_thresholds == overall.fold_thresholds
    sizes = np.bincount(fold_ids) if fold_ids is not None else np.array([len(p) for p in np.array_split(range(n), 10)])
    right_overall = float(np.dot(overall.fold_accuracies, sizes))
    right_buckets = sum(b.accuracy * b.num_pairs for b in r.buckets.values() if b.num_pairs)
    pair_count = np.where((counts.reshape(-1, 2) < 0).any(1), -1, counts.reshape(-1, 2).min(1))
    unknown = pair_count < 0
    # the unknown pairs' share, recomputed from the fold thresholds by hand
    ids = fold_ids if fold_ids is not None else np.repeat(np.arange(10), sizes)
    thresholds = dict(zip(np.unique(ids).tolist(), overall.fold_thresholds))
    right_unknown = np.sum(((scores >= np.array([thresholds[f] for f in ids])) == issame)[unknown])
    assert right_buckets + right_unknown == pytest.approx(right_overall)
    assert sum(b.num_pairs for b in r.buckets.values()) + r.num_unknown == n
    for far in (1e-1, 1e-2):
        genuine_accepted = sum(b.tar_at_far[far] * b.num_genuine for b in r.buckets.values() if b.num_genuine)
        cut = np.sort(scores[~issame])[::-1][math.floor(far * (~issame).sum() + 1e-9)]
        genuine_accepted += np.sum((scores > cut) & issame & unknown)
        assert genuine_accepted / issame.sum() == pytest.approx(overall.tar_at_far[far])


def test_class_counts_files(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"ann": 120, "ben": 3}))
    assert load_class_counts(tmp_path / "c.json") == ({"ann": 120, "ben": 3}, (10, 100))
    (tmp_path / "e.json").write_text(json.dumps({"counts": {"ann": 120}, "edges": [5, 50]}))
    assert load_class_counts(tmp_path / "e.json") == ({"ann": 120}, (5, 50))
    write_manifest(tmp_path / "shards", Manifest(num_classes=3, num_samples=15, shards=["train-000000.tar"],
                                                  shard_counts=[15], class_counts=[10, 4, 1],
                                                  label_map={"x": 0, "y": 1, "z": 2}))
    assert load_class_counts(tmp_path / "shards") == ({"x": 10, "y": 4, "z": 1}, (10, 100))
    assert load_class_counts(tmp_path / "shards" / "manifest.json")[0] == {"x": 10, "y": 4, "z": 1}
    for text, message in [("[1, 2]", "expected a non-empty JSON object"), ('{"a": -1}', "count of 'a' must be"),
                          ("not json", "must be JSON"), ('{"counts": {"a": 1}, "edges": [50, 5]}', "bucket edges")]:
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(ValueError, match=message):
            load_class_counts(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="no such class-counts file"):
        load_class_counts(tmp_path / "none.json")
    # names missing from the counts had no training images; images without a name are unknown
    assert image_counts_of(["x", "q", ""], None, {"x": 10}).tolist() == [10, 0, -1]
    assert image_counts_of(None, np.array([3, 4]), None).tolist() == [3, 4]
    assert image_counts_of(None, None, {"x": 1}) is None
    assert tercile_edges([1, 2, 3, 4, 5, 6, 7, 8, 9]) == (4, 7)
    # a set with neither names nor counts has no split; with counts of its own it has one
    emb = np.random.default_rng(0).normal(size=(4, 3))
    assert class_size_for_pairset(PairSet("anon", [b"a"] * 4, [True, False]), emb) is None
    own = class_size_for_pairset(PairSet("own", [b"a"] * 4, [True, False], image_counts=[50, 50, 3, 200]), emb,
                                 nfolds=2)
    assert own.buckets["torso"].num_pairs == 1 and own.buckets["tail"].num_pairs == 1


def test_pairset_identities_and_counts_are_optional_and_round_trip(tmp_path):
    images = [b"a", b"b", b"c", b"d"]
    old = PairSet("old", images, [True, False])
    back = load_pairset(save_pairset(tmp_path / "old.npz", old))
    assert back.identities is None and back.image_counts is None
    new = PairSet("new", images, [True, False], identities=["p", "p", "p", "q"], image_counts=[5, 5, 5, 0])
    back = load_pairset(save_pairset(tmp_path / "new.npz", new))
    assert back.identities == ["p", "p", "p", "q"] and back.image_counts.tolist() == [5, 5, 5, 0]
    with np.load(tmp_path / "new.npz", allow_pickle=False) as z:
        assert z["identities"].dtype.kind == "U"
    with pytest.raises(ValueError, match="3 identities for 4 images"):
        PairSet("bad", images, [True, False], identities=["p", "p", "p"])
    with pytest.raises(ValueError, match="2 image counts for 4 images"):
        PairSet("bad", images, [True, False], image_counts=[1, 2])


def test_lfw_pairs_carry_identity_names(tmp_path):
    from distrib_face.eval.readers import read_lfw_pairs

    for person, n in [("Ann", 1), ("Ann", 2), ("Bob", 1)]:
        (tmp_path / person).mkdir(exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="PNG")
        (tmp_path / person / f"{person}_{n:04d}.png").write_bytes(buf.getvalue())
    (tmp_path / "pairs.txt").write_text("Ann 1 2\nAnn 1 Bob 1\n")
    assert read_lfw_pairs(tmp_path / "pairs.txt", tmp_path).identities == ["Ann", "Ann", "Ann", "Bob"]


def _onnx(path) -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 15 * 15, 16)).eval()
    torch.onnx.export(net, torch.zeros(1, 3, 32, 32), str(path), input_names=["input"], output_names=["embedding"],
                      dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}}, dynamo=False)


def test_synthetic_seen_pairs_and_eval_cli(tmp_path, capsys):
    from distrib_face.data.manifest import read_manifest
    from distrib_face.data.synthetic import write_synthetic
    from distrib_face.eval.embed import embed_images

    write_synthetic(tmp_path / "data", num_identities=12, min_images=2, max_images=40, zipf_a=0.5,
                    holdout_identities=4, image_size=32, num_pairs=40, seen_pairs=60, samples_per_shard=200)
    manifest = read_manifest(tmp_path / "data")
    seen = load_pairset(tmp_path / "data" / "seen_pairs.npz")
    assert seen.num_pairs == 60 and seen.name == "synthetic_seen"
    labels = [manifest.label_map[name] for name in seen.identities]
    assert seen.image_counts.tolist() == [manifest.class_counts[label] for label in labels]
    for k, same in enumerate(seen.issame):
        assert (seen.identities[2 * k] == seen.identities[2 * k + 1]) == bool(same)
    holdout = load_pairset(tmp_path / "data" / "holdout_pairs.npz")
    assert holdout.identities[0].startswith("holdout") and holdout.image_counts is None

    _onnx(tmp_path / "m.onnx")
    out = tmp_path / "r.json"
    code = main(["eval", "--model", str(tmp_path / "m.onnx"), "--pairs", str(tmp_path / "data" / "seen_pairs.npz"),
                 "--pairs", str(tmp_path / "data" / "holdout_pairs.npz"), "--class-counts", str(tmp_path / "data"),
                 "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "accuracy by class size (synthetic_seen)" in printed
    seen_result, holdout_result = json.loads(out.read_text())["results"]
    emb = embed_images(str(tmp_path / "m.onnx"), seen.images)
    expected = accuracy_by_class_size(cosine_scores(emb[0::2], emb[1::2]), seen.issame, seen.image_counts,
                                      folds=seen.folds)
    got = seen_result["class_size"]["buckets"]
    for name, bucket in expected.buckets.items():
        assert got[name]["num_pairs"] == bucket.num_pairs
        assert got[name]["accuracy"] == (None if math.isnan(bucket.accuracy) else pytest.approx(bucket.accuracy))
    pair_min = seen.image_counts.reshape(-1, 2).min(1)
    assert got["tail"]["num_pairs"] == int(((pair_min >= 1) & (pair_min < 10)).sum()) > 0
    # held-out identities are not in training: every pair is unseen
    assert holdout_result["class_size"]["buckets"]["unseen"]["num_pairs"] == 40
    assert any("so every pair is 'unseen'" in note for note in holdout_result["class_size"]["notes"])

    # a .bin-like set without identities cannot be split
    save_pairset(tmp_path / "anon.npz", PairSet("anon", seen.images, seen.issame))
    assert main(["eval", "--model", str(tmp_path / "m.onnx"), "--pairs", str(tmp_path / "anon.npz"),
                 "--class-counts", str(tmp_path / "data")]) == 2
    assert "no --pairs set has per-image identity names" in capsys.readouterr().err

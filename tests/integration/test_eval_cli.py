"""`distrib-face eval` end to end on real faces (ORL) with a random-init model, via ONNX and a checkpoint."""

import json
import math
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from distrib_face.data.pairset import PairSet, save_pairset

PEOPLE = [f"s{i}" for i in range(31, 41)]


def _orl_pairs(orl):
    """50 genuine and 50 impostor pairs from identities s31..s40, interleaved."""
    rng = np.random.default_rng(0)
    pairs = []
    for k, person in enumerate(PEOPLE):
        for a in range(1, 10, 2):
            pairs.append(((person, a), (person, a + 1), True))
            other = PEOPLE[(k + 1 + a // 2) % len(PEOPLE)]
            pairs.append(((person, a), (other, int(rng.integers(1, 11))), False))
    images = [(orl / p / f"{n}.png").read_bytes() for a, b, _ in pairs for p, n in (a, b)]
    return pairs, PairSet("orl_s31_s40", images, [same for *_, same in pairs])


def _onnx_model(path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.PReLU(8),
        torch.nn.Conv2d(8, 16, 3, stride=2, padding=1),
        torch.nn.AdaptiveAvgPool2d(4),
        torch.nn.Flatten(),
        torch.nn.Linear(16 * 16, 64),
    ).eval()
    torch.onnx.export(
        net, torch.zeros(1, 3, 112, 112), str(path), input_names=["input"], output_names=["embedding"],
        dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}}, dynamo=False,
    )


def _run(*argv):
    proc = subprocess.run(
        [sys.executable, "-m", "distrib_face", "--log-level", "WARNING", *argv],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _check_result(r, num_pairs):
    assert r["num_pairs"] == num_pairs
    assert 0.0 <= r["accuracy"] <= 1.0 and math.isfinite(r["accuracy_std"])
    assert 0.0 <= r["auc"] <= 1.0 and 0.0 <= r["eer"] <= 1.0
    assert r["norm_stats"]["mean"] > 0


def test_eval_onnx_on_orl_pairset_pairs_txt_bin_and_ijb(shared_data, tmp_path):
    orl = shared_data / "orl_faces"
    pairs, pairset = _orl_pairs(orl)
    save_pairset(tmp_path / "orl.npz", pairset)
    # the same pairs as an insightface .bin ...
    (tmp_path / "orl.bin").write_bytes(pickle.dumps((pairset.images, pairset.issame.tolist()), protocol=4))
    # ... and as an LFW-style folder: 2 folds x 5 pairs (5 same, then 5 different, per fold)
    lfw = tmp_path / "orl_lfw"
    for person in PEOPLE:
        (lfw / person).mkdir(parents=True)
        for n in range(1, 11):
            shutil.copy(orl / person / f"{n}.png", lfw / person / f"{person}_{n:04d}.png")
    same = [p for p in pairs if p[2]][:10]
    diff = [p for p in pairs if not p[2]][:10]
    lines = ["2 5"]
    for fold in range(2):
        lines += [f"{a[0]} {a[1]} {b[1]}" for a, b, _ in same[5 * fold:5 * fold + 5]]
        lines += [f"{a[0]} {a[1]} {b[0]} {b[1]}" for a, b, _ in diff[5 * fold:5 * fold + 5]]
    (lfw / "pairs.txt").write_text("\n".join(lines) + "\n")
    # ... and an IJB-style protocol: two templates per person (images 1-5, 6-10), media of two images
    ijb = tmp_path / "ijb"
    (ijb / "meta").mkdir(parents=True)
    (ijb / "loose_crop").mkdir()
    rows, template = [], {}
    for k, person in enumerate(PEOPLE):
        for n in range(1, 11):
            shutil.copy(orl / person / f"{n}.png", ijb / "loose_crop" / f"{person}_{n}.png")
            tid = 2 * k + (n > 5) + 1
            template[tid] = person
            rows.append(f"{person}_{n}.png {tid} {100 * tid + (n - 1) // 2}")
    (ijb / "meta" / "ijbc_face_tid_mid.txt").write_text("\n".join(rows) + "\n")
    tids = sorted(template)
    pair_rows = [f"{a} {b} {int(template[a] == template[b])}" for i, a in enumerate(tids) for b in tids[i + 1:]]
    (ijb / "meta" / "ijbc_template_pair_label.txt").write_text("\n".join(pair_rows) + "\n")

    _onnx_model(tmp_path / "model.onnx")
    table = _run(
        "eval", "--model", str(tmp_path / "model.onnx"),
        "--pairs", str(tmp_path / "orl.npz"), "--pairs", str(tmp_path / "orl.bin"), "--pairs", str(lfw),
        "--ijb", str(ijb), "--batch-size", "32", "--roc", str(tmp_path / "roc.png"), "--json", str(tmp_path / "r.json"),
    )
    assert "orl_s31_s40" in table and "TAR@1e-01" in table and "ijbc" in table
    assert "not measurable" in table  # 50 impostor pairs cannot measure FAR 1e-2
    results = {r["name"]: r for r in json.loads((tmp_path / "r.json").read_text())["results"]}
    assert set(results) == {"orl_s31_s40", "orl", "orl_lfw", "ijbc"}
    _check_result(results["orl_s31_s40"], 100)
    _check_result(results["orl_lfw"], 20)
    assert len(results["orl_lfw"]["fold_accuracies"]) == 2  # the folds of the pairs.txt header
    _check_result(results["ijbc"], 190)
    # one pair list, three containers: identical numbers
    for key in ("accuracy", "auc", "eer", "tar_at_far", "norm_stats"):
        assert results["orl"][key] == results["orl_s31_s40"][key]
    with Image.open(tmp_path / "roc.png") as png:
        assert png.format == "PNG" and png.size[0] > 300


def test_eval_backbone_checkpoint_json_stdout(shared_data, tmp_path):
    models = pytest.importorskip("distrib_face.models")
    if "mobilefacenet_tiny" not in models.list_backbones():
        pytest.skip("mobilefacenet_tiny backbone not registered")
    _, pairset = _orl_pairs(shared_data / "orl_faces")
    # 20 pairs keep the CPU forward passes of a real backbone short
    save_pairset(tmp_path / "orl.npz", PairSet(pairset.name, pairset.images[:40], pairset.issame[:20]))
    kwargs = {"embedding_size": 64}
    net = models.create_backbone("mobilefacenet_tiny", **kwargs)
    models.save_backbone(tmp_path / "ckpt" / "backbone.pt", net, "mobilefacenet_tiny", kwargs)
    argv = ["eval", "--model", str(tmp_path / "ckpt"), "--pairs", str(tmp_path / "orl.npz"), "--no-flip", "--json"]
    out = json.loads(_run(*argv))
    assert out["flip"] is False
    _check_result(out["results"][0], 20)

"""The sub-centre cleaning tool against a brute-force loop, and its command end to end."""

from __future__ import annotations

import math

import numpy as np
import torch

from distrib_face.losses.subcenter import clean_subcenters


def _setup():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 3, 8, generator=gen, dtype=torch.float64)
    labels, emb = [], []
    for c in range(4):
        dom = (c + 1) % 3
        for i in range(12):  # 9 near the dominant sub-centre, 2 near another, 1 random
            centre = dom if i < 9 else (dom + 1) % 3
            v = weight[c, centre] + 0.2 * torch.randn(8, generator=gen, dtype=torch.float64)
            if i == 11:
                v = torch.randn(8, generator=gen, dtype=torch.float64)
            labels.append(c)
            emb.append(v)
    return weight, torch.stack(emb), torch.tensor(labels)


def test_clean_subcenters_brute_force():
    weight, emb, labels = _setup()
    out = clean_subcenters(weight, emb, labels, threshold_degrees=60.0, chunk_size=7)
    for c in range(4):
        votes = [0, 0, 0]
        for i in range(len(labels)):
            if labels[i] == c:
                cos = [float(emb[i] @ weight[c, j] / (emb[i].norm() * weight[c, j].norm())) for j in range(3)]
                votes[int(np.argmax(cos))] += 1
        assert list(out.counts[c]) == votes
        assert out.dominant[c] == int(np.argmax(votes)) == (c + 1) % 3
        assert torch.equal(out.weight[c], weight[c, out.dominant[c]])
    expect = []
    for i in range(len(labels)):
        w = weight[labels[i], out.dominant[labels[i]]]
        angle = math.degrees(math.acos(float(emb[i] @ w / (emb[i].norm() * w.norm()))))
        assert abs(out.angles[i] - angle) < 1e-9
        if angle > 60.0:
            expect.append(i)
    assert list(out.noisy) == expect and len(expect) > 0


def test_clean_subcenters_command(tmp_path):
    from distrib_face.cli import main

    weight, emb, labels = _setup()
    np.save(tmp_path / "w.npy", weight.numpy())
    np.savez(tmp_path / "emb.npz", embeddings=emb.numpy(), labels=labels.numpy(),
             keys=np.array([f"img{i}" for i in range(len(labels))]))
    assert main(["clean-subcenters", "--weights", str(tmp_path / "w.npy"), "--embeddings", str(tmp_path / "emb.npz"),
                 "--threshold", "60", "--output", str(tmp_path / "out")]) == 0
    ref = clean_subcenters(weight, emb, labels, 60.0)
    lines = (tmp_path / "out" / "noisy.csv").read_text().splitlines()
    assert lines[0] == "index,key,label,angle_degrees"
    assert [int(line.split(",")[0]) for line in lines[1:]] == list(ref.noisy)
    assert lines[1].split(",")[1] == f"img{ref.noisy[0]}"
    saved = np.load(tmp_path / "out" / "dominant.npz")
    assert np.array_equal(saved["dominant"], ref.dominant)
    assert np.allclose(saved["weight"], ref.weight.numpy())

"""Metric / regularising losses against brute-force loops written from the papers' definitions."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from distrib_face.losses import metric
from distrib_face.losses.auxiliary import AuxLossSpec
from distrib_face.parallel.auxiliary import build_auxiliary_losses


def _batch(n: int = 12, d: int = 5, classes: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, d, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, classes, (n,), generator=gen)
    return emb, labels


def _dist(a, b):
    return math.sqrt(float(((a - b) ** 2).sum()))


def test_triplet_batch_hard_loop():
    emb, labels = _batch()
    x = F.normalize(emb, dim=1)
    terms = []
    for a in range(len(x)):
        pos = [_dist(x[a], x[p]) for p in range(len(x)) if p != a and labels[p] == labels[a]]
        neg = [_dist(x[a], x[n]) for n in range(len(x)) if labels[n] != labels[a]]
        if pos and neg:
            terms.append(max(0.0, max(pos) - min(neg) + 0.3))
    got = metric.triplet_loss(emb, labels, margin=0.3, mining="batch_hard")
    assert float(got) == pytest.approx(sum(terms) / len(terms), rel=1e-9)


def test_triplet_semi_hard_loop():
    emb, labels = _batch(seed=1)
    terms = []
    for a, p in itertools.permutations(range(len(emb)), 2):
        if labels[a] != labels[p]:
            continue
        d_ap = _dist(emb[a], emb[p])
        negs = [_dist(emb[a], emb[n]) for n in range(len(emb)) if labels[n] != labels[a]]
        farther = [d for d in negs if d > d_ap]
        d_an = min(farther) if farther else max(negs)
        terms.append(max(0.0, d_ap - d_an + 0.5))
    got = metric.triplet_loss(emb, labels, margin=0.5, mining="semi_hard", normalize=False)
    assert float(got) == pytest.approx(sum(terms) / len(terms), rel=1e-9)
    with pytest.raises(ValueError, match="hardest"):
        metric.triplet_loss(emb, labels, mining="hardest")


def test_contrastive_loop():
    emb, labels = _batch(seed=2)
    terms = []
    for i, j in itertools.combinations(range(len(emb)), 2):
        d = _dist(emb[i], emb[j])
        terms.append(0.5 * d * d if labels[i] == labels[j] else 0.5 * max(0.0, 2.0 - d) ** 2)
    assert float(metric.contrastive_loss(emb, labels, margin=2.0)) == pytest.approx(sum(terms) / len(terms), rel=1e-9)


def test_center_ring_angles_up_magface():
    emb, labels = _batch(seed=3)
    centers = torch.randn(4, 5, dtype=torch.float64)
    n = len(emb)
    assert float(metric.center_loss(emb, labels, centers)) == pytest.approx(
        sum(0.5 * _dist(emb[i], centers[labels[i]]) ** 2 for i in range(n)) / n, rel=1e-12)
    radius = torch.tensor(1.7, dtype=torch.float64)
    assert float(metric.ring_loss(emb, radius)) == pytest.approx(
        sum(0.5 * (float(emb[i].norm()) - 1.7) ** 2 for i in range(n)) / n, rel=1e-12)

    def angle(a, b):
        return math.acos(float(a @ b) / (float(a.norm()) * float(b.norm())))

    assert float(metric.intra_angle_loss(emb, labels, centers)) == pytest.approx(
        sum(angle(emb[i], centers[labels[i]]) for i in range(n)) / (n * math.pi), rel=1e-9)
    inter = -sum(sum(angle(centers[labels[i]], centers[j]) for j in range(4) if j != labels[i])
                 for i in range(n)) / (n * math.pi * 3)
    assert float(metric.inter_angle_loss(centers, labels)) == pytest.approx(inter, rel=1e-9)
    novel = torch.tensor([False, True, False, True])
    sq = [float(centers[c] @ centers[c]) for c in range(4)]
    alpha = (sq[0] + sq[2]) / 2
    assert float(metric.up_loss(centers, novel)) == pytest.approx(((sq[1] - alpha) ** 2 + (sq[3] - alpha) ** 2) / 2)
    norms = torch.tensor([5.0, 50.0, 200.0], dtype=torch.float64)
    a = [10.0, 50.0, 110.0]
    assert float(metric.magface_regularizer(norms)) == pytest.approx(sum(v / 110 ** 2 + 1 / v for v in a) / 3)


def test_losses_have_gradients():
    emb, labels = _batch(seed=4)
    emb.requires_grad_(True)
    centers = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    radius = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    for fn in (
        lambda e, c, r: metric.triplet_loss(e, labels, 0.3, "batch_hard"),
        lambda e, c, r: metric.triplet_loss(e, labels, 0.3, "semi_hard"),
        lambda e, c, r: metric.contrastive_loss(e, labels, 2.0),
        lambda e, c, r: metric.center_loss(e, labels, c),
        lambda e, c, r: metric.ring_loss(e, r),
        lambda e, c, r: metric.intra_angle_loss(e, labels, c),
        lambda e, c, r: metric.inter_angle_loss(c, labels),
    ):
        assert torch.autograd.gradcheck(fn, (emb, centers, radius), eps=1e-6, atol=1e-5)
    # UPLoss holds alpha (the base classes' mean squared norm) constant: d/dw_c = 4 (||w_c||^2 - alpha) w_c / n_novel.
    novel = torch.tensor([False, True, False, True])
    metric.up_loss(centers, novel).backward()
    sq = centers.detach().pow(2).sum(dim=1)
    alpha = sq[~novel].mean()
    expect = torch.where(novel[:, None], 4 * (sq - alpha)[:, None] * centers.detach() / 2, torch.zeros_like(centers))
    assert torch.allclose(centers.grad, expect, rtol=1e-12, atol=1e-15)


def test_aux_spec_validation():
    with pytest.raises(ValueError, match="tripplet"):
        AuxLossSpec(name="tripplet")
    with pytest.raises(ValueError, match="marign"):
        AuxLossSpec(name="triplet", options={"marign": 0.1})
    with pytest.raises(ValueError, match="weight"):
        AuxLossSpec(name="ring", weight=-1.0)
    with pytest.raises(ValueError, match="twice"):
        build_auxiliary_losses([{"name": "ring"}, {"name": "ring"}], num_classes=4, embedding_size=5)
    with pytest.raises(ValueError, match="class_counts"):
        build_auxiliary_losses([{"name": "uploss"}], num_classes=4, embedding_size=5)


def test_build_auxiliary_losses_one_process_is_the_weighted_sum():
    emb, labels = _batch(seed=5)
    specs = [
        {"name": "triplet", "weight": 0.5, "options": {"mining": "semi_hard"}},
        {"name": "contrastive", "weight": 0.1},
        {"name": "center", "weight": 0.2},
        {"name": "ring", "weight": 0.3, "options": {"radius": 2.0}},
        {"name": "intra_angle", "weight": 1.0},
        {"name": "inter_angle", "weight": 1.0},
        {"name": "magface", "weight": 2.0, "options": {"lower_norm": 1.0, "upper_norm": 5.0}},
    ]
    aux = build_auxiliary_losses(specs, num_classes=4, embedding_size=5, dtype=torch.float64)
    total, parts = aux(emb, labels)
    c = aux.centers
    expect = (0.5 * metric.triplet_loss(emb, labels, 0.2, "semi_hard") + 0.1 * metric.contrastive_loss(emb, labels)
              + 0.2 * metric.center_loss(emb, labels, c["center"].centers)
              + 0.3 * metric.ring_loss(emb, torch.tensor(2.0, dtype=torch.float64))
              + metric.intra_angle_loss(emb, labels, c["intra_angle"].centers)
              + metric.inter_angle_loss(c["inter_angle"].centers, labels)
              + 2.0 * metric.magface_regularizer(emb.norm(dim=1), 1.0, 5.0))
    assert float(total.detach()) == pytest.approx(float(expect.detach()), rel=1e-12)
    assert set(parts) == {s["name"] for s in specs}

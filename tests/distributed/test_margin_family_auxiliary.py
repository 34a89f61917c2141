"""Auxiliary losses over the global batch with sharded centres (gloo, W=3) equal one process (float64).

The reference applies the plain single-device functions of :mod:`distrib_face.losses.metric` to the whole
batch and the whole centre / weight matrices, and differentiates with autograd.
"""

from __future__ import annotations

import torch

from distrib_face.losses import metric
from tests.spawn import run_world

NUM_CLASSES, DIM = 11, 5
SIZES = [5, 0, 7]
COUNTS = [3, 40, 2, 9, 1, 30, 6, 2, 50, 4, 8]  # classes with <= 5 images are "novel" for uploss
SPECS = [
    {"name": "triplet", "weight": 0.5, "options": {"mining": "batch_hard"}},
    {"name": "contrastive", "weight": 0.1, "options": {"margin": 3.0}},
    {"name": "center", "weight": 0.2, "options": {"init_std": 1.0}},
    {"name": "ring", "weight": 0.3, "options": {"radius": 2.0}},
    {"name": "intra_angle", "weight": 1.0, "options": {"init_std": 1.0}},
    {"name": "inter_angle", "weight": 0.7, "options": {"init_std": 1.0}},
    {"name": "magface", "weight": 2.0, "options": {"lower_norm": 1.0, "upper_norm": 5.0}},
    {"name": "uploss", "weight": 0.4, "options": {"max_samples": 5}},
]


def _batch():
    gen = torch.Generator().manual_seed(11)
    emb = torch.randn(sum(SIZES), DIM, generator=gen, dtype=torch.float64) * 2.0
    labels = torch.randint(0, NUM_CLASSES, (sum(SIZES),), generator=gen)
    return emb, labels


def _worker(rank: int, world: int) -> dict:
    from distrib_face.parallel.auxiliary import build_auxiliary_losses
    from distrib_face.parallel import ShardedMarginClassifier

    emb, labels = _batch()
    lo = sum(SIZES[:rank])
    clf = ShardedMarginClassifier(NUM_CLASSES, DIM, margin="arcface", dtype=torch.float64, seed=3)
    with torch.no_grad():
        clf.weight.mul_(100.0)
    aux = build_auxiliary_losses(SPECS, num_classes=NUM_CLASSES, embedding_size=DIM, dtype=torch.float64,
                                 class_counts=COUNTS, seed=5)
    local = emb[lo: lo + SIZES[rank]].clone().requires_grad_(True)
    total, parts = aux(local, labels[lo: lo + SIZES[rank]], classifier=clf)
    total.backward()
    return dict(total=total.detach(), parts=parts, emb_grad=local.grad,
                centers={k: (m.centers.detach().clone(), m.centers.grad.clone()) for k, m in aux.centers.items()},
                radius_grad=aux.radius.grad.clone(), weight=clf.weight.detach().clone(),
                weight_grad=clf.weight.grad.clone())


def test_auxiliary_losses_sharded_equal_one_process(tmp_path):
    results = run_world(_worker, 3, tmp_path)
    emb, labels = _batch()
    emb = emb.clone().requires_grad_(True)
    centers = {k: torch.cat([r["centers"][k][0] for r in results]).requires_grad_(True) for k in results[0]["centers"]}
    weight = torch.cat([r["weight"] for r in results]).requires_grad_(True)
    radius = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    novel = torch.tensor(COUNTS) <= 5
    ref_parts = {
        "triplet": metric.triplet_loss(emb, labels, 0.2, "batch_hard"),
        "contrastive": metric.contrastive_loss(emb, labels, 3.0),
        "center": metric.center_loss(emb, labels, centers["center"]),
        "ring": metric.ring_loss(emb, radius),
        "intra_angle": metric.intra_angle_loss(emb, labels, centers["intra_angle"]),
        "inter_angle": metric.inter_angle_loss(centers["inter_angle"], labels),
        "magface": metric.magface_regularizer(emb.norm(dim=1), 1.0, 5.0),
        "uploss": metric.up_loss(weight, novel),
    }
    ref_total = sum(spec["weight"] * ref_parts[spec["name"]] for spec in SPECS)
    ref_total.backward()
    for r in results:
        assert torch.allclose(r["total"], ref_total.detach(), rtol=1e-12, atol=0)
        for name, value in ref_parts.items():
            assert torch.allclose(r["parts"][name], value.detach(), rtol=1e-12, atol=1e-15), name
        assert torch.allclose(r["radius_grad"], radius.grad, rtol=1e-10, atol=0)
    assert torch.allclose(torch.cat([r["emb_grad"] for r in results]), emb.grad, rtol=1e-10, atol=1e-14)
    for key, tensor in centers.items():
        got = torch.cat([r["centers"][key][1] for r in results])
        assert float(tensor.grad.abs().max()) > 0, key
        assert torch.allclose(got, tensor.grad, rtol=1e-10, atol=1e-14), key
    assert float(weight.grad.abs().max()) > 0
    assert torch.allclose(torch.cat([r["weight_grad"] for r in results]), weight.grad, rtol=1e-10, atol=1e-14)

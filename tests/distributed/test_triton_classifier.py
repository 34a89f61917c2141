"""The classifier on the fused Triton kernels (Triton's interpreter on CPU) over gloo ranks, against one
process holding the whole matrix in float64 and against the torch path at the same world size.

Sizes are not multiples of the interpreter's 16-wide tiles: 131 classes (uneven over 3 ranks, each shard
larger than the global batch, so that Partial FC samples rather than keeps every class), 40 dims, batches
of 37 (world 1) and 13 + 0 + 24 (world 3, one rank empty). Two samples point away from their
class centre, so that ArcFace's theta + m > pi branch is taken.
"""

from __future__ import annotations

import os

import pytest
import torch

from distrib_face.losses import create_margin
from distrib_face.parallel.shard import init_class_rows
from tests.distributed.test_classifier import reference_loss
from tests.spawn import run_world

NUM_CLASSES = 131
DIM = 40
SEED = 11
BATCH_SIZES = {1: [37], 3: [13, 0, 24]}
MARGIN_KWARGS = {"scale": 16.0}


def _global_batch(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(321)
    total = sum(BATCH_SIZES[world])
    labels = torch.randint(0, NUM_CLASSES, (total,), generator=gen)
    emb = torch.randn(total, DIM, generator=gen, dtype=torch.float64) * 3.0
    weight = init_class_rows(0, NUM_CLASSES, (1, DIM), seed=SEED, dtype=torch.float64)
    for i in range(2):
        emb[i] = -weight[labels[i], 0] * 200.0 + 1e-3 * emb[i]
    return emb, labels


def _worker(rank: int, world: int, sample_rate: float) -> dict:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module is imported in this rank
    from distrib_face.parallel import ShardedMarginClassifier

    emb, labels = _global_batch(world)
    lo = sum(BATCH_SIZES[world][:rank])
    hi = lo + BATCH_SIZES[world][rank]
    out = {}
    for margin in ("cosface", "arcface"):
        for kernel in ("triton", "torch"):
            clf = ShardedMarginClassifier(
                NUM_CLASSES, DIM, margin=create_margin(margin, **MARGIN_KWARGS), sample_rate=sample_rate,
                dtype=torch.float32, seed=SEED, chunk_size=16, kernel=kernel,
            )
            local = emb[lo:hi].float().clone().requires_grad_(True)
            loss = clf(local, labels[lo:hi])
            loss.backward()
            index, rows = clf.active_rows()
            out[(margin, kernel)] = (loss.detach(), local.grad.clone(), rows.grad.clone(),
                                     None if index is None else index.clone(), clf.class_range)
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("world", [1, 3])
@pytest.mark.parametrize("sample_rate", [1.0, 0.4])
def test_triton_classifier_equals_whole_matrix(world, sample_rate, tmp_path):
    results = run_world(_worker, world, tmp_path, args=(sample_rate,))
    emb, labels = _global_batch(world)
    weight = init_class_rows(0, NUM_CLASSES, (1, DIM), seed=SEED, dtype=torch.float64)
    for margin in ("cosface", "arcface"):
        fused = [r[(margin, "triton")] for r in results]
        torch_path = [r[(margin, "torch")] for r in results]
        classes = None
        if sample_rate < 1:
            for f, t in zip(fused, torch_path):
                assert torch.equal(f[3], t[3])  # the same classes sampled
            classes = torch.cat([f[3] + f[4][0] for f in fused]).sort().values
            assert len(classes) < NUM_CLASSES
        ref_loss, ref_emb_grad, ref_w_grad = reference_loss(emb, labels, weight, margin, classes=classes,
                                                            margin_kwargs=MARGIN_KWARGS)
        for f, t in zip(fused, torch_path):
            assert _rel(f[0], ref_loss) < 1e-4, (margin, float(f[0]), float(ref_loss))
            assert _rel(f[0], t[0]) < 1e-4
        emb_grad = torch.cat([f[1] for f in fused])
        assert _rel(emb_grad, ref_emb_grad) < 1e-4, (margin, _rel(emb_grad, ref_emb_grad))
        assert _rel(emb_grad, torch.cat([t[1] for t in torch_path])) < 1e-4
        for f, t in zip(fused, torch_path):
            start, stop = f[4]
            want = ref_w_grad[start:stop, 0] if classes is None else ref_w_grad[f[3] + start, 0]
            assert _rel(f[2], want) < 1e-4, (margin, start, stop, _rel(f[2], want))
            assert _rel(f[2], t[2]) < 1e-4

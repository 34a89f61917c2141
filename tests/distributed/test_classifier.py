"""The class-sharded classifier against one process holding the whole matrix (float64, gloo, W = 1..4).

The reference is plain PyTorch: the whole weight matrix, the same margin object's formulas applied to
a full ``[B, C]`` logit matrix, ``F.cross_entropy`` and autograd. The sharded side never forms that matrix.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distrib_face.losses import MarginContext, create_margin
from distrib_face.parallel.shard import class_range, init_class_rows
from tests.spawn import run_world

NUM_CLASSES = 23  # uneven over 2, 3 and 4 ranks
DIM = 8
SEED = 5
MARGINS = ["normface", "cosface", "arcface", "sphereface", "combined"]
BATCH_SIZES = {1: [7], 2: [5, 2], 3: [4, 0, 6], 4: [3, 5, 1, 4]}  # unequal, one rank empty


def _margin_kwargs(name: str) -> dict:
    # Small scales keep the softmax informative; sphereface's annealing lambda is small so psi matters.
    if name == "sphereface":
        return {"options": {"lambda_base": 2.0, "lambda_min": 0.1}}
    return {"scale": 16.0}


def _global_batch(world: int, num_subcenters: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(123)
    total = sum(BATCH_SIZES[world])
    labels = torch.randint(0, NUM_CLASSES, (total,), generator=gen)
    emb = torch.randn(total, DIM, generator=gen, dtype=torch.float64) * 3.0
    # Two samples pointing away from their class centre: theta close to pi, so theta + m > pi.
    weight = init_class_rows(0, NUM_CLASSES, (num_subcenters, DIM), seed=SEED, dtype=torch.float64)
    for i in range(min(2, total)):
        emb[i] = -weight[labels[i], 0] * 200.0 + 1e-3 * emb[i]
    return emb, labels


def reference_loss(emb: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, margin_name: str,
                   num_subcenters: int = 1, classes: torch.Tensor | None = None,
                   margin_kwargs: dict | None = None) -> tuple:
    """Loss, embedding grad and weight grad of the whole-matrix computation (optionally on a class subset)."""
    kwargs = _margin_kwargs(margin_name) if margin_kwargs is None else margin_kwargs
    margin = create_margin(margin_name, **kwargs)
    if hasattr(margin, "iteration"):
        margin.iteration += 1  # the classifier's begin_step advances annealing once before the logits
    emb = emb.clone().requires_grad_(True)
    weight = weight.clone().requires_grad_(True)  # [C, K, D]
    w = weight if classes is None else weight[classes]
    y = labels if classes is None else torch.searchsorted(classes, labels)
    cos = torch.einsum("bd,ckd->bck", F.normalize(emb, dim=1), F.normalize(w, dim=2)).amax(dim=2)
    ctx = MarginContext(feature_norms=emb.norm(dim=1, keepdim=True))
    logits = margin.negative_logits(cos, ctx)
    rows = torch.arange(len(y))
    target = margin.target_logit(cos[rows, y], ctx)
    logits = logits.index_put((rows, y), target)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    return loss.detach(), emb.grad, weight.grad


def _sharded_worker(rank: int, world: int, num_subcenters: int, chunk_size: int) -> dict:
    from distrib_face.parallel import ShardedMarginClassifier

    emb, labels = _global_batch(world, num_subcenters)
    sizes = BATCH_SIZES[world]
    lo = sum(sizes[:rank])
    out = {}
    for name in MARGINS:
        clf = ShardedMarginClassifier(
            NUM_CLASSES, DIM, margin=create_margin(name, **_margin_kwargs(name)), dtype=torch.float64,
            seed=SEED, chunk_size=chunk_size, num_subcenters=num_subcenters,
        )
        local = emb[lo: lo + sizes[rank]].clone().requires_grad_(True)
        loss = clf(local, labels[lo: lo + sizes[rank]])
        loss.backward()
        out[name] = (loss.detach(), local.grad.clone(), clf.weight.grad.clone(), clf.class_range)
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sharded_equals_single_process(world, tmp_path):
    num_subcenters = 1 if world != 3 else 2  # world 3 also checks sub-centres on the same shard
    results = run_world(_sharded_worker, world, tmp_path, args=(num_subcenters, 3))
    emb, labels = _global_batch(world, num_subcenters)
    weight = init_class_rows(0, NUM_CLASSES, (num_subcenters, DIM), seed=SEED, dtype=torch.float64)
    for name in MARGINS:
        ref_loss, ref_emb_grad, ref_w_grad = reference_loss(emb, labels, weight, name, num_subcenters)
        losses = [r[name][0] for r in results]
        for loss in losses:
            assert _rel(loss, ref_loss) < 1e-10, (name, float(loss), float(ref_loss))
        emb_grad = torch.cat([r[name][1] for r in results])
        assert _rel(emb_grad, ref_emb_grad) < 1e-10, name
        for r in results:
            start, stop = r[name][3]
            got = r[name][2].view(stop - start, num_subcenters, DIM)
            assert _rel(got, ref_w_grad[start:stop]) < 1e-10, (name, start, stop)
        assert sorted(r[name][3] for r in results) == [class_range(NUM_CLASSES, i, world) for i in range(world)]


def _hard_sample_worker(rank: int, world: int) -> float:
    from distrib_face.parallel import ShardedMarginClassifier

    clf = ShardedMarginClassifier(NUM_CLASSES, DIM, margin="arcface", dtype=torch.float64, seed=SEED)
    weight = init_class_rows(0, NUM_CLASSES, (1, DIM), seed=SEED, dtype=torch.float64)
    if rank == 0:
        emb, labels = -weight[3] * 10.0, torch.tensor([3])
    else:
        emb, labels = torch.zeros(0, DIM, dtype=torch.float64), torch.zeros(0, dtype=torch.int64)
    return float(clf(emb, labels).detach())


def test_loss_beyond_probability_floor_is_reported(tmp_path):
    """arcface_torch's -log(clamp(p, 1e-30)) caps a sample's loss at 69.08; ours must not."""
    losses = run_world(_hard_sample_worker, 2, tmp_path)
    weight = init_class_rows(0, NUM_CLASSES, (1, DIM), seed=SEED, dtype=torch.float64)
    ref, _, _ = reference_loss(-weight[3] * 10.0, torch.tensor([3]), weight, "arcface", margin_kwargs={})
    assert ref > -math.log(1e-30) + 10  # the case really is beyond the floor
    for loss in losses:
        assert loss == pytest.approx(float(ref), rel=1e-12)


SAMPLING_CLASSES = 61  # 21 / 20 / 20 classes over 3 ranks: more than the global batch of 10, so rows are sampled


def _sampling_batch(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(321)
    total = sum(BATCH_SIZES[world])
    labels = torch.randint(0, SAMPLING_CLASSES, (total,), generator=gen)
    labels[1] = labels[0]  # a class named twice keeps one slot
    return torch.randn(total, DIM, generator=gen, dtype=torch.float64) * 3.0, labels


def _sampling_worker(rank: int, world: int, rate: float) -> dict:
    from distrib_face.parallel import ShardedMarginClassifier
    from distrib_face.parallel.optim import ShardOptimizer

    emb, labels = _sampling_batch(world)
    sizes = BATCH_SIZES[world]
    lo = sum(sizes[:rank])
    clf = ShardedMarginClassifier(SAMPLING_CLASSES, DIM, margin=create_margin("cosface", scale=16.0),
                                  sample_rate=rate, dtype=torch.float64, seed=SEED)
    opt = ShardOptimizer(clf, "sgd", lr=0.5, momentum=0.9, weight_decay=0.01)
    steps = []
    for step in range(3):
        batch = emb[lo: lo + sizes[rank]] * (1.0 + 0.1 * step)
        w_before = clf.weight.detach().clone()
        buf_before = opt.buffers["momentum_buffer"].clone()
        loss = clf(batch.clone().requires_grad_(True), labels[lo: lo + sizes[rank]])
        loss.backward()
        index, _ = clf.active_rows()
        opt.step()
        opt.zero_grad()
        steps.append(dict(loss=loss.detach(), index=index.clone(), w_before=w_before, w_after=clf.weight.detach().clone(),
                          buf_before=buf_before, buf_after=opt.buffers["momentum_buffer"].clone(),
                          class_range=clf.class_range))
    return steps


# At world 3: slots set by the global batch (10 > ceil(0.3 x 20) = 6) or by the rate (15 > 10).
@pytest.mark.parametrize("world,rate", [(1, 0.3), (2, 0.75), (3, 0.3), (3, 0.75)])
def test_partial_fc_sampling(tmp_path, world, rate):
    results = run_world(_sampling_worker, world, tmp_path, args=(rate,))
    emb, labels = _sampling_batch(world)
    global_batch = len(labels)
    for step in range(3):
        global_classes = []
        for r in results:
            s = r[step]
            start, stop = s["class_range"]
            positives = torch.unique(labels[(labels >= start) & (labels < stop)] - start)
            index = s["index"]
            assert set(positives.tolist()) <= set(index.tolist()), "a positive class was not sampled"
            # ceil(rate x C_r) in exact integer arithmetic (rates with two decimals), or the global batch.
            sampled = -(-round(rate * 100) * (stop - start) // 100)
            assert len(index) == max(sampled, min(global_batch, stop - start))
            assert len(set(index.tolist())) == len(index)
            untouched = torch.ones(stop - start, dtype=torch.bool)
            untouched[index] = False
            assert untouched.any()
            # Unsampled rows: weights and momentum bit-identical across the step.
            assert torch.equal(s["w_after"][untouched], s["w_before"][untouched])
            assert torch.equal(s["buf_after"][untouched], s["buf_before"][untouched])
            # Sampled rows moved.
            assert not torch.equal(s["w_after"][index], s["w_before"][index])
            global_classes.append(index + start)
        classes = torch.cat(global_classes).sort().values
        # The sampled loss equals the whole-matrix reference restricted to the sampled classes.
        weight = torch.cat([r[step]["w_before"] for r in results]).view(SAMPLING_CLASSES, 1, DIM)
        ref_loss, _, _ = reference_loss(emb * (1.0 + 0.1 * step), labels, weight, "cosface", classes=classes)
        for r in results:
            assert _rel(r[step]["loss"], ref_loss) < 1e-10
    # Different steps draw different negatives.
    assert not torch.equal(results[0][0]["index"].sort().values, results[0][1]["index"].sort().values)

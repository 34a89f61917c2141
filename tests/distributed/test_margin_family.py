"""Every margin of the family inside the class-sharded classifier equals one process (float64, gloo, W=3).

The reference holds the whole weight matrix, forms the full ``[B, C]`` logit matrix with the margin's
formulas, computes the global statistics (target cosines, feature norms, the non-target log-sum-exp) from
that matrix, and uses ``F.cross_entropy`` and autograd. Two steps per margin, so state updated from global
statistics (AdaCos's scale, CurricularFace's t, AdaFace's norm EMAs, ElasticFace's draws, annealing) is
checked too. All entries run inside one world-3 spawn: classes 23 -> 8 / 8 / 7, batch 4 / 0 / 6.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distrib_face.losses import MarginContext, StepStats, create_margin
from tests.spawn import run_world

NUM_CLASSES = 23
DIM = 6
SIZES = [4, 0, 6]
STEPS = 2
_ANNEAL = {"lambda_base": 2.0, "lambda_min": 0.1}

# (entry id, margin name, overrides): every registered name, plus options that change the computation.
ENTRIES = [
    ("softmax", "softmax", {}),
    ("softmax_nobias", "softmax", {"options": {"bias": False}}),
    ("l2softmax", "l2softmax", {"scale": 8.0, "options": {"bias": True}}),
    ("normface", "normface", {"scale": 16.0}),
    ("normface_filtered", "normface", {"scale": 16.0, "options": {"interclass_filtering_threshold": 0.3}}),
    ("lsoftmax", "lsoftmax", {"options": _ANNEAL}),
    ("sphereface", "sphereface", {"options": _ANNEAL}),
    ("cosface", "cosface", {"scale": 16.0}),
    ("amsoftmax", "amsoftmax", {}),
    ("arcface", "arcface", {"scale": 16.0}),
    ("arcface_easy", "arcface", {"scale": 16.0, "options": {"easy_margin": True}}),
    ("arcface_insightface", "arcface", {"scale": 16.0, "options": {"fallback": "insightface"}}),
    ("combined", "combined", {"scale": 16.0}),
    ("airface", "airface", {"scale": 16.0}),
    ("li_arcface", "li_arcface", {"scale": 16.0}),
    ("subcenter_arcface", "subcenter_arcface", {"scale": 16.0, "options": {"num_subcenters": 3}}),
    ("adacos", "adacos", {}),
    ("adacos_fixed", "adacos", {"options": {"dynamic": False}}),
    ("heated_up", "heated_up", {"options": {"total_steps": 2, "heat_start": 0.25, "scale_end": 2.0}}),
    ("curricularface", "curricularface", {"scale": 16.0, "options": {"momentum": 0.3}}),
    ("curricularface_filtered", "curricularface",
     {"scale": 16.0, "options": {"momentum": 0.3, "interclass_filtering_threshold": 0.5}}),
    ("adaface", "adaface", {"scale": 16.0, "options": {"t_alpha": 0.5}}),
    ("magface", "magface", {"scale": 16.0, "options": {"lower_norm": 1.0, "upper_norm": 12.0}}),
    ("elasticface", "elasticface", {"scale": 16.0, "options": {"sigma": 0.2}}),
    ("elasticface_arc", "elasticface_arc", {"scale": 16.0, "options": {"sigma": 0.2, "seed": 3}}),
    ("elasticface_arc_plus", "elasticface_arc_plus", {"scale": 16.0, "options": {"sigma": 0.2}}),
    ("elasticface_cos", "elasticface_cos", {"scale": 16.0, "options": {"sigma": 0.2}}),
    ("elasticface_cos_plus", "elasticface_cos_plus", {"scale": 16.0, "options": {"sigma": 0.2}}),
]


def _weights(margin) -> torch.Tensor:
    """The global weight matrix ``[C, K, D (+1)]`` (std 0.5, so unnormalised margins see useful logits)."""
    k = margin.num_subcenters
    cols = DIM + (1 if margin.uses_bias else 0)
    gen = torch.Generator().manual_seed(7)
    return torch.randn(NUM_CLASSES, k, cols, generator=gen, dtype=torch.float64) * 0.5


def _batch(step: int, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    total = sum(SIZES)
    labels = torch.randint(0, NUM_CLASSES, (total,), generator=gen)
    emb = torch.randn(total, DIM, generator=gen, dtype=torch.float64) * 3.0
    emb[0] = -weight[labels[0], 0, :DIM] * 10.0 + 1e-3 * emb[0]  # theta near pi: past arcface's threshold
    emb[1] = weight[labels[1], 0, :DIM] * 10.0 + 0.5 * emb[1]  # an easy sample (curricular / easy margin)
    return emb, labels


def reference_step(margin, emb: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> tuple:
    """Loss and gradients of one step with the whole matrix, the margin's global statistics included."""
    emb = emb.clone().requires_grad_(True)
    weight = weight.clone().requires_grad_(True)
    rows = torch.arange(len(labels))
    x = torch.cat([emb, torch.ones(len(emb), 1, dtype=emb.dtype)], 1) if margin.uses_bias else emb
    x_norm = x.norm(dim=1, keepdim=True)
    w_norm = weight.norm(dim=2, keepdim=True)
    w = weight / w_norm if margin.normalize_weights else weight
    per_center = torch.einsum("bd,ckd->bck", x / x_norm, w)
    cos = per_center.amax(dim=2)  # [B, C]
    target_cos = cos[rows, labels]
    neg_ctx = MarginContext(feature_norms=x_norm, labels=labels, target_cos=target_cos.detach())
    negative_lse = None
    if margin.needs_negative_stats:
        with torch.no_grad():
            minus_inf = torch.tensor(float("-inf"), dtype=cos.dtype)
            negatives = margin.negative_logits(cos, neg_ctx).index_put((rows, labels), minus_inf)
            negative_lse = torch.logsumexp(negatives.reshape(-1), dim=0)
    margin.begin_step(StepStats(target_cos=target_cos.detach(), training=True,
                                feature_norms=emb.detach().norm(dim=1), negative_logsumexp=negative_lse))
    best = per_center[rows, labels].detach().argmax(dim=1)
    target_ctx = MarginContext(feature_norms=x_norm, labels=labels, target_cos=target_cos.detach(),
                               weight_norms=w_norm[labels, best, 0])
    logits = margin.negative_logits(cos, neg_ctx).index_put((rows, labels), margin.target_logit(target_cos, target_ctx))
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    return loss.detach(), emb.grad, weight.grad


def _worker(rank: int, world: int) -> dict:
    from distrib_face.parallel import ShardedMarginClassifier

    lo = sum(SIZES[:rank])
    out = {}
    for entry, name, kwargs in ENTRIES:
        clf = ShardedMarginClassifier(NUM_CLASSES, DIM, margin=create_margin(name, **kwargs), dtype=torch.float64,
                                      chunk_size=3)
        weight = _weights(clf.margin)
        start, stop = clf.class_range
        with torch.no_grad():
            clf.weight.copy_(weight[start:stop].reshape(clf.weight.shape))
        steps = []
        for step in range(STEPS):
            emb, labels = _batch(step, weight)
            local = emb[lo: lo + SIZES[rank]].clone().requires_grad_(True)
            clf.weight.grad = None
            loss = clf(local, labels[lo: lo + SIZES[rank]])
            loss.backward()
            steps.append((loss.detach(), local.grad.clone(), clf.weight.grad.clone()))
        state = {k: v.clone() for k, v in clf.margin.state_dict().items()}
        out[entry] = (steps, (start, stop), state)
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def test_every_margin_sharded_equals_one_process(tmp_path):
    results = run_world(_worker, 3, tmp_path)
    for entry, name, kwargs in ENTRIES:
        margin = create_margin(name, **kwargs)
        margin.set_num_classes(NUM_CLASSES)
        weight = _weights(margin)
        k = margin.num_subcenters
        for step in range(STEPS):
            emb, labels = _batch(step, weight)
            ref_loss, ref_emb_grad, ref_w_grad = reference_step(margin, emb, labels, weight)
            assert torch.isfinite(ref_loss) and float(ref_emb_grad.abs().max()) > 0, entry
            for r in results:
                loss = r[entry][0][step][0]
                assert _rel(loss, ref_loss) < 1e-10, (entry, step, float(loss), float(ref_loss))
            emb_grad = torch.cat([r[entry][0][step][1] for r in results])
            assert _rel(emb_grad, ref_emb_grad) < 1e-9, (entry, step)
            for r in results:
                start, stop = r[entry][1]
                got = r[entry][0][step][2].view(stop - start, k, -1)
                assert _rel(got, ref_w_grad[start:stop]) < 1e-9, (entry, step, start)
        for r in results:  # state after two steps: identical on every rank and equal to the reference's
            for key, value in margin.state_dict().items():
                assert torch.allclose(r[entry][2][key].to(value.dtype), value, rtol=1e-12, atol=0), (entry, key)


def test_every_registered_name_is_covered():
    from distrib_face.losses import list_margins

    assert set(list_margins()) == {name for _, name, _ in ENTRIES}

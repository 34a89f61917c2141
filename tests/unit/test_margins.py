"""Each margin against its closed form at chosen angles, gradients by gradcheck, and the papers' reference
update rules (AdaCos, CurricularFace, AdaFace, MagFace, ElasticFace) written out independently here."""

from __future__ import annotations

import math

import pytest
import torch

from distrib_face.losses import MarginContext, StepStats, create_margin, list_margins
from distrib_face.losses.margins import chebyshev_cos_multiple, l2softmax_min_scale, monotonic_psi

THETAS = torch.tensor([0.05, 0.4, 1.0, 1.6, 2.4, 3.0], dtype=torch.float64)
COS = torch.cos(THETAS)
S = 10.0


def _ctx(n: int, norm: float = 1.0, **kw) -> MarginContext:
    return MarginContext(feature_norms=torch.full((n, 1), norm, dtype=torch.float64), **kw)


def _close(a: torch.Tensor, b, tol: float = 1e-12) -> bool:
    return torch.allclose(a, torch.as_tensor(b, dtype=a.dtype), rtol=tol, atol=tol)


def test_normface_cosface_closed_form():
    assert _close(create_margin("normface", scale=S).target_logit(COS, _ctx(6)), S * COS)
    assert _close(create_margin("cosface", scale=S, additive_margin=0.35).target_logit(COS, _ctx(6)), S * (COS - 0.35))
    assert _close(create_margin("amsoftmax").target_logit(COS, _ctx(6)), 30.0 * (COS - 0.35))


def test_arcface_closed_form_and_beyond_pi():
    m = 0.5
    arc = create_margin("arcface", scale=S, angular_margin=m)
    got = arc.target_logit(COS, _ctx(6)) / S
    inside = THETAS + m <= math.pi
    assert _close(got[inside], torch.cos(THETAS[inside] + m))
    # theta = 3.0: theta + m > pi; continuous fallback cos theta - cos(pi - m) - 1, which is below -1.
    assert not inside[-1]
    assert _close(got[-1], math.cos(3.0) - math.cos(math.pi - m) - 1.0)
    assert got[-1] < -1.0
    # Monotonic decreasing over the whole [0, pi] and continuous at the threshold.
    theta = torch.linspace(0, math.pi, 2001, dtype=torch.float64)
    curve = arc.target_logit(torch.cos(theta), _ctx(2001))
    assert bool((curve[1:] < curve[:-1]).all())
    assert float((curve[1:] - curve[:-1]).abs().max()) < 0.02 * S
    insight = create_margin("arcface", scale=S, angular_margin=m, options={"fallback": "insightface"})
    assert _close(insight.target_logit(COS, _ctx(6))[-1] / S, math.cos(3.0) - m * math.sin(m))
    easy = create_margin("arcface", scale=S, angular_margin=m, options={"easy_margin": True})
    expect = torch.where(COS > 0, torch.cos(THETAS + m), COS)
    assert _close(easy.target_logit(COS, _ctx(6)) / S, expect)


def test_arcface_insightface_fallback_is_pytorch_metric_learnings_arcface():
    """``fallback: insightface`` against the reference code itself: pytorch-metric-learning's ArcFaceLoss
    (``cos theta - m sin m`` past ``theta > pi - m``, as insightface's MXNet code and arcface_torch in 2022)."""
    pml = pytest.importorskip("pytorch_metric_learning.losses", reason="pytorch-metric-learning is a dev dependency")
    m = 0.5
    reference = pml.ArcFaceLoss(num_classes=3, embedding_size=2, margin=math.degrees(m), scale=S)  # margin in degrees
    theta = torch.linspace(0.01, math.pi - 0.01, 999, dtype=torch.float64)  # both sides of pi - m
    cos = torch.cos(theta)
    ours = create_margin("arcface", scale=S, angular_margin=m, options={"fallback": "insightface"})
    got = ours.target_logit(cos, _ctx(cos.numel())) / S
    want = reference.modify_cosine_of_target_classes(cos)
    assert bool((theta > math.pi - m).any()) and bool((theta < math.pi - m).any())
    assert _close(got, want, tol=1e-9)


def test_combined_closed_form():
    comb = create_margin("combined", scale=S, multiplicative_margin=0.9, angular_margin=0.3, additive_margin=0.2)
    got = comb.target_logit(COS[:4], _ctx(4)) / S
    assert _close(got, torch.cos(0.9 * THETAS[:4] + 0.3) - 0.2, 1e-9)


def test_airface_linear_in_angle():
    air = create_margin("airface", scale=S, angular_margin=0.45)
    assert _close(air.target_logit(COS, _ctx(6)) / S, (math.pi - 2 * (THETAS + 0.45)) / math.pi, 1e-9)
    neg = air.negative_logits(COS[None, :], _ctx(1)) / S
    assert _close(neg[0], (math.pi - 2 * THETAS) / math.pi, 1e-9)
    assert create_margin("li_arcface").spec.angular_margin == 0.45


def test_sphereface_psi_monotonic_and_closed_form():
    theta = torch.linspace(0, math.pi, 4001, dtype=torch.float64)
    for m in (1, 2, 3, 4):
        psi = monotonic_psi(torch.cos(theta), m)
        assert bool((psi[1:] <= psi[:-1] + 1e-12).all()), m
        assert _close(psi[0], 1.0) and _close(psi[-1], 1.0 - 2 * m, 1e-9)
        k = torch.floor(m * theta / math.pi).clamp(max=m - 1)
        assert _close(psi, (-1) ** k * torch.cos(m * theta) - 2 * k, 1e-9)
        assert _close(chebyshev_cos_multiple(torch.cos(theta), m), torch.cos(m * theta), 1e-9)
    sphere = create_margin("sphereface", options={"lambda_base": 10.0, "lambda_gamma": 1.0, "lambda_min": 2.0})
    sphere.begin_step(StepStats(target_cos=COS))  # t = 1: lambda = max(2, 10 / 2) = 5
    assert sphere.lambda_ == 5.0
    norm = 3.0
    got = sphere.target_logit(COS, _ctx(6, norm))
    k = torch.floor(4 * THETAS / math.pi).clamp(max=3)
    psi = (-1) ** k * torch.cos(4 * THETAS) - 2 * k
    assert _close(got, norm * (5.0 * COS + psi) / 6.0, 1e-9)
    for _ in range(10):
        sphere.begin_step(StepStats(target_cos=COS))
    assert sphere.lambda_ == 2.0  # floored at lambda_min


def test_lsoftmax_uses_weight_norms():
    ls = create_margin("lsoftmax", options={"lambda_base": 0.0, "lambda_min": 0.0})
    w_norm = torch.full((6,), 2.5, dtype=torch.float64)
    x_norm = 3.0
    got = ls.target_logit(COS * w_norm, _ctx(6, x_norm, weight_norms=w_norm))
    k = torch.floor(4 * THETAS / math.pi).clamp(max=3)
    assert _close(got, x_norm * 2.5 * ((-1) ** k * torch.cos(4 * THETAS) - 2 * k), 1e-9)
    assert not ls.normalize_weights and not ls.normalize_features


def test_softmax_and_l2softmax_flags():
    soft, l2 = create_margin("softmax"), create_margin("l2softmax", scale=12.0)
    assert (soft.normalize_features, soft.normalize_weights, soft.uses_bias) == (False, False, True)
    assert (l2.normalize_features, l2.normalize_weights, l2.uses_bias) == (True, False, False)
    # softmax logit = ||x|| * (x_unit . W) = x . W
    assert _close(soft.target_logit(COS, _ctx(6, 4.0)), 4.0 * COS)
    assert _close(l2.target_logit(COS, _ctx(6, 4.0)), 12.0 * COS)
    assert l2softmax_min_scale(10002, 0.9) == pytest.approx(math.log(0.9 * 10000 / 0.1))


def test_interclass_filtering_zeroes_high_negatives():
    filt = create_margin("cosface", scale=S, options={"interclass_filtering_threshold": 0.4})
    cos = COS[None, :].clone().requires_grad_(True)
    out = filt.negative_logits(cos, _ctx(1))
    expect = torch.where(COS > 0.4, torch.zeros_like(COS), S * COS)
    assert _close(out[0].detach(), expect)
    out.sum().backward()
    assert _close(cos.grad[0], torch.where(COS > 0.4, 0.0, S))
    with pytest.raises(ValueError, match="interclass_filtering_threshold"):
        create_margin("arcface", options={"interclass_filtering_threshold": 1.5})


def test_unknown_option_is_named():
    with pytest.raises(ValueError, match="easy_margn"):
        create_margin("arcface", options={"easy_margn": True})


def test_adacos_matches_reference_code():
    """The AdaCos update as the reference implementation writes it on the full logit matrix."""
    num_classes, batch = 11, 9
    gen = torch.Generator().manual_seed(0)
    cos = torch.rand(batch, num_classes, generator=gen, dtype=torch.float64) * 1.6 - 0.8
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    ada = create_margin("adacos")
    ada.set_num_classes(num_classes)
    s = math.sqrt(2) * math.log(num_classes - 1)
    assert float(ada.adaptive_scale) == pytest.approx(s)
    fixed = create_margin("adacos", options={"dynamic": False})
    fixed.set_num_classes(num_classes)
    for _ in range(3):
        one_hot = torch.nn.functional.one_hot(labels, num_classes).bool()
        b_avg = torch.where(~one_hot, torch.exp(s * cos), torch.zeros_like(cos)).sum() / batch
        theta_med = torch.median(torch.acos(cos[one_hot]))
        s_new = float(torch.log(b_avg) / torch.cos(torch.clamp(theta_med, max=math.pi / 4)))
        negatives = ada.negative_logits(cos, _ctx(batch)).masked_fill(one_hot, float("-inf"))
        ada.begin_step(StepStats(target_cos=cos[one_hot], negative_logsumexp=torch.logsumexp(negatives.reshape(-1), 0)))
        fixed.begin_step(StepStats(target_cos=cos[one_hot]))
        assert float(ada.adaptive_scale) == pytest.approx(s_new, rel=1e-12)
        assert float(fixed.adaptive_scale) == pytest.approx(math.sqrt(2) * math.log(num_classes - 1))
        s = s_new
        cos = (cos + 0.1).clamp(-1, 1)
    assert _close(ada.target_logit(COS, _ctx(6)), s * COS)


def test_heated_up_schedule():
    opts = {"total_steps": 100, "heat_start": 0.5, "scale_end": 4.0}
    lin = create_margin("heated_up", scale=16.0, options=opts)
    assert [lin.scale_at(t) for t in (0, 50, 75, 100, 200)] == [16.0, 16.0, 10.0, 4.0, 4.0]
    step = create_margin("heated_up", scale=16.0, options={**opts, "schedule": "step"})
    assert [step.scale_at(t) for t in (49, 50)] == [16.0, 4.0]
    cosine = create_margin("heated_up", scale=16.0, options={**opts, "schedule": "cosine"})
    assert cosine.scale_at(75) == pytest.approx(10.0)
    for _ in range(75):
        lin.begin_step(StepStats(target_cos=COS))
    assert _close(lin.target_logit(COS, _ctx(6)), 10.0 * COS)


def test_curricularface_matches_reference_code():
    """CurricularFace's forward as its reference code writes it (t updated first, hard negatives re-weighted)."""
    m, s = 0.5, 16.0
    gen = torch.Generator().manual_seed(1)
    cos = torch.rand(5, 7, generator=gen, dtype=torch.float64) * 1.8 - 0.9
    labels = torch.tensor([0, 3, 6, 2, 2])
    rows = torch.arange(5)
    curr = create_margin("curricularface", scale=s, angular_margin=m, options={"fallback": "insightface"})
    t = torch.tensor(0.0, dtype=torch.float64)
    for _ in range(3):
        target = cos[rows, labels]
        sin_t = torch.sqrt(1 - target ** 2)
        cos_theta_m = target * math.cos(m) - sin_t * math.sin(m)
        mask = cos > cos_theta_m[:, None]
        final_target = torch.where(target > math.cos(math.pi - m), cos_theta_m, target - math.sin(math.pi - m) * m)
        t = target.mean() * 0.01 + 0.99 * t
        expect = torch.where(mask, cos * (t + cos), cos)
        expect[rows, labels] = final_target
        expect = expect * s

        curr.begin_step(StepStats(target_cos=target))
        ctx = _ctx(5, target_cos=target)
        got = curr.negative_logits(cos, ctx).index_put((rows, labels), curr.target_logit(target, ctx))
        assert _close(got, expect, 1e-12)
        cos = (cos * 1.05).clamp(-1, 1)
    assert float(curr.t) == pytest.approx(float(t))


def test_adaface_matches_reference_code():
    m, h, s, eps, t_alpha = 0.4, 0.333, 16.0, 1e-3, 0.01
    gen = torch.Generator().manual_seed(2)
    cos = torch.rand(6, 5, generator=gen, dtype=torch.float64) * 1.8 - 0.9
    norms = torch.rand(6, 1, generator=gen, dtype=torch.float64) * 40 + 5
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    rows = torch.arange(6)
    ada = create_margin("adaface", scale=s)
    batch_mean, batch_std = torch.tensor(20.0, dtype=torch.float64), torch.tensor(100.0, dtype=torch.float64)
    for _ in range(2):
        safe = norms.clamp(0.001, 100)
        batch_mean = safe.mean() * t_alpha + (1 - t_alpha) * batch_mean
        batch_std = safe.std() * t_alpha + (1 - t_alpha) * batch_std
        z = ((safe - batch_mean) / (batch_std + eps) * h).clamp(-1, 1)
        c = cos.clamp(-1 + eps, 1 - eps)
        one_hot = torch.nn.functional.one_hot(labels, 5).double()
        theta_m = (c.acos() + one_hot * (m * z * -1)).clamp(eps, math.pi - eps)
        expect = (theta_m.cos() - one_hot * (m + m * z)) * s

        ada.begin_step(StepStats(target_cos=cos[rows, labels], feature_norms=norms[:, 0]))
        ctx = MarginContext(feature_norms=norms)
        got = ada.negative_logits(cos, ctx).index_put((rows, labels), ada.target_logit(cos[rows, labels], ctx))
        assert _close(got, expect, 1e-12)
        norms = norms * 1.3


def test_magface_margin_and_regularizer():
    from distrib_face.losses.metric import magface_regularizer

    mag = create_margin("magface", scale=S)
    norms = torch.tensor([[5.0], [10.0], [60.0], [110.0], [200.0]], dtype=torch.float64)
    a = norms[:, 0].clamp(10, 110)
    expect_m = (0.8 - 0.45) / 100 * (a - 10) + 0.45
    assert _close(mag.margin_of(norms), expect_m)
    cos = torch.full((5,), 0.3, dtype=torch.float64)
    assert _close(mag.target_logit(cos, MarginContext(feature_norms=norms)), S * torch.cos(math.acos(0.3) + expect_m))
    g = magface_regularizer(norms[:, 0], 10.0, 110.0)
    assert float(g) == pytest.approx(float((a / 110 ** 2 + 1 / a).mean()))


def test_elasticface_reproducible_and_plus_order():
    target = torch.tensor([0.9, -0.2, 0.5, 0.1, 0.7], dtype=torch.float64)
    a = create_margin("elasticface_cos", scale=S, options={"sigma": 0.1, "seed": 4})
    b = create_margin("elasticface_cos", scale=S, options={"sigma": 0.1, "seed": 4})
    for margin in (a, b):
        margin.begin_step(StepStats(target_cos=target))
    # Rows as two owners would see them: the same draws per global row index.
    ctx_hi = _ctx(2, row_index=torch.tensor([3, 4]))
    full = a.target_logit(target, _ctx(5))
    assert _close(b.target_logit(target[3:], ctx_hi), full[3:])
    draws = S * target - full  # = S * m_i
    assert float(draws.std() / S) > 0.01
    a.begin_step(StepStats(target_cos=target))
    assert not _close(a.target_logit(target, _ctx(5)), full)  # a new step draws anew
    plus = create_margin("elasticface_cos_plus", scale=S, options={"sigma": 0.1})
    plus.begin_step(StepStats(target_cos=target))
    margins = (S * target - plus.target_logit(target, _ctx(5))) / S
    order = torch.argsort(target)  # hardest (lowest cos) first
    assert bool((margins[order][1:] <= margins[order][:-1]).all())  # ... gets the largest margin
    plus.eval()
    plus.begin_step(StepStats(target_cos=target, training=False))
    assert _close(plus.target_logit(target, _ctx(5)), S * (target - 0.35))
    arc = create_margin("elasticface", scale=S, options={"sigma": 0.0})
    arc.begin_step(StepStats(target_cos=COS))
    assert _close(arc.target_logit(COS[:4], _ctx(4)), S * torch.cos(THETAS[:4] + 0.5), 1e-9)


@pytest.mark.parametrize("name", list_margins())
def test_gradcheck(name):
    """d logit / d (cos, norms, weight norms) of every margin, against finite differences in float64."""
    margin = create_margin(name, scale=4.0)
    margin.set_num_classes(9)
    cos_values = torch.tensor([0.93, 0.41, -0.12, -0.67], dtype=torch.float64)  # away from kinks
    margin.begin_step(StepStats(target_cos=cos_values, feature_norms=torch.tensor([9.0, 15.0, 30.0, 50.0]).double(),
                                negative_logsumexp=torch.tensor(5.0, dtype=torch.float64)))
    cos = cos_values.clone().requires_grad_(True)
    # AdaFace detaches the norms by design (its reference code does); every other margin differentiates them.
    norms = torch.tensor([[12.0], [15.0], [30.0], [50.0]], dtype=torch.float64, requires_grad=name != "adaface")
    w_norms = torch.tensor([1.5, 0.7, 2.0, 1.1], dtype=torch.float64, requires_grad=True)
    neg = torch.tensor([[0.31, -0.52, 0.77], [0.05, 0.2, -0.9], [0.6, -0.33, 0.12], [-0.2, 0.44, 0.81]],
                       dtype=torch.float64, requires_grad=True)

    def target(c, n, w):
        return margin.target_logit(c * w if not margin.normalize_weights else c,
                                   MarginContext(feature_norms=n, target_cos=cos_values, weight_norms=w))

    def negatives(c, n):
        return margin.negative_logits(c, MarginContext(feature_norms=n, target_cos=cos_values))

    assert torch.autograd.gradcheck(target, (cos, norms, w_norms), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(negatives, (neg, norms), eps=1e-6, atol=1e-6)

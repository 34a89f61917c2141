"""The fused Triton classifier kernels, run on CPU through Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before the kernel module is imported), against plain-torch references.

References: the whole ``[B, C]`` logit matrix in float64 with autograd (independent of both chunked
paths), the torch path (``LinearMarginLogSumExp``) at the same precision, and for bfloat16 the same
float64 computation on bf16-rounded operands. Sizes are deliberately not multiples of the tiles (16 in
the interpreter): B = 37, C = 301, D = 40.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from distrib_face.parallel import ShardedMarginClassifier
from distrib_face.parallel.linear_lse import ChunkSpec, LinearMarginLogSumExp

triton_lse = pytest.importorskip("distrib_face.parallel.kernels.triton_lse", reason="needs the triton package")
Fused = triton_lse.TritonLinearMarginLogSumExp
KernelOptions = triton_lse.KernelOptions

B, C, D = 37, 301, 40
SCALE = 30.0


def test_the_kernels_run_in_the_interpreter_here():
    # Every other test of this file would otherwise try to compile for a GPU this machine lacks.
    assert triton_lse.INTERPRETED == (not torch.cuda.is_available())


def _inputs(seed: int = 0, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(B, D, generator=gen, dtype=torch.float64) * 2.0
    weight = torch.randn(C, D, generator=gen, dtype=torch.float64) * 0.01
    target_col = torch.randint(0, C, (B,), generator=gen)
    target_col[::5] = -1  # rows whose class another rank holds
    for i in range(3):  # pointing away from the class centre: theta near pi
        emb[i] = -weight[target_col[i]] * 300.0 + 1e-3 * emb[i]
    target_logits = torch.randn(B, generator=gen, dtype=torch.float64) * 5.0
    grad_out = torch.rand(B, generator=gen, dtype=torch.float64) + 0.5  # an uneven upstream gradient
    valid = torch.rand(C, generator=gen) > 0.25
    return emb.to(dtype), weight.to(dtype), target_logits.to(dtype), target_col, grad_out.to(dtype), valid


def _reference(emb, weight, target_logits, target_col, grad_out, scale=SCALE, valid=None):
    """Whole-matrix float64: lse, d emb, d weight, d target_logits (autograd)."""
    emb, weight, target_logits = (t.detach().double().requires_grad_(True) for t in (emb, weight, target_logits))
    logits = scale * F.normalize(emb, dim=1) @ F.normalize(weight, dim=1).t()  # [B, C]
    rows = torch.arange(len(target_col))
    mask = torch.zeros_like(logits, dtype=torch.bool)
    here = target_col >= 0
    mask[rows[here], target_col[here]] = True
    if valid is not None:
        mask |= ~valid[None, :]
    logits = logits.masked_fill(mask, float("-inf"))
    lse = torch.logsumexp(torch.cat([logits, target_logits[:, None]], dim=1), dim=1)
    (lse * grad_out.double()).sum().backward()
    return lse.detach(), emb.grad, weight.grad, target_logits.grad


def _run(fn, emb, weight, target_logits, target_col, grad_out, *extra, compute_dtype=None, scale=SCALE):
    emb, weight, target_logits = (t.detach().clone().requires_grad_(True) for t in (emb, weight, target_logits))
    lse = fn.apply(emb, weight, target_logits, target_col, scale, ChunkSpec(64, compute_dtype), *extra)
    (lse * grad_out).sum().backward()
    return lse.detach(), emb.grad, weight.grad, target_logits.grad


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300))


NAMES = ("lse", "d embeddings", "d weight", "d target logits")


@pytest.mark.parametrize("masked", [False, True])
def test_fused_equals_whole_matrix_and_torch_path_fp32(masked):
    emb, weight, target_logits, target_col, grad_out, valid = _inputs()
    valid = valid if masked else None
    ref = _reference(emb, weight, target_logits, target_col, grad_out, valid=valid)
    torch_path = _run(LinearMarginLogSumExp, emb, weight, target_logits, target_col, grad_out, valid)
    fused = _run(Fused, emb, weight, target_logits, target_col, grad_out, valid)
    for name, got, want, other in zip(NAMES, fused, ref, torch_path):
        assert _rel(got, want) < 1e-4, (name, _rel(got, want))
        assert _rel(got, other) < 1e-4, (name, _rel(got, other))
    if masked:  # invalid columns: exactly zero gradient, and the same result as dropping them
        assert torch.count_nonzero(fused[2][~valid]) == 0
        keep = valid.nonzero().squeeze(1)
        new_col = torch.full((C,), -1, dtype=torch.int64)
        new_col[keep] = torch.arange(len(keep))
        dropped_col = torch.where(target_col >= 0, new_col[target_col.clamp_min(0)], target_col)
        dropped = _run(Fused, emb, weight[keep].contiguous(), target_logits, dropped_col, grad_out)
        assert _rel(fused[0], dropped[0]) < 1e-6
        assert _rel(fused[2][keep], dropped[2]) < 1e-4


def test_torch_path_validity_mask_equals_dropping_the_columns():
    emb, weight, target_logits, target_col, grad_out, valid = _inputs(1, torch.float64)
    masked = _run(LinearMarginLogSumExp, emb, weight, target_logits, target_col, grad_out, valid)
    ref = _reference(emb, weight, target_logits, target_col, grad_out, valid=valid)
    for name, got, want in zip(NAMES, masked, ref):
        assert _rel(got, want) < 1e-10, name
    assert torch.count_nonzero(masked[2][~valid]) == 0
    all_valid = _run(LinearMarginLogSumExp, emb, weight, target_logits, target_col, grad_out,
                     torch.ones(C, dtype=torch.bool))
    plain = _run(LinearMarginLogSumExp, emb, weight, target_logits, target_col, grad_out)
    for got, want in zip(all_valid, plain):
        assert torch.equal(got, want)


@pytest.mark.parametrize("blocks", [(16, 16, 16, 1), (32, 16, 32, 7)])
def test_tile_shapes_and_splits_do_not_change_the_result(blocks):
    emb, weight, target_logits, target_col, grad_out, _ = _inputs(2)
    block_b, block_c, block_d, splits = blocks
    options = KernelOptions(block_b=block_b, block_c=block_c, block_d=block_d, num_splits=splits)
    ref = _reference(emb, weight, target_logits, target_col, grad_out)
    fused = _run(Fused, emb, weight, target_logits, target_col, grad_out, None, options)
    for name, got, want in zip(NAMES, fused, ref):
        assert _rel(got, want) < 1e-4, (name, blocks)


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).double()


def test_bf16_is_bf16_operands_with_fp32_accumulation():
    """Against float64 on the same bf16-rounded operands: only fp32 summation error remains in the lse;
    the gradients also round ``G`` to bf16 before its two products (as the GPU's bf16 MMA does), whose
    rare rounding flips relative to a float64 ``G`` stay well below one bf16 unit (2^-8) in norm."""
    emb, weight, target_logits, target_col, grad_out, _ = _inputs(3)
    scale = 16.0
    fused = _run(Fused, emb, weight, target_logits, target_col, grad_out, compute_dtype=torch.bfloat16, scale=scale)
    x_norm = emb.double().norm(dim=1, keepdim=True)
    x_unit = (emb / emb.norm(dim=1, keepdim=True)).double()  # fp32 unit vectors, as the kernel's
    u = _bf16(x_unit)  # the matmul operand: rounded to bf16
    w = _bf16(weight)
    inv = 1.0 / weight.double().norm(dim=1)
    raw = u @ w.t()
    logits = raw * inv * scale
    rows = torch.arange(B)
    here = target_col >= 0
    logits[rows[here], target_col[here]] = float("-inf")
    lse = torch.logsumexp(torch.cat([logits, target_logits.double()[:, None]], dim=1), dim=1)
    assert _rel(fused[0], lse) < 1e-5
    grad_raw = torch.exp(logits - lse[:, None]) * grad_out.double()[:, None] * inv * scale  # 0 at targets
    grad_unit = _bf16(grad_raw) @ w
    grad_emb = (grad_unit - x_unit * (grad_unit * x_unit).sum(1, keepdim=True)) / x_norm  # projection in fp32
    grad_w = _bf16(grad_raw).t() @ u - (inv**2 * (grad_raw * raw).sum(0))[:, None] * weight.double()
    for name, got, want in (("d embeddings", fused[1], grad_emb), ("d weight", fused[2], grad_w)):
        frob = float((got.double() - want).norm() / want.norm())
        assert frob < 2**-8 / 4, (name, frob)


def test_bf16_against_fp32_within_the_rounding_bound():
    """bf16 against fp32, within what rounding both operands to bf16 can do (unit roundoff u = 2^-8):
    a cosine moves by at most ``2u + u^2`` (unit vectors), a logit by ``delta = s (2u + u^2)``, the lse by
    as much, a probability by a factor ``exp(+-2 delta)``; so per row
    ``||d grad_u|| <= g s ((e^(2 delta) - 1) + e^(2 delta) (2u + u^2))`` (``sum_c p <= 1``, ``r_c ||w_c|| = 1``),
    divided by ``||x||`` through the projection, and the same per class row for ``d W``."""
    emb, weight, target_logits, target_col, grad_out, _ = _inputs(4)
    scale = 8.0
    u = 2.0**-8
    delta = scale * (2 * u + u * u)
    lse16, demb16, dw16, _ = _run(Fused, emb, weight, target_logits, target_col, grad_out,
                                  compute_dtype=torch.bfloat16, scale=scale)
    lse32, demb32, dw32, _ = _run(Fused, emb, weight, target_logits, target_col, grad_out, scale=scale)
    assert float((lse16 - lse32).abs().max()) <= delta + 1e-5
    factor = scale * ((math.exp(2 * delta) - 1) + math.exp(2 * delta) * (2 * u + u * u))
    row_bound = grad_out * factor / emb.norm(dim=1) + 1e-6
    assert bool(((demb16 - demb32).norm(dim=1) <= row_bound).all())
    # d W_c = r_c (I - w^ w^T) sum_b g_b s p_bc u_b: the same bound with the rows' weights r_c summed over b.
    x_unit = F.normalize(emb, dim=1)
    logits = scale * x_unit @ F.normalize(weight, dim=1).t()
    probs = torch.exp(logits - lse32[:, None])  # an upper bound of each non-target probability
    col_bound = 2 * (probs * grad_out[:, None]).sum(0) * factor / weight.norm(dim=1) + 1e-6
    assert bool(((dw16 - dw32).norm(dim=1) <= col_bound).all())
    assert _rel(lse16, lse32) > 0  # really computed in bf16


def test_gradient_filter_skips_exactly_the_tiles_below_the_threshold():
    emb, weight, target_logits, target_col, grad_out, _ = _inputs(5)
    blocks = dict(block_b=16, block_c=16, num_splits=3)
    exact = _run(Fused, emb, weight, target_logits, target_col, grad_out, None, KernelOptions(**blocks))
    zero = _run(Fused, emb, weight, target_logits, target_col, grad_out, None, KernelOptions(filter_eps=0.0, **blocks))
    # A threshold of 0 keeps every tile. Filtering, the kernels get the full lse and the rescaled gradient
    # (the same products to rounding): the embedding and weight gradients agree to float32 rounding.
    for name, got, want in zip(NAMES, zero, exact):
        if name in ("d embeddings", "d weight"):
            assert _rel(got, want) < 1e-6, name
        else:
            assert torch.equal(got, want), name
    everything = _run(Fused, emb, weight, target_logits, target_col, grad_out, None,
                      KernelOptions(filter_eps=1.0, **blocks))
    assert torch.equal(everything[0], exact[0])  # the forward is never filtered
    assert torch.count_nonzero(everything[1]) == 0 and torch.count_nonzero(everything[2]) == 0
    # A threshold in between: the float64 whole-matrix gradient with the same 16 x 16 tiles zeroed.
    lse = exact[0].double()
    x_unit = F.normalize(emb.double(), dim=1)
    logits = SCALE * x_unit @ F.normalize(weight.double(), dim=1).t()
    rows = torch.arange(B)
    here = target_col >= 0
    logits[rows[here], target_col[here]] = float("-inf")
    probs = torch.exp(logits - lse[:, None])  # [B, C]
    eps = float(probs.max()) / 50
    tiles = F.max_pool2d(F.pad(probs, (0, (-C) % 16, 0, (-B) % 16))[None], 16)[0]  # max p per tile
    keep = (tiles >= eps).repeat_interleave(16, 0).repeat_interleave(16, 1)[:B, :C]
    assert 0 < int(keep.sum()) < keep.numel()  # some tiles kept, some skipped
    filtered = _run(Fused, emb, weight, target_logits, target_col, grad_out, None,
                    KernelOptions(filter_eps=eps, **blocks))
    grad_raw = probs * keep * grad_out.double()[:, None] * SCALE / weight.double().norm(dim=1)
    grad_unit = grad_raw @ (weight.double())
    x_norm = emb.double().norm(dim=1, keepdim=True)
    grad_emb = (grad_unit - x_unit * (grad_unit * x_unit).sum(1, keepdim=True)) / x_norm
    radial = (grad_raw * (x_unit @ weight.double().t())).sum(0) / weight.double().norm(dim=1) ** 2
    grad_w = grad_raw.t() @ x_unit - radial[:, None] * weight.double()
    assert _rel(filtered[1], grad_emb) < 1e-4
    assert _rel(filtered[2], grad_w) < 1e-4
    # filter_study's accounting of what the filter leaves out (docs/classifier.md) is that difference.
    from distrib_face.parallel.kernels.filter_study import dropped_gradients

    drop_emb, drop_w, skipped = dropped_gradients(emb.double(), weight.double(), target_col, lse, grad_out.double(),
                                                  SCALE, eps, 16, 16)
    assert skipped == pytest.approx(1.0 - float((tiles >= eps).float().mean()))
    assert _rel(exact[1].double() - filtered[1].double(), drop_emb) < 1e-3
    assert _rel(exact[2].double() - filtered[2].double(), drop_w) < 1e-3


def _negative_logits(emb, weight, target_col, scale=SCALE):
    """Float64 ``[B, C]`` ``s cos`` with each row's target column at ``-inf``."""
    logits = scale * F.normalize(emb.double(), dim=1) @ F.normalize(weight.double(), dim=1).t()
    here = target_col >= 0
    logits[torch.arange(len(target_col))[here], target_col[here]] = float("-inf")
    return logits


def _threshold_between_tiles(probs: torch.Tensor, tile: int = 16) -> float:
    """A threshold that skips a third to two thirds of the ``tile x tile`` tiles, in the widest gap there
    between two tiles' max probabilities (float32 rounding cannot move a tile across it)."""
    tiles = F.max_pool2d(F.pad(probs, (0, (-probs.shape[1]) % tile, 0, (-probs.shape[0]) % tile))[None], tile)[0]
    ordered = tiles.flatten().sort().values
    lo, hi = len(ordered) // 3, 2 * len(ordered) // 3
    gaps = ordered[lo + 1: hi + 1] / ordered[lo:hi]
    k = lo + int(gaps.argmax())
    assert float(gaps.max()) > 1.01
    return float((ordered[k] * ordered[k + 1]).sqrt())


def test_gradient_filter_tests_the_full_softmax_once_the_target_logits_are_handed_over():
    """Dominant targets (p_target > 0.997, the loss ~1e-3): with the target logits in the holder the filtered
    backward drops exactly what filter_study's accounting with the FULL lse says (docs/classifier.md); with
    the holder left empty it tests the negatives' softmax, which here skips far fewer tiles: that is the
    accounting with the non-target lse, and not the documented one."""
    from distrib_face.parallel.kernels import TargetLogitsHolder
    from distrib_face.parallel.kernels.filter_study import dropped_gradients

    emb, weight, _, target_col, grad_out, _ = _inputs(6)
    logits = _negative_logits(emb, weight, target_col)  # [B, C] float64
    negative_lse = torch.logsumexp(logits, dim=1)
    gen = torch.Generator().manual_seed(6)
    target_logits = (negative_lse + 6.0 + 4.0 * torch.rand(B, generator=gen, dtype=torch.float64)).float()
    full_lse = torch.logaddexp(negative_lse, target_logits.double())
    eps = _threshold_between_tiles(torch.exp(logits - full_lse[:, None]))
    blocks = dict(block_b=16, block_c=16, num_splits=3)

    def run(options, handed_over):
        e, w = emb.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        holder = TargetLogitsHolder()
        neg, _ = triton_lse.TritonLinearNegativeLogSumExp.apply(
            e, w, torch.zeros(B), target_col, SCALE, ChunkSpec(64), None, options, holder)
        if handed_over:
            holder.value = target_logits
        (torch.logaddexp(target_logits, neg) * grad_out).sum().backward()
        return neg.detach(), e.grad.double(), w.grad.double()

    neg, exact_emb, exact_w = run(KernelOptions(**blocks), True)
    assert _rel(neg, negative_lse) < 1e-5
    assert torch.equal(run(KernelOptions(**blocks), False)[1], exact_emb)  # no filter: the holder is unused
    _, full_emb, full_w = run(KernelOptions(filter_eps=eps, **blocks), True)
    drop_emb, drop_w, skipped = dropped_gradients(emb.double(), weight.double(), target_col, full_lse,
                                                  grad_out.double(), SCALE, eps, 16, 16)
    assert 0.3 < skipped < 0.7
    assert _rel(exact_emb - full_emb, drop_emb) < 1e-3
    assert _rel(exact_w - full_w, drop_w) < 1e-3
    # Empty holder: the negatives' softmax p / (1 - p_target) is tested (the non-target lse and its gradient).
    _, neg_emb, neg_w = run(KernelOptions(filter_eps=eps, **blocks), False)
    grad_negative = grad_out.double() * torch.exp(negative_lse - full_lse)  # dL / d negative_lse
    drop_emb_n, drop_w_n, skipped_n = dropped_gradients(emb.double(), weight.double(), target_col, negative_lse,
                                                        grad_negative, SCALE, eps, 16, 16)
    assert skipped_n < skipped / 2
    assert _rel(exact_emb - neg_emb, drop_emb_n) < 1e-3
    assert _rel(exact_w - neg_w, drop_w_n) < 1e-3
    assert _rel(exact_emb - neg_emb, drop_emb) > 0.1
    assert _rel(exact_w - neg_w, drop_w) > 0.1
    # A threshold of 0 keeps every tile: the rescaled pair gives the exact gradient.
    _, zero_emb, zero_w = run(KernelOptions(filter_eps=0.0, **blocks), True)
    assert _rel(zero_emb, exact_emb) < 1e-5 and _rel(zero_w, exact_w) < 1e-5
    # Rows without any negative (one valid column, their own target): a zero pair, no NaN.
    col = int(target_col[1])
    valid = torch.zeros(C, dtype=torch.bool)
    valid[col] = True
    e, w = emb.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    holder = TargetLogitsHolder()
    neg, _ = triton_lse.TritonLinearNegativeLogSumExp.apply(
        e, w, torch.zeros(B), target_col, SCALE, ChunkSpec(64), valid, KernelOptions(filter_eps=0.0, **blocks),
        holder)
    holder.value = target_logits
    (torch.logaddexp(target_logits, neg) * grad_out).sum().backward()
    alone = target_col == col
    assert bool((neg[alone] == float("-inf")).all()) and bool(torch.isfinite(neg[~alone]).all())
    assert bool(torch.isfinite(e.grad).all()) and bool(torch.isfinite(w.grad).all())
    assert torch.count_nonzero(e.grad[alone]) == 0 and torch.count_nonzero(w.grad[~valid]) == 0


def test_classifier_hands_its_target_logits_to_the_filter():
    """Through the classifier (cosface, its margin applied outside the kernels), embeddings near their class
    centre: the filtered gradients are the exact ones less filter_study's full-softmax accounting."""
    from distrib_face.parallel.kernels.filter_study import dropped_gradients

    gen = torch.Generator().manual_seed(12)
    labels = torch.randint(0, C, (B,), generator=gen)
    exact_clf = ShardedMarginClassifier(C, D, margin="cosface", seed=3, chunk_size=50, kernel="triton")
    weight = exact_clf.weight.detach().clone()
    emb = F.normalize(weight[labels], dim=1) * 3.0 + 0.1 * torch.randn(B, D, generator=gen)  # cos ~0.98
    logits = _negative_logits(emb, weight, labels, scale=64.0)  # cosface: s = 64, m = 0.4
    cos_t = (F.normalize(emb.double(), dim=1) * F.normalize(weight[labels].double(), dim=1)).sum(1)
    full_lse = torch.logaddexp(torch.logsumexp(logits, dim=1), 64.0 * (cos_t - 0.4))
    eps = _threshold_between_tiles(torch.exp(logits - full_lse[:, None]))
    filtered_clf = ShardedMarginClassifier(C, D, margin="cosface", seed=3, chunk_size=50, kernel="triton",
                                           grad_filter=eps)
    assert torch.equal(filtered_clf.weight, exact_clf.weight)
    grads = {}
    for name, clf in (("exact", exact_clf), ("filtered", filtered_clf)):
        local = emb.clone().requires_grad_(True)
        loss = clf(local, labels)
        loss.backward()
        assert float(loss.detach()) < 0.05  # the targets dominate
        grads[name] = (local.grad.double(), clf.active_rows()[1].grad.double())
    drop_emb, drop_w, skipped = dropped_gradients(emb.double(), weight.double(), labels, full_lse,
                                                  torch.full((B,), 1.0 / B, dtype=torch.float64), 64.0, eps, 16, 16)
    assert 0.3 < skipped < 0.7
    assert _rel(grads["exact"][0] - grads["filtered"][0], drop_emb) < 1e-3
    assert _rel(grads["exact"][1] - grads["filtered"][1], drop_w) < 1e-3


@pytest.mark.parametrize("margin", ["cosface", "arcface"])
@pytest.mark.parametrize("sample_rate", [1.0, 0.4])
def test_classifier_triton_equals_torch_and_float64(margin, sample_rate):
    """Through the classifier: margins applied outside the kernel (arcface with theta + m > pi), Partial FC."""
    gen = torch.Generator().manual_seed(7)
    labels = torch.randint(0, C, (B,), generator=gen)
    emb = torch.randn(B, D, generator=gen) * 3.0
    results = {}
    for kernel, dtype in (("triton", torch.float32), ("torch", torch.float32), ("torch", torch.float64)):
        clf = ShardedMarginClassifier(C, D, margin=margin, sample_rate=sample_rate, seed=3, dtype=dtype,
                                      chunk_size=50, kernel=kernel)
        with torch.no_grad():  # two samples pointing away from their class: theta + m > pi
            emb[:2] = -clf.weight[labels[:2]].float() * 500.0
        local = emb.to(dtype).clone().requires_grad_(True)
        loss = clf(local, labels)
        loss.backward()
        index, rows = clf.active_rows()
        results[(kernel, dtype)] = (loss.detach(), local.grad, rows.grad, index)
    fused = results[("triton", torch.float32)]
    for other in (results[("torch", torch.float32)], results[("torch", torch.float64)]):
        if sample_rate < 1:
            assert torch.equal(fused[3], other[3])
        for name, got, want in zip(("loss", "d embeddings", "d weight"), fused[:3], other[:3]):
            assert _rel(got, want) < 1e-4, (margin, sample_rate, name, _rel(got, want))


def test_kernel_choice_and_its_errors():
    from distrib_face.parallel.kernels import filter_threshold, resolve_kernel

    emb, weight = torch.randn(4, 8), torch.randn(10, 8)
    assert resolve_kernel("auto", emb, weight, None) == ("triton" if weight.is_cuda else "torch")
    assert resolve_kernel("triton", emb, weight, torch.bfloat16) == "triton"  # the interpreter takes CPU tensors
    with pytest.raises(ValueError, match=r"weight dtype torch.float64"):
        resolve_kernel("triton", emb.double(), weight.double(), None)
    assert resolve_kernel("auto", emb.double(), weight.double(), None) == "torch"
    with pytest.raises(ValueError, match="embedding size 2048"):
        resolve_kernel("triton", torch.randn(2, 2048), torch.randn(3, 2048), None)
    with pytest.raises(ValueError, match=r"kernel must be one of \['auto', 'torch', 'triton'\], got 'cuda'"):
        ShardedMarginClassifier(10, 8, kernel="cuda")
    with pytest.raises(ValueError, match="kernel='torch' is exact"):
        ShardedMarginClassifier(10, 8, kernel="torch", grad_filter="auto")
    with pytest.raises(ValueError, match="grad_filter must be"):
        ShardedMarginClassifier(10, 8, grad_filter=2.0)
    assert filter_threshold("auto", torch.bfloat16) == 2.0**-12
    assert filter_threshold("auto", None) == 2.0**-28
    assert filter_threshold(None, torch.bfloat16) is None


def test_without_triton_the_package_works_and_asking_for_it_says_why(tmp_path):
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` fail as if it were absent
        "import torch\n"
        "from distrib_face.parallel import ShardedMarginClassifier\n"
        "clf = ShardedMarginClassifier(10, 8)\n"  # auto: the torch path
        "loss = clf(torch.randn(3, 8), torch.tensor([1, 2, 3])); loss.backward()\n"
        "try:\n"
        "    ShardedMarginClassifier(10, 8, kernel='triton')\n"
        "except ImportError as err:\n"
        "    print('ERR', err)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "ERR ShardedMarginClassifier(kernel='triton') needs the triton package" in out.stdout
    assert "pip install triton==" in out.stdout


def test_the_config_reaches_the_classifier():
    from distrib_face.config import Config
    from distrib_face.parallel.context import ProcessContext
    from distrib_face.train.components import build_classifier

    cfg = Config.from_dict({"data": {"source": "random"}, "train": {"total_steps": 1},
                            "loss": {"kernel": "triton", "grad_filter": "auto", "compute_dtype": "bf16"}})
    clf, _ = build_classifier(cfg, 50, ProcessContext())
    assert (clf.kernel, clf.grad_filter) == ("triton", "auto")
    assert build_classifier(Config.from_dict({"data": {"source": "random"}, "train": {"total_steps": 1}}), 50,
                            ProcessContext())[0].kernel == "auto"


def _weight_grad_producers(loss: torch.Tensor, rows: torch.Tensor) -> tuple[list[str], set[str]]:
    """The autograd nodes whose edges reach ``rows``' AccumulateGrad, and every node name of the graph."""
    producers, names, seen, stack = [], set(), set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(node.name())
        for child, _ in node.next_functions:
            if child is not None and getattr(child, "variable", None) is rows:
                producers.append(node.name())
            stack.append(child)
    return producers, names


class _WeightSizedOps(TorchDispatchMode):
    """Records the aten ops that return a tensor of ``numel`` elements (the rows' gradient, in any view)."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.ndim >= 2 and out.numel() == self.numel:
            self.ops.append(func.overloadpacket.__name__)
        return out


@pytest.mark.parametrize(("sample_rate", "dtype"), [(1.0, torch.float32), (0.4, torch.float32),
                                                    (1.0, torch.bfloat16)])
def test_triton_path_adds_the_target_rows_gradient_without_a_dense_gather(sample_rate, dtype):
    """The classifier's target cosines reach the weights inside the fused Function (as on the torch path):
    the rows' gradient has exactly one producer, no ``IndexBackward`` gathers the target rows, and no op of
    the backward zero-fills a weight-shaped tensor or adds two of them (what autograd's gather of the target
    rows cost: a dense ``[C, D]`` gradient summed with the kernel's). The result still equals the torch
    path's, which owns the target cosines' gradient the same way (arcface, theta + m > pi included)."""
    gen = torch.Generator().manual_seed(11)
    labels = torch.randint(0, C, (B,), generator=gen)
    labels[::7] = labels[0]  # a class that is the target of several rows: its gradient is accumulated
    emb = torch.randn(B, D, generator=gen) * 3.0
    results = {}
    for kernel in ("triton", "torch"):
        clf = ShardedMarginClassifier(C, D, margin="arcface", sample_rate=sample_rate, seed=3, dtype=dtype,
                                      chunk_size=50, kernel=kernel)
        with torch.no_grad():  # theta + m > pi for two rows
            emb[1:3] = -clf.weight[labels[1:3]].float() * 500.0
        local = emb.clone().requires_grad_(True)
        loss = clf(local, labels)
        index, rows = clf.active_rows()
        producers, names = _weight_grad_producers(loss, rows)
        ops = _WeightSizedOps(rows.numel())
        with ops:
            loss.backward()
        if kernel == "triton":
            dense = [op for op in ops.ops if op in ("zeros", "new_zeros", "zeros_like", "zero_", "fill_", "add",
                                                     "add_", "index_put")]
            assert not dense, ops.ops
            assert ops.ops.count("empty_like") == 1, ops.ops  # the kernel's gradient, the only one
            assert "index_put_" in ops.ops  # the target rows' [B, D] block, accumulated into it in place
            assert producers == ["TritonLinearNegativeLogSumExpBackward"], producers
            assert not any(name.startswith("Index") for name in names), sorted(names)
        results[kernel] = (loss.detach(), local.grad, rows.grad.float(), index)
    fused, reference = results["triton"], results["torch"]
    if sample_rate < 1:
        assert torch.equal(fused[3], reference[3])
    # fp32: the same math to rounding; bf16 rows: both gradients are rounded to bf16 (one unit apart at most)
    tolerance = 1e-4 if dtype == torch.float32 else 2**-7
    for name, got, want in zip(("loss", "d embeddings", "d weight"), fused[:3], reference[:3]):
        assert _rel(got, want) < tolerance, (name, dtype, _rel(got, want))

"""The bytes-moved model of ``distrib-face bench traffic`` (distrib_face/parallel/kernels/traffic.py): each term
pinned to its closed form, written here op by op from the code of linear_lse.py, triton_lse.py, the classifier
and optim.py (bytes read + bytes written of each global-memory pass), for small B, C, D."""

from __future__ import annotations

import pytest

from distrib_face.parallel.kernels import traffic

B, C, D, SPLITS = 3, 10, 5, 2
FP32, BF16 = 4, 2


def _torch_per_weight_element(w: int) -> int:
    cast_to_bf16 = (w + 2) if w == FP32 else 0  # _cast(w, bf16) is the identity on bf16 rows
    forward = [w, cast_to_bf16, 2]  # vector_norm reads w; the cast; the matmul reads the bf16 chunk
    widen_rows = 0 if w == FP32 else (w + 4)  # w_stat = _cast(w, float32) for the radial correction
    backward = [
        cast_to_bf16,  # w_mm, once for the three matmuls
        2,  # raw = x_mm @ w_mm.t() reads w_mm
        2,  # grad_unit += block_bf16 @ w_mm reads w_mm
        2, 2 + 4,  # first = block_bf16.t() @ x_signed: bf16 [c, D] out, widened to float32
        widen_rows,
        4 + 4 + 4,  # first.addcmul_(w_stat, dots): read first, read w_stat (float32), write first
        4 + w,  # grad_weight[c0:c1].copy_(first)
    ]
    return sum(forward) + sum(backward)


def _torch_per_logit() -> tuple[int, int]:
    forward = [2, 2 + 4, 4 + 4, 4, 4 + 4, 4 + 4, 4]  # mm out, widen, mul_, amax, sub_, exp_, sum
    backward = [2, 2 + 4,  # the recomputed raw block: bf16 out, widened
                4 + 4, 4 + 4, 4 + 4,  # addcmul(out=block), exp_, mul_(coef)
                4 + 2, 2,  # cast of the block for grad_unit's matmul, its read
                4 + 2, 2,  # the same for the weight gradient's matmul
                4 + 4 + 4, 4]  # torch.mul(block, raw, out=raw), torch.mv reads it
    return sum(forward), sum(backward)


def test_torch_path_terms():
    assert traffic.torch_weight_bytes(FP32) == _torch_per_weight_element(FP32) == 50
    assert traffic.torch_weight_bytes(BF16) == _torch_per_weight_element(BF16) == 40
    assert (traffic.TORCH_LOGIT_FORWARD, traffic.TORCH_LOGIT_BACKWARD) == _torch_per_logit() == (40, 64)
    for w in (FP32, BF16):
        step = traffic.Step(C, batch=B, dim=D, weight_bytes=w)
        expected = _torch_per_weight_element(w) * C * D + sum(_torch_per_logit()) * B * C
        assert traffic.classifier_bytes(step, "torch") == expected


def test_fused_path_terms():
    for w in (FP32, BF16):
        # W read by the forward and both backward kernels, the gradient written once; the target rows'
        # gradient is a [B, D] block accumulated into it inside the Function (O(B x D), not counted)
        kernels = 3 * w + w
        step = traffic.Step(C, batch=B, dim=D, weight_bytes=w, splits=SPLITS)
        expected = kernels * C * D + (4 + 2 * 4) * C + (4 + 4) * SPLITS * B * D
        assert traffic.fused_weight_bytes(w) == kernels
        assert traffic.classifier_bytes(step, "fused") == expected
    with pytest.raises(ValueError, match="path must be"):
        traffic.classifier_bytes(traffic.Step(C), "cuda")


def test_update_and_sampled_copies():
    fused_sgd_fp32 = 3 * 4 + 2 * 4  # reads w, grad, momentum; writes w, momentum
    assert traffic.update_bytes(FP32) == fused_sgd_fp32 == 20
    widen = 3 * (2 + 4)  # w, momentum, grad .float()
    stochastic_back = 4 + (4 + 4 + 4) + (4 + 4) + (4 + 2)  # randint, add_, bitwise_and_, copy_ to bf16
    assert traffic.update_bytes(BF16, "stochastic") == widen + fused_sgd_fp32 + 2 * stochastic_back == 98
    assert traffic.update_bytes(BF16, "nearest") == widen + fused_sgd_fp32 + 2 * (4 + 2) == 50
    # Partial FC: index_select(out=) of the weight rows and the momentum rows, index_copy_ of both back.
    for w in (FP32, BF16):
        assert traffic.sampled_copy_bytes(w) == (w + w) * 2 + (w + w) * 2
    dense = traffic.Step(C, batch=B, dim=D)
    assert traffic.optimizer_bytes(dense) == 20 * C * D  # rate 1: the shard updated in place, no copies
    sampled = traffic.Step(100, sample_rate=0.1, batch=B, dim=D, weight_bytes=BF16)
    assert sampled.active == 10
    assert traffic.optimizer_bytes(sampled) == (98 + 16) * 10 * D
    nearest = traffic.Step(100, sample_rate=0.1, batch=B, dim=D, weight_bytes=BF16, rounding="nearest")
    assert traffic.optimizer_bytes(nearest) == (50 + 16) * 10 * D


def test_table_rows_are_the_terms():
    """The printed table's 1M-class row: the sums of the terms at the documented shape, in GB and ms."""
    lines = traffic.table(3.3e12).splitlines()
    assert len(lines) == 2 + 6
    step = traffic.Step(1_000_000)
    torch_gb = (50 * 1e6 * 512 + 104 * 256 * 1e6) / 1e9
    fused_gb = (16 * 1e6 * 512 + 12 * 1e6 + 8 * 132 * 256 * 512) / 1e9
    update_gb = 20 * 1e6 * 512 / 1e9
    assert traffic.classifier_bytes(step, "torch") / 1e9 == pytest.approx(torch_gb)
    cells = [cell.strip() for cell in lines[2].strip("|").split("|")]
    assert cells[:3] == ["1M", "1", "fp32"]
    assert cells[3] == f"{torch_gb + update_gb:.1f} ({torch_gb:.1f} + {update_gb:.1f})"
    assert cells[4] == f"{fused_gb + update_gb:.1f} ({fused_gb:.1f} + {update_gb:.1f})"
    assert cells[5] == f"{(torch_gb + update_gb) / 3.3:.1f} ms / {(fused_gb + update_gb) / 3.3:.1f} ms"

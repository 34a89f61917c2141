"""Fast path of the sharded log-sum-exp for margins whose non-target logits are ``s * cos``.

NormFace, CosFace, ArcFace and the combined margin change only the target logit; every other logit is
``s * x_b . w_c / (||x_b|| ||w_c||)``. For those the backward needs no autograd graph per chunk: with
``u = x / ||x||``, ``raw = u W^T`` and ``r_c = 1 / ||w_c||``,

    dL/draw_bc = g_b p_bc s r_c                                   (p: softmax probability, 0 at the target)
    dL/du      = sum_c dL/draw_bc w_c                              (one matmul)
    dL/dw_c    = sum_b dL/draw_bc u_b - r_c^2 w_c sum_b dL/draw_bc raw_bc

which touches the weight chunk three times per step (norm, matmul, gradient) instead of the generic
path's normalised copy and its division backward. The class-weight norms are computed once in the
forward and reused. The result is identical to the generic path up to rounding (tested in float64).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from distrib_face.parallel.softmax_stats import OnlineLogSumExp

_EPS = 1e-12


def _mm(a: Tensor, b: Tensor, compute_dtype: torch.dtype | None, out_dtype: torch.dtype) -> Tensor:
    if compute_dtype is None or compute_dtype == a.dtype:
        return a @ b
    return (a.to(compute_dtype) @ b.to(compute_dtype)).to(out_dtype)


def _targets_in_chunk(target_col: Tensor, c0: int, c1: int) -> tuple[Tensor, Tensor]:
    here = (target_col >= c0) & (target_col < c1)
    rows = here.nonzero(as_tuple=True)[0]
    return rows, target_col[rows] - c0


class LinearMarginLogSumExp(torch.autograd.Function):
    """``log(exp(T_i) + sum over all ranks' non-target classes of exp(s cos_ij))`` with an analytic backward.

    Inputs: raw embeddings ``[B, D]`` (gathered), this rank's weight rows ``[C_r, D]``, the target logits
    ``[B]`` (already summed over ranks), each row's local target column (``-1`` when not on this rank), and
    optionally ``valid`` ``[C_r]`` (bool): columns marked False contribute nothing to the log-sum-exp and
    get a zero weight gradient (fixed-shape Partial FC pads its sample with such columns). ``None``: all valid.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        embeddings: Tensor,
        weight: Tensor,
        target_logits: Tensor,
        target_col: Tensor,
        scale: float,
        chunk_size: int,
        compute_dtype: torch.dtype | None,
        group: Any,
        valid: Tensor | None = None,
    ) -> Tensor:
        stat_dtype = target_logits.dtype
        if valid is not None and valid.shape != (weight.shape[0],):
            raise ValueError(f"valid must be [{weight.shape[0]}] (one flag per weight row), got {tuple(valid.shape)}")
        invalid = None if valid is None else ~valid.to(torch.bool)
        x_norm = embeddings.norm(dim=1, keepdim=True).clamp_min(_EPS)
        x_unit = embeddings / x_norm
        num_rows, num_classes = embeddings.shape[0], weight.shape[0]
        inv_wnorm = torch.empty(num_classes, dtype=stat_dtype, device=weight.device)
        stats = OnlineLogSumExp((num_rows,), stat_dtype, embeddings.device)
        for c0 in range(0, num_classes, chunk_size):
            c1 = min(c0 + chunk_size, num_classes)
            w = weight[c0:c1]
            inv = inv_wnorm[c0:c1]
            torch.reciprocal(w.norm(dim=1).to(stat_dtype).clamp_min(_EPS), out=inv)
            logits = _mm(x_unit, w.t(), compute_dtype, stat_dtype).to(stat_dtype).mul_(inv * scale)  # [B, c]
            rows, cols = _targets_in_chunk(target_col, c0, c1)
            logits[rows, cols] = float("-inf")
            if invalid is not None:
                logits.masked_fill_(invalid[c0:c1], float("-inf"))
            stats.update(logits, consume=True)
        lse = stats.logsumexp(group, extra=target_logits)
        ctx.save_for_backward(x_unit, x_norm, weight, inv_wnorm, target_logits, target_col, lse, invalid)
        ctx.scale, ctx.chunk_size, ctx.compute_dtype = scale, chunk_size, compute_dtype
        return lse

    @staticmethod
    def backward(ctx: Any, grad_lse: Tensor) -> tuple[Tensor | None, ...]:
        x_unit, x_norm, weight, inv_wnorm, target_logits, target_col, lse, invalid = ctx.saved_tensors
        stat_dtype = lse.dtype
        grad_target = grad_lse * torch.exp(target_logits - lse)
        grad_unit = torch.zeros_like(x_unit)
        grad_weight = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        for c0 in range(0, weight.shape[0], ctx.chunk_size):
            c1 = min(c0 + ctx.chunk_size, weight.shape[0])
            w = weight[c0:c1]
            # Cast the chunk once for both matmuls that read it (low-precision compute only).
            w_mm = w if ctx.compute_dtype is None else w.to(ctx.compute_dtype)
            coef = inv_wnorm[c0:c1] * ctx.scale  # d logit / d raw, per class
            raw = _mm(x_unit, w_mm.t(), ctx.compute_dtype, stat_dtype).to(stat_dtype)  # [B, c]
            grad_raw = (raw * coef).sub_(lse[:, None]).exp_().mul_(grad_lse[:, None])  # g * softmax
            rows, cols = _targets_in_chunk(target_col, c0, c1)
            grad_raw[rows, cols] = 0.0  # the target's share went to grad_target
            if invalid is not None:
                grad_raw.masked_fill_(invalid[c0:c1], 0.0)
            grad_raw.mul_(coef)
            grad_unit += _mm(grad_raw, w_mm, ctx.compute_dtype, stat_dtype).to(grad_unit.dtype)
            if grad_weight is not None:
                norm_term = (grad_raw * raw).sum(dim=0) * inv_wnorm[c0:c1] ** 2  # [c]
                gw = grad_weight[c0:c1]
                if ctx.compute_dtype is None and weight.dtype == stat_dtype:
                    torch.mm(grad_raw.t(), x_unit, out=gw)
                else:
                    gw.copy_(_mm(grad_raw.t(), x_unit, ctx.compute_dtype, stat_dtype))
                gw.addcmul_(w, norm_term[:, None].to(weight.dtype), value=-1.0)
        # Through u = x / ||x||: (I - u u^T) g / ||x||.
        grad_emb = (grad_unit - x_unit * (grad_unit * x_unit).sum(dim=1, keepdim=True)) / x_norm
        return grad_emb, grad_weight, grad_target, None, None, None, None, None, None

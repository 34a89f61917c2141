"""Fused Triton kernels for the margin softmax whose non-target logits are ``s * cos``.

Same contracts as :class:`distrib_face.parallel.linear_lse.LinearNegativeLogSumExp` (the classifier's: the
non-target log-sum-exp, with each row's target cosine echoed and its gradient owned) and
:class:`~distrib_face.parallel.linear_lse.LinearMarginLogSumExp` (built on it with ``logaddexp``), different
memory traffic: no ``[B, chunk]`` logit block ever reaches global memory. With ``u = x / ||x||`` (``[B, D]``,
cast once to the compute dtype), ``r_c = 1 / ||w_c||`` and ``raw = u W^T``:

forward, grid ``(B blocks, class splits)``
    each program keeps ``u`` rows of its B block and streams the class tiles of its split through
    on-chip memory (``BLOCK_D`` slices of both operands per step, fp32 accumulation), scales
    ``raw`` by ``s r_c``, masks each row's target column (and invalid / padded columns), and keeps an
    online max and sum of exponentials per row (FlashAttention's online softmax). It writes the
    ``[splits, B]`` partial statistics and, from the programs of the first B block, ``r_c`` once.
    The splits are merged by :meth:`OnlineLogSumExp.merge`, the ranks by its usual MAX + SUM all-reduce.

backward, two kernels that recompute ``raw`` tile by tile from the saved ``[B]`` log-sum-exp
    ``_grad_embedding_kernel``, grid ``(B blocks, class splits)``: ``G = g p s r_c`` per tile (``p`` the
    softmax probability, 0 at the target), accumulates ``G W_tile`` into a ``[B_block, D]`` register
    accumulator over the split (the tile ``W`` is read once and used for both products), and stores one
    ``[B_block, D]`` partial per split; the partials are summed (``[splits, B, D]``, small).
    ``_grad_weight_kernel``, grid ``(class blocks)``: each program owns its rows and loops over the B
    blocks: ``dW_c = sum_b G_bc u_b - r_c^2 w_c sum_b G_bc raw_bc``, written once, no atomics.
    The target cosines' gradient is then added in ``O(B x D)``: to ``dL/du`` and, accumulated, to the
    target rows of ``dW`` (the torch path's :func:`~distrib_face.parallel.linear_lse.add_target_cosine_grad_`).

Everything is deterministic (no atomics, fixed reduction order). Gradient filtering (``filter_eps``,
off by default) skips a tile's two products in backward when every probability in it is below the
threshold, as Cut Cross-Entropy does; its effect is measured in docs/classifier.md. The probability tested
is the one of the ``lse`` the backward kernels get: the Function passes the full log-sum-exp (target
included) when the target logits are known (:class:`~distrib_face.parallel.kernels.TargetLogitsHolder`).

Under ``TRITON_INTERPRET=1`` (set before triton is imported) the same kernels run on CPU tensors, which
is how the project's tests check them. The interpreter stores bfloat16 as integers and multiplies the bit
patterns in ``tl.dot`` (triton-lang/triton#11584) and truncates float32 -> bfloat16 casts, so there,
and only there (the ``INTERPRET`` flag), dot operands are widened to fp32 first (bf16 products are exact
in fp32 and the accumulation is fp32 either way) and narrowing rounds to nearest even on the bits: the
numbers are those of the GPU's bf16 MMA up to summation order.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from distrib_face.parallel.kernels import TargetLogitsHolder
from distrib_face.parallel.linear_lse import ChunkSpec, add_target_cosine_grad_
from distrib_face.parallel.softmax_stats import OnlineLogSumExp

logger = logging.getLogger(__name__)

_EPS = 1e-12
#: The largest embedding size the kernels hold as one tile (``next_power_of_2(D)``).
MAX_EMBEDDING = 1024
#: The ``[splits, B, D]`` float32 partials of the embedding gradient stay below this many bytes.
_MAX_PARTIAL_BYTES = 128 * 2**20

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@dataclass(frozen=True)
class KernelOptions:
    """Knobs of the fused kernels (defaults: what the classifier uses).

    Args:
        filter_eps: skip a backward tile whose softmax probabilities are all below this (``None``: never).
        block_b, block_c, block_d: fixed tile sizes (powers of two >= 16) instead of the autotuned ones
            (tests use small tiles so that odd sizes cross several of them); ``None``: tuned / default.
        num_splits: class splits per B block (``None``: enough programs to fill the device).
    """

    filter_eps: float | None = None
    block_b: int | None = None
    block_c: int | None = None
    block_d: int | None = None
    num_splits: int | None = None

    def __post_init__(self) -> None:
        for name in ("block_b", "block_c", "block_d"):
            value = getattr(self, name)
            if value is not None and (value < 16 or value & (value - 1)):
                raise ValueError(f"KernelOptions.{name} must be a power of two >= 16, got {value}")
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"KernelOptions.num_splits must be >= 1, got {self.num_splits}")
        if self.filter_eps is not None and not self.filter_eps >= 0.0:
            raise ValueError(f"KernelOptions.filter_eps must be >= 0 or None, got {self.filter_eps}")


# ------------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------------
@triton.jit
def _mma(a, b, acc, IEEE: tl.constexpr, INTERPRET: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation (``IEEE``: exact fp32 products, not tf32)."""
    if INTERPRET:  # the interpreter only: see the module docstring
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _cast(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """``x`` in ``DTYPE``, narrowing with round-to-nearest-even as the GPU does.

    The interpreter truncates float32 -> bfloat16; there the rounding is done on the bits first
    (add half an ulp of bf16, ties to even, then drop the low half: the truncation is then exact).
    """
    if DTYPE == tl.float32:
        y = x.to(tl.float32)
    else:
        if INTERPRET and DTYPE == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)  # idempotent on values already in bf16
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            y = bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
        else:
            y = x.to(DTYPE)
    return y


@triton.jit
def _split_range(pid_s, num_splits, C, BLOCK_C: tl.constexpr):
    """Columns ``[lo, hi)`` of class split ``pid_s``: whole tiles, the last split possibly shorter or empty."""
    per_split = tl.cdiv(tl.cdiv(C, BLOCK_C), num_splits) * BLOCK_C
    lo = pid_s * per_split
    hi = tl.minimum(lo + per_split, C)
    return lo, hi


@triton.jit
def _keep(offs_b, offs_c, B, C, tcol, VALID, HAS_VALID: tl.constexpr):
    """``[BB, BC]``: real row, real column, not the row's target, column marked valid."""
    keep = (offs_b[:, None] < B) & (offs_c[None, :] < C) & (offs_c[None, :] != tcol[:, None])
    if HAS_VALID:
        valid = tl.load(VALID + offs_c, mask=offs_c < C, other=0)
        keep = keep & (valid[None, :] != 0)
    return keep


@triton.jit
def _forward_kernel(
    X, W, TCOL, VALID, PART_MAX, PART_SUM, INV_NORM,
    B, C, D, stride_x, stride_w, scale, num_splits,
    HAS_VALID: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = offs_b < B
    tcol = tl.load(TCOL + offs_b, mask=row_ok, other=-1)
    run_max = tl.full([BLOCK_B], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_B], dtype=tl.float32)
    lo, hi = _split_range(pid_s, num_splits, C, BLOCK_C)
    for c0 in range(lo, hi, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        col_ok = offs_c < C
        raw = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)  # [BB, BC] cosines times ||w_c||
        sumsq = tl.zeros([BLOCK_C], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_ok = offs_d < D
            x = tl.load(X + offs_b[:, None].to(tl.int64) * stride_x + offs_d[None, :],
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            w = tl.load(W + offs_c[:, None].to(tl.int64) * stride_w + offs_d[None, :],
                        mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            w32 = w.to(tl.float32)
            sumsq += tl.sum(w32 * w32, axis=1)
            x = _cast(x, DOT_DTYPE, INTERPRET)
            w = _cast(w, DOT_DTYPE, INTERPRET)
            raw = _mma(x, tl.trans(w), raw, IEEE, INTERPRET)
        inv = 1.0 / tl.maximum(tl.sqrt(sumsq), 1e-12)
        if pid_b == 0:  # the norms are the same for every B block: written once
            tl.store(INV_NORM + offs_c, inv, mask=col_ok)
        keep = _keep(offs_b, offs_c, B, C, tcol, VALID, HAS_VALID)
        logits = tl.where(keep, raw * (inv * scale)[None, :], float("-inf"))
        new_max = tl.maximum(run_max, tl.max(logits, axis=1))
        safe = tl.where(new_max == float("-inf"), 0.0, new_max)  # an all-masked row so far stays NaN-free
        run_sum = run_sum * tl.exp(run_max - safe) + tl.sum(tl.exp(logits - safe[:, None]), axis=1)
        run_max = new_max
    out = pid_s.to(tl.int64) * B + offs_b
    tl.store(PART_MAX + out, run_max, mask=row_ok)
    tl.store(PART_SUM + out, run_sum, mask=row_ok)


@triton.jit
def _grad_embedding_kernel(
    X, W, TCOL, VALID, INV_NORM, LSE, GLSE, PART_GU,
    B, C, D, stride_x, stride_w, scale, num_splits, filter_eps,
    HAS_VALID: tl.constexpr, FILTER: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
    INTERPRET: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, D_PAD: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = offs_b < B
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < D
    x = tl.load(X + offs_b[:, None].to(tl.int64) * stride_x + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BB, D_PAD]
    x = _cast(x, DOT_DTYPE, INTERPRET)
    tcol = tl.load(TCOL + offs_b, mask=row_ok, other=-1)
    lse = tl.load(LSE + offs_b, mask=row_ok, other=float("inf"))  # padded rows: p = 0
    g = tl.load(GLSE + offs_b, mask=row_ok, other=0.0)
    acc = tl.zeros([BLOCK_B, D_PAD], dtype=tl.float32)  # [BB, D_PAD] this split's d loss / d u
    lo, hi = _split_range(pid_s, num_splits, C, BLOCK_C)
    for c0 in range(lo, hi, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        col_ok = offs_c < C
        w = tl.load(W + offs_c[:, None].to(tl.int64) * stride_w + offs_d[None, :],
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)  # [BC, D_PAD]
        w = _cast(w, DOT_DTYPE, INTERPRET)
        coef = tl.load(INV_NORM + offs_c, mask=col_ok, other=0.0) * scale  # d logit / d raw
        raw = _mma(x, tl.trans(w), tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32), IEEE, INTERPRET)
        keep = _keep(offs_b, offs_c, B, C, tcol, VALID, HAS_VALID)
        p = tl.where(keep, tl.exp(raw * coef[None, :] - lse[:, None]), 0.0)  # softmax probabilities
        grad_raw = p * g[:, None] * coef[None, :]
        if FILTER:
            if tl.max(tl.max(p, axis=1), axis=0) >= filter_eps:
                acc = _mma(_cast(grad_raw, DOT_DTYPE, INTERPRET), w, acc, IEEE, INTERPRET)
        else:
            acc = _mma(_cast(grad_raw, DOT_DTYPE, INTERPRET), w, acc, IEEE, INTERPRET)
    out = pid_s.to(tl.int64) * B * D + offs_b[:, None].to(tl.int64) * D + offs_d[None, :]
    tl.store(PART_GU + out, acc, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _grad_weight_kernel(
    X, W, TCOL, VALID, INV_NORM, LSE, GLSE, GW,
    B, C, D, stride_x, stride_w, stride_gw, scale, filter_eps,
    HAS_VALID: tl.constexpr, FILTER: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
    INTERPRET: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, D_PAD: tl.constexpr,
):
    pid_c = tl.program_id(0)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = offs_c < C
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < D
    w_ptrs = W + offs_c[:, None].to(tl.int64) * stride_w + offs_d[None, :]
    w_mask = col_ok[:, None] & d_ok[None, :]
    w = _cast(tl.load(w_ptrs, mask=w_mask, other=0.0), DOT_DTYPE, INTERPRET)  # [BC, D_PAD]
    inv = tl.load(INV_NORM + offs_c, mask=col_ok, other=0.0)
    coef = inv * scale
    acc = tl.zeros([BLOCK_C, D_PAD], dtype=tl.float32)  # [BC, D_PAD] sum_b G_bc u_b
    norm_acc = tl.zeros([BLOCK_C], dtype=tl.float32)  # sum_b G_bc raw_bc
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        row_ok = offs_b < B
        x = tl.load(X + offs_b[:, None].to(tl.int64) * stride_x + offs_d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BB, D_PAD]
        x = _cast(x, DOT_DTYPE, INTERPRET)
        tcol = tl.load(TCOL + offs_b, mask=row_ok, other=-1)
        lse = tl.load(LSE + offs_b, mask=row_ok, other=float("inf"))
        g = tl.load(GLSE + offs_b, mask=row_ok, other=0.0)
        raw = _mma(x, tl.trans(w), tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32), IEEE, INTERPRET)
        keep = _keep(offs_b, offs_c, B, C, tcol, VALID, HAS_VALID)
        p = tl.where(keep, tl.exp(raw * coef[None, :] - lse[:, None]), 0.0)
        grad_raw = p * g[:, None] * coef[None, :]  # [BB, BC]
        if FILTER:
            if tl.max(tl.max(p, axis=1), axis=0) >= filter_eps:
                acc = _mma(tl.trans(_cast(grad_raw, DOT_DTYPE, INTERPRET)), x, acc, IEEE, INTERPRET)
                norm_acc += tl.sum(grad_raw * raw, axis=0)
        else:
            acc = _mma(tl.trans(_cast(grad_raw, DOT_DTYPE, INTERPRET)), x, acc, IEEE, INTERPRET)
            norm_acc += tl.sum(grad_raw * raw, axis=0)
    # Through w_c / ||w_c||: subtract the radial part, with the rows reloaded in their own precision.
    w32 = tl.load(w_ptrs, mask=w_mask, other=0.0).to(tl.float32)
    grad = acc - (inv * inv * norm_acc)[:, None] * w32
    if INTERPRET:
        grad = _cast(grad, GW.dtype.element_ty, INTERPRET)
    else:
        grad = grad.to(GW.dtype.element_ty)  # round to nearest even, the compiled default
    tl.store(GW + offs_c[:, None].to(tl.int64) * stride_gw + offs_d[None, :], grad, mask=w_mask)


def _is_interpreted(fn: Any) -> bool:
    return type(fn).__name__ == "InterpretedFunction"


INTERPRETED = _is_interpreted(_forward_kernel)

# Autotuning (GPU only; the interpreter would run every configuration): a few tile shapes for D <= 1024,
# including small ones that fit any shared memory, so that a configuration always compiles. The
# autotuner times each once per (B, D, dtype) and skips those that run out of resources. Untuned on
# real hardware so far: tests/gpu/run.sh records which one wins. DISTRIB_FACE_TRITON_AUTOTUNE=0 takes
# the first (the most conservative) without timing.
# Register budget: the backward kernels keep a [rows, D] float32 accumulator, 64 registers a thread at
# D = 512 when rows = 4 x num_warps; the forward only a [BLOCK_B, BLOCK_C] tile.
_FWD_CONFIGS = [
    triton.Config({"BLOCK_B": 64, "BLOCK_C": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_B": 128, "BLOCK_C": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_B": 128, "BLOCK_C": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_B": 256, "BLOCK_C": 64}, num_warps=8, num_stages=3),
]
_BWD_E_CONFIGS = [
    triton.Config({"BLOCK_B": 16, "BLOCK_C": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_B": 32, "BLOCK_C": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_B": 64, "BLOCK_C": 32}, num_warps=16, num_stages=2),
    triton.Config({"BLOCK_B": 64, "BLOCK_C": 64}, num_warps=16, num_stages=2),
]
_BWD_W_CONFIGS = [
    triton.Config({"BLOCK_B": 32, "BLOCK_C": 16}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_B": 64, "BLOCK_C": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_B": 128, "BLOCK_C": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_B": 64, "BLOCK_C": 64}, num_warps=16, num_stages=2),
]


def _tuned(kernel: Any, configs: list[Any]) -> Any:
    if INTERPRETED:
        return None
    if os.environ.get("DISTRIB_FACE_TRITON_AUTOTUNE", "1") == "0":
        configs = configs[:1]
    return triton.autotune(configs=configs, key=["B", "D"])(kernel)


_forward_tuned = _tuned(_forward_kernel, _FWD_CONFIGS)
_grad_embedding_tuned = _tuned(_grad_embedding_kernel, _BWD_E_CONFIGS)
_grad_weight_tuned = _tuned(_grad_weight_kernel, _BWD_W_CONFIGS)


def chosen_configs() -> dict[str, str]:
    """The tile configuration the autotuner picked per kernel and (B, D, dtypes) key, for reports."""
    out = {}
    for name, kernel in (("forward", _forward_tuned), ("grad_embedding", _grad_embedding_tuned),
                         ("grad_weight", _grad_weight_tuned)):
        cache = getattr(kernel, "cache", None) or {}
        out[name] = "; ".join(f"{key}: {config}" for key, config in cache.items()) or "not tuned (yet)"
    return out


# ------------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------------
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few splits, so that the merge is exercised


def _num_splits(options: KernelOptions, num_rows: int, num_cols: int, dim: int, device: torch.device) -> int:
    """Class splits per B block: about 4 programs per SM in all, at least one tile of 16 columns each."""
    if options.num_splits is not None:
        return options.num_splits
    row_blocks = triton.cdiv(num_rows, 64)
    splits = max(1, min(triton.cdiv(4 * _num_sms(device), row_blocks), triton.cdiv(num_cols, 64)))
    # the embedding gradient's [splits, B, D] float32 partials stay small
    return max(1, min(splits, _MAX_PARTIAL_BYTES // max(1, num_rows * dim * 4)))


def _fixed(options: KernelOptions, default_b: int, default_c: int) -> dict[str, int]:
    return {"BLOCK_B": options.block_b or default_b, "BLOCK_C": options.block_c or default_c}


def _use_fixed(options: KernelOptions) -> bool:
    return INTERPRETED or options.block_b is not None or options.block_c is not None


def _common(x_mm: Tensor, weight: Tensor) -> dict[str, Any]:
    dot = x_mm.dtype
    return {
        "DOT_DTYPE": _TL_DTYPES[dot],
        "IEEE": dot == torch.float32,
        "INTERPRET": INTERPRETED,
    }


def fused_forward(
    x_mm: Tensor, weight: Tensor, target_col: Tensor, valid: Tensor | None, scale: float, options: KernelOptions,
) -> tuple[Tensor, Tensor, Tensor]:
    """Partial statistics ``[splits, B]`` (max, sum of exponentials) and ``1 / ||w_c||`` ``[C]``."""
    num_rows, dim = x_mm.shape
    num_cols = weight.shape[0]
    splits = _num_splits(options, num_rows, num_cols, dim, x_mm.device)
    part_max = torch.full((splits, num_rows), float("-inf"), dtype=torch.float32, device=x_mm.device)
    part_sum = torch.zeros((splits, num_rows), dtype=torch.float32, device=x_mm.device)
    inv_norm = torch.empty(num_cols, dtype=torch.float32, device=x_mm.device)
    block_d = options.block_d or min(16 if INTERPRETED else 64, max(16, triton.next_power_of_2(dim)))
    args = (x_mm, weight, target_col, valid if valid is not None else target_col, part_max, part_sum, inv_norm,
            num_rows, num_cols, dim, x_mm.stride(0), weight.stride(0), float(scale), splits)
    meta = dict(HAS_VALID=valid is not None, BLOCK_D=block_d, **_common(x_mm, weight))
    if _use_fixed(options):
        blocks = _fixed(options, 16 if INTERPRETED else 64, 16 if INTERPRETED else 64)
        grid = (triton.cdiv(num_rows, blocks["BLOCK_B"]), splits)
        _forward_kernel[grid](*args, **meta, **blocks)
    else:
        _forward_tuned[lambda m: (triton.cdiv(num_rows, m["BLOCK_B"]), splits)](*args, **meta)
    return part_max, part_sum, inv_norm


def fused_grad_embedding(
    x_mm: Tensor, weight: Tensor, target_col: Tensor, valid: Tensor | None, inv_norm: Tensor, lse: Tensor,
    grad_lse: Tensor, scale: float, options: KernelOptions,
) -> Tensor:
    """``d loss / d u`` ``[B, D]`` float32 (``u`` the unit embeddings)."""
    num_rows, dim = x_mm.shape
    num_cols = weight.shape[0]
    splits = _num_splits(options, num_rows, num_cols, dim, x_mm.device)
    partial = torch.empty((splits, num_rows, dim), dtype=torch.float32, device=x_mm.device)
    args = (x_mm, weight, target_col, valid if valid is not None else target_col, inv_norm, lse, grad_lse, partial,
            num_rows, num_cols, dim, x_mm.stride(0), weight.stride(0), float(scale), splits,
            float(options.filter_eps or 0.0))
    meta = dict(HAS_VALID=valid is not None, FILTER=options.filter_eps is not None,
                D_PAD=max(16, triton.next_power_of_2(dim)), **_common(x_mm, weight))
    if _use_fixed(options):
        blocks = _fixed(options, 16 if INTERPRETED else 32, 16 if INTERPRETED else 32)
        grid = (triton.cdiv(num_rows, blocks["BLOCK_B"]), splits)
        _grad_embedding_kernel[grid](*args, **meta, **blocks)
    else:
        _grad_embedding_tuned[lambda m: (triton.cdiv(num_rows, m["BLOCK_B"]), splits)](*args, **meta)
    return partial[0] if splits == 1 else partial.sum(dim=0)


def fused_grad_weight(
    x_mm: Tensor, weight: Tensor, target_col: Tensor, valid: Tensor | None, inv_norm: Tensor, lse: Tensor,
    grad_lse: Tensor, scale: float, options: KernelOptions,
) -> Tensor:
    """``d loss / d W`` ``[C, D]`` in the weight's dtype (zero rows for invalid columns)."""
    num_rows, dim = x_mm.shape
    num_cols = weight.shape[0]
    grad = torch.empty_like(weight)
    args = (x_mm, weight, target_col, valid if valid is not None else target_col, inv_norm, lse, grad_lse, grad,
            num_rows, num_cols, dim, x_mm.stride(0), weight.stride(0), grad.stride(0), float(scale),
            float(options.filter_eps or 0.0))
    meta = dict(HAS_VALID=valid is not None, FILTER=options.filter_eps is not None,
                D_PAD=max(16, triton.next_power_of_2(dim)), **_common(x_mm, weight))
    if _use_fixed(options):
        blocks = _fixed(options, 16 if INTERPRETED else 32, 16 if INTERPRETED else 32)
        _grad_weight_kernel[(triton.cdiv(num_cols, blocks["BLOCK_C"]),)](*args, **meta, **blocks)
    else:
        _grad_weight_tuned[lambda m: (triton.cdiv(num_cols, m["BLOCK_C"]),)](*args, **meta)
    return grad


# ------------------------------------------------------------------------------------------------------
# The autograd Function
# ------------------------------------------------------------------------------------------------------
def _backward_statistics(negative_lse: Tensor, grad_lse: Tensor, options: KernelOptions,
                          target_logits: TargetLogitsHolder | None) -> tuple[Tensor, Tensor]:
    """The ``(lse, dL/d lse)`` ``[B]`` float32 pair the backward kernels get.

    The kernels form ``p g`` with ``p = exp(logit - lse)``. The non-target lse with its gradient gives the
    exact gradient (the negatives' softmax times ``dL/d negative_lse`` equals the full softmax times
    ``dL/d lse``), but the filter would then test the negatives' softmax. When filtering and the target
    logits are known, the full ``lse = logaddexp(negative_lse, target)`` goes in with the gradient rescaled by
    ``exp(lse - negative_lse) = 1 / (1 - p_target)``: the same products, and the filter tests the full
    softmax (docs/classifier.md, "Gradient filtering"). Rows without negatives (``negative_lse = -inf``) get
    a zero gradient; a row whose rescale overflows float32 keeps the non-target pair (exact, stricter test).
    """
    negative_lse = negative_lse.contiguous()
    if options.filter_eps is None or target_logits is None or target_logits.value is None:
        return negative_lse, grad_lse
    target = target_logits.value.detach().to(torch.float32)
    if target.shape != negative_lse.shape:
        raise ValueError(f"TargetLogitsHolder.value must be [{negative_lse.shape[0]}] (one target logit per row), "
                         f"got {tuple(target.shape)}")
    full_lse = torch.logaddexp(negative_lse, target)  # [B]
    rescaled = grad_lse * torch.exp(full_lse - negative_lse)  # inf / NaN where negative_lse = -inf
    finite = torch.isfinite(rescaled)
    no_negatives = negative_lse == float("-inf")
    lse = torch.where(finite | no_negatives, full_lse, negative_lse)
    grad = torch.where(finite, rescaled, torch.where(no_negatives, 0.0, grad_lse))
    return lse.contiguous(), grad.contiguous()


def check_supported(embeddings: Tensor, weight: Tensor, compute_dtype: torch.dtype | None) -> str | None:
    """Why the fused kernels cannot take these inputs, or ``None`` when they can."""
    if weight.dtype not in _TL_DTYPES:
        return f"weight dtype {weight.dtype} (the kernels take float32, bfloat16 or float16 weights)"
    if compute_dtype is not None and compute_dtype not in _TL_DTYPES:
        return f"compute_dtype {compute_dtype} (the kernels compute in float32, bfloat16 or float16)"
    if torch.promote_types(weight.dtype, torch.float32) != torch.float32:
        return f"statistics dtype {torch.promote_types(weight.dtype, torch.float32)} (the kernels keep float32)"
    if weight.ndim != 2 or weight.shape[1] > MAX_EMBEDDING:
        return f"embedding size {weight.shape[-1]} (the kernels hold at most {MAX_EMBEDDING} per tile)"
    if weight.device.type != "cuda" and not INTERPRETED:
        return (f"device {weight.device} (Triton runs CUDA tensors; CPU tensors only through its interpreter, "
                f"TRITON_INTERPRET=1 set before triton is imported)")
    if embeddings.device != weight.device:
        return f"embeddings on {embeddings.device}, weights on {weight.device}"
    return None


class TritonLinearNegativeLogSumExp(torch.autograd.Function):
    """:class:`~distrib_face.parallel.linear_lse.LinearNegativeLogSumExp` on fused kernels.

    ``apply(embeddings, weight, target_cos, target_col, scale, chunks, valid=None, options=None,
    target_logits=None)``: ``(log sum over all ranks' non-target classes of exp(s cos_ij) [B], target cosines
    [B])``. As in the torch Function, ``target_cos`` (float32, detached, 0 where the class is on another
    rank) is computed before the margin's statistics and echoed as a differentiable output: the backward
    adds its gradient to ``dL/du`` and to the target rows of the kernels' ``dL/dW`` (an ``O(B x D)`` accumulate,
    :func:`~distrib_face.parallel.linear_lse.add_target_cosine_grad_`), so the weights never get a second
    dense gradient from an autograd gather. Of the :class:`~distrib_face.parallel.linear_lse.ChunkSpec`
    ``chunks`` the matmul dtype and the group are used (the kernels work in tiles, not chunks), plus
    :class:`KernelOptions`. One MAX and one SUM all-reduce of ``[B]``; no host synchronisation.
    ``target_logits``, a :class:`~distrib_face.parallel.kernels.TargetLogitsHolder` the caller fills after
    the forward (the logits the loss's ``logaddexp`` takes), lets the gradient filter test the full softmax;
    unused without a filter.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        saved: Any,
        embeddings: Tensor,
        weight: Tensor,
        target_cos: Tensor,
        target_col: Tensor,
        scale: float,
        chunks: ChunkSpec,
        valid: Tensor | None = None,
        options: KernelOptions | None = None,
        target_logits: TargetLogitsHolder | None = None,
    ) -> tuple[Tensor, Tensor]:
        compute_dtype = chunks.compute_dtype
        reason = check_supported(embeddings, weight, compute_dtype)
        if reason is not None:
            raise ValueError(f"the triton classifier kernels cannot take {reason}")
        if target_cos.dtype != torch.float32:
            raise ValueError(f"the triton classifier kernels keep float32 statistics, got {target_cos.dtype}")
        if valid is not None and valid.shape != (weight.shape[0],):
            raise ValueError(f"valid must be [{weight.shape[0]}] (one flag per weight row), got {tuple(valid.shape)}")
        options = options or KernelOptions()
        num_rows = embeddings.shape[0]
        x_norm = embeddings.norm(dim=1, keepdim=True).clamp_min(_EPS)
        x_unit = embeddings / x_norm  # [B, D] statistics dtype
        x_mm = x_unit.to(compute_dtype or torch.float32).contiguous()  # cast once, read by every tile
        weight_c = weight.contiguous()
        target_col = target_col.to(torch.int64).contiguous()
        valid_i8 = None if valid is None else valid.to(torch.int8).contiguous()
        stats = OnlineLogSumExp((num_rows,), torch.float32, embeddings.device)
        if num_rows and weight.shape[0]:
            part_max, part_sum, inv_norm = fused_forward(x_mm, weight_c, target_col, valid_i8, scale, options)
            stats.merge(part_max, part_sum)
        else:  # nothing to launch; the collectives below still run on every rank
            inv_norm = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
        negative_lse = stats.logsumexp(chunks.group)  # [B]: one MAX and one SUM all-reduce; -inf: no negatives
        saved.save_for_backward(x_unit, x_norm, x_mm, weight_c, inv_norm, target_cos, target_col, negative_lse,
                                valid_i8)
        saved.scale, saved.options, saved.target_logits = float(scale), options, target_logits
        saved.set_materialize_grads(False)  # an unused target cosine (the drop-in below) costs nothing
        return negative_lse, target_cos.clone()

    @staticmethod
    def backward(saved: Any, grad_lse: Tensor | None, grad_cos: Tensor | None) -> tuple[Tensor | None, ...]:
        x_unit, x_norm, x_mm, weight, inv_norm, target_cos, target_col, negative_lse, valid = saved.saved_tensors
        num_rows, num_cols = x_unit.shape[0], weight.shape[0]
        launch = num_rows > 0 and num_cols > 0
        if grad_lse is None:
            grad_lse = torch.zeros_like(negative_lse)
        lse, grad_lse = _backward_statistics(negative_lse, grad_lse.to(torch.float32).contiguous(), saved.options,
                                             saved.target_logits)
        args = (x_mm, weight, target_col, valid, inv_norm, lse, grad_lse, saved.scale, saved.options)
        grad_unit = grad_weight = None
        if saved.needs_input_grad[0]:
            grad_unit = fused_grad_embedding(*args) if launch else torch.zeros_like(x_unit)
        if saved.needs_input_grad[1]:
            grad_weight = fused_grad_weight(*args) if launch else torch.zeros_like(weight)
        if grad_cos is not None and launch:
            add_target_cosine_grad_(grad_unit, grad_weight, x_unit, weight, inv_norm, target_cos, target_col,
                                    grad_cos.to(torch.float32))
        grad_emb = None
        if grad_unit is not None:  # through u = x / ||x||: (I - u u^T) g / ||x||
            grad_emb = (grad_unit - x_unit * (grad_unit * x_unit).sum(dim=1, keepdim=True)) / x_norm
        return grad_emb, grad_weight, None, None, None, None, None, None, None


class TritonLinearMarginLogSumExp:
    """Drop-in for :class:`~distrib_face.parallel.linear_lse.LinearMarginLogSumExp` on fused kernels.

    ``apply(embeddings, weight, target_logits, target_col, scale, chunks, valid=None, options=None)``: the
    same inputs and result, plus :class:`KernelOptions`. Built, as the torch one is, from
    :class:`TritonLinearNegativeLogSumExp` (with no target cosines) and ``logaddexp`` with the target logits,
    which it also hands to the backward (a filled holder: the gradient filter tests the full softmax).
    """

    @staticmethod
    def apply(embeddings: Tensor, weight: Tensor, target_logits: Tensor, target_col: Tensor, scale: float,
              chunks: ChunkSpec, valid: Tensor | None = None, options: KernelOptions | None = None) -> Tensor:
        if target_logits.dtype != torch.float32:
            raise ValueError(f"the triton classifier kernels keep float32 statistics, got {target_logits.dtype}")
        negative_lse, _ = TritonLinearNegativeLogSumExp.apply(
            embeddings, weight, torch.zeros_like(target_logits.detach()), target_col, scale, chunks, valid, options,
            TargetLogitsHolder(target_logits.detach()),
        )
        return torch.logaddexp(target_logits, negative_lse)

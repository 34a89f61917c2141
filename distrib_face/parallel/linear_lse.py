"""Fast path of the sharded log-sum-exp for margins whose non-target logits are ``s * cos``.

NormFace, CosFace, ArcFace, the combined margin (and MagFace, ElasticFace) change only the target logit;
every other logit is ``s * x_b . w_c / (||x_b|| ||w_c||)``. For those the backward needs no autograd graph
per chunk: with ``u = x / ||x||``, ``raw = u W^T``, ``r_c = 1 / ||w_c||`` and ``D = dL/draw`` (the softmax
times the upstream gradient times ``s r_c``, 0 at each row's target),

    dL/du      = D W                                              (one matmul)
    dL/dw_c    = A_c - r_c^2 (A_c . w_c) w_c,   A = D^T u         (one matmul, one row-wise dot)

using ``sum_b D_bc raw_bc = A_c . w_c``: the row dots come from whichever operand is smaller, the
``[B, chunk]`` block (``B <= D``: one product and one matrix-vector product) or the ``[chunk, D]`` gradient (a
batched dot). The backward's element-wise work on the block is three passes (``exp(raw s r - shift)``, the
target mask, the column scale), and the matmuls read each chunk of weights once. The Function also owns
the gradient of each row's *target cosine* (an input computed before the margin's statistics, echoed as
an output): its contribution to ``dL/du`` and to the target rows
of ``dL/dW`` is added in the same backward, so the weights never receive a second dense gradient that
autograd would have to zero-fill and add. Rows whose target is on another rank carry ``target_col = -1``.

Everything has static shapes and runs without a host synchronisation; the masks are ``O(B)`` scatters.
The result equals the generic autograd path up to rounding (tested in float64).

Memory that a step touches is reused from step to step when a :class:`Workspace` is passed (eager mode):
the per-chunk ``[B, chunk]`` block and the gradient of the rows in use. On a CPU a fresh multi-megabyte
tensor costs a page fault per 4 KB on first touch (a fresh 51 MB gradient: 24 ms against 2.8 ms to
rewrite a reused one, measured here), which is more than the arithmetic it holds; CUDA's caching allocator
makes the workspace unnecessary there, and ``torch.compile`` plans its own buffers (pass ``None``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor

from distrib_face.parallel.softmax_stats import OnlineLogSumExp

_EPS = 1e-12


def mask_targets_(block: Tensor, target_col: Tensor, col0: int, value: float) -> Tensor:
    """Set ``block[i, target_col[i] - col0] = value`` for the rows whose target lies in this block, in place.

    ``block`` is ``[B, c]``; rows whose target is elsewhere are untouched. Fixed shape, ``O(B)``: one
    gather, one ``where``, one scatter, no ``nonzero`` and no host synchronisation.
    """
    col = target_col - col0
    here = (col >= 0) & (col < block.shape[1])
    safe = torch.where(here, col, 0)[:, None]  # [B, 1]
    current = block.gather(1, safe)
    return block.scatter_(1, safe, torch.where(here[:, None], torch.full_like(current, value), current))


@dataclass(frozen=True)
class ChunkSpec:
    """How a rank's loop over its class chunks runs: the one argument bundle of every chunked pass.

    Attributes:
        chunk_size: classes per chunk (bounds the ``[B, chunk]`` block a pass holds).
        compute_dtype: dtype of the cosine matmuls (``None``: the weights' own); statistics stay float32+.
        group: the process group whose ranks' statistics are combined (one MAX and one SUM all-reduce).
    """

    chunk_size: int
    compute_dtype: torch.dtype | None = None
    group: Any = None

    def ranges(self, num_classes: int) -> Iterator[tuple[int, int]]:
        """``(c0, c1)`` of each chunk of ``num_classes`` classes."""
        for c0 in range(0, num_classes, self.chunk_size):
            yield c0, min(c0 + self.chunk_size, num_classes)


class Workspace:
    """Scratch tensors reused across steps: each ``take`` returns a new tensor on a kept storage.

    A name's storage grows when asked for more and is never shrunk. Tensors handed out under one name
    alias each other: callers take a name again only when the previous tensor of that name is dead, or,
    for the gradient (:meth:`take_grad`), checked not to be the holder's current ``.grad``.
    """

    def __init__(self) -> None:
        self._storages: dict[str, torch.UntypedStorage] = {}

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """A contiguous ``shape`` tensor of ``dtype`` on ``device`` backed by the storage kept for ``name``."""
        nbytes = max(1, math.prod(shape)) * torch.empty((), dtype=dtype).element_size()
        storage = self._storages.get(name)
        if storage is None or storage.nbytes() < nbytes or storage.device != torch.device(device):
            storage = torch.UntypedStorage(nbytes, device=device)
            self._storages[name] = storage
        return torch.empty((0,), dtype=dtype, device=device).set_(storage, 0, shape)

    def take_grad(self, holder: Tensor) -> Tensor:
        """A buffer for ``holder``'s next gradient; a fresh one while ``holder.grad`` still uses the kept one
        (a second backward before ``zero_grad`` accumulates: the new gradient must not alias the old)."""
        storage = self._storages.get("grad")
        current = holder.grad
        if current is not None and storage is not None and current.untyped_storage().data_ptr() == storage.data_ptr():
            return torch.empty_like(holder)
        return self.take("grad", tuple(holder.shape), holder.dtype, holder.device)


def _block(workspace: Workspace | None, rows: int, cols: int, dtype: torch.dtype, device: torch.device,
           name: str = "block") -> Tensor:
    if workspace is None:
        return torch.empty((rows, cols), dtype=dtype, device=device)
    return workspace.take(name, (rows, cols), dtype, device)


def _matmul_dtype(weight: Tensor, compute_dtype: torch.dtype | None, stat_dtype: torch.dtype) -> torch.dtype:
    """The dtype both matmul operands are cast to: ``compute_dtype``, else the statistics dtype."""
    return compute_dtype if compute_dtype is not None else stat_dtype


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def add_target_cosine_grad_(
    grad_unit: Tensor | None,
    grad_weight: Tensor | None,
    x_unit: Tensor,
    weight: Tensor,
    inv_wnorm: Tensor,
    target_cos: Tensor,
    target_col: Tensor,
    grad_cos: Tensor,
) -> None:
    """Add the gradient of each row's target cosine ``cos_i = u_i . w_t r_t`` to ``dL/du`` and ``dL/dW``, in place.

    ``grad_unit`` ``[B, D]`` (``dL/du``, ``u = x / ||x||``) and ``grad_weight`` ``[R, D]`` (either ``None``: not
    wanted), ``x_unit`` ``[B, D]``, the rows ``[R, D]``, ``inv_wnorm = 1 / ||w_c||`` ``[R]`` (its dtype is the
    arithmetic's), the target cosines and their upstream gradient ``[B]``, the local target columns ``[B]``
    (``-1``: the class is on another rank, the row adds nothing). With ``w^ = w_t r_t``:
    ``d cos / d u = w^`` and ``d cos / d w_t = r_t (u - cos w^)``. ``O(B x D)``: the weight gradient gets a
    ``[B, D]`` block accumulated into its target rows (duplicates summed), never a second dense gradient.
    """
    here = target_col >= 0
    rows_t = torch.where(here, target_col, 0)  # [B]
    g_cos = torch.where(here, grad_cos, torch.zeros_like(grad_cos))  # [B]
    r_t = inv_wnorm.gather(0, rows_t)  # [B]
    w_hat = _cast(weight.index_select(0, rows_t), inv_wnorm.dtype) * r_t[:, None]  # [B, D]
    if grad_unit is not None:
        grad_unit.addcmul_(w_hat, g_cos[:, None])
    if grad_weight is not None:
        target_grad = (x_unit - target_cos[:, None] * w_hat) * (g_cos * r_t)[:, None]  # [B, D]
        grad_weight.index_put_((rows_t,), _cast(target_grad, grad_weight.dtype), accumulate=True)


class LinearNegativeLogSumExp(torch.autograd.Function):
    """``(log sum over all ranks' non-target classes of exp(s cos_ij), target cosines)`` with an analytic backward.

    Inputs: gathered raw embeddings ``[B, D]``, this rank's rows in use ``[R, D]`` (any float dtype: fp32,
    fp64, bf16 storage), each row's target cosine ``[B]`` (detached, 0 where not owned), each row's local
    target column ``[B]`` (``-1`` when not on this rank), the scale ``s``, the chunk size, the matmul dtype and
    the group (the three as a :class:`ChunkSpec`), a :class:`Workspace` (or ``None``) and optionally ``valid``
    ``[R]`` (bool): columns marked
    False contribute nothing and get a zero weight gradient (``None``: all count). Outputs: the non-target
    log-sum-exp ``[B]`` (``-inf`` for a row with no negatives anywhere) and the target cosines (equal to the
    input, differentiable). The statistics are combined with one MAX and one SUM all-reduce of ``[B]``.
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
        workspace: Workspace | None = None,
        valid: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        stat_dtype = target_cos.dtype
        if valid is not None and valid.shape != (weight.shape[0],):
            raise ValueError(f"valid must be [{weight.shape[0]}] (one flag per weight row), got {tuple(valid.shape)}")
        invalid = None if valid is None else ~valid.to(torch.bool)
        mm_dtype = _matmul_dtype(weight, chunks.compute_dtype, stat_dtype)
        x_norm = embeddings.norm(dim=1, keepdim=True).clamp_min(_EPS)  # [B, 1]
        x_unit = embeddings / x_norm  # [B, D]
        x_mm = _cast(x_unit, mm_dtype)
        num_rows, num_classes = embeddings.shape[0], weight.shape[0]
        inv_wnorm = torch.empty(num_classes, dtype=stat_dtype, device=weight.device)  # [R]
        stats = OnlineLogSumExp((num_rows,), stat_dtype, embeddings.device)
        for c0, c1 in chunks.ranges(num_classes):
            w = weight[c0:c1]
            inv = inv_wnorm[c0:c1]
            torch.reciprocal(torch.linalg.vector_norm(w, dim=1, dtype=stat_dtype).clamp_min_(_EPS), out=inv)
            logits = _logits(x_mm, w, mm_dtype, stat_dtype, workspace)  # [B, c]
            logits.mul_(inv * scale)
            mask_targets_(logits, target_col, c0, float("-inf"))
            if invalid is not None:
                logits.masked_fill_(invalid[c0:c1], float("-inf"))
            stats.update(logits, consume=True)
        negative_lse = stats.logsumexp(chunks.group)  # [B]
        saved.save_for_backward(x_unit, x_norm, weight, inv_wnorm, target_cos, target_col, negative_lse, invalid)
        saved.scale, saved.chunks, saved.workspace = scale, chunks, workspace
        return negative_lse, target_cos.clone()

    @staticmethod
    def backward(saved: Any, grad_lse: Tensor, grad_cos: Tensor) -> tuple[Tensor | None, ...]:
        x_unit, x_norm, weight, inv_wnorm, target_cos, target_col, negative_lse, invalid = saved.saved_tensors
        stat_dtype = negative_lse.dtype
        mm_dtype = _matmul_dtype(weight, saved.chunks.compute_dtype, stat_dtype)
        scale = saved.scale
        # g_b exp(logit - lse_b) = sign(g_b) exp(logit - (lse_b - log|g_b|)): the row factor goes into the
        # shift (one pass fewer over the block) and its sign onto the [B, D] operands. A row without
        # negatives (lse = -inf) has only -inf logits, so any finite shift serves it.
        sign = torch.where(grad_lse < 0, -1.0, 1.0).to(stat_dtype)  # [B]
        # (A NaN statistic stays NaN: a diverged state must not pass for an empty row.)
        finite_lse = torch.where(negative_lse == float("-inf"), torch.zeros_like(negative_lse), negative_lse)
        neg_shift = (torch.log(grad_lse.abs()) - finite_lse)[:, None]  # [B, 1]
        x_signed = _cast(x_unit * sign[:, None], mm_dtype)  # [B, D]
        grad_unit = torch.zeros_like(x_unit)
        want_weight = saved.needs_input_grad[1]
        workspace = saved.workspace
        grad_weight = None
        if want_weight:
            grad_weight = workspace.take_grad(weight) if workspace is not None else torch.empty_like(weight)
        x_mm = _cast(x_unit, mm_dtype)
        num_rows = x_unit.shape[0]
        exact = mm_dtype == stat_dtype == weight.dtype  # no casts: matmuls write straight into their outputs
        for c0, c1 in saved.chunks.ranges(weight.shape[0]):
            w = weight[c0:c1]
            w_mm = _cast(w, mm_dtype)  # cast once for the three matmuls that read the chunk
            coef = inv_wnorm[c0:c1] * scale  # [c]: d logit / d raw
            raw = _logits(x_mm, w, mm_dtype, stat_dtype, workspace, w_mm)  # [B, c] raw cosines
            # Keep raw for the row dots when the [B, c] block is the smaller operand (B <= D); else the dots
            # come from the [c, D] weight gradient and the block is reused in place.
            dots_from_block = grad_weight is not None and num_rows <= x_unit.shape[1]
            block = _block(workspace, num_rows, c1 - c0, stat_dtype, raw.device, "block2") if dots_from_block else raw
            torch.addcmul(neg_shift, raw, coef[None, :], out=block).exp_()  # |g| softmax
            mask_targets_(block, target_col, c0, 0.0)  # the target's share goes through grad_cos
            if invalid is not None:
                block.masked_fill_(invalid[c0:c1], 0.0)
            block.mul_(coef)  # |dL/draw|
            if exact:
                grad_unit.addmm_(block, w)
            else:
                grad_unit += _cast(_cast(block, mm_dtype) @ w_mm, stat_dtype)
            if grad_weight is not None:
                if exact:
                    first = torch.mm(block.t(), x_signed, out=grad_weight[c0:c1])  # [c, D]: A
                    w_stat = w
                else:
                    first = _cast(_cast(block, mm_dtype).t() @ x_signed, stat_dtype)
                    w_stat = w_mm if w_mm.dtype == stat_dtype else _cast(w, stat_dtype)  # one upcast per chunk
                if dots_from_block:  # A_c . w_c = sum_b sign_b |dL/draw_bc| raw_bc
                    dots = torch.mv(torch.mul(block, raw, out=raw).t(), sign)
                else:  # the row-wise dots as a batched matmul: no [c, D] product temporary
                    dots = torch.einsum("cd,cd->c", first, w_stat)
                dots.mul_(inv_wnorm[c0:c1].square())  # [c]
                first.addcmul_(w_stat, dots[:, None], value=-1.0)
                if not exact:
                    grad_weight[c0:c1].copy_(first)
        grad_unit.mul_(sign[:, None])
        add_target_cosine_grad_(grad_unit, grad_weight, x_unit, weight, inv_wnorm, target_cos, target_col, grad_cos)
        # Through u = x / ||x||: (I - u u^T) g / ||x||.
        grad_emb = (grad_unit - x_unit * (grad_unit * x_unit).sum(dim=1, keepdim=True)) / x_norm
        return grad_emb, grad_weight, None, None, None, None, None, None


class LinearMarginLogSumExp:
    """``log(exp(T_i) + sum over all ranks' non-target classes of exp(s cos_ij))``: the full log-sum-exp.

    The contract the fused Triton kernels implement (``kernels.TritonLinearMarginLogSumExp``), kept as the
    torch reference for them: raw embeddings ``[B, D]``, the rows ``[R, D]``, the target logits ``[B]``
    (summed over ranks, with gradient), each row's local target column (``-1`` elsewhere), the scale, a
    :class:`ChunkSpec` (the chunk size, the matmul dtype, the group) and optionally ``valid``. Built from
    :class:`LinearNegativeLogSumExp` and ``logaddexp``, so both paths share one implementation.
    """

    @staticmethod
    def apply(embeddings: Tensor, weight: Tensor, target_logits: Tensor, target_col: Tensor, scale: float,
              chunks: ChunkSpec, valid: Tensor | None = None) -> Tensor:
        negative_lse, _ = LinearNegativeLogSumExp.apply(
            embeddings, weight, torch.zeros_like(target_logits.detach()), target_col, scale, chunks, None, valid,
        )
        return torch.logaddexp(target_logits, negative_lse)


def _logits(x_mm: Tensor, w: Tensor, mm_dtype: torch.dtype, stat_dtype: torch.dtype, workspace: Workspace | None,
            w_mm: Tensor | None = None) -> Tensor:
    """``x_mm @ w^T`` as a ``[B, c]`` block of ``stat_dtype`` (in the workspace's block when no cast is needed)."""
    w_mm = _cast(w, mm_dtype) if w_mm is None else w_mm
    if mm_dtype != stat_dtype:
        return _cast(x_mm @ w_mm.t(), stat_dtype)
    out = _block(workspace, x_mm.shape[0], w.shape[0], stat_dtype, x_mm.device)
    return torch.mm(x_mm, w_mm.t(), out=out)

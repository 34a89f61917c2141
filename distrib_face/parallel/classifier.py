"""The class-sharded margin-softmax classifier (model parallel over classes, Partial FC sampling).

Who holds what, per step (W ranks, B_r samples on rank r, B = sum B_r, C classes split in contiguous
ranges of sizes differing by at most one):

1. every rank all-gathers the embeddings ``[B, D]`` and labels ``[B]`` (one all-gather each; the
   embeddings' backward is one reduce-scatter);
2. rank r holds class weights ``[C_r (x K sub-centres), D]`` and computes cosines ``[B, C_r]`` in class
   chunks, never the whole ``[B, C]`` matrix;
3. the target logit of sample i is computed by the rank owning its class, with the margin, and summed
   over ranks (a ``[B]`` all-reduce);
4. the log-sum-exp over non-target classes is assembled from per-rank row max and sum of exponentials
   (all-reduce MAX, then SUM, ``[B]`` each);
5. loss = mean_i (logsumexp_i - target_logit_i), identical on every rank. No probability floor.

The backward recomputes each chunk's logits (like activation checkpointing), so peak memory is
``O(B x chunk_size)`` rather than ``O(B x C_r)``; gradients are exact (the margin's derivative included).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from distrib_face.losses.margins import Margin, MarginContext, MarginSpec, StepStats, create_margin
from distrib_face.parallel.collectives import (
    all_gather_variable,
    all_reduce_sum_replicated_grad,
    all_reduce_tensor,
    gather_with_grad,
)
from distrib_face.parallel.context import group_rank_and_size
from distrib_face.parallel.kernels import (
    check_kernel,
    filter_threshold,
    linear_margin_logsumexp,
    require_triton,
)
from distrib_face.parallel.softmax_stats import OnlineLogSumExp
from distrib_face.parallel.shard import class_range, init_class_rows

logger = logging.getLogger(__name__)

_EPS = 1e-12


def _normalize(x: Tensor) -> tuple[Tensor, Tensor]:
    norms = x.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    return x / norms, norms


def _cosines(
    embeddings: Tensor, weight: Tensor, margin: Margin, num_subcenters: int, compute_dtype: torch.dtype | None
) -> tuple[Tensor, Tensor]:
    """Cosines ``[B, c]`` between rows and classes (max over sub-centres) and the feature norms ``[B, 1]``.

    When the margin does not normalise weights the "cosine" carries the weight norm (a plain dot product
    divided by the feature norm), which is what unnormalised-weight margins expect.
    """
    x_unit, x_norm = _normalize(embeddings)
    w = _normalize(weight)[0] if margin.normalize_weights else weight
    out_dtype = torch.promote_types(embeddings.dtype, torch.float32)
    if compute_dtype is not None and compute_dtype != x_unit.dtype:
        cos = (x_unit.to(compute_dtype) @ w.to(compute_dtype).t()).to(out_dtype)
    else:
        cos = (x_unit @ w.t()).to(out_dtype)
    if num_subcenters > 1:
        cos = cos.view(cos.shape[0], -1, num_subcenters).amax(dim=-1)
    return cos, x_norm.to(out_dtype)


def _chunk_logits(
    embeddings: Tensor,
    weight_chunk: Tensor,
    chunk_start: int,
    target_col: Tensor,
    margin: Margin,
    ctx: MarginContext,
    num_subcenters: int,
    compute_dtype: torch.dtype | None,
) -> Tensor:
    """Non-target logits ``[B, c]`` of one class chunk; each row's own target (if here) is ``-inf``."""
    cos, x_norm = _cosines(embeddings, weight_chunk, margin, num_subcenters, compute_dtype)
    logits = margin.negative_logits(cos, MarginContext(x_norm, ctx.labels, ctx.target_cos))
    cols = target_col - chunk_start
    here = (cols >= 0) & (cols < logits.shape[1])
    if bool(here.any()):
        mask = torch.zeros_like(logits, dtype=torch.bool)
        rows = here.nonzero(as_tuple=True)[0]
        mask[rows, cols[rows]] = True
        logits = logits.masked_fill(mask, float("-inf"))
    return logits


def _target_cosines(
    embeddings: Tensor, target_weight: Tensor, margin: Margin
) -> tuple[Tensor, Tensor, Tensor]:
    """Cosine ``[n]`` of each row with its own class ``[n, K, D]`` (max over sub-centres), feature norms
    ``[n, 1]``, and the norm ``[n]`` of the weight row that gave the max (L-Softmax needs ``||W_y||``).

    Always in the statistics dtype: the target logit is the one number per row that must be exact.
    """
    x_unit, x_norm = _normalize(embeddings)
    w = _normalize(target_weight)[0] if margin.normalize_weights else target_weight
    per_center = torch.einsum("nd,nkd->nk", x_unit, w.to(x_unit.dtype))  # [n, K]
    best = per_center.detach().argmax(dim=-1, keepdim=True)
    w_norms = target_weight.norm(dim=-1).to(x_unit.dtype).gather(1, best).squeeze(1)
    return per_center.amax(dim=-1), x_norm, w_norms


@torch.no_grad()
def _global_negative_logsumexp(
    embeddings: Tensor,
    weight: Tensor,
    target_col: Tensor,
    margin: Margin,
    mctx: MarginContext,
    num_subcenters: int,
    chunk_size: int,
    compute_dtype: torch.dtype | None,
    group: Any,
) -> Tensor:
    """``log sum_i sum_{j != y_i} exp(negative logit_ij)`` over every row and every rank's classes (0-d).

    A statistics pass for margins that need it (AdaCos), with the margin's current state and no gradient.
    Every rank sees the same rows; each sums its own classes; then one MAX and one SUM all-reduce of a scalar.
    """
    stat_dtype = torch.promote_types(weight.dtype, torch.float32)
    stats = OnlineLogSumExp((), stat_dtype, embeddings.device)
    for _, _, logits in _iter_chunks(embeddings, weight, target_col, margin, mctx, num_subcenters, chunk_size,
                                     compute_dtype):
        stats.update(logits.to(stat_dtype).reshape(-1), consume=True)
    return stats.logsumexp(group)


def _iter_chunks(
    embeddings: Tensor,
    weight: Tensor,
    target_col: Tensor,
    margin: Margin,
    mctx: MarginContext,
    num_subcenters: int,
    chunk_size: int,
    compute_dtype: torch.dtype | None,
) -> Iterator[tuple[int, int, Tensor]]:
    """``(c0, c1, non-target logits [B, c1 - c0])`` for each class chunk of this rank's shard."""
    num_classes_here = weight.shape[0] // num_subcenters
    for c0 in range(0, num_classes_here, chunk_size):
        c1 = min(c0 + chunk_size, num_classes_here)
        yield c0, c1, _chunk_logits(
            embeddings, weight[c0 * num_subcenters: c1 * num_subcenters], c0, target_col, margin, mctx,
            num_subcenters, compute_dtype,
        )


class _ShardedNegativeLogSumExp(torch.autograd.Function):
    """log(exp(T_i) + sum over all ranks' non-target classes of exp(logit_ij)), chunked and recomputed."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        embeddings: Tensor,
        weight: Tensor,
        target_logits: Tensor,
        target_col: Tensor,
        margin: Margin,
        mctx: MarginContext,
        num_subcenters: int,
        chunk_size: int,
        compute_dtype: torch.dtype | None,
        group: Any,
    ) -> Tensor:
        stat_dtype = target_logits.dtype
        stats = OnlineLogSumExp((embeddings.shape[0],), stat_dtype, embeddings.device)
        for _, _, logits in _iter_chunks(embeddings, weight, target_col, margin, mctx, num_subcenters, chunk_size,
                                         compute_dtype):
            stats.update(logits.to(stat_dtype), consume=True)
        lse = stats.logsumexp(group, extra=target_logits)  # one MAX and one SUM all-reduce of [B]
        ctx.save_for_backward(embeddings, weight, target_logits, target_col, lse)
        ctx.margin, ctx.mctx, ctx.num_subcenters = margin, mctx, num_subcenters
        ctx.chunk_size, ctx.compute_dtype = chunk_size, compute_dtype
        return lse

    @staticmethod
    def backward(ctx: Any, grad_lse: Tensor) -> tuple[Tensor | None, ...]:
        embeddings, weight, target_logits, target_col, lse = ctx.saved_tensors
        k = ctx.num_subcenters
        grad_target = grad_lse * torch.exp(target_logits - lse)
        grad_embeddings = torch.zeros_like(embeddings)
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        emb_leaf = embeddings.detach().requires_grad_(True)
        for c0 in range(0, weight.shape[0] // k, ctx.chunk_size):
            c1 = min(c0 + ctx.chunk_size, weight.shape[0] // k)
            w_leaf = weight[c0 * k: c1 * k].detach().requires_grad_(True)
            with torch.enable_grad():
                logits = _chunk_logits(
                    emb_leaf, w_leaf, c0, target_col, ctx.margin, ctx.mctx, k, ctx.compute_dtype
                )
                probs = torch.exp(logits.detach().to(lse.dtype) - lse[:, None]) * grad_lse[:, None]
                g_emb, g_w = torch.autograd.grad(logits, (emb_leaf, w_leaf), probs.to(logits.dtype))
            grad_embeddings += g_emb
            if grad_weight is not None:
                grad_weight[c0 * k: c1 * k] = g_w
        return grad_embeddings, grad_weight, grad_target, None, None, None, None, None, None, None


class ShardedMarginClassifier(nn.Module):
    """A margin-softmax classifier whose weight matrix is split by class over the ranks of ``group``.

    Args:
        num_classes: total number of identities ``C``.
        embedding_size: embedding dimension ``D``.
        margin: a margin name (paper defaults), a :class:`MarginSpec`, or a :class:`Margin`.
        sample_rate: Partial FC rate; ``< 1`` keeps each step every class of this shard that is a target
            in the global batch plus uniformly sampled negatives, up to ``ceil(sample_rate * C_local)``.
        group: the process group of the class shards (``None``: the default group or a world of 1).
        dtype: storage dtype of the weights (float32; float64 for reference tests).
        device: where the shard lives.
        seed: weights are ``N(0, 0.01)`` drawn per class block from ``seed``: the same matrix at any world size.
        chunk_size: classes per chunk of the logit computation (bounds peak memory).
        compute_dtype: dtype of the cosine matmuls (e.g. ``torch.bfloat16``); softmax statistics stay float32+.
        embedding_grad_scale: multiplies the embeddings' gradient; set it to the data-parallel world size
            when the backbone's gradients are averaged over ranks (DeepSpeed / DDP), as arcface_torch does.
        num_subcenters: ``K`` sub-centres per class (kept on the same shard; the cosine is their max);
            ``None``: the margin's (3 for ``subcenter_arcface``, else 1).
        kernel: how margins with ``s * cos`` non-target logits are computed: ``"torch"`` (chunked
            matmuls), ``"triton"`` (fused kernels, :mod:`distrib_face.parallel.kernels`; needs triton and
            CUDA tensors) or ``"auto"`` (triton on CUDA when it is importable, else torch).
        grad_filter: the fused backward skips class tiles whose softmax probabilities are all below this
            (``"auto"``: ``eps(compute dtype) / 32``, as Cut Cross-Entropy); ``None`` (default): exact.

    Example:
        ``loss = clf(local_embeddings, local_labels)`` returns the mean loss over the global batch,
        identical on every rank; ``loss.backward()`` fills the local embeddings' gradient with exactly
        what one process holding the whole matrix would compute.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: str | MarginSpec | Margin = "arcface",
        sample_rate: float = 1.0,
        group: dist.ProcessGroup | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        seed: int = 0,
        chunk_size: int = 65536,
        compute_dtype: torch.dtype | None = None,
        embedding_grad_scale: float = 1.0,
        num_subcenters: int | None = None,
        kernel: str = "auto",
        grad_filter: float | str | None = None,
    ) -> None:
        super().__init__()
        self.kernel, self.grad_filter = check_kernel(kernel), grad_filter
        filter_threshold(grad_filter, compute_dtype)  # validates it
        if kernel == "triton":
            require_triton("ShardedMarginClassifier(kernel='triton')")
        if grad_filter is not None and kernel == "torch":
            raise ValueError(f"grad_filter={grad_filter!r} filters the fused triton backward; kernel='torch' is exact")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.margin = create_margin(margin)
        margin_k = int(getattr(self.margin, "num_subcenters", 1))
        if num_subcenters is None:
            num_subcenters = margin_k
        elif margin_k != 1 and num_subcenters != margin_k:
            raise ValueError(f"num_subcenters={num_subcenters} but margin {self.margin.spec.name!r} wants {margin_k}")
        if num_subcenters < 1:
            raise ValueError(f"num_subcenters must be >= 1, got {num_subcenters}")
        self.group = group
        self.rank, self.world_size = group_rank_and_size(group)
        self.num_classes, self.embedding_size = int(num_classes), int(embedding_size)
        self.class_range = class_range(self.num_classes, self.rank, self.world_size)
        self.num_local_classes = self.class_range[1] - self.class_range[0]
        self.num_subcenters = int(num_subcenters)
        self.sample_rate, self.seed, self.chunk_size = float(sample_rate), int(seed), int(chunk_size)
        self.compute_dtype, self.embedding_grad_scale = compute_dtype, float(embedding_grad_scale)
        self.margin.set_num_classes(self.num_classes)
        # A margin with a per-class bias (plain softmax) gets it as an extra weight column, fed by a constant-1
        # feature: the shard, its optimizer state and Partial FC sampling then cover the bias with no extra code.
        self.bias_columns = 1 if getattr(self.margin, "uses_bias", False) else 0
        device = torch.device(device) if device is not None else torch.device("cpu")
        rows = init_class_rows(
            *self.class_range, (self.num_subcenters, self.embedding_size + self.bias_columns), seed=self.seed,
            dtype=dtype, device=device,
        )
        if self.bias_columns:
            rows[..., -1] = 0.0
        # [C_local * K, D (+1 bias column)]: sub-centres of a class are adjacent rows.
        self.weight = nn.Parameter(rows.view(-1, rows.shape[-1]))
        self.register_buffer("sample_step", torch.zeros((), dtype=torch.int64), persistent=True)
        self._active: tuple[Tensor | None, Tensor] | None = None
        #: Use the analytic-backward path for margins whose non-target logits are ``s * cos`` (see linear_lse).
        self.fast_path = True

    # ----------------------------------------------------------------------------------------------
    @property
    def num_sampled(self) -> int:
        """Classes this shard keeps per step when sampling: ``ceil(sample_rate * C_local)``."""
        return min(self.num_local_classes, math.ceil(self.sample_rate * self.num_local_classes))

    def sample_classes(self, local_positive: Tensor, step: int) -> Tensor:
        """Sorted local class indices kept this step: all ``local_positive`` plus uniform negatives.

        Deterministic in ``(seed, rank, step)``, so a resumed run samples what the original would have.
        """
        num = self.num_sampled
        positives = torch.unique(local_positive)
        if positives.numel() >= num:
            return positives
        gen = torch.Generator(device=self.weight.device)
        gen.manual_seed((self.seed * 1_000_003 + self.rank * 7919 + step * 104_729 + 1) & ((1 << 63) - 1))
        scores = torch.rand(self.num_local_classes, generator=gen, device=self.weight.device)
        scores[positives] = 2.0  # above any uniform draw: positives always win
        return torch.topk(scores, num, sorted=False).indices.sort().values

    def active_rows(self) -> tuple[Tensor | None, Tensor]:
        """``(class_index, weight_rows)`` of the last forward: ``class_index`` None means all classes.

        With sampling, ``weight_rows`` is a leaf holding the sampled rows; its ``.grad`` is what
        :class:`~distrib_face.parallel.optim.ShardOptimizer` applies to those rows only.
        """
        if self._active is None:
            raise RuntimeError("no forward pass yet: active_rows() is defined after calling the classifier")
        return self._active

    # ----------------------------------------------------------------------------------------------
    def forward(self, local_embeddings: Tensor, local_labels: Tensor) -> Tensor:
        """Mean margin-softmax loss over the global batch.

        Args:
            local_embeddings: ``[B_local, D]`` this rank's embeddings (any ``B_local``, 0 allowed).
            local_labels: ``[B_local]`` their global class labels in ``[0, num_classes)``.

        Returns:
            A scalar, the same on every rank.
        """
        if local_embeddings.ndim != 2 or local_embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"embeddings must be [B, {self.embedding_size}], got {tuple(local_embeddings.shape)}"
            )
        if local_labels.shape[0] != local_embeddings.shape[0]:
            raise ValueError(f"{local_labels.shape[0]} labels for {local_embeddings.shape[0]} embeddings")
        stat_dtype = torch.promote_types(self.weight.dtype, torch.float32)
        embeddings = gather_with_grad(local_embeddings.to(stat_dtype), self.group, self.embedding_grad_scale)
        labels = all_gather_variable(local_labels.to(torch.int64), self.group)  # [B_global]
        global_norms = embeddings.detach().norm(dim=1)  # [B_global], for margins that use batch statistics
        if self.bias_columns:
            embeddings = torch.cat([embeddings, embeddings.new_ones(embeddings.shape[0], 1)], dim=1)
        if bool(((labels < 0) | (labels >= self.num_classes)).any()):
            bad = labels[(labels < 0) | (labels >= self.num_classes)][0].item()
            raise ValueError(f"label {bad} outside [0, {self.num_classes})")
        start, stop = self.class_range
        owned = (labels >= start) & (labels < stop)
        local_target = torch.where(owned, labels - start, torch.zeros_like(labels))
        k = self.num_subcenters

        if self.training and self.sample_rate < 1.0:
            index = self.sample_classes(local_target[owned], int(self.sample_step))
            rows = (index[:, None] * k + torch.arange(k, device=index.device)).reshape(-1)
            weight = self.weight.detach()[rows].requires_grad_(True)  # [C_sampled * K, D] leaf
            local_target = torch.searchsorted(index, local_target)
            self.sample_step += 1
        else:
            index, weight = None, self.weight
        self._active = (index, weight)
        target_col = torch.where(owned, local_target, torch.full_like(local_target, -1))

        # Target logits on the owning rank, with autograd; summed over ranks into [B_global].
        own_rows = owned.nonzero(as_tuple=True)[0]
        target_weight = weight.view(-1, k, weight.shape[-1])[local_target[own_rows]]  # [n, K, D]
        cos_target, norms, w_norms = _target_cosines(embeddings[own_rows], target_weight, self.margin)
        num_rows = embeddings.shape[0]
        cos_all = torch.zeros(num_rows, dtype=stat_dtype, device=embeddings.device)
        cos_all = all_reduce_tensor(cos_all.index_put((own_rows,), cos_target.detach()), "sum", self.group)
        neg_ctx = MarginContext(feature_norms=None, labels=labels, target_cos=cos_all)  # norms: per chunk
        negative_lse = None
        if getattr(self.margin, "needs_negative_stats", False):
            negative_lse = _global_negative_logsumexp(
                embeddings, weight, target_col, self.margin, neg_ctx, k, self.chunk_size, self.compute_dtype,
                self.group,
            )
        self.margin.begin_step(StepStats(
            target_cos=cos_all, training=self.training, feature_norms=global_norms, negative_logsumexp=negative_lse,
        ))
        mctx = MarginContext(
            feature_norms=norms, labels=labels[own_rows], target_cos=cos_all[own_rows], row_index=own_rows,
            weight_norms=w_norms,
        )
        target_local = self.margin.target_logit(cos_target, mctx).to(stat_dtype)
        target_logits = torch.zeros(num_rows, dtype=stat_dtype, device=embeddings.device).index_put(
            (own_rows,), target_local
        )
        target_logits = all_reduce_sum_replicated_grad(target_logits, self.group)

        linear_scale = self.margin.linear_scale if self.fast_path else None
        if linear_scale is not None and k == 1 and not self.bias_columns:
            lse = linear_margin_logsumexp(
                self.kernel, embeddings, weight, target_logits, target_col, linear_scale, self.chunk_size,
                self.compute_dtype, self.group, grad_filter=self.grad_filter,
            )
        else:
            lse = _ShardedNegativeLogSumExp.apply(
                embeddings, weight, target_logits, target_col, self.margin, neg_ctx, k, self.chunk_size,
                self.compute_dtype, self.group,
            )
        return (lse - target_logits).mean() if num_rows else lse.sum()

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
            f"class_range={self.class_range}, rank={self.rank}/{self.world_size}, "
            f"sample_rate={self.sample_rate}, num_subcenters={self.num_subcenters}, margin={self.margin.spec.name}"
        )

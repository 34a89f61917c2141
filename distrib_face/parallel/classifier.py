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
from dataclasses import dataclass
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
    TargetLogitsHolder,
    check_kernel,
    filter_threshold,
    linear_negative_logsumexp,
    require_triton,
    resolve_kernel,
)
from distrib_face.parallel.linear_lse import ChunkSpec, Workspace
from distrib_face.parallel.rows import gather_rows, scatter_rows_
from distrib_face.parallel.sampling import (
    new_marker,
    num_draws,
    num_sampled_classes,
    num_slots,
    sample_slots,
    step_keys,
    stream_key,
)
from distrib_face.parallel.shard import class_range, init_class_rows
from distrib_face.parallel.softmax_stats import OnlineLogSumExp

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
    out_dtype = torch.promote_types(embeddings.dtype, torch.float32)
    weight = weight.to(out_dtype)  # low-precision storage (bf16): norms and cosines in the statistics dtype
    x_unit, x_norm = _normalize(embeddings)
    w = _normalize(weight)[0] if margin.normalize_weights else weight
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
    mctx: MarginContext,
    num_subcenters: int,
    compute_dtype: torch.dtype | None,
) -> Tensor:
    """Non-target logits ``[B, c]`` of one class chunk; each row's own target (if here) is ``-inf``.

    The mask is a comparison with the chunk's columns (fixed shape, no host synchronisation); autograd
    differentiates through ``masked_fill``.
    """
    cos, x_norm = _cosines(embeddings, weight_chunk, margin, num_subcenters, compute_dtype)
    logits = margin.negative_logits(cos, MarginContext(x_norm, mctx.labels, mctx.target_cos))
    columns = torch.arange(chunk_start, chunk_start + logits.shape[1], device=logits.device)  # [c]
    return logits.masked_fill(target_col[:, None] == columns[None, :], float("-inf"))


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
    chunks: ChunkSpec,
) -> Tensor:
    """``log sum_i sum_{j != y_i} exp(negative logit_ij)`` over every row and every rank's classes (0-d).

    A statistics pass for margins that need it (AdaCos), with the margin's current state and no gradient.
    Every rank sees the same rows; each sums its own classes; then one MAX and one SUM all-reduce of a scalar.
    """
    stat_dtype = torch.promote_types(weight.dtype, torch.float32)
    stats = OnlineLogSumExp((), stat_dtype, embeddings.device)
    for _, _, logits in _iter_chunks(embeddings, weight, target_col, margin, mctx, num_subcenters, chunks):
        stats.update(logits.to(stat_dtype).reshape(-1), consume=True)
    return stats.logsumexp(chunks.group)


def _iter_chunks(
    embeddings: Tensor,
    weight: Tensor,
    target_col: Tensor,
    margin: Margin,
    mctx: MarginContext,
    num_subcenters: int,
    chunks: ChunkSpec,
) -> Iterator[tuple[int, int, Tensor]]:
    """``(c0, c1, non-target logits [B, c1 - c0])`` for each class chunk of this rank's shard."""
    for c0, c1 in chunks.ranges(weight.shape[0] // num_subcenters):
        yield c0, c1, _chunk_logits(
            embeddings, weight[c0 * num_subcenters: c1 * num_subcenters], c0, target_col, margin, mctx,
            num_subcenters, chunks.compute_dtype,
        )


class _ShardedNegativeLogSumExp(torch.autograd.Function):
    """log(exp(T_i) + sum over all ranks' non-target classes of exp(logit_ij)), chunked and recomputed."""

    @staticmethod
    def forward(  # type: ignore[override]
        saved: Any,
        embeddings: Tensor,
        weight: Tensor,
        target_logits: Tensor,
        target_col: Tensor,
        margin: Margin,
        mctx: MarginContext,
        num_subcenters: int,
        chunks: ChunkSpec,
    ) -> Tensor:
        stat_dtype = target_logits.dtype
        stats = OnlineLogSumExp((embeddings.shape[0],), stat_dtype, embeddings.device)
        for _, _, logits in _iter_chunks(embeddings, weight, target_col, margin, mctx, num_subcenters, chunks):
            stats.update(logits.to(stat_dtype), consume=True)
        lse = stats.logsumexp(chunks.group, extra=target_logits)  # one MAX and one SUM all-reduce of [B]
        saved.save_for_backward(embeddings, weight, target_logits, target_col, lse)
        saved.margin, saved.mctx, saved.num_subcenters, saved.chunks = margin, mctx, num_subcenters, chunks
        return lse

    @staticmethod
    def backward(saved: Any, grad_lse: Tensor) -> tuple[Tensor | None, ...]:
        embeddings, weight, target_logits, target_col, lse = saved.saved_tensors
        k = saved.num_subcenters
        grad_target = grad_lse * torch.exp(target_logits - lse)
        grad_embeddings = torch.zeros_like(embeddings)
        grad_weight = torch.zeros_like(weight) if saved.needs_input_grad[1] else None
        emb_leaf = embeddings.detach().requires_grad_(True)
        for c0, c1 in saved.chunks.ranges(weight.shape[0] // k):
            w_leaf = weight[c0 * k: c1 * k].detach().requires_grad_(True)
            with torch.enable_grad():
                logits = _chunk_logits(
                    emb_leaf, w_leaf, c0, target_col, saved.margin, saved.mctx, k, saved.chunks.compute_dtype
                )
                probs = torch.exp(logits.detach().to(lse.dtype) - lse[:, None]) * grad_lse[:, None]
                g_emb, g_w = torch.autograd.grad(logits, (emb_leaf, w_leaf), probs.to(logits.dtype))
            grad_embeddings += g_emb
            if grad_weight is not None:
                grad_weight[c0 * k: c1 * k] = g_w
        return grad_embeddings, grad_weight, grad_target, None, None, None, None, None


OFFLOAD_MODES = ("none", "host")


@dataclass
class StepRows:
    """What one step computes with, decided from the labels before the embeddings are needed.

    Attributes:
        local_labels: the ``[B_local]`` labels it was planned for (``prefetch`` matches on identity).
        labels: ``[B_global]`` gathered labels, out-of-range ones replaced by 0 (they are counted instead).
        owned: ``[B_global]`` bool, the label is a class of this rank.
        target_col: ``[B_global]`` the row of each owned label among the rows in use (its slot when
            sampling), ``-1`` elsewhere.
        index: ``[S]`` local classes in use (slot order), or ``None`` for the whole shard.
        weight: the rows in use: the shard itself (in-device, no sampling) or the row buffer.
    """

    local_labels: Tensor
    labels: Tensor
    owned: Tensor
    target_col: Tensor
    index: Tensor | None
    weight: Tensor


class ShardedMarginClassifier(nn.Module):
    """A margin-softmax classifier whose weight matrix is split by class over the ranks of ``group``.

    Args:
        num_classes: total number of identities ``C``.
        embedding_size: embedding dimension ``D``.
        margin: a margin name (paper defaults), a :class:`MarginSpec`, or a :class:`Margin`.
        sample_rate: Partial FC rate; ``< 1`` keeps each training step every class of this shard that is a
            target in the global batch plus uniform negatives, ``num_slots`` classes in all
            (:mod:`distrib_face.parallel.sampling`; ``ceil(sample_rate x C_local)`` with the rounding rule of
            :func:`~distrib_face.parallel.sampling.num_sampled_classes`).
        group: the process group of the class shards (``None``: the default group or a world of 1).
        dtype: storage dtype of the weights: float32; bfloat16 halves the shard (statistics, target logits and
            the update's arithmetic stay float32; see :class:`~distrib_face.parallel.optim.ShardOptimizer`);
            float64 for reference tests.
        device: where the classifier computes (and, without offload, where the shard lives).
        seed: weights are ``N(0, 0.01)`` drawn per class block from ``seed``: the same matrix at any world size.
        chunk_size: classes per chunk of the logit computation (bounds peak memory).
        compute_dtype: dtype of the cosine matmuls (e.g. ``torch.bfloat16``); softmax statistics stay float32+.
        embedding_grad_scale: multiplies the embeddings' gradient; set it to the data-parallel world size
            when the backbone's gradients are averaged over ranks (DeepSpeed / DDP), as arcface_torch does.
        num_subcenters: ``K`` sub-centres per class (kept on the same shard; the cosine is their max);
            ``None``: the margin's (3 for ``subcenter_arcface``, else 1).
        equal_batches: every rank passes the same number of rows each call (a trainer with ``drop_last``):
            the gathers then skip the all-gather of the sizes and its host synchronisation. Unequal sizes
            with this flag set make the collectives fail.
        offload: ``"host"`` keeps the shard (and the optimizer's state) in host memory, pinned when ``device``
            is CUDA, and moves only the rows in use to the device each step (:meth:`prefetch` overlaps the copy
            with the backbone's forward on a side stream). On a CPU device the host *is* the device and the
            losses equal the in-device path's.
        kernel: how margins with ``s * cos`` non-target logits are computed: ``"torch"`` (chunked
            matmuls), ``"triton"`` (fused kernels, :mod:`distrib_face.parallel.kernels`; needs triton and
            CUDA tensors) or ``"auto"`` (triton on CUDA when it is importable, else torch).
        grad_filter: the fused backward skips class tiles whose softmax probabilities are all below this
            (``"auto"``: ``eps(compute dtype) / 32``, as Cut Cross-Entropy); ``None`` (default): exact.

    Example:
        ``loss = clf(local_embeddings, local_labels)`` returns the mean loss over the global batch,
        identical on every rank; ``loss.backward()`` fills the local embeddings' gradient with exactly
        what one process holding the whole matrix would compute.

    Labels outside ``[0, num_classes)`` are not checked with a host synchronisation: they are counted on
    the device (their rows then belong to no class and carry a target logit of 0) and
    :meth:`check_step_errors` raises on the next call, which the trainer makes when it logs.
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
        equal_batches: bool = False,
        offload: str = "none",
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
        if offload not in OFFLOAD_MODES:
            raise ValueError(f"offload must be one of {OFFLOAD_MODES}, got {offload!r}")
        if dtype not in (torch.float32, torch.float64, torch.bfloat16):
            raise ValueError(f"dtype (the weights' storage) must be float32, float64 or bfloat16, got {dtype}")
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
        self.sample_rate, self.seed, self.chunk_size = sample_rate, int(seed), int(chunk_size)
        self.compute_dtype, self.embedding_grad_scale = compute_dtype, float(embedding_grad_scale)
        self.equal_batches, self.offload = bool(equal_batches), offload
        self.margin.set_num_classes(self.num_classes)
        # A margin with a per-class bias (plain softmax) gets it as an extra weight column, fed by a constant-1
        # feature: the shard, its optimizer state and Partial FC sampling then cover the bias with no extra code.
        self.bias_columns = 1 if getattr(self.margin, "uses_bias", False) else 0
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        #: Where the shard and its optimizer state live: the host when offloaded, else the compute device.
        self.storage_device = torch.device("cpu") if offload == "host" else self.device
        rows = init_class_rows(
            *self.class_range, (self.num_subcenters, self.embedding_size + self.bias_columns), seed=self.seed,
            dtype=dtype, device=self.storage_device,
        )
        if self.bias_columns:
            rows[..., -1] = 0.0
        rows = rows.view(-1, rows.shape[-1])  # [C_local * K, D (+1 bias column)]: sub-centres of a class adjacent
        if offload == "host" and self.device.type == "cuda":
            rows = rows.pin_memory()  # asynchronous copies to the device
        # Autograd reaches the shard itself only on the in-device path without sampling; otherwise the rows in
        # use are gathered into a buffer each step and only that buffer gets a gradient.
        self.weight = nn.Parameter(rows, requires_grad=offload == "none")
        self.register_buffer(
            "sample_step", torch.zeros((), dtype=torch.int64, device=self.storage_device), persistent=True
        )
        #: Device-side counters read by :meth:`check_step_errors`: labels outside [0, C), one such label,
        #: sampling shortfalls (fewer distinct classes drawn than slots; rarer than 2**-60 per step).
        self.register_buffer("step_errors", torch.zeros(3, dtype=torch.int64, device=self.device), persistent=False)
        self.register_buffer("_marker", None, persistent=False)  # the sampler's [C_local + 1] int32 marker
        if self.sample_rate < 1.0:
            self._marker = new_marker(self.num_local_classes, self.storage_device)
        self._rows_buffer: Tensor | None = None  # [rows in use, D] leaf on the compute device
        self._draws: dict[int, int] = {}  # slots -> uniform draws that hold them (sampling.num_draws)
        self.sample_rate = sample_rate  # again, now that the shard exists: allocates the row buffer
        self._staging: dict[str, Tensor] = {}  # offload: [rows in use, D] host buffers, pinned on CUDA
        self._rows_ready: Any = None  # CUDA event: the rows buffer holds this step's rows (offload)
        self._copy_stream: Any = None
        self._pending_writeback: list[Any] = []  # offload: updated rows on their way back to the host
        #: Offload: the optimizer's host state (``{name: [C_local * K, D]}``), attached by ShardOptimizer so
        #: that the plan stages its rows with the weights' (:meth:`attach_offloaded_state`).
        self._offloaded_state: dict[str, Tensor] = {}
        self._state_rows: dict[str, Tensor] = {}  # offload: [rows in use, D] device buffers of those rows
        self._state_prefetched: dict[str, Tensor] = {}  # this plan's state rows, on their way (copy stream)
        self._active: tuple[Tensor | None, Tensor, Tensor | None] | None = None
        self._prefetched: StepRows | None = None
        self._workspace = Workspace()  # the fast path's reused chunk block and row gradient (eager mode)
        #: Use the analytic-backward path for margins whose non-target logits are ``s * cos`` (see linear_lse).
        self.fast_path = True

    # ----------------------------------------------------------------------------------------------
    @property
    def sample_rate(self) -> float:
        """The Partial FC rate (settable; 1.0 turns sampling off)."""
        return self._sample_rate

    @sample_rate.setter
    def sample_rate(self, rate: float) -> None:
        # The count is fixed here, on the host, once: forward (and torch.compile) then only reads an int.
        self._num_sampled = num_sampled_classes(rate, self.num_local_classes)
        self._sample_rate = float(rate)
        if rate < 1.0 and self._num_sampled < self.num_local_classes and hasattr(self, "weight"):
            # The row buffer of the usual slot count (num_sampled >= B_global) exists before any forward, so
            # that a compiled forward only writes into it (a graph cannot create a leaf that needs a gradient).
            self._row_buffer(self._num_sampled * self.num_subcenters)
            self._draws.setdefault(self._num_sampled, num_draws(self.num_local_classes, self._num_sampled))

    @property
    def chunks(self) -> ChunkSpec:
        """The chunk loops' arguments: ``chunk_size``, ``compute_dtype`` and the class-shard group."""
        return ChunkSpec(self.chunk_size, self.compute_dtype, self.group)

    @property
    def num_sampled(self) -> int:
        """Classes this shard samples per step: ``ceil(sample_rate x C_local)`` (exact decimal rule)."""
        return self._num_sampled

    def num_slots(self, global_batch: int) -> int:
        """Classes a sampled training step keeps for a global batch of ``global_batch`` rows (>= num_sampled)."""
        return num_slots(self.num_sampled, global_batch, self.num_local_classes)

    def _sampling_now(self, global_batch: int) -> bool:
        return self.training and self.sample_rate < 1.0 and self.num_slots(global_batch) < self.num_local_classes

    def active_rows(self) -> tuple[Tensor | None, Tensor]:
        """``(class_index, weight_rows)`` of the last forward: ``class_index`` None means all classes.

        ``weight_rows`` is the shard itself (in-device, no sampling) or the buffer holding the rows in use,
        slot by slot; its ``.grad`` is what :class:`~distrib_face.parallel.optim.ShardOptimizer` applies to
        those rows only.
        """
        if self._active is None:
            raise RuntimeError("no forward pass yet: active_rows() is defined after calling the classifier")
        return self._active[0], self._active[1]

    def active_row_index(self) -> Tensor | None:
        """The ``[S x K]`` shard rows of the last forward (sub-centres expanded), None for the whole shard."""
        if self._active is None:
            raise RuntimeError("no forward pass yet: active_row_index() is defined after calling the classifier")
        return self._active[2]

    def check_step_errors(self) -> None:
        """Raise if a past step saw labels outside ``[0, num_classes)`` or a sampling shortfall; then reset.

        One host synchronisation: call it where the trainer already synchronises (when it logs).

        Raises:
            ValueError: naming how many labels were out of range and the last one.
            RuntimeError: Partial FC drew fewer distinct classes than slots (see sampling.num_draws).
        """
        bad, example, shortfalls = (int(v) for v in self.step_errors.tolist())
        self.step_errors.zero_()
        if bad:
            raise ValueError(
                f"{bad} label(s) outside [0, {self.num_classes}) reached the classifier (e.g. {example}); "
                "their rows were scored against no class"
            )
        if shortfalls:
            raise RuntimeError(f"Partial FC drew too few distinct classes in {shortfalls} step(s)")

    # ----------------------------------------------------------------------------------------------
    def prefetch(self, local_labels: Tensor) -> None:
        """Plan the next training step from its labels alone, before the embeddings exist.

        Gathers the labels, samples the classes and starts copying the rows in use to the device (offload:
        on a side CUDA stream, so that the copy overlaps the backbone's forward). The next ``forward`` with
        the same ``local_labels`` object uses the plan. Calling it is optional.
        """
        self._prefetched = self._plan(local_labels)

    def _plan(self, local_labels: Tensor) -> StepRows:
        self._finish_writeback()
        labels = all_gather_variable(local_labels.to(self.device, torch.int64), self.group,
                                     equal_sizes=self.equal_batches)  # [B_global]
        num_rows = labels.shape[0]
        valid = (labels >= 0) & (labels < self.num_classes)
        if num_rows:
            invalid = ~valid
            count = invalid.sum()
            last = labels.gather(0, invalid.to(torch.int32).argmax().reshape(1)).reshape(())  # the first bad label
            self.step_errors[0] += count
            self.step_errors[1] = torch.where(count > 0, last, self.step_errors[1])
        labels = torch.where(valid, labels, 0)
        start, stop = self.class_range
        owned = valid & (labels >= start) & (labels < stop)
        local_target = torch.where(owned, labels - start, 0)
        k = self.num_subcenters
        if self._sampling_now(num_rows):
            slots = self.num_slots(num_rows)
            if slots not in self._draws:
                self._draws[slots] = num_draws(self.num_local_classes, slots)
            if self._marker is None:
                self._marker = new_marker(self.num_local_classes, self.storage_device)
            store = self.storage_device
            keys = step_keys(stream_key(self.seed, self.rank), self.sample_step)
            index, target_slot, shortfall = sample_slots(
                self._marker, local_target.to(store), owned.to(store), keys, slots, self._draws[slots],
            )
            self.step_errors[2] += shortfall.to(self.device)
            self.sample_step += 1
            rows = (index[:, None] * k + torch.arange(k, device=store)).reshape(-1) if k > 1 else index
            weight = self._gather_rows(rows)
            target_col = target_slot.to(self.device)
        elif self.offload == "host":
            index, rows = None, None
            weight = self._gather_rows(None)
            target_col = torch.where(owned, local_target, -1)
        else:
            index, rows, weight = None, None, self.weight
            target_col = torch.where(owned, local_target, -1)
        self._active = (index, weight, rows)
        return StepRows(local_labels, labels, owned, target_col, index, weight)

    def _row_buffer(self, num_rows: int) -> Tensor:
        """The persistent leaf holding the rows in use (reallocated only when the count changes)."""
        buf = self._rows_buffer
        shape = (num_rows, self.weight.shape[1])
        if buf is None or tuple(buf.shape) != shape:
            if torch.compiler.is_compiling():
                raise RuntimeError(
                    f"a compiled forward needs {num_rows} sampled rows but the row buffer holds "
                    f"{None if buf is None else buf.shape[0]}: run one eager training step first"
                )
            buf = torch.empty(shape, dtype=self.weight.dtype, device=self.device, requires_grad=True)
            self._rows_buffer = buf
        elif buf.grad is not None:
            raise RuntimeError(
                "the rows of the previous step still hold a gradient: call ShardOptimizer.step() and zero_grad() "
                "(or drop the gradient) before the next training forward (gradient accumulation over "
                "micro-batches is not supported with Partial FC sampling or offload)"
            )
        return buf

    @torch.no_grad()
    def _gather_rows(self, rows: Tensor | None) -> Tensor:
        """Copy shard rows ``rows`` (all when None) into the row buffer, in place; returns the buffer."""
        num_rows = self.weight.shape[0] if rows is None else rows.shape[0]
        buf = self._row_buffer(num_rows)
        if self.offload == "none":
            gather_rows(self.weight, rows, buf)
            return buf
        if self._rows_ready is not None:
            self._rows_ready.synchronize()  # the previous copy out of the staging buffer is done
        staged = self.stage_rows("weight", self.weight, rows)
        # The optimizer state's rows travel with the weights' (same staging, same stream): its step then
        # finds them on the device instead of copying them after the backward.
        copies = [(staged, buf)] + self._stage_state(rows, num_rows)
        if self.device.type == "cuda":
            if self._copy_stream is None:
                self._copy_stream = torch.cuda.Stream(self.device)
            self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))  # last step's use of buf
            with torch.cuda.stream(self._copy_stream):
                for src, dst in copies:
                    dst.copy_(src, non_blocking=True)
                self._rows_ready = torch.cuda.Event()
                self._rows_ready.record(self._copy_stream)
        else:
            for src, dst in copies:
                dst.copy_(src)
        return buf

    def attach_offloaded_state(self, buffers: dict[str, Tensor]) -> None:
        """Offload: stage the rows of the optimizer's host ``buffers`` with the weights' in every training plan.

        :class:`~distrib_face.parallel.optim.ShardOptimizer` calls it; its ``step`` then takes the rows from
        :meth:`prefetched_state` instead of copying them on the critical path.
        """
        if self.offload != "host":
            raise ValueError(f"attach_offloaded_state is for offload='host', this classifier has {self.offload!r}")
        self._offloaded_state = dict(buffers)

    def prefetched_state(self, name: str) -> Tensor | None:
        """The device rows of optimizer state ``name`` staged by this step's plan (None if it staged none).

        They were copied on the same stream as the weight rows, so the forward's wait covers them too.
        """
        return self._state_prefetched.get(name)

    def _stage_state(self, rows: Tensor | None, num_rows: int) -> list[tuple[Tensor, Tensor]]:
        """``(staged host rows, device rows)`` of each attached optimizer state, for a training plan."""
        self._state_prefetched = {}
        if not self.training:
            return []  # no optimizer step follows an evaluation forward
        pairs = []
        for name, host in self._offloaded_state.items():
            device_rows = self._state_rows.get(name)
            if device_rows is None or tuple(device_rows.shape) != (num_rows, host.shape[1]):
                device_rows = torch.empty((num_rows, host.shape[1]), dtype=host.dtype, device=self.device)
                self._state_rows[name] = device_rows
            pairs.append((self.stage_rows(name, host, rows), device_rows))
            self._state_prefetched[name] = device_rows
        return pairs

    @torch.no_grad()
    def stage_rows(self, name: str, host: Tensor, rows: Tensor | None) -> Tensor:
        """Offload: gather ``host``'s rows ``rows`` (all when None) into the staging buffer kept for ``name``.

        One buffer per name (``"weight"``, each optimizer state), pinned when the device is CUDA, allocated
        once: the rows leave for the device from there, and their updates come back through it.
        """
        num_rows = host.shape[0] if rows is None else rows.shape[0]
        staging = self._staging.get(name)
        if staging is None or staging.shape != (num_rows, host.shape[1]) or staging.dtype != host.dtype:
            staging = torch.empty((num_rows, host.shape[1]), dtype=host.dtype, pin_memory=self.device.type == "cuda")
            self._staging[name] = staging
        if rows is None:
            staging.copy_(host)
        else:
            gather_rows(host, rows, staging)
        return staging

    def schedule_writeback(self, name: str, host: Tensor, rows: Tensor | None, values: Tensor) -> None:
        """Offload: copy updated ``values`` (device) into ``host`` at shard rows ``rows`` (all when None).

        On CUDA the device-to-host copy goes asynchronously into ``name``'s staging buffer (free again: its
        rows reached the device before they were used) and the host-side scatter waits for the next plan
        (:meth:`prefetch` / forward, which the backbone's forward overlaps) or :meth:`flush`. On a CPU
        device the rows are written at once.
        """
        if self.device.type != "cuda":
            if rows is None:
                host.copy_(values)
            else:
                scatter_rows_(host, rows, values)
            return
        staging = self._staging[name]
        staging.copy_(values, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self._pending_writeback.append((host, rows, staging, event))

    def _finish_writeback(self) -> None:
        for host, rows, staging, event in self._pending_writeback:
            event.synchronize()
            if rows is None:
                host.copy_(staging)
            else:
                scatter_rows_(host, rows, staging)
        self._pending_writeback.clear()

    def flush(self) -> None:
        """Offload: land every pending row update in host memory (before reading the shard: checkpoints)."""
        self._finish_writeback()

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """``nn.Module.state_dict`` after :meth:`flush`: whoever reads the shard (a checkpoint, its finiteness
        check) sees the rows of the last step, not host rows still waiting for their offload write-back."""
        self.flush()
        return super().state_dict(*args, **kwargs)

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
        plan = self._prefetched
        self._prefetched = None
        if plan is None or plan.local_labels is not local_labels:
            plan = self._plan(local_labels)
        if self._rows_ready is not None:  # offload on CUDA: the rows' copy must land before they are read
            torch.cuda.current_stream(self.device).wait_event(self._rows_ready)
        stat_dtype = torch.promote_types(self.weight.dtype, torch.float32)
        embeddings = gather_with_grad(local_embeddings.to(stat_dtype), self.group, self.embedding_grad_scale,
                                      equal_sizes=self.equal_batches)  # [B_global, D]
        global_norms = embeddings.detach().norm(dim=1)  # [B_global], for margins that use batch statistics
        if self.bias_columns:
            embeddings = torch.cat([embeddings, embeddings.new_ones(embeddings.shape[0], 1)], dim=1)
        labels, owned, target_col, weight = plan.labels, plan.owned, plan.target_col, plan.weight
        k = self.num_subcenters
        num_rows = embeddings.shape[0]
        linear_scale = self.margin.linear_scale if self.fast_path else None
        fast = linear_scale is not None and k == 1 and not self.bias_columns
        # Both fast paths (torch, triton) own the target cosines' gradient: computed here without autograd,
        # echoed by the Function, whose backward adds their O(B x D) share to the target rows' gradient.
        kernel = self._kernel_for(embeddings, weight) if fast else "torch"
        rows_t = torch.where(owned, target_col, 0)  # [B]: a valid row everywhere; masked where not owned

        if fast:
            # Target cosines first, without autograd (the margin's statistics need them before any logit);
            # their gradient is the Function's (LinearNegativeLogSumExp or its Triton twin), which echoes them.
            with torch.no_grad():
                w_t = weight.index_select(0, rows_t).to(stat_dtype)  # [B, D]
                w_norms = w_t.norm(dim=1).clamp_min(_EPS)  # [B]
                x_unit = embeddings / embeddings.norm(dim=1, keepdim=True).clamp_min(_EPS)
                cos_target = torch.where(owned, (x_unit * w_t).sum(dim=1) / w_norms, 0.0)  # [B]
            norms = embeddings.norm(dim=1, keepdim=True)  # [B, 1], with gradient (MagFace's margin uses it)
        else:
            target_weight = weight.view(-1, k, weight.shape[-1])[rows_t]  # [B, K, D]
            cos_target, norms, w_norms = _target_cosines(embeddings, target_weight, self.margin)
            cos_target = torch.where(owned, cos_target, 0.0)
        cos_all = all_reduce_tensor(cos_target.detach(), "sum", self.group)  # [B] every row's target cosine
        neg_ctx = MarginContext(feature_norms=None, labels=labels, target_cos=cos_all)  # norms: per chunk
        negative_lse = None
        if getattr(self.margin, "needs_negative_stats", False):
            negative_lse = _global_negative_logsumexp(embeddings, weight, target_col, self.margin, neg_ctx, k,
                                                      self.chunks)
        self.margin.begin_step(StepStats(
            target_cos=cos_all, training=self.training, feature_norms=global_norms, negative_logsumexp=negative_lse,
        ))
        mctx = MarginContext(feature_norms=norms, labels=labels, target_cos=cos_all, weight_norms=w_norms)

        # The fused backward's filter tests the full softmax: it needs the target logits, known only below.
        holder = TargetLogitsHolder() if fast and self.grad_filter is not None else None
        if fast:
            workspace = None if torch.compiler.is_compiling() else self._workspace
            negative_lse, cos_target = linear_negative_logsumexp(
                kernel, embeddings, weight, cos_target, target_col, linear_scale, self.chunks, workspace,
                grad_filter=self.grad_filter, target_logits=holder,
            )
        # The owner of each row's class computes its target logit; the sum over ranks replicates it.
        target_local = torch.where(owned, self.margin.target_logit(cos_target, mctx).to(stat_dtype), 0.0)
        target_logits = all_reduce_sum_replicated_grad(target_local, self.group)  # [B]
        if holder is not None:
            holder.value = target_logits.detach().to(torch.float32)
        if fast:
            lse = torch.logaddexp(target_logits, negative_lse)
        else:
            lse = _ShardedNegativeLogSumExp.apply(
                embeddings, weight, target_logits, target_col, self.margin, neg_ctx, k, self.chunks,
            )
        return (lse - target_logits).mean() if num_rows else lse.sum()

    def _kernel_for(self, embeddings: Tensor, weight: Tensor) -> str:
        """``"torch"`` or ``"triton"`` for this step (decided on the host from static attributes on a CPU)."""
        if self.kernel == "torch" or (self.kernel == "auto" and weight.device.type != "cuda"):
            return "torch"
        return resolve_kernel(self.kernel, embeddings, weight, self.compute_dtype)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
            f"class_range={self.class_range}, rank={self.rank}/{self.world_size}, "
            f"sample_rate={self.sample_rate}, num_subcenters={self.num_subcenters}, margin={self.margin.spec.name}, "
            f"dtype={self.weight.dtype}, offload={self.offload}"
        )

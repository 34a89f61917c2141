"""Fused kernels for the class-sharded classifier, and the choice between them and the torch path.

``kernel`` (``ShardedMarginClassifier(kernel=...)``, ``loss.kernel``):

- ``"torch"``: :class:`~distrib_face.parallel.linear_lse.LinearNegativeLogSumExp` (and
  ``LinearMarginLogSumExp`` built on it), chunked matmuls (any device).
- ``"triton"``: :class:`~distrib_face.parallel.kernels.triton_lse.TritonLinearNegativeLogSumExp` (and
  ``TritonLinearMarginLogSumExp``), fused Triton kernels that never write a ``[B, chunk]`` block to memory. CUDA tensors, or CPU tensors through Triton's
  interpreter (``TRITON_INTERPRET=1`` before triton is imported: how the tests run it). Asking for it
  without the ``triton`` package, or for inputs it cannot take, is an error that says why.
- ``"auto"`` (default): ``"triton"`` for CUDA weights when triton is importable and the inputs suit it,
  else ``"torch"``.

triton is imported only when the fused path is chosen: the package works without it.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from distrib_face.parallel.linear_lse import (
    ChunkSpec,
    LinearMarginLogSumExp,
    LinearNegativeLogSumExp,
    Workspace,
)

logger = logging.getLogger(__name__)

KERNELS = ("auto", "torch", "triton")


@dataclass
class TargetLogitsHolder:
    """The target logits ``[B]`` (float32, detached, after the margin), filled once the caller has them.

    The fused Function returns the non-target log-sum-exp before the margin gives the target logits; its
    backward needs them only for the gradient filter, which tests the full softmax
    (``exp(logit - logaddexp(negative_lse, target_logits))``). The caller passes an empty holder to the
    forward and sets :attr:`value` before ``backward``; left ``None``, the filter tests the negatives'
    softmax instead (stricter: it keeps every tile the full test keeps).
    """

    value: Tensor | None = None


@functools.lru_cache(maxsize=None)
def triton_import_error() -> str | None:
    """Why ``triton`` cannot be imported here (``None``: it can). Imports it once, on first use."""
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception as err:  # noqa: BLE001 - any failure means "no triton"; the message says which
        return f"{type(err).__name__}: {err}"
    return None


def triton_available() -> bool:
    """Whether the ``triton`` package imports."""
    return triton_import_error() is None


def check_kernel(kernel: str) -> str:
    """``kernel`` if it is one of :data:`KERNELS`, else a ``ValueError`` naming it."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {list(KERNELS)}, got {kernel!r}")
    return kernel


def filter_threshold(grad_filter: float | str | None, compute_dtype: torch.dtype | None) -> float | None:
    """The probability below which the fused backward skips a class tile (``None``: never, exact).

    ``"auto"`` is Cut Cross-Entropy's choice, ``finfo(compute dtype).eps / 32``: 2^-12 for bfloat16,
    2^-28 for float32 (``compute_dtype=None``).
    """
    if grad_filter is None:
        return None
    if grad_filter == "auto":
        return torch.finfo(compute_dtype or torch.float32).eps / 32
    if isinstance(grad_filter, str) or isinstance(grad_filter, bool):
        raise ValueError(f"grad_filter must be 'auto', a probability in [0, 1) or None, got {grad_filter!r}")
    value = float(grad_filter)
    if not 0.0 <= value < 1.0 or math.isnan(value):
        raise ValueError(f"grad_filter must be 'auto', a probability in [0, 1) or None, got {grad_filter!r}")
    return value


def require_triton(what: str = "kernel='triton'") -> None:
    """Raise ``ImportError`` saying how to get triton when it cannot be imported."""
    error = triton_import_error()
    if error is not None:
        raise ImportError(
            f"{what} needs the triton package, which does not import here ({error}); install it "
            f"(pip install triton==3.9.0; CUDA builds of torch bring their own) or use kernel='torch'"
        )


def _kernels() -> Any:
    from distrib_face.parallel.kernels import triton_lse  # imports triton: only when chosen

    return triton_lse


@functools.lru_cache(maxsize=64)
def _log_fallback_once(reason: str) -> None:
    logger.info("classifier kernel 'auto' uses the torch path: the triton kernels cannot take %s", reason)


def resolve_kernel(kernel: str, embeddings: Tensor, weight: Tensor, compute_dtype: torch.dtype | None) -> str:
    """``"torch"`` or ``"triton"`` for these inputs (``kernel="triton"`` raises when it cannot run them)."""
    check_kernel(kernel)
    if kernel == "torch":
        return "torch"
    if kernel == "auto":
        if weight.device.type != "cuda" or not triton_available():
            return "torch"
        reason = _kernels().check_supported(embeddings, weight, compute_dtype)
        if reason is not None:
            _log_fallback_once(reason)
            return "torch"
        return "triton"
    require_triton()
    reason = _kernels().check_supported(embeddings, weight, compute_dtype)
    if reason is not None:
        raise ValueError(f"kernel='triton' cannot take {reason}; use kernel='torch' or 'auto'")
    return "triton"


def linear_margin_logsumexp(
    kernel: str,
    embeddings: Tensor,
    weight: Tensor,
    target_logits: Tensor,
    target_col: Tensor,
    scale: float,
    chunks: ChunkSpec,
    valid: Tensor | None = None,
    grad_filter: float | str | None = None,
) -> Tensor:
    """``log(exp(T_i) + sum over all ranks' non-target classes of exp(s cos_ij))``, by ``kernel``.

    The arguments are those of :class:`~distrib_face.parallel.linear_lse.LinearMarginLogSumExp` plus
    ``valid`` (``[C_r]`` bool, ``None``: every column counts) and ``grad_filter`` (the fused backward's tile
    filter: a probability, ``"auto"`` or ``None``; the torch path is always exact and ignores it).
    """
    if resolve_kernel(kernel, embeddings, weight, chunks.compute_dtype) == "torch":
        return LinearMarginLogSumExp.apply(embeddings, weight, target_logits, target_col, scale, chunks, valid)
    kernels = _kernels()
    options = kernels.KernelOptions(filter_eps=filter_threshold(grad_filter, chunks.compute_dtype))
    return kernels.TritonLinearMarginLogSumExp.apply(
        embeddings, weight, target_logits, target_col, scale, chunks, valid, options
    )


def linear_negative_logsumexp(
    kernel: str,
    embeddings: Tensor,
    weight: Tensor,
    target_cos: Tensor,
    target_col: Tensor,
    scale: float,
    chunks: ChunkSpec,
    workspace: Workspace | None = None,
    valid: Tensor | None = None,
    grad_filter: float | str | None = None,
    target_logits: TargetLogitsHolder | None = None,
) -> tuple[Tensor, Tensor]:
    """``(non-target log-sum-exp [B], target cosines [B])`` by ``kernel``, the target cosines' gradient owned.

    The arguments are those of :class:`~distrib_face.parallel.linear_lse.LinearNegativeLogSumExp` (the
    ``workspace`` serves the torch path only) plus ``grad_filter`` (the fused backward's tile filter; the
    torch path is always exact and ignores it) and ``target_logits``, a :class:`TargetLogitsHolder` the
    caller fills before ``backward`` so that the filter tests the full softmax (fused path only). Either
    way the target cosines (computed without autograd) are echoed and their gradient reaches the
    embeddings and the target rows inside the Function.
    """
    if resolve_kernel(kernel, embeddings, weight, chunks.compute_dtype) == "torch":
        return LinearNegativeLogSumExp.apply(embeddings, weight, target_cos, target_col, scale, chunks, workspace,
                                             valid)
    kernels = _kernels()
    options = kernels.KernelOptions(filter_eps=filter_threshold(grad_filter, chunks.compute_dtype))
    return kernels.TritonLinearNegativeLogSumExp.apply(
        embeddings, weight, target_cos, target_col, scale, chunks, valid, options, target_logits
    )

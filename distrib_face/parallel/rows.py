"""Row gathers and scatters of a class shard, into and out of preallocated buffers.

A step reads and writes a few hundred thousand scattered rows of the shard (the sampled classes and their
optimizer state). ``index_copy_`` on the CPU moves one element at a time, so rows are moved as 16-byte
elements (a ``complex128`` view of the same bytes) when their size allows: the bits are copied unchanged,
whatever the dtype, and the CPU's scatter runs about 1.5x faster (measured here: 100k rows of 128 fp32,
19.8 -> 12.7 ms). Both functions accept any storage dtype and work on CUDA tensors unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor

_WIDE = (torch.complex128, torch.float64, torch.float32, torch.int16)  # 16, 8, 4, 2 bytes


def _wide_view(t: Tensor) -> Tensor:
    """``t`` ([N, D], contiguous rows) viewed with the widest element that tiles a row; ``t`` if none does."""
    if t.dim() != 2 or t.stride(1) != 1 or t.stride(0) != t.shape[1] or t.is_complex():
        return t
    row_bytes = t.shape[1] * t.element_size()
    for dtype in _WIDE:
        size = torch.empty((), dtype=dtype).element_size()
        if size > t.element_size() and row_bytes % size == 0 and t.storage_offset() * t.element_size() % size == 0:
            return t.view(dtype)
    return t


def _pair(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    if torch.compiler.is_compiling():  # the compiler fuses the copy itself; complex views would not lower
        return a, b
    wide_a, wide_b = _wide_view(a), _wide_view(b)
    if wide_a.dtype != wide_b.dtype:  # one of them cannot be viewed: move elements of the real dtype
        return a, b
    return wide_a, wide_b


def gather_rows(src: Tensor, index: Tensor, out: Tensor) -> Tensor:
    """``out[i] = src[index[i]]`` (``index_select`` into ``out``, which must be contiguous); returns ``out``."""
    wide_src, wide_out = _pair(src, out)
    torch.index_select(wide_src, 0, index, out=wide_out)
    return out


def scatter_rows_(dst: Tensor, index: Tensor, src: Tensor) -> Tensor:
    """``dst[index[i]] = src[i]`` in place (``index_copy_``); ``index`` must not repeat. Returns ``dst``."""
    wide_dst, wide_src = _pair(dst, src)
    wide_dst.index_copy_(0, index, wide_src)
    return dst

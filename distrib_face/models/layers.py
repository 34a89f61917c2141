"""Pieces shared by the backbone families."""

from __future__ import annotations

from typing import Callable

import torch


def run_head_in_fp32(head: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Apply the embedding head in fp32 when ``torch.autocast`` is active, as is, otherwise.

    The large flatten -> FC layer (25088 -> 512 in iresnet) and the final BatchNorm1d lose accuracy
    in fp16 / bf16, so arcface_torch runs them in fp32 under mixed precision; outside autocast the head
    runs in the model's own dtype (a bf16-cast model stays bf16).
    """
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type=device_type, enabled=False):
            return head(x.float())
    return head(x)


def stage_output_size(input_size: int, num_stages: int = 4) -> int:
    """Spatial side after ``num_stages`` stride-2 3x3 convolutions with padding 1 (ceil(s / 2) each)."""
    size = input_size
    for _ in range(num_stages):
        size = (size + 1) // 2
    return size

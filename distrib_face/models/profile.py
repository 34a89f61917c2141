"""Size and cost of a backbone: parameters, multiply-accumulates, CPU throughput.

``distrib-face bench backbones [names...] [--input-size 112] [--throughput]`` prints the table.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``model`` (all of them, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_macs(model: nn.Module, input_size: int = 112, batch_size: int = 1) -> float:
    """Multiply-accumulates of one forward pass per image, counted by ``torch.utils.flop_counter``.

    ``FlopCounterMode`` counts the matrix work (convolutions, linear layers, attention) as 2 FLOPs per
    multiply-accumulate; element-wise layers (BN, PReLU, additions) are not counted, as in the published
    figures. The model runs in eval mode on the meta device, so no arithmetic is done and any size is
    cheap to count.

    Args:
        model: the backbone (any device; a meta-device copy is what runs).
        input_size: image side.
        batch_size: images in the counted batch (the result is per image).

    Returns:
        MACs per image.
    """
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    meta_model = _meta_copy(model).eval()
    images = torch.empty(batch_size, 3, input_size, input_size, device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        meta_model(images)
    model.train(was_training)
    return counter.get_total_flops() / 2.0 / batch_size


def _meta_copy(model: nn.Module) -> nn.Module:
    # A meta-device copy keeps the structure and shapes without arithmetic; a model built on meta is used as is.
    import copy

    if any(t.is_meta for t in model.parameters()):
        return model
    return copy.deepcopy(model).to("meta")


def measure_throughput(
    model: nn.Module,
    input_size: int = 112,
    batch_size: int = 64,
    steps: int = 5,
    warmup: int = 2,
    train: bool = True,
    device: str | torch.device = "cpu",
) -> float:
    """Images per second of forward (and backward when ``train``) on random inputs; median of ``steps``."""
    model = model.to(device).train(train)
    images = torch.randn(batch_size, 3, input_size, input_size, device=device)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        if train:
            model(images).square().mean().backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                model(images)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    times.sort()
    return batch_size / times[len(times) // 2]


def profile_table(
    names: Sequence[str], input_size: int = 112, throughput: bool = False, batch_size: int = 64, **kwargs: Any
) -> list[dict[str, Any]]:
    """Rows of ``{name, params_m, gmacs, [img_per_s_train]}`` for the named backbones."""
    from distrib_face.models.registry import create_backbone

    rows = []
    for name in names:
        with torch.device("meta"):  # counting needs shapes only
            meta_model = create_backbone(name, input_size=input_size, **kwargs)
        row: dict[str, Any] = {
            "name": name,
            "params_m": count_parameters(meta_model) / 1e6,
            "gmacs": count_macs(meta_model, input_size) / 1e9,
        }
        if throughput:
            model = create_backbone(name, input_size=input_size, **kwargs)
            row["img_per_s_train"] = measure_throughput(model, input_size, batch_size)
        rows.append(row)
    return rows

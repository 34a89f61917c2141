"""``distrib-face bench train``: images per second and peak memory of the full training step.

The step is :class:`~distrib_face.train.loop.StepRunner`'s, exactly what :func:`run_training` runs:
backbone forward under DeepSpeed, class-sharded margin softmax, backward, backbone and class-shard
optimiser steps. "with data" draws each batch from the configured loader (decode, augment, copy to the
device included); "no data" reuses one batch already on the device, so the difference is what the input
pipeline costs (or hides, when it keeps up).
"""

from __future__ import annotations

import logging
import resource
import statistics
import sys
import time
from typing import Any

import torch

from distrib_face.config import Config

logger = logging.getLogger(__name__)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is KiB on Linux, bytes on macOS: the process's peak resident set (CPU tensors and all).
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_train(cfg: Config, ctx: Any, *, steps: int = 20, warmup: int = 3, with_data: bool = True) -> dict[str, Any]:
    """Time ``steps`` optimiser steps after ``warmup`` untimed ones (collective: every rank calls it).

    Returns:
        ``{"mode", "steps", "global_batch", "median_step_ms", "img_s", "peak_memory_mb", "peak_memory_kind"}``;
        ``img_s`` counts the images of all ranks per second of the median step.
    """
    from distrib_face.train.data import build_train_data
    from distrib_face.train.engine import build_backbone, build_engine
    from distrib_face.train.loop import StepRunner, build_classifier, seed_everything
    from distrib_face.train.schedule import peak_learning_rates, set_learning_rates

    seed_everything(cfg.train.seed, deterministic=False)
    data = build_train_data(cfg, ctx.rank, ctx.world_size, ctx.device)
    backbone = build_backbone(cfg)
    backbone_lr, classifier_lr = peak_learning_rates(cfg, ctx.world_size)
    bundle = build_engine(cfg, backbone, backbone_lr, ctx.device, ctx.world_size)
    if cfg.model.compile:
        bundle.engine.compile()
    classifier, shard_optimizer = build_classifier(cfg, data.num_classes, ctx)
    set_learning_rates([bundle.optimizer, shard_optimizer], [backbone_lr, classifier_lr], 1.0)
    runner = StepRunner(cfg, ctx, bundle.engine, classifier, shard_optimizer, bundle.input_dtype)

    iterator = iter(data.loader)

    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal iterator
        try:
            return next(iterator)
        except StopIteration:
            iterator = iter(data.loader)
            return next(iterator)

    fixed = None
    if not with_data:
        images, labels = draw()
        fixed = (images.to(ctx.device), labels.to(ctx.device))
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    times = []
    for i in range(warmup + steps):
        _sync(ctx.device)
        start = time.perf_counter()
        for _ in range(cfg.optim.grad_accum):
            images, labels = fixed if fixed is not None else draw()
            runner.forward_backward(images, labels)
        runner.finish_step()
        _sync(ctx.device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    global_batch = cfg.data.batch_size * ctx.world_size * cfg.optim.grad_accum
    median = statistics.median(times)
    return {
        "mode": "with data" if with_data else "no data",
        "steps": steps,
        "global_batch": global_batch,
        "median_step_ms": median * 1000,
        "img_s": global_batch / median,
        "peak_memory_mb": _peak_memory_mb(ctx.device),
        "peak_memory_kind": "cuda max allocated" if ctx.device.type == "cuda" else "process peak RSS",
    }

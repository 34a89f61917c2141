"""``distrib-face bench train``: images per second and peak memory of the full training step.

The step is :class:`~distrib_face.train.step.StepRunner`'s on :func:`~distrib_face.train.components.build_components`'s
parts, exactly what the trainer runs:
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
from distrib_face.parallel import ProcessContext
from distrib_face.train.components import build_components, seed_everything
from distrib_face.train.schedule import set_learning_rates
from distrib_face.train.step import StepRunner

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


def bench_train(cfg: Config, ctx: ProcessContext, *, steps: int = 20, warmup: int = 3,
                with_data: bool = True) -> dict[str, Any]:
    """Time ``steps`` optimiser steps after ``warmup`` untimed ones (collective: every rank calls it).

    Returns:
        ``{"mode", "steps", "global_batch", "median_step_ms", "images_per_sec", "peak_memory_mb", "peak_memory_kind"}``;
        ``images_per_sec`` counts the images of all ranks per second of the median step.
    """
    seed_everything(cfg.train.seed, deterministic=False)
    parts = build_components(cfg, ctx, tracking=False)
    set_learning_rates(parts.optimizers, parts.peaks, 1.0)
    runner = StepRunner(cfg, ctx, parts)
    loader = parts.data.loader
    iterator = iter(loader)

    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal iterator
        try:
            return next(iterator)
        except StopIteration:
            iterator = iter(loader)
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
        "images_per_sec": global_batch / median,
        "peak_memory_mb": _peak_memory_mb(ctx.device),
        "peak_memory_kind": "cuda max allocated" if ctx.device.type == "cuda" else "process peak RSS",
    }


def expected_step_payload(cfg: Config, world_size: int, backbone_params: int) -> dict[str, int]:
    """What one training step's collectives carry, from the formula of docs/scale.md (bytes, all ranks' share).

    ``B`` = global micro-batch, ``D`` = embedding size, ``P`` = backbone parameters; gathers and all-reduces
    in fp32 (the statistics dtype), labels int64; DeepSpeed ZeRO 0 with fp32 gradients:

    - all-gather: the embeddings ``B x D x 4`` and the labels ``B x 8``;
    - reduce-scatter: the embeddings' gradient, ``B x D x 4``;
    - all-reduce: four ``[B]`` vectors (the target cosines, the target logits, the softmax max and sum,
      ``4 x B x 4``) and the backbone's gradient ``P x 4``.
    """
    batch = cfg.data.batch_size * world_size
    dim = cfg.model.embedding_size
    return {
        "all_gather": batch * dim * 4 + batch * 8,
        "reduce_scatter": batch * dim * 4,
        "all_reduce": 4 * batch * 4 + backbone_params * 4,
    }


def bench_comm(cfg: Config, ctx: ProcessContext, *, warmup: int = 1) -> dict[str, Any]:
    """Count what one training step's collectives move, against :func:`expected_step_payload` (collective).

    Runs ``warmup`` steps, then one step under :class:`~distrib_face.parallel.collectives.CollectiveCounter`.

    Returns:
        ``{"rows": [{name, calls, payload_bytes, wire_bytes}], "expected": {kind: bytes}, "counted":
        {kind: bytes}, "world_size", "global_batch", "backbone_params"}``; ``kind`` groups the variants of a
        collective (``all_gather_into_tensor`` and ``all_gather_single`` are both ``all_gather``).
    """
    from distrib_face.parallel.collectives import CollectiveCounter

    seed_everything(cfg.train.seed, deterministic=False)
    parts = build_components(cfg, ctx, tracking=False)
    set_learning_rates(parts.optimizers, parts.peaks, 1.0)
    runner = StepRunner(cfg, ctx, parts)
    batches = iter(parts.data.loader)
    for _ in range(warmup):
        images, labels = next(batches)
        runner.forward_backward(images, labels)
        runner.finish_step()
    images, labels = next(batches)
    with CollectiveCounter(ctx.world_size) as counter:
        runner.forward_backward(images, labels)
        runner.finish_step()
    rows = counter.rows()
    counted: dict[str, int] = {}
    for row in rows:
        kind = next((k for k in ("all_gather", "reduce_scatter", "all_reduce", "broadcast") if row["name"].startswith(k)),
                    row["name"])
        counted[kind] = counted.get(kind, 0) + row["payload_bytes"]
    params = sum(p.numel() for p in parts.engine.module.parameters() if p.requires_grad)
    return {"rows": rows, "counted": counted, "expected": expected_step_payload(cfg, ctx.world_size, params),
            "world_size": ctx.world_size, "global_batch": cfg.data.batch_size * ctx.world_size,
            "backbone_params": params}

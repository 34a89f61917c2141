"""Loader throughput: images per second of the full reader (shards -> batches on the device) per decoder."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from distrib_face.data.loader import build_loader

log = logging.getLogger(__name__)


@dataclass
class BenchRow:
    """One measured configuration."""

    name: str
    decoder: str
    device: str
    dali_threads: int
    num_workers: int
    images: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        """Throughput."""
        return self.images / self.seconds if self.seconds > 0 else float("nan")


def measure(shards: Any, *, name: str, decoder: str, device: str, dali_threads: int, num_workers: int,
            batch_size: int, batches: int, warmup: int = 3) -> BenchRow:
    """Time ``batches`` batches after ``warmup`` (the clock starts after the warm-up batches arrived)."""
    loader = build_loader(shards, batch_size=batch_size, rank=0, world_size=1, num_workers=num_workers,
                          decoder=decoder, device=device, dali_threads=dali_threads, augment=False,
                          resampled=True)
    def endless() -> Any:
        while True:
            yield from loader

    stream = endless()
    batch = None
    for _ in range(warmup):
        batch, _ = next(stream)
    if batch is not None and batch.device.type == "cuda":
        torch.cuda.synchronize(batch.device)
    images = 0
    start = time.perf_counter()
    for _ in range(batches):
        batch, _ = next(stream)
        images += batch.shape[0]
    if batch is not None and batch.device.type == "cuda":
        torch.cuda.synchronize(batch.device)
    seconds = time.perf_counter() - start
    stream.close()
    return BenchRow(name, decoder, device, dali_threads, num_workers, images, seconds)


def default_configs(device: str, num_workers: int) -> list[dict[str, Any]]:
    """DALI CPU with 1 and 2 threads, DALI mixed on a GPU when ``device`` is CUDA, and the PIL path."""
    configs = [
        {"name": "DALI cpu, 1 thread", "decoder": "dali", "device": "cpu", "dali_threads": 1},
        {"name": "DALI cpu, 2 threads", "decoder": "dali", "device": "cpu", "dali_threads": 2},
    ]
    if device.startswith("cuda"):
        configs.append({"name": "DALI mixed (GPU)", "decoder": "dali", "device": device, "dali_threads": 4})
    configs.append({"name": f"PIL, {num_workers} workers", "decoder": "pil", "device": "cpu", "dali_threads": 1})
    return [{**c, "num_workers": num_workers} for c in configs]

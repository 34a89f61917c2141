"""Small, fully known data sets for tests and examples (every sample identifiable by its label)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from distrib_face.data.manifest import Manifest, content_hash, write_manifest
from distrib_face.data.shards import ShardWriter


def sample_image(index: int, size: int = 16) -> np.ndarray:
    """A deterministic uint8 [size, size, 3] image for sample ``index`` (smooth, so JPEG keeps it close)."""
    rng = np.random.default_rng(index)
    base = rng.integers(30, 226, size=3)
    ramp = np.linspace(-25, 25, size)
    image = base[None, None, :] + ramp[:, None, None] * rng.choice([-1, 1], size=3) + ramp[None, :, None] * 0.5
    return np.clip(image, 0, 255).astype(np.uint8)


def jpeg_bytes(array: np.ndarray, quality: int = 95) -> bytes:
    """Encode ``array`` as JPEG."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_indexed_shards(out_dir: str | os.PathLike, shard_sizes: Sequence[int], image_size: int = 16,
                         corrupt: Sequence[int] = ()) -> Manifest:
    """Shards whose sample ``i`` has label ``i`` (so a label identifies the sample), with a manifest.

    Args:
        out_dir: output folder.
        shard_sizes: samples in each shard.
        image_size: side of the images.
        corrupt: sample indices whose JPEG is cut in half (they still count in the manifest).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    total = int(sum(shard_sizes))
    writer = ShardWriter(out, prefix="part", max_count=10**9)
    index = 0
    for size in shard_sizes:
        for _ in range(size):
            data = jpeg_bytes(sample_image(index, image_size))
            if index in corrupt:
                data = data[: len(data) // 2]
            writer.write(f"{index:08d}", data, index)
            index += 1
        writer.close_shard()
    finished = writer.finished
    manifest = Manifest(
        num_classes=total, num_samples=total, shards=[str(f.path) for f in finished],
        shard_counts=[f.count for f in finished], class_counts=[1] * total,
        class_names=[str(i) for i in range(total)], source={"kind": "test"},
        content_hash=content_hash([f.sha256 for f in finished]), image_size=(image_size, image_size),
        shard_hashes=[f.sha256 for f in finished], shard_bytes=[f.bytes for f in finished],
    )
    write_manifest(out, manifest)
    return manifest

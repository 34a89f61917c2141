"""Writing webdataset tar shards: ``NAME-%06d.tar`` holding ``<key>.jpg`` + ``<key>.cls`` samples."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class FinishedShard:
    """A closed shard: its path, sample count, size, digest and labels."""

    path: Path
    count: int
    bytes: int
    sha256: str
    labels: list[int] = field(default_factory=list)


class ShardWriter:
    """Writes samples into numbered tar shards, starting a new shard at ``max_count`` samples or ``max_bytes``.

    Shards are written to a ``.tmp`` name and renamed when closed, so a shard with its final name is complete.

    Args:
        out_dir: output folder.
        prefix: shard name prefix (``prefix-000000.tar``).
        max_count: most samples per shard.
        max_bytes: most payload bytes per shard (the tar overhead of ~1 KiB a sample comes on top).
        start_index: number of the first shard (used when resuming).
    """

    def __init__(
        self, out_dir: str | os.PathLike, prefix: str = "train", max_count: int = 10000,
        max_bytes: int = 512 * 1024 * 1024, start_index: int = 0,
    ) -> None:
        if max_count < 1:
            raise ValueError(f"max_count must be >= 1, got {max_count}")
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.index = start_index
        self.finished: list[FinishedShard] = []
        self._tar: tarfile.TarFile | None = None
        self._count = 0
        self._bytes = 0
        self._labels: list[int] = []

    def shard_path(self, index: int) -> Path:
        """Final path of shard number ``index``."""
        return self.out_dir / f"{self.prefix}-{index:06d}.tar"

    def _open(self) -> None:
        tmp = self.shard_path(self.index).with_suffix(".tar.tmp")
        self._tar = tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT)
        self._count = 0
        self._bytes = 0
        self._labels = []

    @staticmethod
    def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        info.mode = 0o444
        info.mtime = 0  # reproducible shards: same input, same bytes
        tar.addfile(info, io.BytesIO(payload))

    def write(self, key: str, image: bytes, label: int, ext: str = "jpg") -> FinishedShard | None:
        """Add one sample; returns the shard it closed, if adding it filled one."""
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
        if self._tar is None:
            self._open()
        assert self._tar is not None
        self._add(self._tar, f"{key}.{ext}", image)
        self._add(self._tar, f"{key}.cls", str(int(label)).encode())
        self._count += 1
        self._bytes += len(image)
        self._labels.append(int(label))
        if self._count >= self.max_count or self._bytes >= self.max_bytes:
            return self.close_shard()
        return None

    def close_shard(self) -> FinishedShard | None:
        """Close the open shard (if any) and give it its final name."""
        if self._tar is None:
            return None
        self._tar.close()
        self._tar = None
        final = self.shard_path(self.index)
        tmp = final.with_suffix(".tar.tmp")
        os.replace(tmp, final)
        shard = FinishedShard(final, self._count, final.stat().st_size, file_sha256(final), self._labels)
        self.finished.append(shard)
        self.index += 1
        return shard

    def close(self) -> list[FinishedShard]:
        """Close the last shard; returns every shard this writer finished."""
        self.close_shard()
        return self.finished


def encode_jpeg(array: np.ndarray, quality: int = 95) -> bytes:
    """Encode a uint8 [H, W, 3] or [H, W] array as JPEG."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()

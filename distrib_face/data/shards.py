"""Writing webdataset tar shards: ``NAME-%06d.tar`` holding ``<key>.jpg`` + ``<key>.cls`` samples."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from distrib_face.atomic import publish_file


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


def _member(name: str, payload: bytes) -> bytes:
    """One tar member as ``tarfile.addfile`` writes it: the USTAR header, the payload, NUL padding to a block."""
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mode = 0o444
    info.mtime = 0  # reproducible shards: same input, same bytes
    padding = -len(payload) % tarfile.BLOCKSIZE
    return info.tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape") + payload + tarfile.NUL * padding


def encode_sample(key: str, image: bytes, label: int, ext: str = "jpg") -> bytes:
    """The tar members of one sample, ``<key>.<ext>`` (the image) and ``<key>.cls`` (the label as ASCII), as the
    bytes :meth:`ShardWriter.write_encoded` appends: worker processes build them, so that the process writing
    the shards only appends bytes (in ``pack`` the tar headers cost the writer half as much as decoding an
    image cost a worker)."""
    if "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
    return _member(f"{key}.{ext}", image) + _member(f"{key}.cls", str(int(label)).encode())


class ShardWriter:
    """Writes samples into numbered tar shards, starting a new shard at ``max_count`` samples or ``max_bytes``.

    Shards are written to a ``.tar.tmp`` name, fsynced and renamed when closed
    (:func:`distrib_face.atomic.publish_file`), so a shard with its final name is complete.
    The bytes are those of ``tarfile`` in USTAR format (mode 0444, mtime 0, end-of-archive blocks, padded to
    its 10240-byte records); the SHA-256 is taken as they are written.

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
        self._file: BinaryIO | None = None
        self._digest: Any = None
        self._offset = 0
        self._count = 0
        self._bytes = 0
        self._labels: list[int] = []

    def shard_path(self, index: int) -> Path:
        """Final path of shard number ``index``."""
        return self.out_dir / f"{self.prefix}-{index:06d}.tar"

    def _tmp_path(self, index: int) -> Path:
        # the name `pack` looks for when it resumes (data/pack.py): a shard without its final name is unfinished
        return self.shard_path(index).with_suffix(".tar.tmp")

    def _open(self) -> None:
        self._file = open(self._tmp_path(self.index), "wb")
        self._digest = hashlib.sha256()
        self._offset = self._count = self._bytes = 0
        self._labels = []

    def _append(self, data: bytes) -> None:
        assert self._file is not None
        self._file.write(data)
        self._digest.update(data)
        self._offset += len(data)

    def write(self, key: str, image: bytes, label: int, ext: str = "jpg") -> FinishedShard | None:
        """Add one sample; returns the shard it closed, if adding it filled one."""
        return self.write_encoded(encode_sample(key, image, label, ext), len(image), label)

    def write_encoded(self, members: bytes, image_bytes: int, label: int) -> FinishedShard | None:
        """Add one sample already encoded by :func:`encode_sample` (``image_bytes``: its image's size, for
        ``max_bytes``); returns the shard it closed, if adding it filled one."""
        if self._file is None:
            self._open()
        self._append(members)
        self._count += 1
        self._bytes += image_bytes
        self._labels.append(int(label))
        if self._count >= self.max_count or self._bytes >= self.max_bytes:
            return self.close_shard()
        return None

    def close_shard(self) -> FinishedShard | None:
        """Close the open shard (if any) and give it its final name."""
        if self._file is None:
            return None
        # what tarfile.TarFile.close writes: two zero blocks, then zeros to the end of the 10240-byte record
        self._append(tarfile.NUL * (2 * tarfile.BLOCKSIZE))
        self._append(tarfile.NUL * (-self._offset % tarfile.RECORDSIZE))
        self._file.close()
        self._file = None
        final = publish_file(self._tmp_path(self.index), self.shard_path(self.index))
        shard = FinishedShard(final, self._count, self._offset, self._digest.hexdigest(), self._labels)
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

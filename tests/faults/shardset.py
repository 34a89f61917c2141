"""A shard set holding every kind of bad sample of issue 9, written byte by byte with ``tarfile`` (not with the
library's writer), and what a reader must make of it, counted by hand.

Label ``i`` is good sample ``i`` (so a delivered label names its sample); the bad samples get labels outside
the good range (or none). Shards:

- ``part-000000.tar``: 20 good samples (labels 0..19), the clean shard a second pass reads first;
- ``part-000001.tar``: bad images between good ones: bombs (60000 x 60000 and 12000 x 12000 headers over
  a 16 x 16 body), a JPEG cut in half, random bytes, a text file named ``.jpg``, a JPEG with a broken
  Huffman table (header and end marker fine: only a decoder finds it, DALI and PIL alike);
- ``part-000002.tar``: repairs (another size, grey, CMYK, 16-bit grey, RGBA) and bad labels (``num_classes``,
  ``-1``, no ``.cls``, ``seven``) and a ``.cls`` without image;
- ``part-000003.tar``: 6 samples in the manifest, the tar cut inside the 4th sample's image;
- ``part-000004.tar``: named by the manifest, absent on disk.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SIZE = 16


def _jpeg(image: Image.Image, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def face(index: int, size: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE)) -> np.ndarray:
    """A smooth, deterministic uint8 [H, W, 3] image for sample ``index``."""
    rng = np.random.default_rng(index)
    height, width = size
    base = rng.integers(40, 216, size=3)
    ramp = np.linspace(-30, 30, width)[None, :, None] + np.linspace(-20, 20, height)[:, None, None]
    return np.clip(base[None, None, :] + ramp * rng.choice([-1, 1], size=3), 0, 255).astype(np.uint8)


def _with_sof_size(jpeg: bytes, height: int, width: int) -> bytes:
    """``jpeg`` with its frame header (SOF0) claiming ``height`` x ``width``: a decompression bomb header."""
    at = jpeg.index(b"\xff\xc0")
    return jpeg[:at + 5] + struct.pack(">HH", height, width) + jpeg[at + 9:]


def _broken_huffman(jpeg: bytes) -> bytes:
    """``jpeg`` with the code counts of its first Huffman table overwritten: the header still parses and the
    end marker is there, but libjpeg (in PIL and in DALI) fails ("Bogus Huffman table definition")."""
    at = jpeg.index(b"\xff\xc4")
    data = bytearray(jpeg)
    data[at + 5:at + 21] = b"\xff" * 16
    return bytes(data)


@dataclass
class FaultSet:
    """The written set and what reading it must give."""

    root: Path
    num_classes: int
    good_labels: list[int]  # every label a reader must deliver (once per pass)
    shard_labels: dict[str, list[int]]  # shard name -> good labels in it
    skipped: dict[str, int]  # reason -> samples, for one pass over the present shards
    repaired: dict[str, int]
    skipped_by_shard: dict[str, dict[str, int]]
    missing_shard: str = "part-000004.tar"
    undecodable_shard: str = "part-000001.tar"
    manifest_counts: dict[str, int] = field(default_factory=dict)


def write_fault_set(root: Path) -> FaultSet:
    """Write the shard set described in the module docstring into ``root`` (with its manifest.json)."""
    root.mkdir(parents=True, exist_ok=True)
    good = iter(range(10**6))
    labels_by_shard: dict[str, list[int]] = {}
    shards: list[tuple[str, list[tuple[str, dict[str, bytes]]]]] = []

    def good_sample(shard: str, image: bytes | None = None, ext: str = "jpg") -> tuple[str, dict[str, bytes]]:
        label = next(good)
        labels_by_shard.setdefault(shard, []).append(label)
        data = image if image is not None else _jpeg(Image.fromarray(face(label)))
        return f"s{label:06d}", {ext: data, "cls": str(label).encode()}

    base = _jpeg(Image.fromarray(face(999)))
    shard0 = [good_sample("part-000000.tar") for _ in range(20)]
    n1 = "part-000001.tar"
    bad_images = [
        _with_sof_size(base, 60000, 60000),
        _with_sof_size(base, 12000, 12000),
        base[: len(base) // 2],
        b"\x00\x01" + np.random.default_rng(5).integers(0, 256, 300, dtype=np.uint8).tobytes(),
        b"this is a text file, named like a JPEG\n",
        _broken_huffman(base),
    ]
    shard1 = []
    for k, image in enumerate(bad_images):
        shard1.append(good_sample(n1))
        shard1.append((f"bad1{k:03d}", {"jpg": image, "cls": b"0"}))
    shard1.append(good_sample(n1))
    n2 = "part-000002.tar"
    grey = Image.fromarray(face(500)[..., 0])
    sixteen = Image.fromarray(face(501)[..., 1].astype(np.uint16) * 257)  # mode I;16
    rgba = Image.fromarray(np.dstack([face(502), np.full((IMAGE_SIZE, IMAGE_SIZE), 128, np.uint8)]))
    assert sixteen.mode == "I;16" and rgba.mode == "RGBA"
    shard2 = [
        good_sample(n2, _jpeg(Image.fromarray(face(503, (24, 20))))),  # another size: resized
        good_sample(n2, _jpeg(grey)),
        good_sample(n2, _jpeg(Image.fromarray(face(504)).convert("CMYK"))),
        good_sample(n2, _png(sixteen), "png"),
        good_sample(n2, _png(rgba), "png"),
        good_sample(n2),
    ]
    num_classes = 40  # good labels 0 .. 39 (20 + 7 + 7 + 6)
    clean = _jpeg(Image.fromarray(face(777)))
    shard2 += [
        ("badl000", {"jpg": clean, "cls": str(num_classes).encode()}),  # label == num_classes
        ("badl001", {"jpg": clean, "cls": b"-1"}),
        ("badl002", {"jpg": clean}),  # no .cls
        ("badl003", {"jpg": clean, "cls": b"seven"}),
        ("badl004", {"cls": b"3"}),  # no image
        good_sample(n2),
    ]
    n3 = "part-000003.tar"
    shard3 = [good_sample(n3) for _ in range(6)]
    shards = [("part-000000.tar", shard0), (n1, shard1), (n2, shard2), (n3, shard3)]
    assert next(good) == num_classes

    entries = []
    for name, samples in shards:
        path = root / name
        cut = None
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for index, (key, members) in enumerate(samples):
                for ext, payload in members.items():
                    if name == n3 and index == 3 and ext == "jpg":
                        cut = tar.offset + 512 + len(payload) // 2  # inside this member's data
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        if cut is not None:
            path.write_bytes(path.read_bytes()[:cut])
        data = path.read_bytes()
        entries.append({"name": name, "count": len(samples), "bytes": len(data),
                        "sha256": hashlib.sha256(data).hexdigest()})
    entries.append({"name": "part-000004.tar", "count": 5, "bytes": 10240, "sha256": "0" * 64})

    # class counts as a packer would have written them: one sample per good label, the rest on label 0
    total = sum(e["count"] for e in entries)
    class_counts = [1] * num_classes
    class_counts[0] += total - num_classes
    manifest = {
        "format": "distrib_face.shards/1", "num_classes": num_classes, "num_samples": total, "shards": entries,
        "class_counts": class_counts, "label_map": {}, "image_size": [IMAGE_SIZE, IMAGE_SIZE],
        "source": {"kind": "test"}, "content_hash": hashlib.sha256(b"faults").hexdigest(),
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    by_shard = {
        n1: {"too_large": 2, "truncated": 1, "not_an_image": 2, "undecodable": 1},
        n2: {"label_out_of_range": 2, "missing_label": 1, "bad_label": 1, "missing_image": 1},
        n3: {"truncated_shard": 3},
    }
    skipped: dict[str, int] = {}
    for counts in by_shard.values():
        for reason, n in counts.items():
            skipped[reason] = skipped.get(reason, 0) + n
    good_labels = sorted(label for labels in labels_by_shard.values() for label in labels)
    # shard 3 is cut inside its 4th sample: samples 4, 5, 6 of it never arrive
    good_labels = [g for g in good_labels if g not in labels_by_shard[n3][3:]]
    labels_by_shard[n3] = labels_by_shard[n3][:3]
    return FaultSet(root, num_classes, good_labels, labels_by_shard, skipped, {"resized": 1, "converted": 4},
                    by_shard, manifest_counts={e["name"]: e["count"] for e in entries})

"""The shard set's ``manifest.json``: what a folder of webdataset shards holds, and where to read it from.

A manifest sits beside its shards and names them relative to itself, so a shard folder can be copied,
served over HTTP or put in an object store and still be read through the same file::

    {
      "format": "distrib_face.shards/1",
      "num_classes": 40, "num_samples": 400,
      "shards": [{"name": "train-000000.tar", "count": 400, "bytes": 1234567, "sha256": "..."}],
      "class_counts": [10, 10, ...],          # index = contiguous label
      "label_map": {"s1": 0, "s10": 1, ...},  # original identity name -> label
      "image_size": [112, 112],               # [H, W] when every image has it, else null
      "source": {"kind": "folder", "path": "...", ...},
      "content_hash": "sha256 of the shard hashes in order"
    }

Each shard is a tar of samples ``<key>.jpg`` (the encoded image) and ``<key>.cls`` (the label as ASCII).
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from distrib_face.atomic import write_json

MANIFEST_NAME = "manifest.json"
FORMAT = "distrib_face.shards/1"
REMOTE_SCHEMES = ("http", "https", "s3", "gs", "gcs", "az", "abfs", "hf")


@dataclass
class Manifest:
    """A shard set: labels, per-shard and per-class counts, and the shards' full paths or URLs.

    Attributes:
        num_classes: number of identities (labels are ``0 .. num_classes - 1``).
        num_samples: number of samples over all shards.
        shards: each shard's local path or URL, in manifest order.
        shard_counts: samples in each shard, aligned with ``shards``.
        class_counts: samples of each label.
        label_map: original identity name -> label.
        source: where the samples were packed from (free-form, JSON-able).
        content_hash: SHA-256 over the shards' SHA-256 digests, in order.
        image_size: ``(H, W)`` when every image has that size, else ``None``.
        location: the manifest file's own path or URL (``None`` when built in memory).
        shard_hashes: each shard's SHA-256 (empty when unknown).
        shard_bytes: each shard's size in bytes (empty when unknown).
    """

    num_classes: int
    num_samples: int
    shards: list[str]
    shard_counts: list[int]
    class_counts: list[int]
    label_map: dict[str, int] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    content_hash: str = ""
    image_size: tuple[int, int] | None = None
    location: str | None = None
    shard_hashes: list[str] = field(default_factory=list)
    shard_bytes: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        where = self.location or "manifest"
        if self.num_classes < 1:
            raise ValueError(f"{where}: num_classes must be >= 1, got {self.num_classes}")
        if self.num_samples < 0:
            raise ValueError(f"{where}: num_samples must be >= 0, got {self.num_samples}")
        if len(self.shards) != len(self.shard_counts):
            raise ValueError(f"{where}: {len(self.shards)} shards but {len(self.shard_counts)} shard counts")
        bad = next((i for i, c in enumerate(self.shard_counts) if c < 0), None)
        if bad is not None:
            raise ValueError(f"{where}: shards[{bad}].count must be >= 0, got {self.shard_counts[bad]} "
                             f"({_basename(self.shards[bad])})")
        bad = next((i for i, c in enumerate(self.class_counts) if c < 0), None)
        if bad is not None:
            raise ValueError(f"{where}: class_counts[{bad}] must be >= 0, got {self.class_counts[bad]}")
        names = [_basename(p) for p in self.shards]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"{where}: shards lists {dup!r} twice")
        if sum(self.shard_counts) != self.num_samples:
            raise ValueError(
                f"{where}: num_samples={self.num_samples} but the shard counts sum to {sum(self.shard_counts)}"
            )
        if len(self.class_counts) != self.num_classes:
            raise ValueError(
                f"{where}: num_classes={self.num_classes} but class_counts has {len(self.class_counts)} entries"
            )
        if sum(self.class_counts) != self.num_samples:
            raise ValueError(
                f"{where}: num_samples={self.num_samples} but the class counts sum to {sum(self.class_counts)}"
            )
        bad_label = next((k for k, v in self.label_map.items() if not 0 <= v < self.num_classes), None)
        if bad_label is not None:
            raise ValueError(f"{where}: label_map[{bad_label!r}]={self.label_map[bad_label]} is outside "
                             f"[0, num_classes={self.num_classes})")
        for name, values in (("sha256", self.shard_hashes), ("bytes", self.shard_bytes)):
            if values and len(values) != len(self.shards):
                raise ValueError(f"{where}: {len(values)} shard {name} values for {len(self.shards)} shards")
        if any(b < 0 for b in self.shard_bytes):
            raise ValueError(f"{where}: a shard's bytes is negative")
        if self.image_size is not None:
            if len(self.image_size) != 2 or not all(int(v) >= 1 for v in self.image_size):
                raise ValueError(f"{where}: image_size must be [H, W] with H, W >= 1, got {list(self.image_size)}")
            self.image_size = (int(self.image_size[0]), int(self.image_size[1]))

    def to_json_dict(self) -> dict[str, Any]:
        """The JSON form written to ``manifest.json`` (shard names relative to the manifest)."""
        shards = []
        for i, path in enumerate(self.shards):
            entry: dict[str, Any] = {"name": _basename(path), "count": int(self.shard_counts[i])}
            if self.shard_bytes:
                entry["bytes"] = int(self.shard_bytes[i])
            if self.shard_hashes:
                entry["sha256"] = self.shard_hashes[i]
            shards.append(entry)
        return {
            "format": FORMAT,
            "num_classes": int(self.num_classes),
            "num_samples": int(self.num_samples),
            "shards": shards,
            "class_counts": [int(c) for c in self.class_counts],
            "label_map": {str(k): int(v) for k, v in self.label_map.items()},
            "image_size": list(self.image_size) if self.image_size is not None else None,
            "source": self.source,
            "content_hash": self.content_hash,
        }


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def is_remote(location: str) -> bool:
    """Whether ``location`` is a URL (http(s), object store) or a ``pipe:`` command rather than a local path."""
    if location.startswith("pipe:"):
        return True
    scheme = urllib.parse.urlparse(location).scheme
    return scheme in REMOTE_SCHEMES


def content_hash(shard_hashes: Sequence[str]) -> str:
    """The shard set's content hash: SHA-256 of the shard digests joined by newlines, in shard order."""
    return hashlib.sha256("\n".join(shard_hashes).encode()).hexdigest()


def _read_text(location: str) -> str:
    scheme = urllib.parse.urlparse(location).scheme
    if scheme in ("http", "https"):
        with urllib.request.urlopen(location, timeout=60) as response:  # noqa: S310 - user-given URL
            return response.read().decode("utf-8")
    if scheme in REMOTE_SCHEMES:
        try:
            import fsspec
        except ImportError as err:  # pragma: no cover - fsspec ships with the stack
            raise ValueError(f"{location}: reading {scheme}:// needs fsspec") from err
        with fsspec.open(location, "r") as handle:
            return handle.read()
    return Path(location).read_text()


def manifest_location(dir_or_file: str | os.PathLike) -> str:
    """The manifest's path or URL for a shard folder, a folder URL, or the manifest itself."""
    text = str(dir_or_file)
    if text.endswith(".json"):
        return text
    if is_remote(text):
        return text.rstrip("/") + "/" + MANIFEST_NAME
    return str(Path(text) / MANIFEST_NAME)


def read_manifest(dir_or_file: str | os.PathLike) -> Manifest:
    """Read a shard set's manifest from a folder, a ``manifest.json`` path, or either as an http(s) / fsspec URL.

    Args:
        dir_or_file: the shard folder (or its URL), or the manifest file (or its URL).

    Returns:
        The manifest, with ``shards`` resolved to full paths / URLs beside the manifest.

    Raises:
        FileNotFoundError: no manifest at that location.
        ValueError: the file is not a valid manifest (the message names the file and the field).
    """
    location = manifest_location(dir_or_file)
    try:
        text = _read_text(location)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{location}: no shard manifest here (pack or synth writes one)") from err
    except OSError as err:
        raise FileNotFoundError(f"{location}: cannot read the shard manifest: {err}") from err
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{location}: not JSON: {err}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{location}: expected a JSON object, got {type(raw).__name__}")
    if raw.get("format") != FORMAT:
        raise ValueError(f"{location}: format {raw.get('format')!r} is not {FORMAT!r}")
    base = location.rsplit("/", 1)[0] if "/" in location else "."
    if not isinstance(raw, dict):
        raise ValueError(f"{location}: expected a JSON object, got {type(raw).__name__}")
    for key in ("num_classes", "num_samples", "shards", "class_counts"):
        if key not in raw:
            raise ValueError(f"{location}: missing field '{key}'")
    shards = raw["shards"]
    if not isinstance(shards, list) or not all(isinstance(e, dict) for e in shards):
        raise ValueError(f"{location}: shards must be a list of {{name, count}} objects")
    if not isinstance(raw["class_counts"], list):
        raise ValueError(f"{location}: class_counts must be a list")
    for i, entry in enumerate(shards):
        if not isinstance(entry.get("name"), str) or not entry["name"] or "/" in entry["name"]:
            raise ValueError(f"{location}: shards[{i}].name must be a file name beside the manifest, "
                             f"got {entry.get('name')!r}")
    image_size = raw.get("image_size")
    if image_size is not None and (not isinstance(image_size, list) or len(image_size) != 2):
        raise ValueError(f"{location}: image_size must be [H, W] or null, got {image_size!r}")
    return Manifest(
        num_classes=_integer(raw["num_classes"], "num_classes", location),
        num_samples=_integer(raw["num_samples"], "num_samples", location),
        shards=[f"{base}/{entry['name']}" for entry in shards],
        shard_counts=[_integer(e.get("count"), f"shards[{i}].count", location) for i, e in enumerate(shards)],
        class_counts=[_integer(c, f"class_counts[{i}]", location) for i, c in enumerate(raw["class_counts"])],
        label_map={str(k): _integer(v, f"label_map[{k!r}]", location) for k, v in raw.get("label_map", {}).items()},
        source=raw.get("source", {}),
        content_hash=str(raw.get("content_hash", "")),
        image_size=None if not image_size else tuple(_integer(v, "image_size", location) for v in image_size),
        location=location,
        shard_hashes=[str(entry["sha256"]) for entry in shards] if all("sha256" in e for e in shards) else [],
        shard_bytes=[_integer(e["bytes"], f"shards[{i}].bytes", location) for i, e in enumerate(shards)]
        if all("bytes" in e for e in shards) else [],
    )


def _integer(value: Any, field_name: str, location: str) -> int:
    """``value`` as an int, or a ValueError naming the field (no floats, strings or booleans)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{location}: {field_name} must be an integer, got {value!r}")
    return value


def write_manifest(out_dir: str | os.PathLike, manifest: Manifest) -> Path:
    """Write ``manifest`` as ``out_dir/manifest.json`` atomically; returns the path."""
    path = Path(out_dir) / MANIFEST_NAME
    write_json(path, manifest.to_json_dict())
    manifest.location = str(path)
    return path

"""The shard set's ``manifest.json``: what a folder of webdataset shards holds, and where to read it from.

A manifest sits beside its shards and names them (and its class table) relative to itself, so a shard
folder can be copied, served over HTTP or put in an object store and still be read through the same file.
Format 2 (written since issue 10)::

    {
      "format": "distrib_face.shards/2",
      "num_classes": 40, "num_samples": 400,
      "shards": [{"name": "train-000000.tar", "count": 400, "bytes": 1234567, "sha256": "..."}],
      "classes": {"name": "classes-0123456789abcdef.npz", "bytes": 1234, "sha256": "..."},
      "image_size": [112, 112],               # [H, W] when every image has it, else null
      "source": {"kind": "folder", "path": "...", ...},
      "content_hash": "sha256 of the shard hashes in order"
    }

The per-class data lives in the *class table* ``classes-<first 16 hex digits of its SHA-256>.npz`` beside
the manifest: an uncompressed numpy ``.npz`` read with ``allow_pickle=False``, holding

- ``class_counts``: int64 ``[num_classes]``, samples of each label;
- ``name_offsets``: int64 ``[num_classes + 1]`` and ``name_bytes``: uint8 ``[total]``, the identity names by
  label, UTF-8, name of label ``c`` = ``name_bytes[name_offsets[c]:name_offsets[c + 1]]`` (empty: no name).

At a million classes the table is ~24 MB of arrays that load in milliseconds, where format 1 held them as
a 27 MB JSON list and object that every process parsed into a million Python objects. The table is read
(its size and SHA-256 checked against ``classes``) and validated when the manifest is read; the names are
decoded only when ``class_names`` / ``label_map`` are first used. Its name carries its digest, so a writer
that replaces a manifest never changes a table an older manifest names: the new table is written first,
then the manifest, then the previous table is removed.

Format 1 (``distrib_face.shards/1``) is still read: the same fields with ``class_counts`` (a JSON list,
index = label) and ``label_map`` (``{name: label}``) inline instead of ``classes``. To rewrite a set in
format 2: ``write_manifest(folder, read_manifest(folder))``.

Each shard is a tar of samples ``<key>.jpg`` (the encoded image) and ``<key>.cls`` (the label as ASCII).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import re
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from distrib_face.atomic import write_bytes, write_json


class ManifestError(ValueError):
    """A shard manifest (or its class table) that cannot be used: the message names the file and the field.
    Bad input, so the commands exit 2 (``exit_code``, :mod:`distrib_face.cli.errors`)."""

    exit_code = 2


MANIFEST_NAME = "manifest.json"
FORMAT = "distrib_face.shards/2"
FORMAT_V1 = "distrib_face.shards/1"
READABLE_FORMATS = (FORMAT_V1, FORMAT)
CLASS_TABLE_PREFIX = "classes-"
REMOTE_SCHEMES = ("http", "https", "s3", "gs", "gcs", "az", "abfs", "hf")
_TABLE_KEYS = ("class_counts", "name_offsets", "name_bytes")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class Manifest:
    """A shard set: labels, per-shard and per-class counts, and the shards' full paths or URLs.

    Attributes:
        num_classes: number of identities (labels are ``0 .. num_classes - 1``).
        num_samples: number of samples over all shards.
        shards: each shard's local path or URL, in manifest order.
        shard_counts: samples in each shard, aligned with ``shards``.
        class_counts: int64 ``[num_classes]`` (read-only) samples of each label.
        source: where the samples were packed from (free-form, JSON-able).
        content_hash: SHA-256 over the shards' SHA-256 digests, in order (the class table is not part of it:
            the same shards are the same data in either manifest format).
        image_size: ``(H, W)`` when every image has that size, else ``None``.
        location: the manifest file's own path or URL (``None`` when built in memory).
        shard_hashes: each shard's SHA-256 (empty when unknown).
        shard_bytes: each shard's size in bytes (empty when unknown).
        format: the manifest format it was read from (``FORMAT`` when built in memory).

    Identity names: ``class_names`` (by label, ``""`` for a label without a name) and ``label_map``
    (``{name: label}``), both built on first use. Give the constructor either ``label_map`` or
    ``class_names`` (or neither).

    Raises:
        ValueError: inconsistent counts or fields (the message names the field and the manifest).
    """

    def __init__(
        self,
        num_classes: int,
        num_samples: int,
        shards: Sequence[str],
        shard_counts: Sequence[int],
        class_counts: Sequence[int] | np.ndarray,
        label_map: Mapping[str, int] | None = None,
        source: Mapping[str, Any] | None = None,
        content_hash: str = "",
        image_size: Sequence[int] | None = None,
        location: str | None = None,
        shard_hashes: Sequence[str] | None = None,
        shard_bytes: Sequence[int] | None = None,
        *,
        class_names: Sequence[str] | None = None,
        format: str = FORMAT,
    ) -> None:
        self.num_classes = num_classes
        self.num_samples = num_samples
        self.shards = list(shards)
        self.shard_counts = list(shard_counts)
        self.class_counts = _counts_array(class_counts)
        self.source = dict(source or {})
        self.content_hash = content_hash
        self.image_size = None if image_size is None else tuple(image_size)
        self.location = location
        self.shard_hashes = list(shard_hashes or [])
        self.shard_bytes = list(shard_bytes or [])
        self.format = format
        self._names = _Names(self.num_classes, label_map, class_names)  # shared by with_shards copies
        self._validate()

    # ------------------------------------------------------------------------------------------ names
    @property
    def class_names(self) -> list[str]:
        """Identity name of each label (``""`` for a label without one); decoded on first use."""
        return self._names.class_names()

    @property
    def label_map(self) -> dict[str, int]:
        """``{identity name: label}`` for the labels that have a name; built on first use."""
        return self._names.label_map()

    def counts_by_name(self) -> Mapping[str, int]:
        """``{identity name: training images}`` as a read-only mapping over this manifest (no copy of the
        counts; the name index is built at the first lookup); a label without a name goes by its number."""
        return _NameCounts(self)

    # ------------------------------------------------------------------------------------------ checks
    def _where(self) -> str:
        return self.location or "manifest"

    def _validate(self) -> None:
        where = self._where()
        if self.num_classes < 1:
            raise ManifestError(f"{where}: num_classes must be >= 1, got {self.num_classes}")
        if self.num_samples < 0:
            raise ManifestError(f"{where}: num_samples must be >= 0, got {self.num_samples}")
        if len(self.shards) != len(self.shard_counts):
            raise ManifestError(f"{where}: {len(self.shards)} shards but {len(self.shard_counts)} shard counts")
        bad = next((i for i, c in enumerate(self.shard_counts) if c < 0), None)
        if bad is not None:
            raise ManifestError(f"{where}: shards[{bad}].count must be >= 0, got {self.shard_counts[bad]} "
                             f"({_basename(self.shards[bad])})")
        _check_class_counts(self.class_counts, where)
        names = [_basename(p) for p in self.shards]
        if len(set(names)) != len(names):
            dup = next(n for n, k in Counter(names).items() if k > 1)
            raise ManifestError(f"{where}: shards lists {dup!r} twice")
        if sum(self.shard_counts) != self.num_samples:
            raise ManifestError(
                f"{where}: num_samples={self.num_samples} but the shard counts sum to {sum(self.shard_counts)}"
            )
        if len(self.class_counts) != self.num_classes:
            raise ManifestError(
                f"{where}: num_classes={self.num_classes} but class_counts has {len(self.class_counts)} entries"
            )
        total = int(self.class_counts.sum())
        if total != self.num_samples:
            raise ManifestError(f"{where}: num_samples={self.num_samples} but the class counts sum to {total}")
        self._names.validate(self.num_classes, where)
        for name, values in (("sha256", self.shard_hashes), ("bytes", self.shard_bytes)):
            if values and len(values) != len(self.shards):
                raise ManifestError(f"{where}: {len(values)} shard {name} values for {len(self.shards)} shards")
        if any(b < 0 for b in self.shard_bytes):
            raise ManifestError(f"{where}: a shard's bytes is negative")
        if self.image_size is not None:
            if len(self.image_size) != 2 or not all(int(v) >= 1 for v in self.image_size):
                raise ManifestError(f"{where}: image_size must be [H, W] with H, W >= 1, got {list(self.image_size)}")
            self.image_size = (int(self.image_size[0]), int(self.image_size[1]))

    # ------------------------------------------------------------------------------------------ copies
    def with_shards(self, shards: Sequence[str], shard_counts: Sequence[int], class_counts: Sequence[int] | np.ndarray,
                    content_hash: str) -> Manifest:
        """A copy over other shards (a subset), sharing the identity names (still undecoded if they were)."""
        out = copy.copy(self)
        out.shards, out.shard_counts = list(shards), list(shard_counts)
        out.num_samples = int(sum(out.shard_counts))
        out.class_counts = _counts_array(class_counts)
        out.content_hash = content_hash
        out.shard_hashes, out.shard_bytes = [], []
        out._validate()
        return out

    def __repr__(self) -> str:
        return (f"Manifest({self._where()}: {self.num_classes} classes, {self.num_samples} samples, "
                f"{len(self.shards)} shards, {self.format})")

    # ------------------------------------------------------------------------------------------ writing
    def class_table_bytes(self) -> bytes:
        """The class table (``.npz``, format 2) of this manifest.

        Raises:
            ValueError: two names for one label (format 2 holds one name per label), or an empty name.
        """
        encoded = [name.encode("utf-8") for name in self._names.names_for_table(self._where())]
        offsets = np.zeros(self.num_classes + 1, dtype=np.int64)  # [C + 1]
        np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)), out=offsets[1:])
        buffer = io.BytesIO()
        np.savez(buffer, class_counts=self.class_counts, name_offsets=offsets,
                 name_bytes=np.frombuffer(b"".join(encoded), dtype=np.uint8))
        return buffer.getvalue()

    def to_json_dict(self, classes: Mapping[str, Any]) -> dict[str, Any]:
        """The format-2 JSON of ``manifest.json`` (shard names relative to the manifest).

        Args:
            classes: the class table's entry, ``{"name", "bytes", "sha256"}``.
        """
        return {
            "format": FORMAT,
            "num_classes": int(self.num_classes),
            "num_samples": int(self.num_samples),
            "shards": self._shard_entries(),
            "classes": dict(classes),
            "image_size": list(self.image_size) if self.image_size is not None else None,
            "source": self.source,
            "content_hash": self.content_hash,
        }

    def to_json_dict_v1(self) -> dict[str, Any]:
        """The format-1 JSON (class counts and label map inline): for tools that must write an old manifest
        (the reader's benchmark, compatibility tests); :func:`write_manifest` writes format 2."""
        return {
            "format": FORMAT_V1,
            "num_classes": int(self.num_classes),
            "num_samples": int(self.num_samples),
            "shards": self._shard_entries(),
            "class_counts": self.class_counts.tolist(),
            "label_map": {str(k): int(v) for k, v in self.label_map.items()},
            "image_size": list(self.image_size) if self.image_size is not None else None,
            "source": self.source,
            "content_hash": self.content_hash,
        }

    def _shard_entries(self) -> list[dict[str, Any]]:
        shards = []
        for i, path in enumerate(self.shards):
            entry: dict[str, Any] = {"name": _basename(path), "count": int(self.shard_counts[i])}
            if self.shard_bytes:
                entry["bytes"] = int(self.shard_bytes[i])
            if self.shard_hashes:
                entry["sha256"] = self.shard_hashes[i]
            shards.append(entry)
        return shards


class _Names:
    """The identity names of a manifest in whichever form it came: a label map, names by label, or a class
    table's encoded names; the other forms are built from it on first use."""

    def __init__(self, num_classes: int, label_map: Mapping[str, int] | None, class_names: Sequence[str] | None
                 ) -> None:
        self.num_classes = num_classes
        self._label_map: dict[str, int] | None = dict(label_map) if label_map is not None else None
        self._class_names: list[str] | None = list(class_names) if class_names is not None else None
        self.encoded: tuple[np.ndarray, np.ndarray, str] | None = None  # (name_offsets, name_bytes, table path)

    def validate(self, num_classes: int, where: str) -> None:
        if self._label_map is not None:
            bad = next((k for k, v in self._label_map.items() if not 0 <= v < num_classes), None)
            if bad is not None:
                raise ManifestError(f"{where}: label_map[{bad!r}]={self._label_map[bad]} is outside "
                                 f"[0, num_classes={num_classes})")
        if self._class_names is not None and len(self._class_names) != num_classes:
            raise ManifestError(f"{where}: {len(self._class_names)} class names for num_classes={num_classes}")

    def class_names(self) -> list[str]:
        if self._class_names is None:
            if self.encoded is not None:
                self._class_names = _decode_names(*self.encoded)
                self.encoded = None
            else:
                names = [""] * self.num_classes
                for name, label in (self._label_map or {}).items():
                    names[label] = name
                self._class_names = names
        return self._class_names

    def label_map(self) -> dict[str, int]:
        if self._label_map is None:
            self._label_map = {name: label for label, name in enumerate(self.class_names()) if name}
        return self._label_map

    def names_for_table(self, where: str) -> list[str]:
        """Names by label for a class table, refusing what format 2 cannot hold."""
        if self._label_map is None or self._class_names is not None or self.encoded is not None:
            return self.class_names()
        names = [""] * self.num_classes
        for name, label in self._label_map.items():
            if not name:
                raise ManifestError(f"{where}: label_map has an empty identity name (label {label})")
            if names[label]:
                raise ManifestError(f"{where}: label_map maps both {names[label]!r} and {name!r} to label {label}; "
                                 "format 2 holds one name per label")
            names[label] = name
        return names


class _NameCounts(Mapping[str, int]):
    """``{identity name: count}`` over a manifest (see :meth:`Manifest.counts_by_name`); a label without a
    name is known by its number as a string."""

    def __init__(self, manifest: Manifest) -> None:
        self._manifest = manifest

    def _label(self, name: str) -> int:
        label = self._manifest.label_map.get(name)
        if label is not None:
            return label
        if name.isdigit() and int(name) < self._manifest.num_classes and not self._manifest.class_names[int(name)]:
            return int(name)
        raise KeyError(name)

    def __getitem__(self, name: str) -> int:
        return int(self._manifest.class_counts[self._label(name)])

    def __iter__(self) -> Iterator[str]:
        return (name or str(label) for label, name in enumerate(self._manifest.class_names))

    def __len__(self) -> int:
        return self._manifest.num_classes


def _counts_array(values: Sequence[int] | np.ndarray) -> np.ndarray:
    """``values`` as a read-only int64 array (refusing floats and booleans)."""
    array = np.asarray(values)
    if array.size == 0:
        array = array.astype(np.int64)
    if array.dtype.kind not in "iu" or array.ndim != 1:
        raise ManifestError(f"class_counts must be a list of integers, got {array.dtype} of shape {list(array.shape)}")
    array = array.astype(np.int64, copy=array.dtype != np.int64 or array.flags.writeable)
    array.flags.writeable = False
    return array


def _check_class_counts(counts: np.ndarray, where: str) -> None:
    negative = np.flatnonzero(counts < 0)
    if negative.size:
        first = int(negative[0])
        raise ManifestError(f"{where}: class_counts[{first}] must be >= 0, got {int(counts[first])}")


def _decode_names(offsets: np.ndarray, data: np.ndarray, where: str) -> list[str]:
    """Names by label from a class table's ``name_offsets`` / ``name_bytes``."""
    blob = data.tobytes()
    bounds = offsets.tolist()
    try:
        text = blob.decode("ascii")  # the common case: byte offsets are character offsets
        return [text[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    except UnicodeDecodeError:
        pass
    names = []
    for label, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        try:
            names.append(blob[a:b].decode("utf-8"))
        except UnicodeDecodeError as err:
            raise ManifestError(f"{where}: the name of label {label} is not UTF-8: {err}") from err
    return names


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


def _read_raw(location: str) -> bytes:
    scheme = urllib.parse.urlparse(location).scheme
    if scheme in ("http", "https"):
        with urllib.request.urlopen(location, timeout=60) as response:  # noqa: S310 - user-given URL
            return response.read()
    if scheme in REMOTE_SCHEMES:
        try:
            import fsspec
        except ImportError as err:  # pragma: no cover - fsspec ships with the stack
            raise ManifestError(f"{location}: reading {scheme}:// needs fsspec") from err
        with fsspec.open(location, "rb") as handle:
            return handle.read()
    return Path(location).read_bytes()


def manifest_location(dir_or_file: str | os.PathLike) -> str:
    """The manifest's path or URL for a shard folder, a folder URL, or the manifest itself."""
    text = str(dir_or_file)
    if text.endswith(".json"):
        return text
    if is_remote(text):
        return text.rstrip("/") + "/" + MANIFEST_NAME
    return str(Path(text) / MANIFEST_NAME)


def read_manifest(dir_or_file: str | os.PathLike) -> Manifest:
    """Read a shard set's manifest (format 2, or format 1) from a folder, a ``manifest.json`` path, or either
    as an http(s) / fsspec URL.

    Args:
        dir_or_file: the shard folder (or its URL), or the manifest file (or its URL).

    Returns:
        The manifest, with ``shards`` resolved to full paths / URLs beside the manifest.

    Raises:
        FileNotFoundError: no manifest (or no class table) at that location.
        ValueError: the file is not a valid manifest, or its class table is damaged or inconsistent (the
            message names the file and the field).
    """
    location = manifest_location(dir_or_file)
    try:
        text = _read_raw(location).decode("utf-8")
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{location}: no shard manifest here (pack or synth writes one)") from err
    except OSError as err:
        raise FileNotFoundError(f"{location}: cannot read the shard manifest: {err}") from err
    except UnicodeDecodeError as err:
        raise ManifestError(f"{location}: not JSON: {err}") from err
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise ManifestError(f"{location}: not JSON: {err}") from err
    if not isinstance(raw, dict):
        raise ManifestError(f"{location}: expected a JSON object, got {type(raw).__name__}")
    if raw.get("format") not in READABLE_FORMATS:
        raise ManifestError(f"{location}: format {raw.get('format')!r} is not one of {list(READABLE_FORMATS)}")
    base = location.rsplit("/", 1)[0] if "/" in location else "."
    table_field = "class_counts" if raw["format"] == FORMAT_V1 else "classes"
    for key in ("num_classes", "num_samples", "shards", table_field):
        if key not in raw:
            raise ManifestError(f"{location}: missing field '{key}'")
    shards = raw["shards"]
    if not isinstance(shards, list) or not all(isinstance(e, dict) for e in shards):
        raise ManifestError(f"{location}: shards must be a list of {{name, count}} objects")
    for i, entry in enumerate(shards):
        if not _is_file_name(entry.get("name")):
            raise ManifestError(f"{location}: shards[{i}].name must be a file name beside the manifest, "
                             f"got {entry.get('name')!r}")
    image_size = raw.get("image_size")
    if image_size is not None and (not isinstance(image_size, list) or len(image_size) != 2):
        raise ManifestError(f"{location}: image_size must be [H, W] or null, got {image_size!r}")
    fields: dict[str, Any] = dict(
        num_classes=_integer(raw["num_classes"], "num_classes", location),
        num_samples=_integer(raw["num_samples"], "num_samples", location),
        shards=[f"{base}/{entry['name']}" for entry in shards],
        shard_counts=[_integer(e.get("count"), f"shards[{i}].count", location) for i, e in enumerate(shards)],
        source=raw.get("source", {}),
        content_hash=str(raw.get("content_hash", "")),
        image_size=None if not image_size else tuple(_integer(v, "image_size", location) for v in image_size),
        location=location,
        shard_hashes=[str(entry["sha256"]) for entry in shards] if all("sha256" in e for e in shards) else [],
        shard_bytes=[_integer(e["bytes"], f"shards[{i}].bytes", location) for i, e in enumerate(shards)]
        if all("bytes" in e for e in shards) else [],
    )
    if fields["num_classes"] < 1:
        raise ManifestError(f"{location}: num_classes must be >= 1, got {fields['num_classes']}")
    if raw["format"] == FORMAT_V1:
        if not isinstance(raw["class_counts"], list):
            raise ManifestError(f"{location}: class_counts must be a list")
        label_map = raw.get("label_map", {})
        if not isinstance(label_map, dict):
            raise ManifestError(f"{location}: label_map must be an object {{name: label}}")
        return Manifest(
            class_counts=[_integer(c, f"class_counts[{i}]", location) for i, c in enumerate(raw["class_counts"])],
            label_map={str(k): _integer(v, f"label_map[{k!r}]", location) for k, v in label_map.items()},
            format=FORMAT_V1, **fields,
        )
    table_location, counts, offsets, name_bytes = _read_class_table(raw["classes"], base, location,
                                                                   fields["num_classes"])
    manifest = Manifest(class_counts=counts, format=FORMAT, **fields)
    manifest._names.encoded = (offsets, name_bytes, table_location)
    return manifest


def _is_file_name(name: Any) -> bool:
    return isinstance(name, str) and bool(name) and "/" not in name and name not in (".", "..")


def _read_class_table(entry: Any, base: str, location: str, num_classes: int
                      ) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    """Read and check a format-2 class table: ``(its location, class_counts, name_offsets, name_bytes)``."""
    if not isinstance(entry, dict):
        raise ManifestError(f"{location}: classes must be an object {{name, bytes, sha256}}, got {entry!r}")
    if not _is_file_name(entry.get("name")):
        raise ManifestError(f"{location}: classes.name must be a file name beside the manifest, got {entry.get('name')!r}")
    size = _integer(entry.get("bytes"), "classes.bytes", location)
    digest = entry.get("sha256")
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        raise ManifestError(f"{location}: classes.sha256 must be 64 lower-case hex digits, got {digest!r}")
    table = f"{base}/{entry['name']}"
    try:
        data = _read_raw(table)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{table}: the class table named by {location} is missing") from err
    except OSError as err:
        raise FileNotFoundError(f"{table}: cannot read the class table named by {location}: {err}") from err
    if len(data) != size:
        raise ManifestError(f"{table}: {len(data)} bytes but {location} says classes.bytes={size}")
    if hashlib.sha256(data).hexdigest() != digest:
        raise ManifestError(f"{table}: SHA-256 differs from classes.sha256 in {location} (damaged or replaced)")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            missing = [key for key in _TABLE_KEYS if key not in npz.files]
            if missing:
                raise ManifestError(f"{table}: missing array(s) {missing}")
            counts, offsets, name_bytes = (npz[key] for key in _TABLE_KEYS)
    except ValueError as err:  # also numpy's refusal of a pickled (object) array
        raise ManifestError(f"{table}: not a class table: {err}") from err
    except (OSError, EOFError, KeyError) as err:
        raise ManifestError(f"{table}: not a class table: {err}") from err
    for key, array, kinds, shape in (("class_counts", counts, "iu", (num_classes,)),
                                     ("name_offsets", offsets, "iu", (num_classes + 1,)),
                                     ("name_bytes", name_bytes, "u", None)):
        if array.dtype.kind not in kinds or array.ndim != 1:
            raise ManifestError(f"{table}: {key} must be a 1-d integer array, got {array.dtype} of shape "
                             f"{list(array.shape)}")
        if shape is not None and array.shape != shape:
            raise ManifestError(f"{table}: {key} has {array.shape[0]} entries for num_classes={num_classes} "
                             f"(expected {shape[0]})")
    _check_class_counts(counts, table)
    offsets = offsets.astype(np.int64, copy=False)
    if offsets[0] != 0 or offsets[-1] != name_bytes.size or (np.diff(offsets) < 0).any():
        raise ManifestError(f"{table}: name_offsets must rise from 0 to the {name_bytes.size} name bytes")
    return table, counts, offsets, name_bytes.astype(np.uint8, copy=False)


def _integer(value: Any, field_name: str, location: str) -> int:
    """``value`` as an int, or a ValueError naming the field (no floats, strings or booleans)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ManifestError(f"{location}: {field_name} must be an integer, got {value!r}")
    return value


def write_manifest(out_dir: str | os.PathLike, manifest: Manifest) -> Path:
    """Write ``manifest`` in format 2 into ``out_dir``: its class table, then ``manifest.json`` (each atomically),
    then remove the class tables no longer named; returns the manifest's path."""
    out = Path(out_dir)
    table = manifest.class_table_bytes()
    digest = hashlib.sha256(table).hexdigest()
    name = f"{CLASS_TABLE_PREFIX}{digest[:16]}.npz"
    write_bytes(out / name, table)
    path = out / MANIFEST_NAME
    write_json(path, manifest.to_json_dict({"name": name, "bytes": len(table), "sha256": digest}))
    for stale in out.glob(f"{CLASS_TABLE_PREFIX}*.npz"):
        if stale.name != name:
            stale.unlink(missing_ok=True)
    manifest.location = str(path)
    manifest.format = FORMAT
    return path

"""MXNet RecordIO (``train.rec`` + ``train.idx``) as insightface distributes MS1MV3, Glint360K, WebFace42M,
read natively (no mxnet), plus a writer used by tests and for interop.

A ``.rec`` file is a sequence of records, each ``uint32 magic = 0xced7230a``, ``uint32 lrecord`` (upper 3 bits
``cflag``, lower 29 bits the length), then the data padded to 4 bytes. A payload that contains the magic
number at a 4-byte-aligned offset is split there into parts (cflag 1 = first, 2 = middle, 3 = last; 0 =
whole record), and the reader joins the parts with the magic in between. The ``.idx`` file has one
``index<TAB>byte offset`` line per record.

An image record's payload starts with the header ``struct IRHeader {uint32 flag; float label; uint64 id;
uint64 id2}`` (``<IfQQ``, 24 bytes). With ``flag > 0`` the label is the ``flag`` floats that follow the
header (the identity is the first); the image bytes come after. insightface's record 0 is a header record:
``flag > 0`` and ``label[0]`` is one past the last image record, so images are records ``1 .. label[0]-1``.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Sequence

import numpy as np

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LREC = struct.Struct("<II")
IR_HEADER = struct.Struct("<IfQQ")


@dataclass
class IRRecord:
    """One unpacked image record."""

    flag: int
    labels: np.ndarray  # float32 [max(1, flag)]
    id: int
    id2: int
    payload: bytes

    @property
    def label(self) -> float:
        """The identity label (the first label)."""
        return float(self.labels[0])


def read_idx(path: str | os.PathLike) -> list[tuple[int, int]]:
    """``(index, offset)`` of every record listed in an ``.idx`` file, in file order.

    Raises:
        ValueError: a line is not ``index<TAB>offset`` (the message names the file and line).
    """
    entries = []
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{path}:{number}: expected 'index<TAB>offset', got {line.strip()!r}")
            entries.append((int(parts[0]), int(parts[1])))
    return entries


def read_record(handle: BinaryIO, offset: int) -> bytes:
    """Read the (possibly multi-part) record starting at byte ``offset``.

    Raises:
        ValueError: no record magic at that offset, or the file ends inside the record.
    """
    handle.seek(offset)
    parts: list[bytes] = []
    while True:
        head = handle.read(_LREC.size)
        if len(head) < _LREC.size:
            raise ValueError(f"record at offset {offset}: file ends inside the record")
        magic, lrecord = _LREC.unpack(head)
        if magic != MAGIC:
            raise ValueError(f"record at offset {offset}: bad magic {magic:#x} (expected {MAGIC:#x})")
        cflag, length = lrecord >> 29, lrecord & ((1 << 29) - 1)
        data = handle.read(length)
        if len(data) < length:
            raise ValueError(f"record at offset {offset}: file ends inside the record")
        handle.seek((4 - length % 4) % 4, os.SEEK_CUR)
        parts.append(data)
        if cflag in (0, 3):
            return _MAGIC_BYTES.join(parts)
        if cflag not in (1, 2):
            raise ValueError(f"record at offset {offset}: bad cflag {cflag}")


def unpack_record(record: bytes) -> IRRecord:
    """Split a record into its IRHeader, labels and image bytes.

    Raises:
        ValueError: the record is shorter than its header says.
    """
    if len(record) < IR_HEADER.size:
        raise ValueError(f"record of {len(record)} bytes is shorter than the {IR_HEADER.size}-byte IRHeader")
    flag, label, rid, rid2 = IR_HEADER.unpack_from(record)
    body = record[IR_HEADER.size:]
    if flag > 0:
        if len(body) < 4 * flag:
            raise ValueError(f"record header says {flag} labels but only {len(body)} bytes follow")
        labels = np.frombuffer(body[:4 * flag], dtype="<f4").astype(np.float32)
        body = body[4 * flag:]
    else:
        labels = np.array([label], dtype=np.float32)
    return IRRecord(flag, labels, rid, rid2, body)


def pack_record(label: float | Sequence[float], payload: bytes, record_id: int = 0, record_id2: int = 0) -> bytes:
    """Build a record payload: IRHeader (+ label floats when ``label`` is a sequence) + ``payload``."""
    if isinstance(label, (int, float)):
        return IR_HEADER.pack(0, float(label), record_id, record_id2) + payload
    labels = np.asarray(label, dtype="<f4")
    return IR_HEADER.pack(len(labels), 0.0, record_id, record_id2) + labels.tobytes() + payload


def _write_one(handle: BinaryIO, data: bytes) -> None:
    # mxnet's RecordIOWriter::WriteRecord: split at every 4-byte-aligned occurrence of the magic
    start = 0
    aligned_end = len(data) // 4 * 4
    for i in range(0, aligned_end, 4):
        if data[i:i + 4] == _MAGIC_BYTES:
            handle.write(_LREC.pack(MAGIC, ((1 if start == 0 else 2) << 29) | (i - start)))
            handle.write(data[start:i])
            start = i + 4
    length = len(data) - start
    handle.write(_LREC.pack(MAGIC, ((3 if start else 0) << 29) | length))
    handle.write(data[start:])
    handle.write(b"\x00" * ((4 - length % 4) % 4))


def write_recordio(rec_path: str | os.PathLike, idx_path: str | os.PathLike,
                   records: Sequence[tuple[int, bytes]]) -> None:
    """Write ``(index, record bytes)`` pairs as a ``.rec`` + ``.idx`` pair (mxnet's indexed RecordIO layout)."""
    with open(rec_path, "wb") as rec, open(idx_path, "w") as idx:
        for index, data in records:
            idx.write(f"{index}\t{rec.tell()}\n")
            _write_one(rec, data)


def write_insightface_rec(directory: str | os.PathLike, images: Sequence[tuple[int, bytes]],
                          multi_label: bool = False) -> tuple[Path, Path]:
    """Write ``(label, image bytes)`` as insightface's ``train.rec`` / ``train.idx``: header record 0, then the
    images as records ``1..N`` (labels as one float, or as a float array when ``multi_label``), then one
    identity record per label giving its image range."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    num = len(images)
    labels = sorted({label for label, _ in images})
    records: list[tuple[int, bytes]] = []
    for i, (label, data) in enumerate(images, start=1):
        records.append((i, pack_record([float(label), 0.0] if multi_label else float(label), data, i)))
    for j, label in enumerate(labels):
        members = [i for i, (lab, _) in enumerate(images, start=1) if lab == label]
        records.append((num + 1 + j, pack_record([float(members[0]), float(members[-1] + 1)], b"")))
    header = pack_record([float(num + 1), float(num + 1 + len(labels))], b"")
    write_recordio(directory / "train.rec", directory / "train.idx", [(0, header)] + records)
    return directory / "train.rec", directory / "train.idx"

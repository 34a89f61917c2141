"""Readers for published verification sets: LFW-style ``pairs.txt`` + image folder, insightface ``.bin``.

Both produce a :class:`~distrib_face.data.pairset.PairSet` (images kept as their encoded bytes), the format
``distrib-face pack-pairs`` writes and ``distrib-face eval`` and the trainer read.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from distrib_face.data.pairset import PairSet, load_pairset

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".webp")


# --------------------------------------------------------------------------------------------------- .bin


class _NoGlobalsUnpickler(pickle.Unpickler):
    """An unpickler that can build only pickle's built-in values, never a class or a function.

    Every opcode that names a global (GLOBAL, STACK_GLOBAL, INST, OBJ, the EXT* registry) goes through
    ``find_class``, which refuses; without a callable on the stack REDUCE / BUILD / NEWOBJ cannot run code.
    Persistent ids are refused too. What can come out is then limited to None, bool, int, float, str,
    bytes, bytearray, list, tuple, dict, set and frozenset, and the caller checks the structure further.
    """

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: only plain data is allowed")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError(f"refusing persistent id {pid!r}: only plain data is allowed")


def restricted_loads(data: bytes) -> Any:
    """Unpickle ``data`` without ever importing or calling anything (see :class:`_NoGlobalsUnpickler`).

    Python 2 ``str`` values come back as ``bytes`` (``encoding="bytes"``), as insightface reads its files.
    """
    return _NoGlobalsUnpickler(io.BytesIO(data), encoding="bytes").load()


def read_bin(path: str | os.PathLike, name: str | None = None) -> PairSet:
    """Read an insightface verification ``.bin`` (a pickle of ``(list of JPEG bytes, list of bools)``).

    The pickle is read by :func:`restricted_loads`, so a file that tries to import or call anything is
    refused before any of it runs; the result must then be exactly two sequences, the first of ``bytes``
    (twice as many as pairs) and the second of ``bool`` (or 0/1 ints).

    Args:
        path: the ``.bin`` file.
        name: the set's name; defaults to the file stem (``lfw``, ``cfp_fp``, ``agedb_30``, ...).

    Raises:
        ValueError: the file is not a well-formed verification ``.bin`` (the message names the file).
    """
    path = Path(path)
    try:
        obj = restricted_loads(path.read_bytes())
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError) as err:
        raise ValueError(f"{path}: refused or unreadable pickle: {err}") from err
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise ValueError(f"{path}: expected a pair (images, issame), got {type(obj).__name__}")
    images, issame = obj
    if not isinstance(images, (list, tuple)) or not isinstance(issame, (list, tuple)):
        raise ValueError(
            f"{path}: images and issame must be lists, got {type(images).__name__}, {type(issame).__name__}"
        )
    bad = next((i for i, b in enumerate(images) if not isinstance(b, (bytes, bytearray))), None)
    if bad is not None:
        raise ValueError(f"{path}: image {bad} is {type(images[bad]).__name__}, not bytes")
    bad = next((i for i, s in enumerate(issame) if not (isinstance(s, bool) or s in (0, 1))), None)
    if bad is not None:
        raise ValueError(f"{path}: issame[{bad}] = {issame[bad]!r} is not a bool")
    if len(images) != 2 * len(issame):
        raise ValueError(f"{path}: {len(images)} images for {len(issame)} pairs (expected {2 * len(issame)})")
    return PairSet(
        name=name or path.stem,
        images=[bytes(b) for b in images],
        issame=np.array([bool(s) for s in issame], dtype=bool),
    )


def write_bin(path: str | os.PathLike, pairs: PairSet) -> Path:
    """Write ``pairs`` as an insightface ``.bin`` (for tests and for tools that want that format)."""
    path = Path(path)
    path.write_bytes(pickle.dumps((list(pairs.images), [bool(s) for s in pairs.issame]), protocol=4))
    return path


# ------------------------------------------------------------------------------------------ LFW pairs.txt


def _find_image(images_dir: Path, name: str, number: int, pairs_path: Path, line_no: int) -> Path:
    stem = images_dir / name / f"{name}_{number:04d}"
    for ext in IMAGE_EXTENSIONS:
        candidate = stem.with_name(stem.name + ext)
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{pairs_path}:{line_no}: image {stem}.jpg not found (also tried {IMAGE_EXTENSIONS[1:]})")


def read_lfw_pairs(
    pairs_path: str | os.PathLike, images_dir: str | os.PathLike, name: str | None = None
) -> PairSet:
    """Read an LFW-style ``pairs.txt`` and its image folder.

    Format: a header line, then one pair per line - ``name n1 n2`` (two images of one person) or
    ``name1 n1 name2 n2`` (two people); image ``n`` of ``name`` is ``images_dir/name/name_%04d.jpg``
    (other extensions are tried too). The header is ``folds pairs_per_fold`` (LFW: ``10 300``; each fold is
    that many same pairs then as many different ones) and fixes each pair's fold; a one-number header
    (``pairsDevTrain.txt``) or none gives no folds (the evaluator then splits contiguously).

    Args:
        pairs_path: the pairs file.
        images_dir: the folder holding one sub-folder per person.
        name: the set's name; defaults to the images folder's name.

    Raises:
        ValueError: a malformed line (the message gives file and line number) or a count that does not match
            the header. FileNotFoundError: a missing image.
    """
    pairs_path, images_dir = Path(pairs_path), Path(images_dir)
    lines = [(i + 1, line.split()) for i, line in enumerate(pairs_path.read_text().splitlines()) if line.strip()]
    if not lines:
        raise ValueError(f"{pairs_path}: empty pairs file")
    num_folds = pairs_per_fold = None
    first_no, first = lines[0]
    if all(tok.isdigit() for tok in first) and len(first) in (1, 2):
        if len(first) == 2:
            num_folds, pairs_per_fold = int(first[0]), int(first[1])
        lines = lines[1:]
    images: list[bytes] = []
    identities: list[str] = []
    issame: list[bool] = []
    for line_no, tokens in lines:
        try:
            if len(tokens) == 3:
                people = [(tokens[0], int(tokens[1])), (tokens[0], int(tokens[2]))]
                same = True
            elif len(tokens) == 4:
                people = [(tokens[0], int(tokens[1])), (tokens[2], int(tokens[3]))]
                same = False
            else:
                raise ValueError(f"{len(tokens)} fields")
        except ValueError as err:
            raise ValueError(
                f"{pairs_path}:{line_no}: expected 'name n1 n2' or 'name1 n1 name2 n2', "
                f"got {' '.join(tokens)!r} ({err})"
            ) from err
        for person, number in people:
            images.append(_find_image(images_dir, person, number, pairs_path, line_no).read_bytes())
            identities.append(person)
        issame.append(same)
    folds = None
    if num_folds is not None:
        expected = num_folds * 2 * pairs_per_fold
        if len(issame) != expected:
            raise ValueError(
                f"{pairs_path}: header says {num_folds} folds x {pairs_per_fold} pairs "
                f"({expected} pair lines), found {len(issame)}"
            )
        folds = np.arange(len(issame)) // (2 * pairs_per_fold)
    return PairSet(name=name or images_dir.name, images=images, issame=np.array(issame, dtype=bool), folds=folds,
                   identities=identities)


# ------------------------------------------------------------------------------------------------- any


def load_any_pairs(path: str | os.PathLike, images_dir: str | os.PathLike | None = None) -> PairSet:
    """Read a verification set from whatever ``path`` is.

    - a ``.bin`` file: :func:`read_bin`;
    - a ``.txt`` file: :func:`read_lfw_pairs` with ``images_dir`` (default: the file's folder);
    - a folder: its ``pairs.txt``, images in that folder (or in ``images_dir``);
    - a pair-set file (:func:`~distrib_face.data.pairset.load_pairset`, a ``.npz``).

    Raises:
        FileNotFoundError: nothing at ``path``, or a folder without ``pairs.txt``.
        ValueError: a file of another kind (the message names the kinds accepted), or a broken one.
    """
    path = Path(path)
    if path.is_dir():
        pairs_txt = path / "pairs.txt"
        if not pairs_txt.is_file():
            raise FileNotFoundError(f"{path}: a folder given as a pair set must contain pairs.txt")
        return read_lfw_pairs(pairs_txt, images_dir or path, name=path.name)
    if path.suffix == ".bin":
        return read_bin(path)
    if path.suffix == ".txt":
        folder = Path(images_dir) if images_dir else path.parent
        return read_lfw_pairs(path, folder, name=folder.name)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such pair-set file")
    if not zipfile.is_zipfile(path):  # a .npz is a zip archive; anything else would reach numpy's unpickler
        raise ValueError(
            f"{path}: not a pair set (not a .npz archive): give a pair-set .npz (distrib-face pack-pairs), an "
            "insightface .bin, a pairs.txt or a folder holding pairs.txt"
        )
    return load_pairset(path)

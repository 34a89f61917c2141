"""Image sources for ``distrib-face embed``: what to read, and reading it in worker processes.

A source is one of

- ``shards``: a shard folder (``manifest.json`` beside webdataset tars, or the manifest path itself); labels
  come from the shards, identity names from the manifest's ``label_map``, names are ``SHARD/KEY``;
- ``folder``: one sub-folder per identity (:func:`distrib_face.data.pack.scan_folder`: the labels ``pack``
  would give, identities sorted by name); names are paths relative to the folder;
- ``flat``: a folder of images with no identity sub-folders; labels ``-1``, no identity names;
- ``list``: a ``path label`` text file (:func:`distrib_face.data.pack.scan_list`); names are the paths as
  written in the file.

Images are decoded in worker processes (``forkserver`` where available, else ``spawn``; never ``fork``,
which deadlocks a process that already runs threads: torch, ONNX Runtime, tqdm's monitor). Each task is a
chunk of images; results come back in submission order, every wait is bounded, and a worker that dies
fails the run with a message naming it (number, pid, exit code or signal, the images it was decoding)
instead of hanging it. Readers die with the process that started them, as the training loader's do
(``PR_SET_PDEATHSIG`` and a parent watch, :func:`distrib_face.data.procs.watch_parent`). An image that
cannot be decoded is skipped and counted under a named reason (:func:`decode_safely`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import multiprocessing as mp
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from distrib_face.data.decode import BadSample
from distrib_face.eval.embed import decode_rgb

logger = logging.getLogger(__name__)

SOURCE_KINDS = ("auto", "shards", "folder", "flat", "list")

# why an image was skipped (the keys of the skip counts in the output and on stderr)
SKIP_REASONS: dict[str, str] = {
    "unreadable_file": "the file could not be read (permissions, vanished, I/O error)",
    "missing_image": "a shard sample without an image member",
    "empty": "zero bytes",
    "not_an_image": "no decoder recognises the bytes",
    "truncated": "the image data ends early",
    "too_large": "the header claims more pixels than the limit (a decompression bomb)",
    "undecodable": "a decoder error inside the image data",
}
"""Why an image was skipped: the data side's reasons (:data:`distrib_face.data.decode.SKIP_REASONS`) plus the
two that only a file source has (``unreadable_file``, ``empty``)."""


class SourceError(ValueError):
    """A source that cannot be read as any kind (the message names the path)."""


@dataclass
class SourceItem:
    """One image of a file-based source.

    Attributes:
        name: the image's key in the output (path relative to the source, or as written in a list file).
        path: the file to read.
        label: identity label, ``-1`` when unknown.
    """

    name: str
    path: str
    label: int = -1


@dataclass
class ImageSource:
    """What ``embed`` reads.

    Attributes:
        kind: ``shards``, ``folder``, ``flat`` or ``list``.
        path: the source as given.
        identities: label -> identity name (empty when the source has none).
        items: the images of a file-based source, in reading order (empty for ``shards``).
        shards: the shard paths / URLs of a ``shards`` source, in manifest order.
        shard_counts: samples in each shard (manifest).
        num_images: images to read.
    """

    kind: str
    path: str
    identities: list[str]
    items: list[SourceItem] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    shard_counts: list[int] = field(default_factory=list)
    num_images: int = 0

    def identity(self, label: int) -> str:
        """The identity name of ``label`` ("" when unknown)."""
        return self.identities[label] if 0 <= label < len(self.identities) else ""


def _images_in(folder: Path) -> list[Path]:
    from distrib_face.data.pack import IMAGE_EXTENSIONS

    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def scan_image_source(source: str | os.PathLike, kind: str = "auto") -> ImageSource:
    """Find out what ``source`` is and list its images.

    Args:
        source: a shard folder or ``manifest.json``, an image folder (per identity or flat), or a list file.
        kind: one of :data:`SOURCE_KINDS`; ``auto`` decides from what is there (``manifest.json`` -> shards;
            a folder with image sub-folders -> folder; a folder of images -> flat; a file -> list).

    Raises:
        SourceError: nothing readable there (the message names the path and what was expected).
    """
    from distrib_face.data.manifest import MANIFEST_NAME, is_remote, read_manifest
    from distrib_face.data.pack import IMAGE_EXTENSIONS, PackError, scan_folder, scan_list

    if kind not in SOURCE_KINDS:
        raise SourceError(f"source kind must be one of {SOURCE_KINDS}, got {kind!r}")
    text = str(source)
    path = Path(source)
    if kind == "auto":
        if text.endswith(".json") or is_remote(text) or (path.is_dir() and (path / MANIFEST_NAME).is_file()):
            kind = "shards"
        elif path.is_dir():
            has_identity_folders = any(p.is_dir() and _images_in(p) for p in path.iterdir())
            kind = "folder" if has_identity_folders else "flat"
        elif path.is_file():
            kind = "list"
        else:
            raise SourceError(f"{source}: no such file or folder")
    try:
        if kind == "shards":
            try:
                manifest = read_manifest(source)
            except FileNotFoundError as err:
                raise SourceError(str(err)) from err
            names = manifest.class_names
            return ImageSource("shards", text, names if any(names) else [], shards=list(manifest.shards),
                               shard_counts=list(manifest.shard_counts), num_images=manifest.num_samples)
        if kind == "folder":
            scanned = scan_folder(path)
            loose = _images_in(path)
            if loose:
                logger.warning("%s: %d images directly in the folder are ignored (identity sub-folders are read)",
                               path, len(loose))
            labels = {name: i for i, name in enumerate(scanned.identities)}
            items = [SourceItem(str(Path(it.ref).relative_to(path)), it.ref, labels[it.identity])
                     for it in scanned.items]
            return ImageSource("folder", text, list(scanned.identities), items=items, num_images=len(items))
        if kind == "flat":
            if not path.is_dir():
                raise SourceError(f"{source}: not a folder")
            files = _images_in(path)
            if not files:
                raise SourceError(f"{source}: no images (extensions {IMAGE_EXTENSIONS}) and no identity sub-folders")
            items = [SourceItem(p.name, str(p)) for p in files]
            return ImageSource("flat", text, [], items=items, num_images=len(items))
        # list
        scanned = scan_list(path)
        labels = {name: i for i, name in enumerate(scanned.identities)}
        base = path.parent
        items = []
        for it in scanned.items:
            ref = Path(it.ref)
            name = str(ref.relative_to(base)) if ref.is_relative_to(base) else str(ref)
            items.append(SourceItem(name, it.ref, labels[it.identity]))
        return ImageSource("list", text, list(scanned.identities), items=items, num_images=len(items))
    except PackError as err:
        raise SourceError(str(err)) from err
    except UnicodeDecodeError as err:
        raise SourceError(f"{source}: not a text list file ({err})") from err


# ------------------------------------------------------------------------------------------ decoding


def decode_safely(data: bytes | None, size: tuple[int, int]) -> tuple[np.ndarray | None, str, str]:
    """Decode one image for embedding with the data side's safe decoder, or say why not.

    Returns:
        ``(uint8 [H, W, 3] or None, reason, message)``; ``reason`` is a key of :data:`SKIP_REASONS` or "".
    """
    if data is None:
        return None, "missing_image", "no image in the sample"
    if len(data) == 0:
        return None, "empty", "0 bytes"
    try:
        return decode_rgb(data, size), "", ""
    except BadSample as bad:
        return None, bad.reason, bad.detail


@dataclass
class DecodedChunk:
    """What a reader returns for one task.

    Attributes:
        indices: positions (in the source) of the decoded images, ascending.
        images: uint8 [len(indices), H, W, 3].
        skipped: ``(position, reason, message)`` of each image that was not decoded.
    """

    indices: list[int]
    images: np.ndarray
    skipped: list[tuple[int, str, str]]


# In a reader process: (the pool's shared table, this reader's row), set by _start_reader. The row holds the
# reader's pid and the first and last position of the chunk it decodes (-1 between chunks), so the parent
# can name a reader that died and what it was reading.
_READER_ROW: tuple[Any, int] | None = None
_TABLE_COLUMNS = 3


def _start_reader(parent_pid: int, table: Any, next_row: Any) -> None:
    """Initialiser of a reader process: die with the process that embeds (``parent_pid``), exactly as the
    training loader's readers do (``PR_SET_PDEATHSIG`` and a watch thread, :func:`distrib_face.data.procs.
    watch_parent`), and claim a row of ``table``."""
    from distrib_face.data.procs import watch_parent

    global _READER_ROW
    watch_parent(parent_pid)
    with next_row.get_lock():
        row = next_row.value
        next_row.value += 1
    if (row + 1) * _TABLE_COLUMNS <= len(table):
        table[row * _TABLE_COLUMNS:(row + 1) * _TABLE_COLUMNS] = [os.getpid(), -1, -1]
        _READER_ROW = (table, row)


def _mark_reading(first: int, last: int) -> None:
    if _READER_ROW is not None:
        table, row = _READER_ROW
        table[row * _TABLE_COLUMNS + 1:(row + 1) * _TABLE_COLUMNS] = [first, last]


def decode_task(task: tuple[list[tuple[int, str | bytes | None]], tuple[int, int]]) -> DecodedChunk:
    """Decode one chunk: ``([(position, file path or bytes or None), ...], (H, W))`` (runs in a reader)."""
    entries, size = task
    if entries:
        _mark_reading(entries[0][0], entries[-1][0])
    indices, arrays, skipped = [], [], []
    for index, payload in entries:
        if isinstance(payload, str):
            try:
                with open(payload, "rb") as handle:
                    payload = handle.read()
            except OSError as err:
                skipped.append((index, "unreadable_file", f"{type(err).__name__}: {err}"))
                continue
        array, reason, message = decode_safely(payload, size)
        if array is None:
            skipped.append((index, reason, message))
            continue
        indices.append(index)
        arrays.append(array)
    images = np.stack(arrays) if arrays else np.zeros((0, size[0], size[1], 3), np.uint8)
    _mark_reading(-1, -1)
    return DecodedChunk(indices, images, skipped)


def iter_payloads(source: ImageSource) -> Iterator[tuple[int, str, int, str | bytes | None]]:
    """``(position, name, label, payload)`` of every image in reading order (payload: a path, or shard bytes).

    Shards are read in the calling process (plain tar streaming, cheap next to decoding); a truncated or
    unreadable shard is logged (with the number of samples it lost), and reading goes on with the next shard.
    """
    if source.kind != "shards":
        for position, item in enumerate(source.items):
            yield position, item.name, item.label, item.path
        return
    from distrib_face.data.stream import iter_shard

    position = 0
    for index, (url, expected) in enumerate(zip(source.shards, source.shard_counts)):
        shard_name = url.rstrip("/").rsplit("/", 1)[-1]
        for sample in iter_shard(url, index, expected=expected, allow_missing=True):
            if not sample.key:  # a marker for samples a cut-short or missing shard did not deliver
                logger.warning("%s: %d sample(s) lost (%s)", shard_name, sample.lost, sample.reason)
                continue
            # a sample without a usable label is still embedded (label -1); one without an image is skipped
            yield position, f"{shard_name}/{sample.key}", -1 if sample.label is None else sample.label, sample.image
            position += 1


def reader_context() -> mp.context.BaseContext:
    """``forkserver`` where the platform has it, else ``spawn``; never ``fork`` (see the module docstring)."""
    methods = mp.get_all_start_methods()
    return mp.get_context("forkserver" if "forkserver" in methods else "spawn")


class ReaderPool:
    """Decode chunks in worker processes, results in submission order, every wait bounded.

    Readers die with the calling process (a SIGKILLed ``embed`` leaves none behind: the training loader's
    mechanism, :func:`distrib_face.data.procs.watch_parent`), and a reader that dies is named: its number,
    pid, exit code or signal, and the images it was decoding.

    Args:
        workers: reader processes; 0 decodes in the calling process (no timeout applies there).
        max_in_flight: tasks submitted ahead of the one being waited for (default ``2 * workers``).
        timeout: seconds to wait for one task before giving up with an error.
        describe: what the image at a position is, for the message about a dead reader (default: the position).
    """

    def __init__(self, workers: int, max_in_flight: int | None = None, timeout: float = 300.0,
                 describe: Callable[[int], str] | None = None) -> None:
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.workers, self.timeout = workers, timeout
        self.max_in_flight = max(1, max_in_flight or 2 * workers)
        self.describe = describe or (lambda position: f"image {position}")
        self.executor: concurrent.futures.ProcessPoolExecutor | None = None
        if workers:
            context = reader_context()
            # [workers, 3] int64: pid, first and last position being decoded (written by the readers)
            self._table = context.Array("q", [0] * (_TABLE_COLUMNS * workers), lock=False)
            next_row = context.Value("i", 0)
            self.executor = concurrent.futures.ProcessPoolExecutor(
                max_workers=workers, mp_context=context, initializer=_start_reader,
                initargs=(os.getpid(), self._table, next_row))

    def map(self, tasks: Iterator[Any]) -> Iterator[DecodedChunk]:
        """Decode every task of ``tasks`` (see :func:`decode_task`) and yield the chunks in order."""
        if self.executor is None:
            for task in tasks:
                yield decode_task(task)
            return
        pending: collections.deque[concurrent.futures.Future] = collections.deque()
        for task in tasks:
            pending.append(self.executor.submit(decode_task, task))
            while len(pending) >= self.max_in_flight:
                yield self._result(pending.popleft())
        while pending:
            yield self._result(pending.popleft())

    def _result(self, future: concurrent.futures.Future) -> DecodedChunk:
        try:
            return future.result(timeout=self.timeout)
        except concurrent.futures.TimeoutError as err:
            raise RuntimeError(
                f"a reader process gave no result within {self.timeout:.0f} s (stuck reading or decoding?)"
            ) from err
        except concurrent.futures.process.BrokenProcessPool as err:
            raise RuntimeError(f"a reader process died (out of memory, or killed): {self._dead_readers()}") from err

    def _dead_readers(self) -> str:
        """The readers that died, each with its number, pid, how it ended and what it was reading."""
        # The pool's manager thread reaps the readers (it terminates the rest once one died); reading an exit
        # code while it does races with it for the fork server's one status message (then it reads as 255).
        manager = getattr(self.executor, "_executor_manager_thread", None)
        if manager is not None:
            manager.join(timeout=10)
        processes = list((getattr(self.executor, "_processes", None) or {}).values())
        ended = [p for p in processes if p.exitcode is not None]
        # the pool terminates the others (SIGTERM) once one died: name the ones that ended otherwise
        dead = [p for p in ended if p.exitcode != -signal.SIGTERM] or ended
        if not dead:
            return "no reader found that ended"
        rows = {self._table[i * _TABLE_COLUMNS]: i for i in range(self.workers)}
        return "; ".join(self._dead_reader(p, rows.get(p.pid)) for p in dead)

    def _dead_reader(self, process: Any, row: int | None) -> str:
        code = process.exitcode
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        text = f"reader {'?' if row is None else row + 1} of {self.workers} (pid {process.pid}, {how})"
        first, last = (-1, -1) if row is None else self._table[row * _TABLE_COLUMNS + 1:(row + 1) * _TABLE_COLUMNS]
        if first < 0:
            return text + " between chunks"
        span = f"images {first}-{last}" if last != first else f"image {first}"
        return text + f" while decoding {span}, from {self.describe(first)}"

    def close(self) -> None:
        """Stop the readers; does not wait on one that hangs."""
        if self.executor is None:
            return
        processes = list(getattr(self.executor, "_processes", {}).values())
        self.executor.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.join(timeout=2)  # idle readers leave at once; a stuck one is terminated
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
        self.executor = None

    def __enter__(self) -> "ReaderPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

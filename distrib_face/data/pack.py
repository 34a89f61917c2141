"""``distrib-face pack``: image folders, insightface RecordIO or ``path label`` lists -> webdataset shards.

Reading, checking and (re-)encoding images runs in a process pool; the parent writes the shards in input
order, so the output is the same whatever the number of processes. JPEG input is passed through
unchanged (after a full decode that proves it is readable, unless ``verify=False``); anything else, and
any image to be resized, is encoded as JPEG at ``quality``.

An output folder that already holds shards is refused, resumed or overwritten (``if_exists``), never
mixed: a resumable run keeps ``.pack-progress.json`` (written after every finished shard, with a hash of
the input listing and the options) and a resume with another input or other options is refused.
Unreadable images are skipped and listed with the reason in ``pack_report.json`` (with the identities
that had no image); ``strict=True`` stops at the first one instead.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from distrib_face.atomic import write_json
from distrib_face.data.decode import DEFAULT_MAX_IMAGE_PIXELS, BadSample, decode_image, inspect_image, resize_rgb
from distrib_face.data.manifest import MANIFEST_NAME, Manifest, content_hash, write_manifest
from distrib_face.data.procs import OrderedPool
from distrib_face.data.shards import ShardWriter, encode_sample

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".webp")
PROGRESS_NAME = ".pack-progress.json"
REPORT_NAME = "pack_report.json"
IF_EXISTS = ("refuse", "resume", "overwrite")


class PackError(RuntimeError):
    """Packing cannot start or had to stop (existing output, a strict-mode skip, an unreadable source)."""


@dataclass
class Item:
    """One input image: where to read it (a file path, or a ``.rec`` path and byte offset) and its identity."""

    ref: str
    identity: str
    offset: int = -1  # >= 0: a record of the .rec file ``ref``


@dataclass
class Source:
    """An input listing: the items in packing order and the identities (sorted; label = position)."""

    kind: str
    path: str
    items: list[Item]
    identities: list[str]
    empty_identities: list[str] = field(default_factory=list)


def _natural_key(name: str) -> tuple[Any, ...]:
    return (0, int(name), "") if name.lstrip("-").isdigit() else (1, 0, name)


def scan_folder(root: str | os.PathLike) -> Source:
    """One sub-folder per identity holding jpg / png / bmp / pgm / webp images (other files are ignored)."""
    root = Path(root)
    if not root.is_dir():
        raise PackError(f"{root}: not a folder")
    items, identities, empty = [], [], []
    base = str(root)
    with os.scandir(root) as entries:
        folders = sorted(entry.name for entry in entries if entry.is_dir())
    for name in folders:
        files = _image_files(f"{base}/{name}" if base != "/" else f"/{name}")
        if not files:
            empty.append(name)
            continue
        identities.append(name)
        items += [Item(path, name) for path in files]
    if not items:
        raise PackError(f"{root}: no images in any identity sub-folder (extensions {IMAGE_EXTENSIONS})")
    return Source("folder", str(root), items, identities, empty)


def _image_files(folder: str) -> list[str]:
    """Image files under ``folder`` (any depth, not through symlinked folders), in ``sorted(Path.rglob)``
    order: by path components. ``os.scandir`` knows a file from a folder without a ``stat`` per file, which a
    folder of millions of images needs (``Path.rglob`` + ``is_file`` took 0.85 s for 50k images)."""
    found: list[tuple[tuple[str, ...], str]] = []
    pending: list[tuple[str, tuple[str, ...]]] = [(folder, ())]
    while pending:
        path, parts = pending.pop()
        try:
            with os.scandir(path) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        pending.append((entry.path, (*parts, entry.name)))
                    elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS and entry.is_file():
                        found.append(((*parts, entry.name), entry.path))
        except OSError as err:
            raise PackError(f"{path}: cannot list this folder: {err}") from err
    found.sort()
    return [path for _, path in found]


def scan_list(list_file: str | os.PathLike) -> Source:
    """A text file of ``path label`` lines (paths relative to the list file's folder; ``#`` comments)."""
    list_file = Path(list_file)
    items = []
    with open(list_file) as handle:
        for number, line in enumerate(handle, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2:
                raise PackError(f"{list_file}:{number}: expected 'path label', got {line!r}")
            path = Path(parts[0])
            items.append(Item(str(path if path.is_absolute() else list_file.parent / path), parts[1]))
    if not items:
        raise PackError(f"{list_file}: no 'path label' lines")
    identities = sorted({item.identity for item in items}, key=_natural_key)
    return Source("list", str(list_file), items, identities)


def scan_recordio(rec_or_dir: str | os.PathLike) -> Source:
    """insightface's ``train.rec`` + ``train.idx`` (a folder holding them, or the ``.rec`` path)."""
    from distrib_face.data.recordio import read_idx, read_record, unpack_record

    path = Path(rec_or_dir)
    rec = path / "train.rec" if path.is_dir() else path
    idx = rec.with_suffix(".idx")
    if not rec.is_file() or not idx.is_file():
        raise PackError(f"{rec}: needs both {rec.name} and {idx.name}")
    entries = read_idx(idx)
    offsets = dict(entries)
    with open(rec, "rb") as handle:
        try:
            first = unpack_record(read_record(handle, offsets[min(offsets)]))
        except ValueError as err:
            raise PackError(f"{rec}: cannot read record {min(offsets)}: {err}") from err
        if first.flag > 0:  # insightface header record: images are records 1 .. label[0] - 1
            indices = [i for i in range(1, int(first.labels[0])) if i in offsets]
        else:
            indices = sorted(offsets)
        items = []
        for index in indices:
            try:
                record = unpack_record(read_record(handle, offsets[index]))
            except ValueError as err:
                raise PackError(f"{rec}: record {index}: {err}") from err
            items.append(Item(str(rec), str(int(record.label)), offset=offsets[index]))
    if not items:
        raise PackError(f"{rec}: no image records")
    identities = sorted({item.identity for item in items}, key=_natural_key)
    return Source("recordio", str(rec), items, identities)


def scan_source(source: str | os.PathLike, kind: str = "auto") -> Source:
    """Scan ``source`` as ``folder``, ``recordio`` or ``list`` (``auto`` decides from what is there)."""
    path = Path(source)
    if kind == "auto":
        if path.is_dir():
            kind = "recordio" if (path / "train.rec").is_file() else "folder"
        elif path.suffix == ".rec":
            kind = "recordio"
        elif path.is_file():
            kind = "list"
        else:
            raise PackError(f"{source}: no such file or folder")
    scanners = {"folder": scan_folder, "list": scan_list, "recordio": scan_recordio}
    if kind not in scanners:
        raise PackError(f"source kind must be one of {sorted(scanners)} or auto, got {kind!r}")
    return scanners[kind](path)


# ------------------------------------------------------------------------------------------ worker side
_REC_HANDLES: dict[str, Any] = {}


def _read_bytes(item: Item) -> bytes:
    if item.offset < 0:
        with open(item.ref, "rb") as handle:
            return handle.read()
    from distrib_face.data.recordio import read_record, unpack_record

    handle = _REC_HANDLES.get(item.ref)
    if handle is None:
        handle = _REC_HANDLES[item.ref] = open(item.ref, "rb")
    return unpack_record(read_record(handle, item.offset)).payload


_Job = tuple[int, Item, int, int, int | None, bool, int]  # index, item, label, quality, size, verify, max pixels
_Result = tuple[int, bytes | None, int, str, str, tuple[int, int]]


def _prepare(job: _Job) -> _Result:
    """Load one item: ``(index, its tar members or None, image bytes, error, skip reason, (H, W))``.

    The header is checked first (:func:`distrib_face.data.decode.inspect_image`: pixel limit, truncation), so
    no decoder allocates for a decompression bomb; the reasons are those of the training loader. The sample's
    tar members (key ``index`` as 9 digits) are built here, in the worker (:func:`~distrib_face.data.shards.encode_sample`).
    """
    index, item, label, quality, image_size, verify, max_pixels = job
    data, error, reason, size = _load(item, quality, image_size, verify, max_pixels)
    if data is None:
        return index, None, 0, error, reason, size
    return index, encode_sample(f"{index:09d}", data, label), len(data), "", "", size


def _load(item: Item, quality: int, image_size: int | None, verify: bool,
          max_pixels: int) -> tuple[bytes | None, str, str, tuple[int, int]]:
    """``(jpeg bytes or None, error, skip reason, (H, W))`` of one item."""
    try:
        data = _read_bytes(item)
    except (OSError, ValueError) as err:
        return None, f"{type(err).__name__}: {err}", "not_an_image", (0, 0)
    try:
        header = inspect_image(data, max_pixels)
        size = (header.height, header.width)
        if header.format == "JPEG" and header.mode in ("RGB", "L") and header.bits == 8 and image_size is None:
            if verify:
                decode_image(data, header, max_pixels)  # proves the whole file decodes
            return data, "", "", size
        image = decode_image(data, header, max_pixels)
        if header.mode in ("L", "LA", "I", "I;16", "F", "1"):
            image = image.convert("L")  # grey stays grey (16-bit scaled to 8, not clipped)
        if image_size is not None:
            image = resize_rgb(image, (image_size, image_size))
            size = (image_size, image_size)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        return buffer.getvalue(), "", "", size
    except BadSample as bad:
        return None, str(bad), bad.reason, (0, 0)


# ------------------------------------------------------------------------------------------ parent side
@dataclass
class PackResult:
    """What a pack run did."""

    manifest: Manifest
    skipped: list[dict[str, str]]
    empty_identities: list[str]
    report_path: Path

    @property
    def num_skipped(self) -> int:
        """Images that could not be read."""
        return len(self.skipped)


def _listing_hash(source: Source, options: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for item in source.items:
        digest.update(f"{item.ref}\t{item.offset}\t{item.identity}\n".encode())
    return digest.hexdigest()


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    write_json(path, payload)


def _existing_outputs(out: Path, prefix: str) -> list[Path]:
    names = [MANIFEST_NAME, PROGRESS_NAME, REPORT_NAME]
    found = [out / n for n in names if (out / n).exists()]
    return found + sorted(out.glob(f"{prefix}-*.tar")) + sorted(out.glob(f"{prefix}-*.tar.tmp"))


def pack(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    kind: str = "auto",
    prefix: str = "train",
    max_count: int = 10000,
    max_mb: float = 512.0,
    quality: int = 95,
    image_size: int | None = None,
    workers: int | None = None,
    if_exists: str = "refuse",
    strict: bool = False,
    verify: bool = True,
    progress: bool = True,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    stall_timeout: float = 300.0,
) -> PackResult:
    """Pack ``source`` into ``out_dir/PREFIX-%06d.tar`` shards with a ``manifest.json`` and ``pack_report.json``.

    Args:
        source: an identity-per-folder tree, a ``train.rec`` (or its folder), or a ``path label`` list file.
        out_dir: output folder.
        kind: ``auto``, ``folder``, ``recordio`` or ``list``.
        prefix: shard name prefix.
        max_count: most samples per shard.
        max_mb: most image megabytes per shard.
        quality: JPEG quality for images that are (re-)encoded.
        image_size: resize every image to this square size (default: keep sizes).
        workers: processes reading and checking images (default: the CPU count).
        if_exists: what to do when ``out_dir`` already holds shards: ``refuse``, ``resume`` or ``overwrite``.
        strict: stop at the first unreadable image instead of skipping it.
        verify: fully decode JPEGs that are passed through, to catch corrupt ones.
        progress: show a progress bar.
        max_image_pixels: images whose header claims more pixels are skipped as ``too_large`` before decoding.
        stall_timeout: seconds a worker process may go without finishing a chunk of 16 images before it
            counts as stuck (:class:`~distrib_face.data.procs.WorkerError`, naming it).

    Returns:
        A :class:`PackResult` (the manifest, the skipped images and the empty identities).

    Raises:
        PackError: the output exists and ``if_exists="refuse"``, a resume does not match, or ``strict`` hit a
            bad image.
        WorkerError: a worker process died or got stuck (never mistaken for a bad image).
    """
    if if_exists not in IF_EXISTS:
        raise PackError(f"if_exists must be one of {IF_EXISTS}, got {if_exists!r}")
    if not 1 <= quality <= 100:
        raise PackError(f"quality must be in [1, 100], got {quality}")
    out = Path(out_dir)
    scanned = scan_source(source, kind)
    labels = {name: i for i, name in enumerate(scanned.identities)}
    options = {"kind": scanned.kind, "prefix": prefix, "max_count": max_count, "max_mb": max_mb,
               "quality": quality, "image_size": image_size, "verify": verify, "max_image_pixels": max_image_pixels}
    listing = _listing_hash(scanned, options)

    state, finished = _open_output(out, prefix, if_exists, listing, len(labels), len(scanned.items))
    if finished is not None:
        return finished

    writer = ShardWriter(out, prefix=prefix, max_count=max_count, max_bytes=int(max_mb * 1024 * 1024),
                         start_index=len(state["shards"]))
    class_counts = list(state["class_counts"])
    skipped = list(state["skipped"])
    sizes = {tuple(s) for s in state["sizes"]}
    jobs = ((i, scanned.items[i], labels[scanned.items[i].identity], quality, image_size, verify, max_image_pixels)
            for i in range(state["items_done"], len(scanned.items)))
    remaining = len(scanned.items) - state["items_done"]
    for index, members, image_bytes, error, reason, size in _run_jobs(jobs, workers, remaining, progress,
                                                                      stall_timeout):
        item = scanned.items[index]
        if members is None:
            where = item.ref if item.offset < 0 else f"{item.ref}@{item.offset}"
            if strict:
                raise PackError(f"{where}: unreadable image ({error}); stopped because strict=True")
            log.warning("skipping %s: %s", where, error)
            skipped.append({"item": where, "identity": item.identity, "error": error, "reason": reason})
            continue
        label = labels[item.identity]
        sizes.add(size)
        class_counts[label] += 1
        finished = writer.write_encoded(members, image_bytes, label)
        if finished is not None:
            state["shards"].append({"name": finished.path.name, "count": finished.count, "bytes": finished.bytes,
                                    "sha256": finished.sha256})
            state.update(items_done=index + 1, class_counts=class_counts, skipped=skipped,
                         sizes=sorted(list(s) for s in sizes))
            _write_json(out / PROGRESS_NAME, state)
    last = writer.close_shard()
    if last is not None:
        state["shards"].append({"name": last.path.name, "count": last.count, "bytes": last.bytes,
                                "sha256": last.sha256})

    return _write_results(out, scanned, labels, options, listing, state["shards"], class_counts, skipped, sizes)


def _open_output(out: Path, prefix: str, if_exists: str, listing: str, num_classes: int,
                 num_items: int) -> tuple[dict[str, Any], PackResult | None]:
    """Prepare ``out`` for packing: the state to start from (fresh, or a resumed run's), or the result of an
    identical finished pack (then nothing is left to do)."""
    out.mkdir(parents=True, exist_ok=True)
    existing = _existing_outputs(out, prefix)
    state: dict[str, Any] = {"listing": listing, "items_done": 0, "shards": [], "class_counts": [0] * num_classes,
                             "skipped": [], "sizes": []}
    if not existing:
        return state, None
    if if_exists == "refuse":
        raise PackError(f"{out}: already holds {existing[0].name} (and {len(existing) - 1} more); "
                        "pass --if-exists resume or overwrite")
    finished = _finished_pack(out, listing)
    if if_exists == "resume" and finished is not None:
        log.info("%s: already packed from the same input with the same options; nothing to do", out)
        return state, finished
    if if_exists == "overwrite":
        for path in existing:
            path.unlink()
        return state, None
    state = _load_resume_state(out, listing)
    for path in _existing_outputs(out, prefix):
        if path.suffix == ".tmp" or (path.suffix == ".tar" and path.name not in {s["name"] for s in state["shards"]}):
            path.unlink()  # a shard that was being written when the previous run stopped
    log.info("resuming %s after %d of %d images (%d shards done)", out, state["items_done"], num_items,
             len(state["shards"]))
    return state, None


def _write_results(out: Path, scanned: Source, labels: dict[str, int], options: dict[str, Any], listing: str,
                   shards: list[dict[str, Any]], class_counts: list[int], skipped: list[dict[str, Any]],
                   sizes: set[tuple[int, int]]) -> PackResult:
    """The manifest and ``pack_report.json`` of a finished pack (the progress file goes)."""
    emptied = [name for name, label in labels.items() if class_counts[label] == 0]
    manifest = Manifest(
        num_classes=len(labels), num_samples=sum(s["count"] for s in shards),
        shards=[str(out / s["name"]) for s in shards], shard_counts=[s["count"] for s in shards],
        class_counts=class_counts, label_map=labels,
        source={"kind": scanned.kind, "path": scanned.path, **options, "listing_hash": listing},
        content_hash=content_hash([s["sha256"] for s in shards]),
        image_size=next(iter(sizes)) if len(sizes) == 1 else None,  # type: ignore[arg-type]
        shard_hashes=[s["sha256"] for s in shards], shard_bytes=[s["bytes"] for s in shards],
    )
    write_manifest(out, manifest)
    empty = scanned.empty_identities + emptied
    report = {"source": scanned.path, "kind": scanned.kind, "num_images_in": len(scanned.items),
              "num_samples": manifest.num_samples, "num_classes": manifest.num_classes,
              "num_skipped": len(skipped), "skipped_by_reason": _by_reason(skipped), "skipped": skipped,
              "empty_identities": scanned.empty_identities,
              "identities_emptied_by_skips": emptied}
    _write_json(out / REPORT_NAME, report)
    (out / PROGRESS_NAME).unlink(missing_ok=True)
    return PackResult(manifest, skipped, empty, out / REPORT_NAME)


def _finished_pack(out: Path, listing: str) -> PackResult | None:
    """The result of a finished pack of the same listing in ``out``, if there is one."""
    from distrib_face.data.manifest import read_manifest

    if not (out / MANIFEST_NAME).exists() or (out / PROGRESS_NAME).exists():
        return None
    try:
        manifest = read_manifest(out)
    except ValueError:
        return None
    if manifest.source.get("listing_hash") != listing:
        return None
    report = json.loads((out / REPORT_NAME).read_text()) if (out / REPORT_NAME).exists() else {}
    empty = report.get("empty_identities", []) + report.get("identities_emptied_by_skips", [])
    return PackResult(manifest, report.get("skipped", []), empty, out / REPORT_NAME)


def _load_resume_state(out: Path, listing: str) -> dict[str, Any]:
    progress = out / PROGRESS_NAME
    if not progress.exists():
        raise PackError(f"{out}: holds shards but no {PROGRESS_NAME} (a finished pack, or not ours); "
                        "use --if-exists overwrite to start again")
    state = json.loads(progress.read_text())
    if state.get("listing") != listing:
        raise PackError(f"{progress}: was written for another input listing or other options; "
                        "refusing to mix (use --if-exists overwrite)")
    return state


def _by_reason(skipped: list[dict[str, str]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for entry in skipped:
        reason = entry.get("reason", "undecodable")
        counts[reason] = counts.get(reason, 0) + 1
    return dict(sorted(counts.items()))


def _run_jobs(jobs: Iterator[_Job], workers: int | None, total: int, progress: bool,
              stall_timeout: float) -> Iterator[_Result]:
    from tqdm import tqdm

    if workers is None:
        workers = os.cpu_count() or 1
    bar = tqdm(total=total, unit="img", disable=not progress, file=sys.stderr)
    try:
        if workers <= 1:
            for job in jobs:
                yield _prepare(job)
                bar.update()
            return
        # forkserver workers (data.procs), not a fork of this process: it already runs tqdm's monitor
        # thread (and, in a trainer or a test run, many more), and a forked child can inherit a held lock
        for result in OrderedPool(_prepare, workers, name="pack worker", stall_timeout=stall_timeout).imap(jobs):
            yield result
            bar.update()
    finally:
        bar.close()

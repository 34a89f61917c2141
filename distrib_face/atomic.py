"""Atomic writes: a file or a folder appears under its final name complete, or not at all.

Every writer of a file a reader may open while it is written (checkpoints, manifests, pair sets, exported
models, plots) goes through here: the content goes to a temp name beside the target (same file system, so
the rename is atomic), is flushed and fsynced, then ``os.replace`` puts it in place and the parent folder
is fsynced so the rename survives a power cut. On any error the temp file is removed and the previous
target, if any, is untouched.

A full or read-only disk raises :class:`OutputError` naming the target path ("no space left on PATH"),
which the entry points turn into one line for the user. Writers that fail without an ``OSError`` (``torch.save``
reports a short write as ``RuntimeError: [enforce fail at inline_container.cc] unexpected pos``) are
diagnosed from the disk itself (:func:`explain_write_failure`: no free blocks, or a file at the file-size
limit of ``ulimit -f``).

Writers that cannot use a context manager (a shard file kept open across many calls, a folder every rank of
a job writes into) finish their temp file or folder themselves and hand it to :func:`publish_file` /
:func:`publish_dir`: these are the only places that rename (``tests/unit/test_layout.py`` checks that nothing
else in distrib_face calls ``os.replace`` / ``os.rename`` / ``Path.replace`` / ``Path.rename``).

This module is a leaf: it imports nothing of distrib_face, so every layer may use it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

__all__ = [
    "OutputError",
    "atomic_dir",
    "atomic_open",
    "atomic_path",
    "explain_os_error",
    "explain_write_failure",
    "fsync_dir",
    "fsync_tree",
    "publish_dir",
    "publish_file",
    "write_bytes",
    "write_json",
    "write_text",
]


class OutputError(OSError):
    """Writing an output failed for a reason the user must fix (no space, read-only, permission)."""


_USER_ERRNOS = {errno.ENOSPC: "no space left on", errno.EDQUOT: "disk quota exceeded on",
                errno.EROFS: "read-only file system at", errno.EACCES: "permission denied writing",
                errno.EPERM: "permission denied writing", errno.EFBIG: "file too large for"}


def explain_os_error(err: OSError, path: str | os.PathLike) -> OSError:
    """``err`` as an :class:`OutputError` naming ``path`` when it is a disk / permission problem, else ``err``."""
    what = _USER_ERRNOS.get(err.errno or 0)
    if what is None or isinstance(err, OutputError):
        return err
    out = OutputError(err.errno, f"{what} {path}")
    out.filename = str(path)
    return out


def explain_write_failure(
    err: BaseException, path: str | os.PathLike, written: str | os.PathLike | None = None
) -> BaseException:
    """``err`` as an :class:`OutputError` when the disk is why writing ``path`` failed, else ``err`` itself.

    For writers whose errors carry no errno (``torch.save``'s ``RuntimeError``), the disk is asked: no free
    blocks on the file system of ``path`` means "no space left on PATH"; a file under ``written`` (the
    partial file or folder, default ``path``) that reached this process's ``RLIMIT_FSIZE`` means "file too
    large for FILE". An ``OSError`` goes through :func:`explain_os_error`.
    """
    if isinstance(err, OSError):
        return explain_os_error(err, path)
    found = _disk_diagnosis(Path(path), Path(written) if written is not None else Path(path))
    if found is None:
        return err
    code, message, where = found
    out = OutputError(code, message)
    out.filename = str(where)
    return out


def _disk_diagnosis(path: Path, written: Path) -> tuple[int, str, Path] | None:
    import resource

    folder = path if path.is_dir() else path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        stats = os.statvfs(folder)
        if stats.f_bavail == 0 or stats.f_bfree == 0:
            return errno.ENOSPC, f"no space left on {path}", path
    except OSError:
        pass
    limit, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if limit == resource.RLIM_INFINITY:
        return None
    if written.is_file():
        files = [written]
    else:
        files = [p for p in written.rglob("*") if p.is_file()] if written.is_dir() else []
    for file in files:
        try:
            if file.stat().st_size >= limit:
                where = path if file == written else file
                message = f"file too large for {where} (the file-size limit, ulimit -f, is {limit} bytes)"
                return errno.EFBIG, message, where
        except OSError:
            continue
    return None


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a folder, so that a rename inside it is durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and folder under ``root``."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(dirpath)


def publish_file(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Put the finished, closed file ``tmp`` in place as ``final``: fsync it, rename it, fsync the folder.

    ``tmp`` must be beside ``final`` (same file system, so that the rename is atomic); an existing ``final``
    is replaced. Disk and permission errors name ``final`` (:class:`OutputError`). Returns ``final``.
    """
    final = Path(final)
    try:
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except OSError as err:
        raise explain_os_error(err, final) from err
    return final


def publish_dir(tmp: str | os.PathLike, final: str | os.PathLike, *, replace: bool = False,
                may_race: bool = False) -> Path:
    """Put the finished folder ``tmp`` in place as ``final``: fsync every file and folder in it, remove an old
    ``final`` (``replace``), rename, fsync the parent folder.

    Args:
        tmp: the complete temp folder, beside ``final`` (same file system).
        final: the folder's final name.
        replace: an existing ``final`` is removed first (else :class:`FileExistsError`).
        may_race: other processes may publish their own copy as ``final`` at the same time (the ranks of one
            node publishing a checkpoint rank 0 cannot see): a rename that fails while ``final`` exists means
            one of them won, and is not an error.

    Returns:
        ``final``. Disk and permission errors name it (:class:`OutputError`).
    """
    tmp, final = Path(tmp), Path(final)
    try:
        fsync_tree(tmp)
        if may_race and final.exists() and not tmp.exists():  # another process published it while we synced
            return final
        if final.exists():
            if not replace:
                raise FileExistsError(f"{final} already exists")
            shutil.rmtree(final)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (may_race and final.exists()):
                raise
        fsync_dir(final.parent)
    except OSError as err:
        raise explain_os_error(err, final) from err
    return final


def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` sets it, racing other threads' writes)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _mode_for(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temp path beside ``path`` for a writer that wants a file name (``np.savez``, ``onnx.save``).

    When the block exits normally the temp file is fsynced and replaces ``path``; on an exception it is
    deleted. ``suffix`` keeps writers that append an extension (numpy adds ``.npz``) on the same name.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
        os.close(fd)
    except OSError as err:
        raise explain_os_error(err, path) from err
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600; the result gets the mode a plain open() would give it (or keeps the mode of
        # the file it replaces), so that an exported model or a plot logged to MLflow stays readable by others
        os.chmod(tmp, _mode_for(path))
        publish_file(tmp, path)
    except Exception as err:
        explained = explain_write_failure(err, path, tmp)
        if explained is err:
            raise
        raise explained from err
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temp file beside ``path`` for writing (``"wb"`` or ``"w"``); it replaces ``path`` on success."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open mode must be 'wb' or 'w', got {mode!r}")
    with atomic_path(path) as tmp:
        try:
            with open(tmp, mode) as handle:
                yield handle
                handle.flush()
        except OSError as err:
            raise explain_os_error(err, path) from err


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, payload: Any, indent: int | None = 1, **kwargs: Any) -> Path:
    """Write ``payload`` as JSON (and a final newline) to ``path`` atomically; returns the path."""
    return write_text(path, json.dumps(payload, indent=indent, **kwargs) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temp folder beside ``path``; on success it is fsynced and renamed to ``path``.

    Args:
        path: the final folder.
        replace: an existing ``path`` is removed first (else :class:`FileExistsError`).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as err:
        raise explain_os_error(err, path) from err
    try:
        yield tmp
        publish_dir(tmp, path, replace=replace)
    except OSError as err:  # the writer's own errors too: a full disk names the folder
        raise explain_os_error(err, path) from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

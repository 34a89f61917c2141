"""Exit codes and one-line error reports, shared by ``distrib-face train``, ``launch/train.py`` and
``launch/ray_job.py`` (docs/training.md, "Exit codes and errors").

- 0: finished.
- 1 (:data:`EXIT_FAILED`): training failed -- the loss diverged (``NonFiniteLossError``), the workers failed
  more often than ``ray.max_failures`` allows, or anything unexpected (a bug: its traceback is printed).
- 2 (:data:`EXIT_BAD_INPUT`): the user must fix something outside the training -- the config
  (``ConfigError``), an input file (``FileNotFoundError``, ``BackboneFileError``), a checkpoint
  (``CheckpointError``), the output location (``OutputError``: read-only, not a folder, no space left, the
  file-size limit), the MLflow store (``TrackingError``, ``MlflowException``), the Ray cluster address.

An exception class with an integer attribute ``exit_code`` gets that code, so new error types (a
data-quality abort, an unsafe checkpoint) plug in without a change here.

Known errors are reported as one line, ``PROG: error: MESSAGE`` (argparse's form; argparse also exits 2),
secrets masked, and no traceback unless the log level is DEBUG.
"""

from __future__ import annotations

import errno
import logging
import sys
import traceback

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2

#: errno values that mean "the output location is the problem", whatever wrote there.
_OUTPUT_ERRNOS = frozenset({
    errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.ENOTDIR, errno.EISDIR,
    errno.EEXIST,
})

# (module, class name, exit code) for the classes whose module may not be imported yet: a class of a
# module nobody imported cannot be what was raised, so the module is never imported just to check.
_BY_CLASS: tuple[tuple[str, str, int], ...] = (
    ("distrib_face.config", "ConfigError", EXIT_BAD_INPUT),
    ("distrib_face.atomic", "OutputError", EXIT_BAD_INPUT),
    ("distrib_face.train.checkpoint", "CheckpointError", EXIT_BAD_INPUT),
    ("distrib_face.tracking.mlflow_tracker", "TrackingError", EXIT_BAD_INPUT),
    ("mlflow.exceptions", "MlflowException", EXIT_BAD_INPUT),
    ("distrib_face.models.io", "BackboneFileError", EXIT_BAD_INPUT),
    ("distrib_face.models.registry", "UnknownBackboneError", EXIT_BAD_INPUT),
    ("distrib_face.export.exporter", "ExportSourceError", EXIT_BAD_INPUT),
    ("distrib_face.data.pack", "PackError", EXIT_BAD_INPUT),
)


class UserError(Exception):
    """An error the entry points report as one line with exit code 2 (e.g. a Ray cluster that cannot be reached)."""

    exit_code = EXIT_BAD_INPUT


def _loaded_class(module: str, name: str) -> type | None:
    loaded = sys.modules.get(module)
    cls = getattr(loaded, name, None) if loaded is not None else None
    return cls if isinstance(cls, type) else None


def classify(err: BaseException) -> tuple[int, bool]:
    """``(exit code, known)`` for ``err``: its documented code, and whether it is one of the documented
    faults (reported without a traceback) rather than a bug."""
    code = getattr(err, "exit_code", None)
    if isinstance(code, int) and not isinstance(code, bool):
        return code, True
    for module, name, exit_code in _BY_CLASS:
        cls = _loaded_class(module, name)
        if cls is not None and isinstance(err, cls):
            return exit_code, True
    if isinstance(err, FileNotFoundError) or (isinstance(err, OSError) and err.errno in _OUTPUT_ERRNOS):
        return EXIT_BAD_INPUT, True
    return EXIT_FAILED, False


def exit_code_for(err: BaseException) -> int:
    """The documented exit code for ``err`` (1 or 2; see the module docstring)."""
    return classify(err)[0]


def describe(err: BaseException) -> str:
    """``err`` as one line naming what the user must look at (the path of an OSError), secrets masked."""
    from distrib_face.redact import redact_text

    from distrib_face.atomic import OutputError, explain_os_error

    if isinstance(err, OutputError) and err.strerror:
        text = err.strerror  # already names the path
    elif isinstance(err, OSError) and err.filename is not None:
        explained = explain_os_error(err, err.filename)
        if isinstance(explained, OutputError):
            text = explained.strerror or str(explained)
        elif isinstance(err, FileNotFoundError):
            text = f"no such file or folder: {err.filename}"
        else:
            text = f"{err.strerror or type(err).__name__}: {err.filename}"
    elif isinstance(err, OSError) and err.errno and err.strerror:
        text = err.strerror
    else:
        text = str(err) or type(err).__name__
        mlflow_error = _loaded_class("mlflow.exceptions", "MlflowException")
        if mlflow_error is not None and isinstance(err, mlflow_error):
            text = f"MLflow: {text}"
    return redact_text(" ".join(text.split()))


def report(prog: str, err: BaseException, debug: bool | None = None) -> int:
    """Print ``err`` as one line on stderr (with its traceback first when ``debug`` or when it is not a
    known fault) and return its exit code.

    Args:
        prog: the command, as the user typed it ("distrib-face train", "ray_job.py").
        err: the exception.
        debug: print the traceback; default: when the root logger is at DEBUG.
    """
    from distrib_face.redact import redact_text

    if debug is None:
        debug = logging.getLogger().isEnabledFor(logging.DEBUG)
    code, known = classify(err)
    if debug or not known:
        text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        sys.stderr.write(redact_text(text))
    sys.stderr.write(f"{prog}: error: {describe(err)}\n")
    sys.stderr.flush()
    return code


class RayTrainingError(RuntimeError):
    """A Ray Train job that failed, as one line; its exit code is that of the worker's own error."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def ray_failure(err: BaseException, max_failures: int) -> BaseException:
    """What to report for an exception of ``TorchTrainer.fit``: ``err`` itself unless it is Ray Train's
    ``TrainingFailedError``, which becomes a :class:`RayTrainingError` naming the lowest failed rank and
    its own error, with that error's exit code (a worker that found its output disk full still exits 2)."""
    try:
        from ray.train import TrainingFailedError
    except ImportError:  # pragma: no cover - ray is a dependency
        return err
    if not isinstance(err, TrainingFailedError):
        return err
    restarts = f"after ray.max_failures={max_failures} restart(s)"
    failures = getattr(err, "worker_failures", None) or {}
    if failures:
        rank = min(failures)
        cause = _unwrap_ray(failures[rank])
        code, _ = classify(cause)
        what = describe(cause)
        if not isinstance(cause, OSError) and type(cause).__name__ not in what:
            what = f"{type(cause).__name__}: {what}"
        return RayTrainingError(f"training failed {restarts}: rank {rank}: {what}", code)
    controller = getattr(err, "controller_failure", None)
    if controller is not None:
        cause = _unwrap_ray(controller)
        return RayTrainingError(f"training failed: Ray Train's controller: {type(cause).__name__}: "
                                f"{describe(cause)}", classify(cause)[0])
    return RayTrainingError(f"training failed {restarts}: {describe(err)}", EXIT_FAILED)


def _unwrap_ray(err: BaseException) -> BaseException:
    """The user's exception inside Ray's wrappers (Ray Train's ``UserExceptionWithTraceback``, ``RayTaskError``)."""
    for _ in range(8):
        inner = getattr(err, "_base_exc", None) or getattr(err, "cause", None)
        if not isinstance(inner, BaseException) or inner is err:
            return err
        err = inner
    return err

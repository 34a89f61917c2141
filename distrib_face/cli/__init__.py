"""The single entry point ``distrib-face``: parses, builds, runs, nothing else.

Each area's subcommands live in a module of this package (``distrib_face/cli/data.py`` for
``distrib_face.data``, ...) with a ``register(subparsers, groups)`` function; ``groups`` holds the
shared command groups
(``bench``, ``plot``, ``data``, ``config``) so that e.g. ``distrib-face bench classifier`` and
``distrib-face bench data`` live in different packages. Handlers import their heavy
dependencies lazily, so ``distrib-face --help`` stays fast.

Errors. A wrong input -- a missing path, a file of the wrong kind, a bad config value -- ends the command
with one line on stderr, ``distrib-face: error: <what, naming the path or field>``, and exit code 2 (the
prefix and code argparse uses for a bad command line). Handlers raise :class:`CommandError` for what they
check themselves; :func:`main` turns the project's input errors (``ConfigError``, ``BackboneFileError``,
``ExportSourceError``, ``PackError``, ``TrackingError``, ``OutputError``) and missing / unreadable files
(``FileNotFoundError``, ``NotADirectoryError``, ``IsADirectoryError``, ``PermissionError``,
``FileExistsError``) into that line. Anything else is a bug and keeps its traceback. ``--log-level DEBUG``
also logs the traceback of an input error.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

logger = logging.getLogger(__name__)

EXIT_INPUT_ERROR = 2
"""Exit code of a wrong input (argparse's code for a bad command line)."""

ERROR_PREFIX = "distrib-face: error: "

COMMAND_MODULES: tuple[str, ...] = (
    "distrib_face.cli.parallel",
    "distrib_face.cli.losses",
    "distrib_face.cli.data",
    "distrib_face.cli.train",
    "distrib_face.cli.eval",
    "distrib_face.cli.search",
    "distrib_face.cli.export",
    "distrib_face.cli.models",
    "distrib_face.cli.config",
)

# Input errors of the packages, by (module, class): looked up only in modules already imported (an error of
# a module that was never imported cannot have been raised), so that the entry point imports nothing heavy.
_PROJECT_INPUT_ERRORS: tuple[tuple[str, str], ...] = (
    ("distrib_face.config", "ConfigError"),
    ("distrib_face.models.io", "BackboneFileError"),
    ("distrib_face.export.exporter", "ExportSourceError"),
    ("distrib_face.data.pack", "PackError"),
    ("distrib_face.tracking.mlflow_tracker", "TrackingError"),
    ("distrib_face.atomic", "OutputError"),
)
_OS_INPUT_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError,
)


class CommandError(Exception):
    """A wrong input the user can fix: :func:`main` prints it as one ``distrib-face: error:`` line, exit 2."""


def input_error_types() -> tuple[type[BaseException], ...]:
    """The exception types :func:`main` reports as one line with exit code 2."""
    types: list[type[BaseException]] = [CommandError, *_OS_INPUT_ERRORS]
    for module_name, class_name in _PROJECT_INPUT_ERRORS:
        module = sys.modules.get(module_name)
        if module is not None and isinstance(getattr(module, class_name, None), type):
            types.append(getattr(module, class_name))
    return tuple(types)


def one_line(err: BaseException) -> str:
    """The message of ``err`` as one line: an OS error as ``<file>: <reason>``, else its first line."""
    if isinstance(err, OSError) and err.filename and err.strerror and str(err).startswith("[Errno"):
        where = f"{err.filename} -> {err.filename2}" if err.filename2 else str(err.filename)
        return f"{where}: {err.strerror.lower()}"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def report_error(message: str) -> None:
    """Print ``message`` as the command's one error line on stderr (for handlers that exit non-zero themselves)."""
    print(f"{ERROR_PREFIX}{message}", file=sys.stderr)

GROUPS: dict[str, str] = {
    "bench": "benchmarks that print tables (ms/step, img/s, peak memory)",
    "plot": "figures written as PNG",
    "data": "data-set inspection",
    "config": "look at a training config (resolved and validated)",
}


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every package's subcommands registered."""
    from distrib_face import __version__

    parser = argparse.ArgumentParser(prog="distrib-face", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"distrib-face {__version__}")
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, help_text in GROUPS.items():
        group_parser = sub.add_parser(name, help=help_text)
        groups[name] = group_parser.add_subparsers(dest=f"{name}_command", required=True, metavar="WHAT")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(sub, groups)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen command; returns its exit code (2 for a wrong input, see above)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except Exception as err:  # noqa: BLE001 - only input errors are caught; the rest is re-raised below
        if not isinstance(err, input_error_types()):
            raise
        logger.debug("input error", exc_info=True)
        report_error(one_line(err))
        return EXIT_INPUT_ERROR


if __name__ == "__main__":
    sys.exit(main())

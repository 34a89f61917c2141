"""The single entry point ``distrib-face``: parses, builds, runs, nothing else.

Each area's subcommands live in a module of this package (``distrib_face/cli/data.py`` for
``distrib_face.data``, ...) with a ``register(subparsers, groups)`` function; ``groups`` holds the
shared command groups
(``bench``, ``plot``, ``data``, ``config``) so that e.g. ``distrib-face bench classifier`` and
``distrib-face bench data`` live in different packages. Handlers import their heavy
dependencies lazily, so ``distrib-face --help`` stays fast.

Errors. A wrong input -- a missing path, a file of the wrong kind, a bad config value -- ends the command
with one line on stderr, ``distrib-face: error: <what, naming the path or field>``, and exit code 2 (the
prefix and code argparse uses for a bad command line); a failed training exits 1. Handlers raise
:class:`CommandError` for what they check themselves; :func:`main` hands every exception to
:func:`distrib_face.cli.errors.report`, the one table of exit codes that ``launch/train.py`` and
``launch/ray_job.py`` share. Anything that is not a documented fault is a bug and keeps its traceback;
``--log-level DEBUG`` prints the traceback of every error.
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
    "distrib_face.cli.scale",
    "distrib_face.cli.eval",
    "distrib_face.cli.search",
    "distrib_face.cli.export",
    "distrib_face.cli.models",
    "distrib_face.cli.config",
)

class CommandError(Exception):
    """A wrong input the user can fix: :func:`main` prints it as one ``distrib-face: error:`` line, exit 2."""

    exit_code = EXIT_INPUT_ERROR


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


def configure_logging(level: str) -> None:
    """Logging of every entry point: ``level`` (a name; unknown names mean INFO) to stderr, Python warnings
    through logging, and every record passed through the secret redaction
    (:func:`distrib_face.tracking.install_log_redaction`)."""
    from distrib_face.redact import install_log_redaction

    logging.basicConfig(
        level=getattr(logging, str(level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.captureWarnings(True)
    install_log_redaction()


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen command; returns its exit code (2 for a wrong input, see above)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        return int(args.func(args) or 0)
    except Exception as err:  # noqa: BLE001 - every error becomes one line and a documented code (cli/errors.py)
        from distrib_face.cli.errors import report

        return report(parser.prog, err)


if __name__ == "__main__":
    sys.exit(main())

"""The single entry point ``distrib-face``: parses, builds, runs, nothing else.

Each area's subcommands live in a module of this package (``distrib_face/cli/data.py`` for
``distrib_face.data``, ...) with a ``register(subparsers, groups)`` function; ``groups`` holds the
shared command groups
(``bench``, ``plot``, ``data``) so that e.g. ``distrib-face bench classifier`` and
``distrib-face bench data`` live in different packages. Handlers import their heavy
dependencies lazily, so ``distrib-face --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

COMMAND_MODULES: tuple[str, ...] = (
    "distrib_face.cli.parallel",
    "distrib_face.cli.losses",
    "distrib_face.cli.data",
    "distrib_face.cli.train",
    "distrib_face.cli.eval",
    "distrib_face.cli.export",
    "distrib_face.cli.models",
)

GROUPS: dict[str, str] = {
    "bench": "benchmarks that print tables (ms/step, img/s, peak memory)",
    "plot": "figures written as PNG",
    "data": "data-set inspection",
}


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every package's subcommands registered."""
    parser = argparse.ArgumentParser(prog="distrib-face", description=__doc__.splitlines()[0])
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
    """Parse ``argv`` and run the chosen command; returns its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

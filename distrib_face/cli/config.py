"""Subcommands of ``distrib_face.config``: ``config show``."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    """Add ``distrib-face config show``."""
    p = groups["config"].add_parser(
        "show",
        help="print the resolved, validated config (YAML) a job would run, and exit",
        description="Read the YAML config, apply the --set overrides, fill in every default and validate it, "
        "then print the result as YAML (load_config reads it back to the same config). A bad value is one "
        "error line naming the field, exit code 2.",
    )
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=0.05 (repeatable)")
    p.set_defaults(func=_show)


def _show(args: argparse.Namespace) -> int:
    from distrib_face.config import load_config

    print(load_config(args.config, args.overrides).to_yaml(), end="")
    return 0

"""Subcommands contributed by ``distrib_face.eval``."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    """Add this package's subcommands (none yet)."""

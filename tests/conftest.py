"""Shared fixtures: where the real face data lives, and a gloo multi-process runner."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DISTRIB_FACE_SHARED_DATA", ROOT.parent / "shared" / "data"))

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (ORL, Extended Yale B); the test is skipped with the reason when it is absent."""
    if not (SHARED_DATA / "orl_faces").is_dir():
        pytest.skip(f"real face data not found at {SHARED_DATA} (set DISTRIB_FACE_SHARED_DATA to its folder)")
    return SHARED_DATA

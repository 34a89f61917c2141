"""Shared fixtures: where the real face data lives, and a gloo multi-process runner."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DISTRIB_FACE_SHARED_DATA", ROOT.parent / "shared" / "data"))

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# The Triton classifier kernels are checked on CPU through Triton's interpreter. triton.jit reads the
# variable when it decorates a kernel, i.e. when distrib_face.parallel.kernels.triton_lse is first
# imported; conftest runs before any test module, and gloo ranks spawned by tests inherit it. On a CUDA
# machine (tests/gpu) the kernels must be compiled, so it is left unset there.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (ORL, Extended Yale B); the test is skipped with the reason when it is absent."""
    if not (SHARED_DATA / "orl_faces").is_dir():
        pytest.skip(f"real face data not found at {SHARED_DATA} (set DISTRIB_FACE_SHARED_DATA to its folder)")
    return SHARED_DATA

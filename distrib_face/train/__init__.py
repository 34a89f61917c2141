"""The training step and loop, DeepSpeed engine setup, LR schedules, checkpoints.

``from distrib_face.train import run_training, Reporter`` -- the names are imported on first use, so that
``distrib-face --help`` (which imports ``distrib_face.cli.train``) does not load torch and DeepSpeed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distrib_face.train.loop import NonFiniteLossError, Reporter, run_training

__all__ = ["NonFiniteLossError", "Reporter", "run_training"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from distrib_face.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'distrib_face.train' has no attribute {name!r}")

"""The trainer, its components and step, DeepSpeed engine setup, LR schedules, checkpoints, the Ray backend.

``from distrib_face.train import run_training, Trainer, Reporter`` -- the names are imported on first use, so
that ``distrib-face --help`` (which imports ``distrib_face.cli.train``) does not load torch and DeepSpeed.

Modules: :mod:`~distrib_face.train.trainer` (the loop), :mod:`~distrib_face.train.components` (what it is
built from), :mod:`~distrib_face.train.step` (one optimiser step), :mod:`~distrib_face.train.checkpoint`,
:mod:`~distrib_face.train.data`, :mod:`~distrib_face.train.engine`, :mod:`~distrib_face.train.schedule`,
:mod:`~distrib_face.train.verify`, :mod:`~distrib_face.train.ray_backend`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distrib_face.train.trainer import NonFiniteLossError, Reporter, Trainer, run_training

__all__ = ["NonFiniteLossError", "Reporter", "Trainer", "run_training"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from distrib_face.train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'distrib_face.train' has no attribute {name!r}")

"""Margins and metric losses: pure functions of cosines / embeddings on one device (no torch.distributed)."""

from distrib_face.losses.auxiliary import AuxLossSpec, build_auxiliary_losses
from distrib_face.losses.margins import (
    MARGINS,
    Margin,
    MarginContext,
    MarginSpec,
    StepStats,
    create_margin,
    list_margins,
    register_margin,
)

__all__ = [
    "MARGINS",
    "AuxLossSpec",
    "Margin",
    "MarginContext",
    "MarginSpec",
    "StepStats",
    "build_auxiliary_losses",
    "create_margin",
    "list_margins",
    "register_margin",
]

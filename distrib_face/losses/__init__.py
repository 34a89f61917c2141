"""Margins and metric losses: pure functions of cosines / embeddings on one device (no torch.distributed)."""

from distrib_face.losses.auxiliary import AuxLossSpec
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
    "create_margin",
    "list_margins",
    "register_margin",
]

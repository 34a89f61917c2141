"""Auxiliary losses by name and weight, added to the margin softmax: what the config's list describes.

This module holds the specs (names, options, weights) and validates them; the losses themselves are the
single-device functions of :mod:`distrib_face.losses.metric`, and their sharded assembly over the global
batch (class centres split by class like the classifier) is
:func:`distrib_face.parallel.auxiliary.build_auxiliary_losses`::

    aux = build_auxiliary_losses(cfg.loss.auxiliary, num_classes=C, embedding_size=D, group=ctx.group,
                                 device=ctx.device, embedding_grad_scale=W, class_counts=manifest.class_counts)
    aux_opt = torch.optim.SGD(aux.parameters(), lr=...)       # centres / radius: not data-parallel
    total, parts = aux(local_embeddings, local_labels, classifier=clf)
    loss = clf(local_embeddings, local_labels) + total

Names and options (weights are the paper's usual scale; the weight multiplies the unweighted loss):

==============  =========================================================================  =============
name            options (defaults)                                                          typical weight
==============  =========================================================================  =============
triplet         ``margin`` 0.2, ``mining`` "batch_hard" / "semi_hard", ``normalize`` True   1
contrastive     ``margin`` 1.0, ``normalize`` False (DeepID2)                                0.05
center          ``init_std`` 0.01 (sharded centres)                                          0.003
ring            ``radius`` 1.0 (learned R)                                                   0.01
intra_angle     ``init_std`` 0.01 (sharded centres; ArcFace paper's Intra-Loss)               1
inter_angle     ``init_std`` 0.01 (sharded centres; ArcFace paper's Inter-Loss)               1
uploss          ``max_samples`` 5 (classes with at most this many images are "novel")        0.01
magface         ``lower_norm`` 10, ``upper_norm`` 110 (MagFace's g(a); use with magface)     35
==============  =========================================================================  =============
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

AUXILIARY_OPTIONS: dict[str, frozenset[str]] = {
    "triplet": frozenset({"margin", "mining", "normalize"}),
    "contrastive": frozenset({"margin", "normalize"}),
    "center": frozenset({"init_std"}),
    "ring": frozenset({"radius"}),
    "intra_angle": frozenset({"init_std"}),
    "inter_angle": frozenset({"init_std"}),
    "uploss": frozenset({"max_samples"}),
    "magface": frozenset({"lower_norm", "upper_norm"}),
}


@dataclass(kw_only=True)
class AuxLossSpec:
    """One auxiliary loss: ``name`` (see :data:`AUXILIARY_OPTIONS`), its ``weight`` and ``options``."""

    name: str
    weight: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in AUXILIARY_OPTIONS:
            raise ValueError(f"unknown auxiliary loss {self.name!r}; known: {', '.join(sorted(AUXILIARY_OPTIONS))}")
        if not self.weight >= 0:
            raise ValueError(f"auxiliary loss {self.name!r}: weight must be >= 0, got {self.weight}")
        unknown = set(self.options) - AUXILIARY_OPTIONS[self.name]
        if unknown:
            raise ValueError(
                f"auxiliary loss {self.name!r}: unknown options {sorted(unknown)}; known: "
                f"{sorted(AUXILIARY_OPTIONS[self.name])}"
            )
        if self.name == "triplet" and self.options.get("mining", "batch_hard") not in ("batch_hard", "semi_hard"):
            raise ValueError(f"triplet mining must be 'batch_hard' or 'semi_hard', got {self.options['mining']!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AuxLossSpec":
        """From ``{"name": ..., "weight": ..., "options": {...}}``; unknown keys raise naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown auxiliary loss fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

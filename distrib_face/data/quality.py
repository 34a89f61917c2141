"""What reading the data had to skip, repair or fall back on, and when that is too much.

A :class:`DataCounts` is kept by every :class:`~distrib_face.data.loader.TrainLoader` (one per rank, over
the loader's whole life, saved in its ``state_dict`` so a resumed run keeps counting). It is the contract
between the data side and the trainer:

- ``counts.to_dict()`` is the ``data`` block of the run summary (JSON);
- ``counts.metrics()`` are the MLflow metrics (``data/skipped/<reason>``, ``data/skipped_total``,
  ``data/repaired/<reason>``, ``data/samples_read``, ``data/dali_fallback_batches``, ``data/skip_fraction``);
- ``counts.progress_text()`` is the short text for the progress line ("" when nothing happened);
- ``counts.vector()`` / ``DataCounts.from_vector`` carry the numbers through one all-reduce (sum over ranks);
  ``DataCounts.merged`` sums full dicts (with the per-shard counts) gathered from every rank.

:func:`check_skip_fraction` raises :class:`DataQualityError` once the skipped fraction exceeds
``data.max_skip_fraction``, naming the worst shard.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from distrib_face.data.decode import REPAIR_REASONS, SKIP_REASONS

DEFAULT_MAX_SKIP_FRACTION = 0.01
DEFAULT_SKIP_CHECK_AFTER = 1000
"""Samples read before the skip fraction is checked, so that one bad image among the first few does not abort."""

VECTOR_KEYS: tuple[str, ...] = (
    ("delivered", "dali_fallback_batches")
    + tuple(f"skipped/{r}" for r in SKIP_REASONS)
    + tuple(f"repaired/{r}" for r in REPAIR_REASONS)
)
"""Order of :meth:`DataCounts.vector`."""


class DataQualityError(RuntimeError):
    """Too many samples had to be skipped: the data is broken beyond ``data.max_skip_fraction``.

    Exit code 2 at the entry points: the input is what the user must fix (``distrib-face data verify``)."""

    exit_code = 2


class DaliFallbackError(RuntimeError):
    """DALI failed on more batches than a small fraction for no fault in the data; the message is DALI's own.

    Exit code 1: a training failure, not the user's input."""

    exit_code = 1


@dataclass
class DataCounts:
    """Counts of one loader (or of all ranks, once merged).

    Attributes:
        delivered: samples handed to the trainer.
        skipped: samples dropped, by reason (:data:`~distrib_face.data.decode.SKIP_REASONS`).
        repaired: delivered samples that were converted or resized, by reason (``REPAIR_REASONS``).
        dali_fallback_batches: batches DALI failed on and PIL decoded instead.
        per_shard: for each shard name with skips, its skipped samples by reason.
        missing_shards: shards of the manifest left out because they were missing (``allow_missing_shards``).
    """

    delivered: int = 0
    skipped: Counter = field(default_factory=Counter)
    repaired: Counter = field(default_factory=Counter)
    dali_fallback_batches: int = 0
    per_shard: dict[str, Counter] = field(default_factory=dict)
    missing_shards: list[str] = field(default_factory=list)

    @property
    def skipped_total(self) -> int:
        """Samples dropped, all reasons."""
        return sum(self.skipped.values())

    @property
    def samples_read(self) -> int:
        """Samples taken from the shards: delivered plus skipped."""
        return self.delivered + self.skipped_total

    @property
    def skip_fraction(self) -> float:
        """Skipped / read (0 before anything was read)."""
        return self.skipped_total / self.samples_read if self.samples_read else 0.0

    def add_skip(self, shard: str, reason: str, count: int = 1) -> None:
        """Count ``count`` samples of ``shard`` dropped for ``reason``."""
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        self.skipped[reason] += count
        self.per_shard.setdefault(shard, Counter())[reason] += count

    def worst_shard(self) -> tuple[str, Counter] | None:
        """The shard with the most skipped samples (ties: the first name), with its counts; None if no skip."""
        if not self.per_shard:
            return None
        name = max(sorted(self.per_shard), key=lambda n: sum(self.per_shard[n].values()))
        return name, self.per_shard[name]

    # ------------------------------------------------------------------------------------- reports
    def to_dict(self) -> dict[str, Any]:
        """JSON-able: the ``data`` block of the summary, and what ``state_dict`` saves."""
        worst = self.worst_shard()
        return {
            "samples_read": self.samples_read,
            "delivered": self.delivered,
            "skipped_total": self.skipped_total,
            "skipped": {r: int(self.skipped[r]) for r in SKIP_REASONS if self.skipped[r]},
            "repaired": {r: int(self.repaired[r]) for r in REPAIR_REASONS if self.repaired[r]},
            "dali_fallback_batches": self.dali_fallback_batches,
            "skip_fraction": self.skip_fraction,
            "worst_shard": None if worst is None else {"shard": worst[0], "skipped": sum(worst[1].values()),
                                                       "reasons": dict(sorted(worst[1].items()))},
            "per_shard": {name: dict(sorted(c.items())) for name, c in sorted(self.per_shard.items())},
            "missing_shards": list(self.missing_shards),
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> DataCounts:
        """Inverse of :meth:`to_dict` (the derived fields are recomputed)."""
        return cls(
            delivered=int(raw.get("delivered", 0)),
            skipped=Counter({str(k): int(v) for k, v in raw.get("skipped", {}).items()}),
            repaired=Counter({str(k): int(v) for k, v in raw.get("repaired", {}).items()}),
            dali_fallback_batches=int(raw.get("dali_fallback_batches", 0)),
            per_shard={str(n): Counter({str(k): int(v) for k, v in c.items()})
                       for n, c in raw.get("per_shard", {}).items()},
            missing_shards=[str(s) for s in raw.get("missing_shards", [])],
        )

    def metrics(self, prefix: str = "data/") -> dict[str, float]:
        """Flat numbers for MLflow: every reason (zeros included, so the curves exist from step 0)."""
        out: dict[str, float] = {
            f"{prefix}samples_read": float(self.samples_read),
            f"{prefix}skipped_total": float(self.skipped_total),
            f"{prefix}skip_fraction": float(self.skip_fraction),
            f"{prefix}dali_fallback_batches": float(self.dali_fallback_batches),
        }
        out.update({f"{prefix}skipped/{r}": float(self.skipped[r]) for r in SKIP_REASONS})
        out.update({f"{prefix}repaired/{r}": float(self.repaired[r]) for r in REPAIR_REASONS})
        return out

    def progress_text(self) -> str:
        """``"skipped 3 (truncated 2, too_large 1), dali fallbacks 1"``; empty when nothing was skipped."""
        parts = []
        if self.skipped_total:
            reasons = ", ".join(f"{r} {self.skipped[r]}" for r in SKIP_REASONS if self.skipped[r])
            parts.append(f"skipped {self.skipped_total} ({reasons})")
        if self.dali_fallback_batches:
            parts.append(f"dali fallbacks {self.dali_fallback_batches}")
        return ", ".join(parts)

    # ------------------------------------------------------------------------------------- across ranks
    def vector(self) -> list[int]:
        """The numbers in :data:`VECTOR_KEYS` order, for a sum over ranks (one all-reduce)."""
        values = {"delivered": self.delivered, "dali_fallback_batches": self.dali_fallback_batches}
        values.update({f"skipped/{r}": self.skipped[r] for r in SKIP_REASONS})
        values.update({f"repaired/{r}": self.repaired[r] for r in REPAIR_REASONS})
        return [int(values[k]) for k in VECTOR_KEYS]

    @classmethod
    def from_vector(cls, vector: Iterable[float]) -> DataCounts:
        """Inverse of :meth:`vector` (per-shard counts are not carried)."""
        values = dict(zip(VECTOR_KEYS, (int(round(v)) for v in vector)))
        return cls(
            delivered=values["delivered"], dali_fallback_batches=values["dali_fallback_batches"],
            skipped=Counter({r: values[f"skipped/{r}"] for r in SKIP_REASONS if values[f"skipped/{r}"]}),
            repaired=Counter({r: values[f"repaired/{r}"] for r in REPAIR_REASONS if values[f"repaired/{r}"]}),
        )

    @classmethod
    def merged(cls, parts: Iterable[DataCounts | Mapping[str, Any]]) -> DataCounts:
        """The sum of several ranks' counts (``DataCounts`` or their :meth:`to_dict`)."""
        total = cls()
        for part in parts:
            counts = part if isinstance(part, DataCounts) else cls.from_dict(part)
            total.delivered += counts.delivered
            total.dali_fallback_batches += counts.dali_fallback_batches
            total.skipped.update(counts.skipped)
            total.repaired.update(counts.repaired)
            for name, c in counts.per_shard.items():
                total.per_shard.setdefault(name, Counter()).update(c)
            total.missing_shards += [s for s in counts.missing_shards if s not in total.missing_shards]
        return total


def format_reasons(counts: Mapping[str, int]) -> str:
    """``"too_large 2, truncated 1"`` in the order of the reason lists."""
    order = {r: i for i, r in enumerate(SKIP_REASONS + REPAIR_REASONS)}
    return ", ".join(f"{r} {n}" for r, n in sorted(counts.items(), key=lambda kv: order.get(kv[0], 99)) if n)


def check_skip_fraction(counts: DataCounts, max_skip_fraction: float,
                        min_samples: int = DEFAULT_SKIP_CHECK_AFTER, where: str = "") -> None:
    """Raise :class:`DataQualityError` when more than ``max_skip_fraction`` of the samples read were skipped.

    Checked only once ``min_samples`` samples were read. The message names the worst shard and its reasons.
    """
    if counts.samples_read < min_samples or counts.skipped_total <= max_skip_fraction * counts.samples_read:
        return
    worst = counts.worst_shard()
    worst_text = "" if worst is None else (
        f"; worst shard {worst[0]}: {sum(worst[1].values())} skipped ({format_reasons(worst[1])})")
    raise DataQualityError(
        f"{where}{counts.skipped_total} of {counts.samples_read} samples read "
        f"({100 * counts.skip_fraction:.2f}%) were skipped, above data.max_skip_fraction="
        f"{max_skip_fraction} ({format_reasons(counts.skipped)}){worst_text}. "
        "Run `distrib-face data verify SHARDS` for a table of the problems, or raise data.max_skip_fraction."
    )

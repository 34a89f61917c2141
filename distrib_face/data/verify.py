"""``distrib-face data verify SHARDS``: read every sample of a shard set once and report every problem.

Each shard is read in a worker process (:class:`~distrib_face.data.procs.OrderedPool`); every sample goes
through the training loader's own checks (:mod:`distrib_face.data.decode`: header and pixel limit, then a
full PIL decode, then the label against ``num_classes``), so what verify reports is what training would
skip. Per shard it also checks the sample count against the manifest, the file size and, with ``sha256``,
the digest; over the set it checks the per-class counts.

Problems (:data:`SHARD_PROBLEMS` and :data:`~distrib_face.data.decode.SKIP_REASONS`) make the command exit
with 3; repairs (``converted``, ``resized``) are listed but are not problems (training uses those samples).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from distrib_face.data.decode import (
    DEFAULT_MAX_IMAGE_PIXELS,
    REPAIR_REASONS,
    SKIP_REASONS,
    BadSample,
    decode_image,
    flag_names,
    inspect_image,
    repair_flags,
)
from distrib_face.data.manifest import Manifest, is_remote, read_manifest

log = logging.getLogger(__name__)

SHARD_PROBLEMS: tuple[str, ...] = ("count_mismatch", "bytes_mismatch", "sha256_mismatch")
"""Shard-level problems besides the sample reasons: more samples than the manifest says (fewer are
``truncated_shard``), another file size, another SHA-256."""

PROBLEMS = SKIP_REASONS + SHARD_PROBLEMS


@dataclass
class ShardReport:
    """What reading one shard found.

    Attributes:
        name: the shard's file name.
        expected: its sample count in the manifest.
        samples: samples read from it.
        problems: reason -> count (samples, except ``bytes_mismatch`` / ``sha256_mismatch`` which are 1).
        repaired: repair reason -> samples.
        labels: label -> samples with that (valid) label, for the class-count check (emptied once
            :func:`verify_shards` has counted them).
    """

    name: str
    expected: int
    samples: int = 0
    problems: Counter = field(default_factory=Counter)
    repaired: Counter = field(default_factory=Counter)
    labels: Counter = field(default_factory=Counter)


def verify_shard(job: tuple[str, int, int, int, Any, int, str | None, int | None]) -> ShardReport:
    """Read one shard: ``job = (path, index, expected count, num_classes, image size or None, max pixels,
    expected sha256 or None (not checked), expected bytes or None)``."""
    from distrib_face.data.stream import iter_shard, open_url

    path, index, expected, num_classes, image_size, max_pixels, sha256, num_bytes = job
    report = ShardReport(path.rsplit("/", 1)[-1], expected)
    if num_bytes is not None and not is_remote(path) and os.path.exists(path) and os.path.getsize(path) != num_bytes:
        report.problems["bytes_mismatch"] += 1
    if sha256 is not None:
        import hashlib

        try:
            digest = hashlib.sha256()
            with open_url(path) as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            if digest.hexdigest() != sha256:
                report.problems["sha256_mismatch"] += 1
        except OSError:
            pass  # reported as missing_shard below
    size = tuple(image_size) if image_size else None
    for sample in iter_shard(path, index, expected, num_classes, allow_missing=True):
        if sample.lost:
            report.problems[sample.reason] += sample.lost
            continue
        report.samples += 1
        if sample.label is not None:
            report.labels[sample.label] += 1
        if sample.reason is not None:
            report.problems[sample.reason] += 1
            continue
        assert sample.image is not None
        try:
            header = inspect_image(sample.image, max_pixels)
            decode_image(sample.image, header, max_pixels)
        except BadSample as bad:
            report.problems[bad.reason] += 1
            continue
        for name in flag_names(repair_flags(header, size)):  # type: ignore[arg-type]
            report.repaired[name] += 1
    if report.samples > expected:
        report.problems["count_mismatch"] += report.samples - expected
    return report


@dataclass
class VerifyResult:
    """Every shard's report and the problems of the set as a whole."""

    manifest: Manifest
    shards: list[ShardReport]
    set_problems: list[str]

    @property
    def num_problems(self) -> int:
        """Problem count over all shards plus the set-level problems."""
        return sum(sum(r.problems.values()) for r in self.shards) + len(self.set_problems)

    @property
    def ok(self) -> bool:
        """No problem found."""
        return self.num_problems == 0

    def by_reason(self) -> dict[str, int]:
        """Problem counts by reason over all shards."""
        total: Counter = Counter()
        for report in self.shards:
            total.update(report.problems)
        return {r: total[r] for r in PROBLEMS if total[r]}

    def table(self) -> str:
        """The shards with problems, one row each, a column per reason that occurs; then the totals."""
        bad = [r for r in self.shards if r.problems]
        reasons = [r for r in PROBLEMS if any(s.problems[r] for s in bad)]
        lines = []
        if bad:
            width = max(len("shard"), *(len(r.name) for r in bad))
            header = f"{'shard':<{width}} {'read':>7} {'expected':>8} " + " ".join(f"{r:>{len(r)}}" for r in reasons)
            lines.append(header)
            for report in bad:
                cells = " ".join(f"{report.problems[r] or '-':>{len(r)}}" for r in reasons)
                lines.append(f"{report.name:<{width}} {report.samples:>7} {report.expected:>8} {cells}")
        lines += [f"set: {problem}" for problem in self.set_problems]
        read = sum(r.samples for r in self.shards)
        repaired: Counter = Counter()
        for report in self.shards:
            repaired.update(report.repaired)
        found = "no problems"
        if not self.ok:
            found = f"{self.num_problems} problems in {len(bad)} shards"
            if self.set_problems:
                found += f" and {len(self.set_problems)} of the set"
        summary = f"{len(self.shards)} shards, {read} samples read ({self.manifest.num_samples} in the manifest): {found}"
        if any(repaired.values()):
            summary += "; repaired, not problems: " + ", ".join(f"{r} {repaired[r]}" for r in REPAIR_REASONS
                                                             if repaired[r])
        lines.append(summary)
        return "\n".join(lines)


def _add_labels(found: np.ndarray, report: ShardReport) -> None:
    """Add a shard's label counts into ``found`` (``[C]``) and drop them from the report: a million-class set
    would otherwise keep a dict entry per sample until the end."""
    if report.labels:
        labels = np.fromiter(report.labels.keys(), dtype=np.int64, count=len(report.labels))
        np.add.at(found, labels, np.fromiter(report.labels.values(), dtype=np.int64, count=len(report.labels)))
    report.labels = Counter()


def _class_problems(manifest: Manifest, reports: Sequence[ShardReport], found: np.ndarray) -> list[str]:
    """``found``: samples of each label in the shards (``[C]``)."""
    if any(r.problems["missing_shard"] or r.problems["truncated_shard"] for r in reports):
        return []  # the counts cannot match while samples are missing; those are reported already
    differ = np.flatnonzero(found != manifest.class_counts)
    if not differ.size:
        return []
    c = int(differ[0])
    more = f" (and {differ.size - 1} more classes differ)" if differ.size > 1 else ""
    return [f"class_counts[{c}] = {manifest.class_counts[c]} in the manifest, but the shards hold {found[c]} "
            f"samples of label {c}{more}"]


def verify_shards(shards_or_dir: str | os.PathLike, *, workers: int = 2, sha256: bool = False,
                  max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, progress: bool = True) -> VerifyResult:
    """Read every sample of the shard set once and report its problems.

    Args:
        shards_or_dir: the shard folder, its manifest, or either as a URL.
        workers: processes (one shard at a time each); 1 or less reads here.
        sha256: also check each shard's SHA-256 against the manifest (reads each shard once more).
        max_image_pixels: the pixel limit of the headers (``data.max_image_pixels``).
        progress: show a progress bar (samples).

    Raises:
        FileNotFoundError: no manifest there.
        ValueError: the manifest is invalid (the message names the field).
    """
    from tqdm import tqdm

    from distrib_face.data.procs import OrderedPool

    manifest = read_manifest(shards_or_dir)
    jobs = [(path, i, manifest.shard_counts[i], manifest.num_classes, manifest.image_size, max_image_pixels,
             manifest.shard_hashes[i] if sha256 and manifest.shard_hashes else None,
             manifest.shard_bytes[i] if manifest.shard_bytes else None)
            for i, path in enumerate(manifest.shards)]
    set_problems = []
    if sha256 and not manifest.shard_hashes:
        set_problems.append("the manifest has no sha256 of its shards: --sha256 cannot check them")
    results: Iterator[ShardReport]
    if workers <= 1 or len(jobs) <= 1:
        results = (verify_shard(job) for job in jobs)
    else:
        results = OrderedPool(verify_shard, min(workers, len(jobs)), name="verify worker").imap(jobs, chunk_size=1)
    reports = []
    found = np.zeros(manifest.num_classes, dtype=np.int64)  # [C] samples of each label in the shards
    with tqdm(total=manifest.num_samples, unit="img", disable=not progress) as bar:
        for report in results:
            _add_labels(found, report)
            reports.append(report)
            bar.update(report.samples)
    set_problems += _class_problems(manifest, reports, found)
    return VerifyResult(manifest, reports, set_problems)

"""What reading a shard manifest costs a process, format 1 (inline JSON) against format 2 (JSON + class table).

``distrib-face bench manifest --classes N`` writes both formats of one manifest (N identities named
``id%07d``, Zipf-like counts, 10,000 samples a shard) into a temp folder, then reads each in a fresh Python
process (the first read of a process, the case of every rank and tool), three times: the manifest alone
(what a rank that only needs the counts pays), then its names by label (``class_names``), then the
``{name: label}`` map. Times are wall seconds of each step; memory is the process's resident set (VmRSS)
after the step minus its RSS before the read, and the peak (VmHWM) over the same baseline.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distrib_face.data.manifest import MANIFEST_NAME, Manifest, write_manifest

STEPS = ("read", "class_names", "label_map")

_CHILD = r"""
import json, sys, time
def rss():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
from distrib_face.data.manifest import read_manifest
base, _ = rss()
out = {}
t = time.perf_counter(); m = read_manifest(sys.argv[1]); int(m.class_counts.sum())
out["read"] = (time.perf_counter() - t, *rss())
t = time.perf_counter(); names = m.class_names
out["class_names"] = (time.perf_counter() - t, *rss())
t = time.perf_counter(); labels = m.label_map
out["label_map"] = (time.perf_counter() - t, *rss())
sys.stdout.write(json.dumps({"base": base, "steps": out}) + "\n")
"""


@dataclass
class ManifestCost:
    """One format's cost: bytes on disk, and per step (seconds, RSS MB over the baseline, peak MB over it)."""

    format: str
    manifest_bytes: int
    table_bytes: int
    steps: dict[str, tuple[float, float, float]]


def synthetic_manifest(num_classes: int, seed: int = 0) -> Manifest:
    """A manifest of ``num_classes`` identities named ``id%07d`` with counts in [1, 60] (Zipf 1.5), in shards
    of 10,000 samples (no shard files: only the manifest is read)."""
    rng = np.random.default_rng(seed)
    support = np.arange(1, 61)
    weights = support.astype(np.float64) ** -1.5
    counts = rng.choice(support, size=num_classes, p=weights / weights.sum()).astype(np.int64)
    total = int(counts.sum())
    per_shard = [10_000] * (total // 10_000) + ([total % 10_000] if total % 10_000 else [])
    shards = [f"train-{i:06d}.tar" for i in range(len(per_shard))]
    return Manifest(num_classes=num_classes, num_samples=total, shards=shards, shard_counts=per_shard,
                    class_counts=counts, class_names=[f"id{i:07d}" for i in range(num_classes)],
                    source={"kind": "synthetic"}, content_hash="0" * 64, image_size=(16, 16),
                    shard_hashes=["0" * 64] * len(shards), shard_bytes=[1] * len(shards))


def measure_manifest_cost(num_classes: int, python: str = sys.executable) -> list[ManifestCost]:
    """Write format 1 and format 2 of :func:`synthetic_manifest` and measure each read in a fresh process."""
    manifest = synthetic_manifest(num_classes)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-manifest-") as tmp:
        v1, v2 = Path(tmp) / "v1", Path(tmp) / "v2"
        v1.mkdir()
        (v1 / MANIFEST_NAME).write_text(json.dumps(manifest.to_json_dict_v1(), indent=1))
        write_manifest(v2, manifest)
        for name, folder in (("distrib_face.shards/1", v1), ("distrib_face.shards/2", v2)):
            proc = subprocess.run([python, "-c", _CHILD, str(folder)], capture_output=True, text=True, check=True,
                                  timeout=600)
            measured = json.loads(proc.stdout.strip().splitlines()[-1])
            base = measured["base"]
            steps = {step: (seconds, rss - base, peak - base) for step, (seconds, rss, peak) in measured["steps"].items()}
            tables = list(folder.glob("classes-*.npz"))
            results.append(ManifestCost(name, (folder / MANIFEST_NAME).stat().st_size,
                                        tables[0].stat().st_size if tables else 0, steps))
    return results


def format_manifest_table(num_classes: int, results: list[ManifestCost]) -> str:
    """The results as a text table, one row per format and step."""
    lines = [f"manifest of {num_classes:,} classes: read in a fresh process, three steps",
             f"{'format':<22} {'manifest MB':>11} {'table MB':>8} {'step':<12} {'s':>7} {'RSS MB':>7} {'peak MB':>7}"]
    for r in results:
        for step in STEPS:
            seconds, rss, peak = r.steps[step]
            lines.append(f"{r.format:<22} {r.manifest_bytes / 2**20:>11.2f} {r.table_bytes / 2**20:>8.2f} "
                         f"{step:<12} {seconds:>7.3f} {rss:>7.0f} {peak:>7.0f}")
    return "\n".join(lines)

"""``distrib-face bench workers``: how ``synth`` and ``pack`` scale with ``--workers``, each run the real command.

Rows: ``synth`` of ~50k images at 16 px and of ~10k images at 112 px (the Zipf 4..60 law of ``synth``'s
defaults), and ``pack`` of an identity-per-folder tree of ~50k JPEGs at 112 px (synthesised and written out
first, untimed), each at every worker count asked for. Every run is measured with its whole process tree
(:func:`distrib_face.train.proctree.measure_command`): wall seconds, CPU seconds of all its processes, and
from them the speed-up over the first worker count and the cores the run kept busy (CPU / wall), and the CPU
seconds of the command's own (main) process, where the serial work is. On a
shared machine the two tell apart work our code adds with more workers (CPU seconds grow) from cores the
machine did not have to give (CPU / wall below the worker count).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from distrib_face.train.proctree import TreeUsage, check, measure_command

log = logging.getLogger(__name__)


@dataclass
class WorkersRow:
    """One run: what, how many workers, images, and its measured usage."""

    name: str
    workers: int
    images: int
    usage: TreeUsage


def _python(*args: str) -> list[str]:
    return [sys.executable, "-m", "distrib_face", *args]


def export_image_folder(shards: str | os.PathLike, folder: str | os.PathLike) -> int:
    """Write every sample of a shard set as ``folder/id%06d/KEY.jpg`` (the identity-per-folder input of
    ``pack``); returns the number of images."""
    from distrib_face.data.manifest import read_manifest
    from distrib_face.data.stream import iter_shard

    manifest = read_manifest(shards)
    root = Path(folder)
    count = 0
    for index, url in enumerate(manifest.shards):
        for sample in iter_shard(url, index):
            if sample.image is None or sample.label is None:
                continue
            target = root / f"id{sample.label:06d}"
            target.mkdir(parents=True, exist_ok=True)
            (target / f"{sample.key}.jpg").write_bytes(sample.image)
            count += 1
    return count


def run_workers_bench(out: str | os.PathLike, *, workers: Sequence[int] = (1, 2), identities_16: int = 3450,
                      identities_112: int = 690, pack_identities: int = 3450, repeat: int = 1) -> list[WorkersRow]:
    """Run every row (see the module docstring) in ``out`` (emptied first).

    With ``repeat`` > 1 the worker counts of a task run interleaved (1, 2, 1, 2, ...) and each row keeps its
    fastest run: on a shared machine the slow runs are the ones another job took cores from.
    """
    from distrib_face.data.manifest import read_manifest

    out = Path(out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    best: dict[tuple[str, int], WorkersRow] = {}

    def keep(row: WorkersRow) -> None:
        known = best.get((row.name, row.workers))
        if known is None or row.usage.wall_s < known.usage.wall_s:
            best[(row.name, row.workers)] = row
        log.info("%s, %d workers: %.1f s", row.name, row.workers, row.usage.wall_s)

    for size, identities in ((16, identities_16), (112, identities_112)):
        for attempt in range(repeat):
            for count in workers:
                data = out / f"synth_{size}_{count}"
                name = f"synth {size} px"
                usage = check(measure_command(
                    _python("synth", str(data), "--identities", str(identities), "--image-size", str(size),
                            "--workers", str(count)), log_path=out / "logs" / f"synth_{size}_{count}_{attempt}.log"),
                    name)
                keep(WorkersRow(name, count, read_manifest(data).num_samples, usage))
                shutil.rmtree(data)
    # pack's input: an identity-per-folder tree of 112 px JPEGs (made untimed, with every worker asked for)
    source, folder = out / "pack_source", out / "folder_112"
    check(measure_command(_python("synth", str(source), "--identities", str(pack_identities), "--image-size", "112",
                                  "--holdout", "0", "--workers", str(max(workers))),
                          log_path=out / "logs" / "pack_source.log"), "synth (pack input)")
    images = export_image_folder(source, folder)
    shutil.rmtree(source)
    for attempt in range(repeat):
        for count in workers:
            shards = out / f"pack_{count}"
            usage = check(measure_command(
                _python("pack", str(folder), str(shards), "--workers", str(count), "--no-progress"),
                log_path=out / "logs" / f"pack_{count}_{attempt}.log"), "pack")
            keep(WorkersRow("pack 112 px folder", count, images, usage))
            shutil.rmtree(shards)
    shutil.rmtree(folder)
    return list(best.values())


def format_workers_table(rows: Sequence[WorkersRow]) -> str:
    """The rows as a text table; the speed-up is against the same task's first row."""
    lines = [f"{'task':<20} {'workers':>7} {'images':>7} {'wall s':>7} {'img/s':>7} {'CPU s':>7} "
             f"{'CPU/wall':>8} {'speed-up':>8} {'main CPU s':>10}"]
    first: dict[str, float] = {}
    for row in rows:
        wall = row.usage.wall_s
        first.setdefault(row.name, wall)
        lines.append(f"{row.name:<20} {row.workers:>7} {row.images:>7} {wall:>7.1f} {row.images / wall:>7.0f} "
                     f"{row.usage.cpu_s:>7.1f} {row.usage.cpu_s / wall:>8.2f} {first[row.name] / wall:>8.2f} "
                     f"{row.usage.cpu_by_kind.get('main', 0.0):>10.1f}")
    return "\n".join(lines)

"""Smoke tests of the benchmark subcommands at tiny sizes (seconds): ``distrib-face bench manifest`` and
``bench classifier --floor / --interleave / --plan`` run as a user runs them, and print the tables they
claim, with numbers checked against independent arithmetic where that is cheap."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

TINY = ["--batch", "8", "--embedding", "16", "--steps", "2", "--warmup", "1", "--no-baseline"]


def _cli(*args: str) -> str:
    code = "import sys; from distrib_face.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _table(out: str) -> list[dict[str, str]]:
    """The rows of the first Markdown table in ``out``, as ``{column: cell}``."""
    lines = [line for line in out.splitlines() if line.startswith("|")]
    head = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert set(lines[1].replace("|", "")) == {"-"}
    return [dict(zip(head, (cell.strip() for cell in line.strip("|").split("|")), strict=True)) for line in lines[2:]]


def _number(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("x"))


def test_bench_manifest_prints_both_formats_and_three_steps():
    out = _cli("bench", "manifest", "--classes", "2000")
    assert "manifest of 2,000 classes" in out
    rows = [line.split() for line in out.splitlines()[2:] if line.strip()]
    assert out.splitlines()[1].split() == ["format", "manifest", "MB", "table", "MB", "step", "s", "RSS", "MB",
                                           "peak", "MB"]
    assert [(r[0], r[3]) for r in rows] == [(f"distrib_face.shards/{v}", step) for v in (1, 2)
                                            for step in ("read", "class_names", "label_map")]
    # format 1 carries the class table inline in manifest.json; format 2 in the side file
    assert all(float(r[1]) > 0 and float(r[2]) == 0 for r in rows[:3])
    assert all(float(r[1]) < float(r[2]) for r in rows[3:])


def test_bench_classifier_floor_has_the_floor_columns():
    (row,) = _table(_cli("bench", "classifier", "--classes", "2000", "--floor", *TINY))
    assert row["classes"] == "2,000" and row["rows/step"] == "2,000" and row["world"] == "1"
    assert _number(row["ms/step"]) > 0 and _number(row["4-matmul floor ms"]) >= 0
    assert _number(row["step / floor"]) > 0 and row["vs first"] == "1.00x"


def test_bench_classifier_interleave_times_every_case_in_one_process():
    rows = _table(_cli("bench", "classifier", "--classes", "2000,3000", "--interleave", *TINY))
    assert [r["classes"] for r in rows] == ["2,000", "3,000"]
    assert all(r["note"] == "cases interleaved in one process" for r in rows)
    first, second = (_number(r["ms/step"]) for r in rows)
    assert rows[0]["vs first"] == "1.00x"
    # the ratio is of the unrounded times: within the rounding of the printed ones
    assert _number(rows[1]["vs first"]) == pytest.approx(second / first, abs=0.01 + 0.06 / first)


def test_bench_classifier_plan_bytes_per_class_and_largest_count():
    out = _cli("bench", "classifier", "--plan", "--classes", "1000000", "--embedding", "512",
               "--device-memory", "80GB")
    rows = {r["component"]: r for r in _table(out)}
    row = 4 * 512  # fp32 weights, 512-d
    for name in ("weights", "optimizer state (momentum / moments)", "weight gradient"):
        assert _number(rows[name]["bytes per class"]) == row
        assert rows[name]["device GB"] == f"{1_000_000 * row / 1e9:.2f}"
    assert _number(rows["per-class step counts"]["bytes per class"]) == 8  # one int64 per class
    assert rows["**total**"]["bytes per class"] == f"{3 * row + 8:,.1f} on the device"
    # fixed: two [256, 65536] float32 logit blocks (B <= D keeps the raw block) and a float32 chunk of rows
    fixed = 2 * 256 * 65536 * 4 + 65536 * 512 * 4
    largest = math.floor((80e9 - fixed) / (3 * row + 8))
    assert f"the largest class count that fits is **{largest:,}**" in out

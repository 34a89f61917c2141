"""launch/ray_job.py's summary table prints rounded numbers (the summary dict keeps full precision)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _ray_job_module():
    spec = importlib.util.spec_from_file_location("ray_job_under_test", ROOT / "launch" / "ray_job.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_print_summary_rounds(capsys):
    summary = {
        "steps": 120, "total_steps": 300, "finished": False, "images_per_sec": 343.61234567, "final_loss": 0.745712345,
        "verification_before": {"synthetic_holdout": 0.6225}, "verification_after": {},
        "workers": [{"rank": 0, "hostname": "h", "node_id": "0123456789abcdef"}],
        "mlflow_run_id": "abc", "tracking_uri": "sqlite:///x.db",
    }
    _ray_job_module().print_summary(summary)
    rows = dict(line.split("  ", 1) for line in capsys.readouterr().out.splitlines()[1:])
    rows = {key.strip(): value.strip() for key, value in rows.items()}
    assert rows["images/s"] == "343.6" and rows["final loss"] == "0.7457"
    assert rows["verification before"] == "synthetic_holdout 62.25%" and rows["verification after"] == "-"
    assert rows["steps"] == "120 / 300 (stopped early: train.max_steps_this_run)"

"""``ray_backend.job_status``: the MLflow status the Ray driver ends its run with, from rank 0's summary in a
real ``ray.train.Result`` (the object ``TorchTrainer.fit`` returns)."""

from __future__ import annotations

import pytest


def _result(return_value):
    from ray.train import Result

    return Result(metrics={}, checkpoint=None, error=None, path="/nowhere", return_value=return_value)


@pytest.mark.parametrize("summary, status", [
    ({"steps": 120, "total_steps": 300, "finished": False}, "SCHEDULED"),  # stopped by train.max_steps_this_run
    ({"steps": 300, "total_steps": 300, "finished": True}, "FINISHED"),
    # A summary without the flag (an older worker) or no summary at all: nothing says the job stopped early.
    ({"steps": 300}, "FINISHED"),
    (None, "FINISHED"),
])
def test_job_status_follows_rank_0s_summary(summary, status):
    from distrib_face.tracking import STOPPED_EARLY_STATUS
    from distrib_face.tracking.base import END_STATUSES
    from distrib_face.train.ray_backend import job_status

    assert STOPPED_EARLY_STATUS == "SCHEDULED"  # MLflow's "to be run later"
    got = job_status(_result(summary))
    assert got == status and got in END_STATUSES

"""Experiment tracking: MLflow on rank 0 (a no-op tracker elsewhere), redaction, plots.

Tracking receives numbers: averaging metrics over ranks is a collective and lives in
:mod:`distrib_face.parallel.metrics`.

Usage in a training process::

    tracker = create_tracker(enabled=ctx.rank == 0, tracking_uri=None, experiment="distrib_face",
                             run_id=resumed_run_id, artifact_location=output_dir)
    tracker.log_params(cfg.to_dict())
    ...
    tracker.end()

MLflow is imported only when a real tracker is created.
"""

from __future__ import annotations

from distrib_face.redact import install_log_redaction, is_secret_key, redact, redact_text
from distrib_face.tracking.base import STOPPED_EARLY_STATUS, NoOpTracker, Tracker
from distrib_face.tracking.naming import dataset_name, default_run_name, run_name_for
from distrib_face.tracking.params import flatten_params
from distrib_face.tracking.plots import (
    class_size_histogram,
    plot_class_histogram,
    plot_training_curves,
)

__all__ = [
    "NoOpTracker",
    "STOPPED_EARLY_STATUS",
    "Tracker",
    "class_size_histogram",
    "create_tracker",
    "dataset_name",
    "default_run_name",
    "flatten_params",
    "install_log_redaction",
    "is_secret_key",
    "plot_class_histogram",
    "plot_training_curves",
    "redact",
    "redact_text",
    "run_name_for",
]


def create_tracker(
    enabled: bool,
    tracking_uri: str | None,
    experiment: str,
    run_id: str | None = None,
    run_name: str | None = None,
    artifact_location: str | None = None,
    resumed: bool | None = None,
) -> Tracker:
    """The tracker for this process: an MLflow run when ``enabled`` (rank 0), else a :class:`NoOpTracker`.

    Args:
        enabled: False on every rank but 0, or with tracking switched off.
        tracking_uri: MLflow tracking URI; None means ``MLFLOW_TRACKING_URI`` or else
            ``sqlite:///mlruns.db`` (relative paths are resolved against the current directory).
        experiment: experiment name (created when missing).
        run_id: log into this existing run (same id, status back to RUNNING): a run continued after a restart,
            or one the launcher opened for this job (Ray's driver).
        run_name: display name for a new run (see :func:`run_name_for` for a default that says what ran).
        artifact_location: artifact folder of a new experiment (local stores; defaults to
            ``mlartifacts/`` beside the sqlite database).
        resumed: with ``run_id``: True when a job continues the run from a checkpoint, False when the run was
            only opened for this job; ``None`` decides from the run (resumed if it holds params or metrics).

    Returns:
        A :class:`Tracker`.

    Raises:
        distrib_face.tracking.mlflow_tracker.TrackingError: ``run_id`` not found, or the store refuses.
    """
    if not enabled:
        return NoOpTracker()
    from distrib_face.tracking.mlflow_tracker import MLflowTracker

    return MLflowTracker(
        tracking_uri, experiment, run_id=run_id, run_name=run_name, artifact_location=artifact_location,
        resumed=resumed,
    )

"""The ``Tracker`` interface the trainer talks to, and the no-op tracker every rank but 0 gets."""

from __future__ import annotations

import abc
import os
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any

PathLike = str | os.PathLike[str]

#: The status of a run that a job left on purpose before its last step (``train.max_steps_this_run``): not
#: FINISHED (the model is not the final one), not FAILED or KILLED (nothing went wrong, nobody stopped it), but
#: "to be continued" -- MLflow's SCHEDULED ("scheduled to run at a later time"). The next job that resumes
#: from its checkpoint sets it back to RUNNING.
STOPPED_EARLY_STATUS = "SCHEDULED"

#: Statuses accepted by :meth:`Tracker.end` (MLflow's ``RunStatus`` names).
END_STATUSES: tuple[str, ...] = ("FINISHED", "FAILED", "KILLED", STOPPED_EARLY_STATUS)


class Tracker(abc.ABC):
    """Records one training run: params, metrics, tags, artifacts and the exported model.

    Only rank 0 holds a real tracker; every other rank gets a :class:`NoOpTracker` so that calling code
    never branches on the rank. A tracker is a context manager: leaving the block ends the run as
    ``FINISHED``, or ``FAILED`` when an exception escapes.
    """

    @property
    @abc.abstractmethod
    def run_id(self) -> str | None:
        """The run's id (keep it in checkpoints to continue the same run after a restart); None for no-op."""

    @abc.abstractmethod
    def log_params(self, params: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
        """Log a (nested) config as params with flattened keys ("optim.lr"); secrets are redacted.

        Returns:
            ``{key: (logged value, new value)}`` for keys this run already holds with another value (MLflow
            keeps the first; the change goes to the tag ``param_changed.<key>`` as ``"old -> new"``).
        """

    @abc.abstractmethod
    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log scalar metrics (floats, ints, 0-d tensors or arrays) at ``step``."""

    @abc.abstractmethod
    def log_artifact(self, path: PathLike, subdir: str | None = None) -> None:
        """Upload the file or folder ``path`` into the run's artifacts, under ``subdir`` if given."""

    @abc.abstractmethod
    def log_dict(self, data: Mapping[str, Any], filename: str) -> None:
        """Store ``data`` (secrets redacted) as the artifact ``filename`` (.json or .yaml by its extension)."""

    @abc.abstractmethod
    def log_figure(self, figure: Any, filename: str) -> None:
        """Store a matplotlib figure as the artifact ``filename`` (e.g. "plots/loss.png")."""

    @abc.abstractmethod
    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set (or overwrite) run tags; values are stringified."""

    @abc.abstractmethod
    def log_onnx_model(
        self, onnx_path: PathLike, name: str, register_as: str | None = None, step: int | None = None
    ) -> str | None:
        """Log an exported ONNX file as an MLflow model (ONNX flavour, with its signature).

        Args:
            onnx_path: the ``.onnx`` file.
            name: the model's name within the run (e.g. "model").
            register_as: when given, also register it in the model registry under this name.
            step: the training step the model is from: the run's metrics logged at this step (before this
                call) become the model's metrics. ``None``: the last step any metric was logged at.

        Returns:
            The model URI to load it with (``mlflow.pyfunc.load_model(uri)``), or None for a no-op tracker.
        """

    @abc.abstractmethod
    def record_resume(
        self, config: Mapping[str, Any], step: int, world_size: int, checkpoint: PathLike | None = None
    ) -> dict[str, tuple[str, str]]:
        """Record that a job resumed this run at ``step``: what changed since the run's logged config.

        Logs ``config`` as params (changed values get the tag ``param_changed.<key>`` = ``"old -> new"``),
        sets the tag ``resumed_at_step_<step>`` = ``"world_size=<W>"`` and stores the artifact
        ``resumes/step_<step>.yaml`` (step, world size, checkpoint, the changes, the whole config).

        Returns:
            The changes, as :meth:`log_params` returns them.
        """

    @abc.abstractmethod
    def log_training_data(self, manifest: Any, name: str | None = None, context: str = "training") -> str | None:
        """Log a shard set as an MLflow dataset input of the run (``mlflow.data``).

        Args:
            manifest: the :class:`~distrib_face.data.manifest.Manifest` of the training shards.
            name: the dataset's name (default: :func:`~distrib_face.tracking.naming.dataset_name`).
            context: the input's ``mlflow.data.context`` tag.

        Returns:
            The dataset's digest (the manifest's content hash, cut to MLflow's 36 characters), or None.
        """

    @abc.abstractmethod
    def end(self, status: str = "FINISHED") -> None:
        """Mark the run terminated with ``status`` (one of :data:`END_STATUSES`); later calls do nothing.

        ``SCHEDULED`` (:data:`STOPPED_EARLY_STATUS`) is for a job stopped before the run's last step on
        purpose (``train.max_steps_this_run``): the run is to be continued.
        """

    def log_artifacts(self, paths: Iterable[PathLike], subdir: str | None = None) -> None:
        """:meth:`log_artifact` for each of ``paths`` (e.g. the ROC PNGs the evaluation wrote)."""
        for path in paths:
            self.log_artifact(path, subdir)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.end("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.end("KILLED")
        else:
            self.end("FAILED")


class NoOpTracker(Tracker):
    """A tracker that records nothing: for ranks other than 0 and for runs with tracking switched off."""

    @property
    def run_id(self) -> str | None:
        return None

    def log_params(self, params: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
        return {}

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        return None

    def log_artifact(self, path: PathLike, subdir: str | None = None) -> None:
        return None

    def log_dict(self, data: Mapping[str, Any], filename: str) -> None:
        return None

    def log_figure(self, figure: Any, filename: str) -> None:
        return None

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        return None

    def log_onnx_model(
        self, onnx_path: PathLike, name: str, register_as: str | None = None, step: int | None = None
    ) -> str | None:
        return None

    def record_resume(
        self, config: Mapping[str, Any], step: int, world_size: int, checkpoint: PathLike | None = None
    ) -> dict[str, tuple[str, str]]:
        return {}

    def log_training_data(self, manifest: Any, name: str | None = None, context: str = "training") -> str | None:
        return None

    def end(self, status: str = "FINISHED") -> None:
        return None

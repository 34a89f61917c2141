"""The ``Tracker`` interface the trainer talks to, and the no-op tracker every rank but 0 gets."""

from __future__ import annotations

import abc
import os
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any

PathLike = str | os.PathLike[str]

#: Terminal statuses accepted by :meth:`Tracker.end` (MLflow's ``RunStatus`` names).
END_STATUSES: tuple[str, ...] = ("FINISHED", "FAILED", "KILLED")


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
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log a (nested) config as params with flattened keys ("optim.lr"); secrets are redacted."""

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
    def log_onnx_model(self, onnx_path: PathLike, name: str, register_as: str | None = None) -> str | None:
        """Log an exported ONNX file as an MLflow model (ONNX flavour, with its signature).

        Args:
            onnx_path: the ``.onnx`` file.
            name: the model's name within the run (e.g. "model").
            register_as: when given, also register it in the model registry under this name.

        Returns:
            The model URI to load it with (``mlflow.pyfunc.load_model(uri)``), or None for a no-op tracker.
        """

    @abc.abstractmethod
    def end(self, status: str = "FINISHED") -> None:
        """Mark the run terminated with ``status`` (FINISHED, FAILED or KILLED); later calls do nothing."""

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

    def log_params(self, params: Mapping[str, Any]) -> None:
        return None

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

    def log_onnx_model(self, onnx_path: PathLike, name: str, register_as: str | None = None) -> str | None:
        return None

    def end(self, status: str = "FINISHED") -> None:
        return None

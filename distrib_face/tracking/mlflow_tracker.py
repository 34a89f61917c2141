"""The MLflow tracker: one run per training job, continued (same run id) when a restarted job resumes.

Only rank 0 creates one (``create_tracker(enabled=rank == 0, ...)``). Talks to MLflow through an
``MlflowClient`` bound to the tracker's URI, so several trackers in one process do not share state, and
MLflow's process-wide ("fluent") state is left as it was (:meth:`MLflowTracker.log_onnx_model` needs it
set and restores it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from distrib_face.tracking.base import END_STATUSES, STOPPED_EARLY_STATUS, PathLike, Tracker
from distrib_face.tracking.environment import environment_tags
from distrib_face.tracking.params import MAX_TAG_VALUE_LENGTH, flatten_params, stringify, truncate
from distrib_face.redact import redact, redact_value

logger = logging.getLogger(__name__)

#: Used when neither the ``tracking_uri`` argument nor ``MLFLOW_TRACKING_URI`` is given.
DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"
#: Folder (beside the sqlite database) for artifacts when no ``artifact_location`` is given.
DEFAULT_ARTIFACT_DIRNAME = "mlartifacts"

#: Seconds :func:`check_tracking_store` waits for an MLflow server's ``/health`` before calling it unreachable.
HEALTH_TIMEOUT_S = 10.0

#: Seconds to wait before sending metrics again after the store refused them.
METRIC_RETRY_INTERVAL_S = 60.0
#: Metrics kept while the store is unreachable (a few hours of logging at typical intervals).
MAX_PENDING_METRICS = 100_000

# MLflow's per-request limits for log_batch (mlflow.utils.validation).
_PARAMS_TAGS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000


class TrackingError(RuntimeError):
    """The tracking backend refused something the tracker needs (unknown run id, bad URI, unwritable store).

    The message is one line and names the store (its URI with any password masked).
    """

    #: The entry points' exit code: the store is the user's to fix (docs/training.md).
    exit_code = 2


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def resolve_tracking_uri(tracking_uri: str | None = None) -> str:
    """The URI a tracker uses: the argument, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlruns.db``.

    A relative sqlite path is made absolute against the current directory (``sqlite:////abs/path.db``,
    four slashes) and its folder is created, so the database does not move when the cwd changes.
    """
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///"):
        path_part, sep, query = uri[len("sqlite:///"):].partition("?")
        if not path_part:
            raise TrackingError(f"sqlite tracking URI {uri!r} names no database file")
        db_path = Path(path_part)
        if not db_path.is_absolute():
            db_path = Path.cwd() / db_path
        db_path = db_path.resolve()
        try:
            db_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise TrackingError(
                f"MLflow tracking store {uri}: cannot create the folder {db_path.parent}: "
                f"{error.strerror or _first_line(error)}"
            ) from error
        uri = f"sqlite:///{db_path.as_posix()}{sep}{query}"
    return uri


def check_tracking_store(tracking_uri: str) -> None:
    """Fail fast, with one line naming the store, when it cannot work; else return.

    MLflow itself retries an unusable store for minutes (a sqlite file it cannot open: ~100 s of engine
    retries; an unreachable server: up to 7 request retries with exponential back-off) before raising a
    multi-line error. Checked here instead, in well under a second:

    - ``sqlite:///PATH``: the database's folder must accept a new file (sqlite writes its journal beside
      the database) and an existing database file must open for writing;
    - ``http(s)://``: the server must accept a connection (``GET /health``; any HTTP status counts as
      reachable, so a server behind an authenticating proxy passes).

    Other schemes are left to MLflow.

    Raises:
        TrackingError: naming the URI (password masked) and the reason.
    """
    import tempfile

    shown = redact_value(tracking_uri)
    db_path = sqlite_database_path(tracking_uri)
    if db_path is not None:
        try:
            fd, probe = tempfile.mkstemp(prefix=".mlflow_probe_", dir=db_path.parent)
            os.close(fd)
            os.unlink(probe)
            if db_path.exists():
                with open(db_path, "ab"):
                    pass
        except OSError as error:
            where = error.filename or db_path.parent
            raise TrackingError(
                f"MLflow tracking store {shown}: cannot write {where}: {error.strerror or _first_line(error)}"
            ) from error
        return
    if urlparse(tracking_uri).scheme in ("http", "https"):
        import requests

        try:
            requests.get(tracking_uri.rstrip("/") + "/health", timeout=HEALTH_TIMEOUT_S)
        except requests.RequestException as error:
            reason = type(error).__name__
            if isinstance(error, requests.ConnectionError):
                reason = "connection refused or host unreachable"
            elif isinstance(error, requests.Timeout):
                reason = f"no answer in {HEALTH_TIMEOUT_S:.0f} s"
            raise TrackingError(f"MLflow tracking server {shown} is unreachable: {reason}") from error


def sqlite_database_path(tracking_uri: str) -> Path | None:
    """The database file of an (absolute) ``sqlite:///`` URI, or None for other URIs."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri[len("sqlite:///"):].partition("?")[0])


def _is_remote(tracking_uri: str) -> bool:
    return urlparse(tracking_uri).scheme in ("http", "https", "databricks", "databricks-uc", "uc")


def _is_local_location(location: str) -> bool:
    scheme = urlparse(location).scheme
    return scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt")


def _as_float(key: str, value: Any) -> float:
    if hasattr(value, "item"):  # 0-d torch tensors and numpy scalars/arrays
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"metric {key!r} must be a real number, got {type(value).__name__}: {value!r}")
    return float(value)


@contextlib.contextmanager
def fluent_mlflow_state(
    tracking_uri: str, registry_uri: str | None = None, experiment_id: str | None = None
) -> Iterator[None]:
    """Point MLflow's process-wide ("fluent") tracking URI, registry URI (default: the tracking URI) and
    experiment (if given) at ours, then restore them: e.g. to ``mlflow.pyfunc.load_model("models:/...")``
    from a given store.

    MLflow keeps these in module globals mirrored into ``MLFLOW_TRACKING_URI`` / ``MLFLOW_REGISTRY_URI`` /
    ``MLFLOW_EXPERIMENT_ID``; leaving them changed would redirect any later MLflow use in this process
    (and its children) to this tracker's store.
    """
    import mlflow
    from mlflow.tracking import fluent
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID")
    saved_env = {name: os.environ.get(name) for name in names}
    saved_tracking = getattr(tracking_utils, "_tracking_uri", None)
    saved_registry = getattr(registry_utils, "_registry_uri", None)
    saved_experiment = getattr(fluent, "_active_experiment_id", None)
    try:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(registry_uri or tracking_uri)
        if experiment_id is not None:
            mlflow.set_experiment(experiment_id=experiment_id)
        yield
    finally:
        mlflow.set_tracking_uri(saved_tracking)
        registry_utils._registry_uri = saved_registry
        fluent._active_experiment_id = saved_experiment
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _no_printed_run_url() -> Iterator[None]:
    """Keep MLflow from writing "View run NAME at: URL" to stdout when a run ends.

    ``MlflowClient.set_terminated`` prints that line itself (``sys.stdout.write``, past any logging), and its
    URL is the tracking URI as given, credentials included. The tracker logs its own line, redacted.
    """
    name = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"
    saved = os.environ.get(name)
    os.environ[name] = "true"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def onnx_signature(onnx_model: Any) -> Any:
    """The MLflow ``ModelSignature`` of an ONNX graph: its named inputs/outputs with dtype and shape.

    Dynamic dimensions (``dim_param`` or unset) become -1, so an exported backbone reads
    float32 [-1, 3, 112, 112] -> float32 [-1, 512].
    """
    import numpy as np
    import onnx
    from mlflow.models.signature import ModelSignature
    from mlflow.types import Schema, TensorSpec

    initializers = {init.name for init in onnx_model.graph.initializer}

    def spec(value_info: Any) -> Any:
        tensor_type = value_info.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        shape = tuple(dim.dim_value if dim.HasField("dim_value") else -1 for dim in tensor_type.shape.dim)
        return TensorSpec(dtype, shape, value_info.name)

    inputs = [spec(v) for v in onnx_model.graph.input if v.name not in initializers]
    outputs = [spec(v) for v in onnx_model.graph.output]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs))


class MLflowTracker(Tracker):
    """A :class:`Tracker` writing to an MLflow tracking store (sqlite file or server).

    Args:
        tracking_uri: where runs go; see :func:`resolve_tracking_uri` for the default.
        experiment: experiment name, created when missing (restored when deleted).
        run_id: log into this existing run instead of starting one (status back to RUNNING).
        run_name: display name of a new run.
        resumed: whether ``run_id`` is continued after an interruption (a ``resumed_at`` tag, "continuing run"
            in the log) or was only opened by a launcher for this job (Ray's driver opens the run before the
            workers start). ``None``: resumed when the run already holds params or metrics -- a run a launcher
            just opened holds neither.
        artifact_location: where a *new* experiment keeps artifacts. For a local store (sqlite) it
            defaults to ``mlartifacts/`` beside the database; for a server, local paths are ignored (the
            server stores artifacts where it was told to) and only remote URIs (``s3://...``) are used.
            An existing experiment keeps its own location.

    Raises:
        TrackingError: ``run_id`` does not exist in the store, or the URI is unusable.
    """

    def __init__(
        self,
        tracking_uri: str | None,
        experiment: str,
        run_id: str | None = None,
        run_name: str | None = None,
        artifact_location: str | None = None,
        resumed: bool | None = None,
    ) -> None:
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        check_tracking_store(self.tracking_uri)
        try:
            self._start(experiment, run_id, run_name, artifact_location, resumed)
        except TrackingError:
            raise
        except Exception as error:  # whatever MLflow or its database driver raise: one line naming the store
            raise TrackingError(
                f"MLflow tracking store {redact_value(self.tracking_uri)}: cannot start the run: {_first_line(error)}"
            ) from error
        self.set_tags(environment_tags())

    def _start(self, experiment: str, run_id: str | None, run_name: str | None, artifact_location: str | None,
               resumed: bool | None) -> None:
        """Open the client and create (or continue) the run; the constructor turns failures into one line."""
        from mlflow import MlflowClient

        self.experiment_name = experiment
        self._client = MlflowClient(tracking_uri=self.tracking_uri)
        self._ended = False
        self._known_params: dict[str, str] | None = None
        # Metrics the store did not take yet (it was unreachable), oldest first, and when to try again.
        self._pending_metrics: list[Any] = []
        self._metrics_paused_until = 0.0
        self.metric_retry_interval_s = METRIC_RETRY_INTERVAL_S
        self._last_step: int | None = None  # highest step a metric was logged at by this tracker
        shown_uri = redact_value(self.tracking_uri)
        self.resumed = False
        if run_id:
            run, self.resumed = self._open_existing(run_id, resumed)
            if self.resumed:
                logger.info("MLflow: continuing run %s (%s) at %s", run_id, run.info.run_name, shown_uri)
            else:
                logger.info("MLflow: logging into run %s (%s), opened for this job, at %s",
                            run_id, run.info.run_name, shown_uri)
        else:
            experiment_id = self._experiment_id(experiment, artifact_location)
            run = self._client.create_run(experiment_id, run_name=run_name)
            logger.info(
                "MLflow: run %s (%s) in experiment %r at %s", run.info.run_id, run.info.run_name, experiment, shown_uri
            )
        self._run_id: str = run.info.run_id
        self.experiment_id: str = run.info.experiment_id
        self.artifact_uri: str = run.info.artifact_uri
        self._run_name: str = run.info.run_name

    # -- run lifecycle -----------------------------------------------------------------------------------
    def _open_existing(self, run_id: str, resumed: bool | None) -> tuple[Any, bool]:
        """Open run ``run_id`` (status RUNNING); returns it and whether this is a resume (see ``resumed``)."""
        from mlflow.exceptions import MlflowException

        try:
            run = self._client.get_run(run_id)
        except MlflowException as error:
            raise TrackingError(
                f"cannot continue MLflow run {run_id!r}: not found at {redact_value(self.tracking_uri)} ({_first_line(error)})"
            ) from error
        if resumed is None:
            resumed = bool(run.data.params or run.data.metrics)
        if run.info.lifecycle_stage == "deleted":
            logger.warning("MLflow run %s was deleted; restoring it to continue", run_id)
            self._client.restore_run(run_id)
        if run.info.status != "RUNNING":
            self._client.update_run(run_id, status="RUNNING")
        if resumed:
            self._client.set_tag(run_id, "resumed_at", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        return self._client.get_run(run_id), resumed

    def _experiment_id(self, name: str, artifact_location: str | None) -> str:
        from mlflow.exceptions import MlflowException

        location = self._artifact_location(artifact_location)
        experiment = self._client.get_experiment_by_name(name)
        if experiment is None:
            try:
                return self._client.create_experiment(name, artifact_location=location)
            except MlflowException as error:  # another process created it between the two calls
                experiment = self._client.get_experiment_by_name(name)
                if experiment is None:
                    raise TrackingError(
                        f"cannot create MLflow experiment {name!r} at {redact_value(self.tracking_uri)}: {_first_line(error)}"
                    ) from error
        if experiment.lifecycle_stage == "deleted":
            logger.warning("MLflow experiment %r was deleted; restoring it", name)
            self._client.restore_experiment(experiment.experiment_id)
        if location is not None and _is_local_location(location):
            wanted = Path(urlparse(location).path if location.startswith("file:") else location)
            have = experiment.artifact_location
            have_path = Path(urlparse(have).path if have.startswith("file:") else have)
            if _is_local_location(have) and have_path.resolve() != wanted.resolve():
                logger.warning(
                    "MLflow experiment %r already stores artifacts in %s; artifact_location %s applies only to a "
                    "new experiment (use a new experiment name to keep artifacts beside this run's output)",
                    name, have, location,
                )
        return experiment.experiment_id

    def _artifact_location(self, artifact_location: str | None) -> str | None:
        if _is_remote(self.tracking_uri):
            if artifact_location and _is_local_location(artifact_location):
                logger.warning(
                    "ignoring local artifact_location %s for the MLflow server %s: the server decides where "
                    "artifacts go (--artifacts-destination)", artifact_location, redact_value(self.tracking_uri),
                )
                return None
            return artifact_location
        if artifact_location:
            if _is_local_location(artifact_location):
                return str(Path(artifact_location).resolve())
            return artifact_location
        db_path = sqlite_database_path(self.tracking_uri)
        if db_path is not None:
            return str(db_path.parent / DEFAULT_ARTIFACT_DIRNAME)
        return None

    @property
    def run_id(self) -> str | None:
        return self._run_id

    def end(self, status: str = "FINISHED") -> None:
        if status not in END_STATUSES:
            raise ValueError(f"run status must be one of {END_STATUSES}, got {status!r}")
        if self._ended:
            return
        if self._pending_metrics and not self._flush_metrics():
            logger.warning("MLflow: %d metrics could not be logged before the run ended", len(self._pending_metrics))
        if status == STOPPED_EARLY_STATUS and self._last_step is not None:
            self.set_tags({"stopped_at_step": self._last_step})
        with _no_printed_run_url():
            self._client.set_terminated(self._run_id, status=status)
        self._ended = True
        logger.info("MLflow: run %s ended %s", self._run_id, status)
        if _is_remote(self.tracking_uri):
            base = redact_value(self.tracking_uri).rstrip("/")
            logger.info("MLflow: view run %s at %s/#/experiments/%s/runs/%s", self._run_name, base,
                        self.experiment_id, self._run_id)

    # -- params, metrics, tags ---------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
        """Log ``params`` flattened ("optim.lr"), stringified, truncated at 6000 characters, secrets redacted.

        MLflow forbids changing a logged param. Keys already logged with the same value (a resumed run
        logging its config again) are skipped; a changed value (e.g. a different world size after a
        restart) is kept as it was, and the tag ``param_changed.<key>`` records ``"<logged> -> <new>"``
        (the latest change wins), with a warning.

        Returns:
            ``{key: (logged value, new value)}`` of the changed keys.
        """
        from mlflow.entities import Param, RunTag

        flat = flatten_params(params)
        if self._known_params is None:
            self._known_params = dict(self._client.get_run(self._run_id).data.params)
        new: list[Param] = []
        changed: list[RunTag] = []
        changes: dict[str, tuple[str, str]] = {}
        for key, value in flat.items():
            old = self._known_params.get(key)
            if old is None:
                new.append(Param(key, value))
                self._known_params[key] = value
            elif old != value:
                logger.warning("param %s was %r in this run and is now %r; keeping the first value", key, old, value)
                changes[key] = (old, value)
                changed.append(RunTag(f"param_changed.{key}", truncate(f"{old} -> {value}", MAX_TAG_VALUE_LENGTH)))
        for start in range(0, len(new), _PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self._run_id, params=new[start : start + _PARAMS_TAGS_PER_BATCH])
        for start in range(0, len(changed), _PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self._run_id, tags=changed[start : start + _PARAMS_TAGS_PER_BATCH])
        return changes

    def record_resume(
        self, config: Mapping[str, Any], step: int, world_size: int, checkpoint: PathLike | None = None
    ) -> dict[str, tuple[str, str]]:
        """See :meth:`Tracker.record_resume`; the artifact is ``resumes/step_<step, 9 digits>.yaml``."""
        changes = self.log_params(config)
        self.set_tags({f"resumed_at_step_{int(step)}": f"world_size={int(world_size)}"})
        record = {
            "step": int(step),
            "world_size": int(world_size),
            "checkpoint": str(checkpoint) if checkpoint is not None else None,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "changed": {key: {"logged": old, "now": new} for key, (old, new) in changes.items()},
            "config": dict(config),
        }
        self.log_dict(record, f"resumes/step_{int(step):09d}.yaml")
        if changes:
            logger.info("MLflow: resumed at step %d with %d changed config values: %s", step, len(changes),
                        ", ".join(f"{k} {o} -> {n}" for k, (o, n) in changes.items()))
        return changes

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log scalar ``metrics`` at ``step``.

        A value that is not a real number raises ``TypeError``; NaN/Inf are logged as they are. When the
        store refuses (a server unreachable after MLflow's own retries), training goes on: the metrics are
        kept (up to ``MAX_PENDING_METRICS``, oldest dropped first), a warning is logged, and they are sent
        with the next call after ``metric_retry_interval_s`` seconds (or at :meth:`end`).
        """
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        if metrics:
            self._last_step = int(step) if self._last_step is None else max(self._last_step, int(step))
        self._pending_metrics.extend(
            Metric(key, _as_float(key, value), timestamp, int(step)) for key, value in metrics.items()
        )
        if len(self._pending_metrics) > MAX_PENDING_METRICS:
            dropped = len(self._pending_metrics) - MAX_PENDING_METRICS
            del self._pending_metrics[:dropped]
            logger.warning("MLflow: dropped the %d oldest metrics the store has not taken", dropped)
        if time.monotonic() >= self._metrics_paused_until:
            self._flush_metrics()

    def _flush_metrics(self) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            while self._pending_metrics:
                batch = self._pending_metrics[:_METRICS_PER_BATCH]
                self._client.log_batch(self._run_id, metrics=batch)
                del self._pending_metrics[: len(batch)]
        except (MlflowException, OSError) as error:
            self._metrics_paused_until = time.monotonic() + self.metric_retry_interval_s
            logger.warning(
                "MLflow: could not log metrics (%d waiting; next try in %.0f s): %s",
                len(self._pending_metrics), self.metric_retry_interval_s, error,
            )
            return False
        return True

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        entries = [
            RunTag(str(key), truncate(redact_value(stringify(value)), MAX_TAG_VALUE_LENGTH))
            for key, value in redact(dict(tags)).items()
        ]
        for start in range(0, len(entries), _PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self._run_id, tags=entries[start : start + _PARAMS_TAGS_PER_BATCH])

    # -- artifacts ---------------------------------------------------------------------------------------
    def log_artifact(self, path: PathLike, subdir: str | None = None) -> None:
        local = Path(path)
        if not local.exists():
            raise FileNotFoundError(f"artifact to log does not exist: {local}")
        if local.is_dir():
            artifact_path = f"{subdir}/{local.name}" if subdir else local.name
            self._client.log_artifacts(self._run_id, str(local), artifact_path=artifact_path)
        else:
            self._client.log_artifact(self._run_id, str(local), artifact_path=subdir)

    def log_dict(self, data: Mapping[str, Any], filename: str) -> None:
        self._client.log_dict(self._run_id, redact(dict(data)), filename)

    def log_figure(self, figure: Any, filename: str) -> None:
        self._client.log_figure(self._run_id, figure, filename)

    def log_onnx_model(
        self, onnx_path: PathLike, name: str, register_as: str | None = None, step: int | None = None
    ) -> str | None:
        """Log ``onnx_path`` as an MLflow model (ONNX flavour) named ``name``, its signature read from the graph.

        The logged ``model.onnx`` is self-contained (weights inside the file) whenever the model is under
        protobuf's 2 GiB limit, so the single file downloaded from the UI or the API opens on its own. A larger
        model keeps its weights beside it in ``model.onnx.data`` (download the whole model folder).

        MLflow 3 links a logged model to the run's metrics of one step: MLflow copies the metrics logged at
        ``step`` so far onto the model (its page then shows them), so log the final metrics first. ``step``
        ``None`` takes the last step this tracker logged a metric at (0 if none).

        MLflow's model-logging API reads the tracking/registry URI and experiment from process-wide state;
        they point at this tracker's for the duration of the call and are restored afterwards. With
        ``register_as``, a new version of that registered model is created (the registered model too if
        missing).

        Returns:
            The model URI (``models:/<model_id>``), loadable with ``mlflow.pyfunc.load_model`` or
            ``mlflow.onnx.load_model``.
        """
        import mlflow
        import mlflow.onnx

        path = Path(onnx_path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model to log does not exist: {path}")
        model, self_contained = _load_onnx_for_logging(path)
        signature = onnx_signature(model)
        if step is None:
            step = self._last_step if self._last_step is not None else 0
        if self._pending_metrics:
            self._flush_metrics()  # metrics still waiting would miss the model link
        save_kwargs: dict[str, Any] = {"save_as_external_data": not self_contained}
        if not self_contained:
            # one readable file beside model.onnx instead of onnx's default UUID-named one
            save_kwargs.update(all_tensors_to_one_file=True, location=f"{MLFLOW_ONNX_FILENAME}.data")
            logger.warning(
                "%s: %.1f GiB is over protobuf's 2 GiB limit; its weights are logged beside model.onnx in "
                "model.onnx.data (download the whole model folder)", path, _onnx_size_bytes(path) / 2**30,
            )
        registry_uri = os.environ.get("MLFLOW_REGISTRY_URI") or self.tracking_uri
        with fluent_mlflow_state(self.tracking_uri, registry_uri, self.experiment_id):
            info = mlflow.onnx.log_model(
                model,
                name=name,
                signature=signature,
                registered_model_name=register_as,
                # Explicit requirements: MLflow would otherwise infer them by loading the model in a subprocess.
                pip_requirements=mlflow.onnx.get_default_pip_requirements(),
                run_id=self._run_id,
                step=int(step),
                **save_kwargs,
            )
        self.set_tags({f"model.{name}.uri": info.model_uri, f"model.{name}.step": int(step)})
        if register_as:
            logger.info(
                "MLflow: registered %s as %r version %s", info.model_uri, register_as, info.registered_model_version
            )
        return info.model_uri

    def log_training_data(self, manifest: Any, name: str | None = None, context: str = "training") -> str | None:
        """See :meth:`Tracker.log_training_data`.

        The dataset's source is the manifest file (``manifest.location``), its digest the manifest's
        ``content_hash`` (SHA-256 over the shards' SHA-256s) cut to the 36 characters MLflow stores, and its
        profile ``num_classes``, ``num_samples``, ``num_shards``, the full ``content_hash``, ``image_size`` and
        the smallest / median / largest images per identity. The tags ``data.content_hash``,
        ``data.num_classes`` and ``data.num_samples`` repeat them on the run.
        """
        import numpy as np
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        from distrib_face.tracking.naming import dataset_name

        counts = np.asarray(manifest.class_counts, dtype=np.int64)
        profile = {
            "num_classes": int(manifest.num_classes),
            "num_samples": int(manifest.num_samples),
            "num_shards": len(manifest.shards),
            "content_hash": manifest.content_hash or None,
            "image_size": list(manifest.image_size) if manifest.image_size else None,
            "images_per_class_min": int(counts.min()) if counts.size else 0,
            "images_per_class_median": float(np.median(counts)) if counts.size else 0.0,
            "images_per_class_max": int(counts.max()) if counts.size else 0,
        }
        location = str(manifest.location) if manifest.location else None
        if location and "://" not in location:
            location = str(Path(location).resolve())
        with warnings.catch_warnings():
            # MLflow registers its local-file source under two schemes and warns that a path matches both
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple")
            source = resolve_dataset_source(location or "unknown-manifest")
        digest = manifest.content_hash[:_MAX_DATASET_DIGEST] if manifest.content_hash else None  # None: MLflow's own
        dataset = _manifest_dataset_class()(source=source, name=name or dataset_name(manifest), digest=digest,
                                            profile=profile)
        self._client.log_inputs(
            self._run_id,
            datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])],
        )
        self.set_tags({"data.content_hash": manifest.content_hash or "unknown", "data.num_classes": manifest.num_classes,
                       "data.num_samples": manifest.num_samples})
        return dataset.digest


#: The file name MLflow's ONNX flavour gives the model inside the logged model folder.
MLFLOW_ONNX_FILENAME = "model.onnx"
#: Protobuf refuses to serialise a message of 2 GiB or more; below it a model is logged as one file.
ONNX_SELF_CONTAINED_LIMIT_BYTES = 2**31 - 2**20  # a MiB of headroom for the graph and metadata
# mlflow.utils.validation.MAX_DATASET_DIGEST_SIZE
_MAX_DATASET_DIGEST = 36


def _metric_name(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_\-. /]+", "_", text).strip() or "unknown"


def _onnx_size_bytes(path: Path) -> int:
    """The ``.onnx`` file plus every external-data file its initializers name (each counted once)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    graph_only = onnx.load(str(path), load_external_data=False)
    total = path.stat().st_size
    seen: set[str] = set()
    for tensor in graph_only.graph.initializer:
        if uses_external_data(tensor):
            location = next((e.value for e in tensor.external_data if e.key == "location"), None)
            if location and location not in seen:
                seen.add(location)
                target = path.parent / location
                if not target.is_file():
                    raise FileNotFoundError(f"{path}: its external data file {target} does not exist")
                total += target.stat().st_size
    return total


def _load_onnx_for_logging(path: Path) -> tuple[Any, bool]:
    """The model with all its weights in memory, and whether it fits one self-contained file."""
    import onnx

    self_contained = _onnx_size_bytes(path) < ONNX_SELF_CONTAINED_LIMIT_BYTES
    return onnx.load(str(path)), self_contained


def _manifest_dataset_class() -> type:
    from mlflow.data.meta_dataset import MetaDataset

    class ManifestDataset(MetaDataset):
        """A shard set known by its manifest: metadata only, with a profile of counts."""

        def __init__(self, source: Any, name: str, digest: str | None, profile: dict[str, Any]) -> None:
            self._profile = profile
            super().__init__(source=source, name=name, digest=digest)

        @property
        def profile(self) -> Any:
            return self._profile

        def to_dict(self) -> dict[str, str]:
            import json

            out = super().to_dict()
            out["profile"] = json.dumps(self._profile)
            return out

    return ManifestDataset

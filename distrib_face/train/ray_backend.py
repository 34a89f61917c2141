"""Ray Train orchestration: one :class:`~ray.train.torch.TorchTrainer` runs :func:`run_training` on every worker.

The driver (``launch/ray_job.py``, or any process connected to a Ray cluster) calls
:func:`launch_ray_training`. It

1. fixes the paths the workers must agree on (the Ray storage path, the MLflow artifact location) as
   absolute paths, and opens -- or re-opens -- the MLflow run, so that its id travels to the workers in
   ``cfg.tracking.run_id`` and rank 0 keeps logging into the *same* run after any restart;
2. builds the TorchTrainer: ``ScalingConfig`` from ``cfg.ray``, ``RunConfig(storage_path, name)`` with
   ``FailureConfig(max_failures)``;
3. waits for the result and closes the MLflow run with the job's outcome.

Each worker builds its :class:`~distrib_face.parallel.ProcessContext` with
:func:`~distrib_face.parallel.init_distributed` (which reuses the gloo / nccl group Ray Train made), takes
``ray.train.get_checkpoint()`` as ``resume_from`` and runs :func:`distrib_face.train.run_training` with a
:class:`RayReporter`.

Multi-rank checkpoints. Every rank calls ``reporter.report(metrics, checkpoint_dir)`` at the same steps.
Ray Train V2 uploads each rank's reported directory into one directory in storage
(``<storage_path>/<name>/checkpoint_<time>/``), so the union of the ranks' files must be the whole
checkpoint. Whether the ranks wrote into one shared folder (one machine, or a shared file system) or into
node-local folders, :class:`RayReporter` makes each file go up exactly once: the ranks exchange their file
lists and a file is uploaded by the lowest rank that sees it (files several ranks wrote under the same
relative path must be identical -- e.g. the config). On a restart every rank gets the merged directory as
``resume_from``. See docs/ray.md for the contract with :mod:`distrib_face.train.checkpoint`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:  # heavy imports stay lazy: the driver may only validate a config
    from ray.train import Result

    from distrib_face.config import Config
    from distrib_face.parallel import ProcessContext

logger = logging.getLogger(__name__)

RUN_INFO_FILE = "distrib_face_run.json"
"""Written by the driver in ``<storage_path>/<name>/``: the MLflow run id, reused when the job is resubmitted."""

STAGING_PREFIX = ".ray_upload_"
"""Per-rank staging folders (hard links of the files a rank uploads) live beside the checkpoint with this prefix."""


@dataclass(frozen=True)
class FaultInjection:
    """Test hook: rank ``rank`` dies (``os._exit(1)``) right after its first report whose ``step`` is >= ``step``.

    It happens once per job: the dying rank first creates ``marker`` (a path every rank can see), and a
    rank that finds the marker does not die again -- so the restarted worker group finishes.
    """

    rank: int
    step: int
    marker: str

    def maybe_die(self, rank: int, step: int | None) -> None:
        """Exit this process abruptly when the hook is due here (and record that it happened)."""
        if rank != self.rank or step is None or step < self.step or os.path.exists(self.marker):
            return
        _wait_until_reports_collected()
        Path(self.marker).parent.mkdir(parents=True, exist_ok=True)
        Path(self.marker).write_text(json.dumps({"rank": rank, "step": step, "pid": os.getpid()}))
        logger.warning("fault injection: rank %d exits at step %d (pid %d)", rank, step, os.getpid())
        os._exit(1)


def _wait_until_reports_collected(timeout_s: float = 60.0) -> None:
    """Block until Ray's controller has taken every report of this worker (fault injection only).

    ``ray.train.report`` returns before the report reaches the controller (a background thread queues it and
    the controller polls every couple of seconds), so a worker dying right after reporting a checkpoint can
    lose it. The test hook waits for its queue to drain so that "the last checkpoint" is well defined; this
    reads Ray Train V2 internals and falls back to a plain wait if they change.
    """
    import time

    try:
        from ray.train.v2._internal.execution.context import get_train_context

        context = get_train_context()
        result_queue = context.get_result_queue()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if context.current_report_index == context.report_call_index and result_queue.unfinished_tasks == 0:
                break
            time.sleep(0.05)
        time.sleep(0.5)  # the controller registers the checkpoint right after the poll that drained the queue
    except (ImportError, AttributeError):
        time.sleep(10.0)


class RayReporter:
    """The :class:`~distrib_face.train.Reporter` of a Ray Train worker: forwards to ``ray.train.report``.

    Every rank must call :meth:`report` at the same points (Ray's report is a barrier, and the checkpoint
    file exchange is a collective over the ranks).
    """

    def __init__(self, ctx: "ProcessContext", fault: FaultInjection | None = None) -> None:
        """Args:
        ctx: this rank's process context (its group carries the file-list exchange).
        fault: an optional :class:`FaultInjection` (tests only).
        """
        self.ctx = ctx
        self.fault = fault

    def report(self, metrics: Mapping[str, Any], checkpoint_dir: str | os.PathLike | None = None) -> None:
        """Report ``metrics`` (rank 0's reach the driver) and, when given, this rank's part of a checkpoint.

        Args:
            metrics: JSON-able scalars; a ``step`` key (the optimiser step) drives the fault hook.
            checkpoint_dir: the checkpoint folder as this rank sees it, or ``None``. It is left in place:
                the trainer's retention policy owns it.
        """
        import ray.train

        metrics = dict(metrics)
        # The exchange runs on every report (also without a checkpoint) so that ranks disagreeing on whether
        # this report carries one still issue matching collectives instead of hanging.
        staged = _stage_own_files(Path(checkpoint_dir) if checkpoint_dir else None, self.ctx)
        try:
            checkpoint = ray.train.Checkpoint.from_directory(str(staged)) if staged is not None else None
            ray.train.report(metrics, checkpoint=checkpoint)
        finally:
            if staged is not None and staged.name.startswith(STAGING_PREFIX):
                shutil.rmtree(staged, ignore_errors=True)
        if self.fault is not None:
            # After the report: Ray's result queue holds one report, so once this one is queued the previous
            # one (and any checkpoint it carried) has reached the controller and survives this death.
            self.fault.maybe_die(self.ctx.rank, metrics.get("step"))


def _list_files(root: Path) -> list[str]:
    """Relative paths of the regular files under ``root``, sorted (staging folders excluded)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(STAGING_PREFIX)]
        for name in filenames:
            out.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(out)


def _stage_own_files(checkpoint_dir: Path | None, ctx: "ProcessContext") -> Path | None:
    """The folder this rank should report: the files of ``checkpoint_dir`` no lower rank also sees.

    Collective: every rank calls it at the same report. Returns ``checkpoint_dir`` itself when this rank is
    the only one seeing its files (world of 1, rank-private folders), ``None`` without a checkpoint or when
    lower ranks upload all of this rank's files, else a staging folder of hard links beside
    ``checkpoint_dir`` (named with :data:`STAGING_PREFIX`; the caller deletes it after the upload).
    """
    if checkpoint_dir is not None and not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"reported checkpoint folder {checkpoint_dir} does not exist on rank {ctx.rank}")
    mine = _list_files(checkpoint_dir) if checkpoint_dir is not None else None
    from distrib_face.parallel.collectives import all_gather_json

    everyone = all_gather_json(mine, ctx.group, ctx.device)
    if mine is None:
        return None
    seen_below: set[str] = set()
    for files in everyone[: ctx.rank]:
        seen_below.update(files or ())
    own = [f for f in mine if f not in seen_below]
    if len(own) == len(mine):
        return checkpoint_dir
    if not own:
        return None
    staging = checkpoint_dir.parent / f"{STAGING_PREFIX}{checkpoint_dir.name}_rank{ctx.rank}"
    shutil.rmtree(staging, ignore_errors=True)
    for rel in own:
        target = staging / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(checkpoint_dir / rel, target)
        except OSError:  # a file system without hard links
            shutil.copy2(checkpoint_dir / rel, target)
    return staging


def _train_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """The function every Ray Train worker runs; rank 0's return value becomes ``Result.return_value``."""
    import ray
    import ray.train

    from distrib_face.atomic import explain_write_failure
    from distrib_face.config import Config
    from distrib_face.parallel import init_distributed
    from distrib_face.redact import install_log_redaction, restore_secrets
    from distrib_face.train import run_training

    # The config came redacted (Ray records train_loop_config in its dashboard state); its secrets come
    # through the object store.
    secrets = ray.get(loop_config["secrets"]) if loop_config.get("secrets") is not None else []
    config = restore_secrets(loop_config["config"], secrets)
    install_log_redaction(config)  # DeepSpeed prints its config in this process, Ray forwards worker logs
    cfg = Config.from_dict(config)
    fault = FaultInjection(**loop_config["fault"]) if loop_config.get("fault") else None
    ctx = init_distributed(device=cfg.device)
    placement = {
        "rank": ctx.rank,
        "node_id": ray.get_runtime_context().get_node_id(),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        # The process group's TCPStore: rank 0 listens on MASTER_PORT, on every interface (docs/ray.md).
        "master_addr": os.environ.get("MASTER_ADDR"),
        "master_port": int(os.environ["MASTER_PORT"]) if os.environ.get("MASTER_PORT") else None,
    }
    from distrib_face.parallel.collectives import all_gather_json

    workers = all_gather_json(placement, ctx.group, ctx.device)
    checkpoint = ray.train.get_checkpoint()
    reporter = RayReporter(ctx, fault)
    try:
        if checkpoint is None:
            summary = run_training(cfg, ctx, reporter=reporter, resume_from=None)
        else:
            # Local storage: the merged folder itself; remote storage: a download, deleted afterwards.
            with checkpoint.as_directory() as resume_dir:
                logger.info("rank %d resumes from %s", ctx.rank, checkpoint.path)
                summary = run_training(cfg, ctx, reporter=reporter, resume_from=resume_dir)
    except Exception as err:
        # A full disk or the file-size limit on this node becomes an OutputError naming the path (torch.save
        # says only "unexpected pos"); the driver maps it to its exit code.
        explained = explain_write_failure(err, cfg.train.output_dir)
        if explained is err:
            raise
        raise explained from err
    return {**dict(summary or {}), "workers": workers, "ray_resumed_from": checkpoint.path if checkpoint else None}


def resolve_paths(cfg: "Config", base_dir: str | os.PathLike | None = None) -> "Config":
    """A copy of ``cfg`` whose file paths are absolute, as workers in other folders / on other nodes need.

    Relative paths are taken from ``base_dir`` (default: the current directory). Resolved: ``train.output_dir``,
    ``ray.storage_path`` (default ``<train.output_dir>/ray``), ``tracking.artifact_location`` (default
    ``<train.output_dir>/mlartifacts``), a ``sqlite:///`` tracking URI with a relative path (and the default
    URI: ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<base_dir>/mlruns.db``), ``data.shards``,
    ``train.eval_pairsets``, ``train.init_backbone`` and a ``train.resume`` folder. URIs (``s3://``...) are
    left alone.
    """
    base = Path(base_dir or os.getcwd()).resolve()

    def absolute(path: str | None) -> str | None:
        if path is None or "://" in path:
            return path
        return str(base / os.path.expanduser(path))

    output_dir = absolute(cfg.train.output_dir)
    resume = cfg.train.resume if cfg.train.resume in ("auto", "never") else absolute(cfg.train.resume)
    uri = cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlruns.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + absolute(uri[len("sqlite:///"):])
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, shards=absolute(cfg.data.shards)),
        train=dataclasses.replace(
            cfg.train, output_dir=output_dir, resume=resume, init_backbone=absolute(cfg.train.init_backbone),
            eval_pairsets=[absolute(p) for p in cfg.train.eval_pairsets],
        ),
        ray=dataclasses.replace(cfg.ray, storage_path=absolute(cfg.ray.storage_path or os.path.join(output_dir, "ray"))),
        tracking=dataclasses.replace(
            cfg.tracking, tracking_uri=uri,
            artifact_location=absolute(cfg.tracking.artifact_location or os.path.join(output_dir, "mlartifacts")),
        ),
    )


def run_name(cfg: "Config") -> str:
    """The Ray run name: the basename of ``train.output_dir`` (stable, so a resubmitted job resumes)."""
    return Path(cfg.train.output_dir.rstrip("/")).name


def _read_run_info(experiment_path: str) -> dict[str, Any]:
    import pyarrow.fs

    fs, base = pyarrow.fs.FileSystem.from_uri(experiment_path)
    path = f"{base}/{RUN_INFO_FILE}"
    if fs.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
        return {}
    with fs.open_input_stream(path) as handle:
        return json.loads(handle.read().decode())


def _write_run_info(experiment_path: str, info: Mapping[str, Any]) -> None:
    import pyarrow.fs

    fs, base = pyarrow.fs.FileSystem.from_uri(experiment_path)
    fs.create_dir(base, recursive=True)
    with fs.open_output_stream(f"{base}/{RUN_INFO_FILE}") as handle:
        handle.write(json.dumps(dict(info), indent=1).encode())


def _open_mlflow_run(cfg: "Config", experiment_path: str) -> tuple["Config", Any]:
    """Create or reuse the MLflow run on the driver; returns the config carrying its id, and the tracker.

    A new run is named after what runs (``tracking.run_name``, else ``<backbone>-<margin>-<data set>-<date>``)
    and tagged with the Ray job: submission id and entrypoint (from the environment Ray's job supervisor
    gives the driver), the Ray job id, the Ray run name and storage path.
    """
    if not cfg.tracking.enabled:
        return cfg, None
    import ray

    from distrib_face.redact import redact_text
    from distrib_face.tracking import create_tracker, run_name_for
    from distrib_face.tracking.environment import ray_job_tags

    run_id = cfg.tracking.run_id or _read_run_info(experiment_path).get("mlflow_run_id")
    tracker = create_tracker(
        enabled=True,
        tracking_uri=cfg.tracking.tracking_uri,
        experiment=cfg.tracking.experiment,
        run_id=run_id,
        run_name=None if run_id else run_name_for(cfg, _driver_manifest(cfg)),
        artifact_location=cfg.tracking.artifact_location,
    )
    tags = {"launcher": "ray", "ray.run_name": run_name(cfg), "ray.storage_path": cfg.ray.storage_path,
            **ray_job_tags()}
    if ray.is_initialized():
        tags["ray.job_id"] = ray.get_runtime_context().get_job_id()
    tracker.set_tags(tags)
    _write_run_info(experiment_path, {"mlflow_run_id": tracker.run_id,
                                      "tracking_uri": redact_text(cfg.tracking.tracking_uri)})
    logger.info("MLflow run %s (%s)", tracker.run_id, "continued" if run_id else "new")
    return dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, run_id=tracker.run_id)), tracker


def _driver_manifest(cfg: "Config") -> Any:
    """The training shards' manifest for the run name, or None (random data, or not readable from the driver)."""
    if cfg.data.source != "shards" or not cfg.data.shards:
        return None
    from distrib_face.data.manifest import read_manifest

    try:
        return read_manifest(cfg.data.shards)
    except (OSError, ValueError) as err:
        logger.info("run name without the manifest (%s): %s", cfg.data.shards, err)
        return None


def job_status(result: Any) -> str:
    """The MLflow status of a Ray job that returned ``result``: ``FINISHED``, or ``SCHEDULED`` when rank 0's
    summary says training stopped before its last step (``train.max_steps_this_run``)."""
    from distrib_face.tracking import STOPPED_EARLY_STATUS

    summary = getattr(result, "return_value", None) or {}
    return "FINISHED" if summary.get("finished", True) else STOPPED_EARLY_STATUS


def launch_ray_training(
    cfg: "Config", *, base_dir: str | os.PathLike | None = None, fault: FaultInjection | None = None
) -> "Result":
    """Run ``cfg`` as a Ray Train job on the connected cluster (``ray.init`` first) and wait for it.

    Resubmitting a job with the same ``train.output_dir`` (hence the same run name) and storage path resumes
    from its last reported checkpoint and continues the same MLflow run.

    Args:
        cfg: a validated config; ``cfg.ray`` sets the workers and fault tolerance.
        base_dir: relative paths in ``cfg`` are taken from here (default: the current directory); see
            :func:`resolve_paths`.
        fault: a :class:`FaultInjection` test hook, or ``None``.

    Returns:
        The ``ray.train.Result``: ``metrics`` (rank 0's last report), ``checkpoint`` (the last one),
        ``return_value`` (rank 0's summary from ``run_training`` plus ``workers``: rank, node id, host,
        pid, ``master_addr`` and ``master_port`` of every worker, and ``ray_resumed_from``: the Ray
        checkpoint this worker group started from, or ``None``) and ``path``.

    Raises:
        ray.train.TrainingFailedError: the job failed more than ``cfg.ray.max_failures`` times (the MLflow
            run is marked FAILED). A job that ends before its last step (``train.max_steps_this_run``)
            leaves the run SCHEDULED (to be continued), a finished one FINISHED.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = resolve_paths(cfg, base_dir)
    name = run_name(cfg)
    experiment_path = f"{cfg.ray.storage_path.rstrip('/')}/{name}"
    cfg, tracker = _open_mlflow_run(cfg, experiment_path)
    resources = {"CPU": cfg.ray.cpus_per_worker}
    if cfg.ray.use_gpu:
        resources["GPU"] = 1
    import ray

    from distrib_face.redact import split_secrets

    # Ray Train records train_loop_config (the dashboard's run state): it gets the config redacted, and the
    # secrets go to the workers as an object in the object store (owned by this driver, so it outlives
    # worker-group restarts).
    config, secrets = split_secrets(cfg.to_dict())
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"config": config, "secrets": ray.put(secrets) if secrets else None,
                           "fault": dataclasses.asdict(fault) if fault else None},
        torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name,
            storage_path=cfg.ray.storage_path,
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            # Ray keeps every reported checkpoint unless told; the trainer's own retention count applies here too.
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints or None),
        ),
    )
    logger.info(
        "Ray Train: %d workers (%s), storage %s, max_failures %d",
        cfg.ray.num_workers, "GPU" if cfg.ray.use_gpu else "CPU", experiment_path, cfg.ray.max_failures,
    )
    status = "FAILED"
    try:
        result = trainer.fit()  # raises TrainingFailedError once max_failures restarts are used up
        status = job_status(result)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if tracker is not None:
            tracker.end(status=status)
    return result

"""Submit-side entry point of a Ray Train job: validate the config, join the cluster, train, print a summary.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python launch/ray_job.py --config configs/tiny_cpu.yaml --base-dir "$PWD" --set train.total_steps=50

``ray job submit --working-dir .`` runs this script in a *copy* of the repository on the head node, so
relative paths in the config (output folder, data, MLflow database) would land in that temporary copy:
``--base-dir "$PWD"`` (expanded by your shell) resolves them against the folder you submitted from. A bad
config fails here, before any worker starts, with the field and the value in the message (exit code 2).

Config loading, the checks before any worker starts (``distrib_face.cli.train.preflight``), the one-line
error reports and the exit codes are those of ``distrib-face train`` (``distrib_face.cli.errors``): 0 the job
finished; 1 training failed (after ``ray.max_failures`` restarts); 2 bad config or input (config, input
files, output or storage folder, MLflow store, an unreachable Ray cluster, or a worker that failed on one
of those).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

# The job runs from the uploaded copy of the repository: import the package from that copy (as the
# workers do, whose PYTHONPATH holds the working dir), not from wherever .venv's editable install points.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

logger = logging.getLogger("launch.ray_job")

RAY_WORKING_DIR_MARK = os.path.join("runtime_resources", "working_dir_files")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config (e.g. configs/tiny_cpu.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set optim.lr=0.05 (repeatable)")
    parser.add_argument("--base-dir", default=os.environ.get("DISTRIB_FACE_BASE_DIR"),
                        help="resolve relative paths of the config against this folder (default: "
                             "$DISTRIB_FACE_BASE_DIR, else the current folder)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster address (default: ray.address of the config, else the cluster this "
                             "job was submitted to, else a new local one)")
    parser.add_argument("--summary-json", default=None, help="also write the summary to this JSON file")
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


def _inside_ray_working_dir() -> bool:
    return RAY_WORKING_DIR_MARK in os.getcwd()


def load_and_check(args: argparse.Namespace):
    """The validated config with absolute paths, checked by ``preflight`` (inputs, output and storage
    folders, MLflow store); raises what ``preflight`` raises, or ``ConfigError`` naming the field and value."""
    from distrib_face.cli.train import preflight
    from distrib_face.config import ConfigError, load_config
    from distrib_face.train.ray_backend import resolve_paths

    config_path = Path(args.config)
    if not config_path.is_file() and args.base_dir and not config_path.is_absolute():
        config_path = Path(args.base_dir) / config_path
    cfg = load_config(config_path, args.overrides)
    if args.base_dir is None and _inside_ray_working_dir():
        relative = [
            (name, value) for name, value in (
                ("train.output_dir", cfg.train.output_dir), ("ray.storage_path", cfg.ray.storage_path),
                ("data.shards", cfg.data.shards),
            ) if value and "://" not in value and not os.path.isabs(value)
        ]
        if relative:
            name, value = relative[0]
            raise ConfigError(
                f"{name} is relative, got {value!r}, and this job runs in Ray's temporary copy of the working dir "
                f"({os.getcwd()}): pass --base-dir \"$PWD\" (or an absolute --set {name}=...)"
            )
    cfg = resolve_paths(cfg, args.base_dir)
    preflight(cfg, ray_storage=True)
    return cfg


def connect(address: str | None) -> None:
    """``ray.init`` on the given cluster, the submitting cluster (``RAY_ADDRESS``), or a new local one.

    Raises:
        distrib_face.cli.errors.UserError: the cluster cannot be reached (exit code 2).
    """
    import ray

    from distrib_face.cli.errors import UserError

    try:
        if address:
            ray.init(address=address)
        elif os.environ.get("RAY_ADDRESS"):  # set by `ray job submit` for the job's driver
            ray.init(address="auto")
        else:
            logger.info("no Ray cluster given: starting a local one")
            ray.init()
    except ConnectionError as err:
        raise UserError(f"cannot reach the Ray cluster at {address or os.environ.get('RAY_ADDRESS')}: {err}") from err


def summarize(result, cfg) -> dict:
    """The job's outcome as a flat JSON-able dict (rank 0's summary plus where things are), secrets masked."""
    from distrib_face.redact import redact_text

    summary = dict(result.return_value or {})
    summary["ray_result_path"] = result.path
    summary["ray_checkpoint"] = result.checkpoint.path if result.checkpoint else None
    summary["tracking_uri"] = redact_text(cfg.tracking.tracking_uri)
    summary["mlflow_artifact_location"] = cfg.tracking.artifact_location
    summary["mlflow_experiment"] = cfg.tracking.experiment
    return summary


def _number(value, digits: int = 4) -> str:
    """A float rounded for reading (``0.7457``), ``-`` when missing."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _accuracies(values) -> str:
    """``{set: accuracy}`` as ``set 97.50%`` items."""
    if not values:
        return "-"
    return ", ".join(f"{name} {100 * acc:.2f}%" if isinstance(acc, float) else f"{name} -"
                     for name, acc in values.items())


def print_summary(summary: dict) -> None:
    """A short table on stdout: numbers rounded (loss 4 decimals, img/s 1, accuracies in % with 2)."""
    rows = [
        ("steps", f"{summary.get('steps')} / {summary.get('total_steps')}"
         + ("" if summary.get("finished", True) else " (stopped early: train.max_steps_this_run)")),
        ("images/s", _number(summary.get("images_per_sec"), 1)),
        ("final loss", _number(summary.get("final_loss"))),
        ("verification before", _accuracies(summary.get("verification_before"))),
        ("verification after", _accuracies(summary.get("verification_after"))),
        ("workers", ", ".join(f"rank {w['rank']}@{w['hostname']}:{w['node_id'][:8]}" for w in summary.get("workers", []))),
        ("resumed from", summary.get("ray_resumed_from")),
        ("Ray result", summary.get("ray_result_path")),
        ("last checkpoint", summary.get("ray_checkpoint")),
        ("output dir", summary.get("output_dir")),
        ("MLflow run", f"{summary.get('mlflow_run_id')} ({summary.get('tracking_uri')})"),
    ]
    width = max(len(name) for name, _ in rows)
    print("== distrib_face Ray job summary ==")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def main(argv: list[str] | None = None) -> int:
    """Validate, check, connect, train, summarise; returns the exit code (one line on stderr on failure)."""
    args = parse_args(argv)
    from distrib_face.atomic import write_json
    from distrib_face.cli import configure_logging
    from distrib_face.cli.errors import ray_failure, report

    configure_logging(args.log_level)
    try:
        cfg = load_and_check(args)
        from distrib_face.train.ray_backend import launch_ray_training

        connect(args.address or cfg.ray.address)
        try:
            result = launch_ray_training(cfg)
        except Exception as err:
            raise ray_failure(err, cfg.ray.max_failures) from err
        summary = summarize(result, cfg)
        print_summary(summary)
        if args.summary_json:
            write_json(Path(args.base_dir or ".") / args.summary_json, summary, default=str)
    except Exception as err:
        return report("ray_job.py", err)
    return 0


if __name__ == "__main__":
    sys.exit(main())

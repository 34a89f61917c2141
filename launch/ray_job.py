"""Submit-side entry point of a Ray Train job: validate the config, join the cluster, train, print a summary.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python launch/ray_job.py --config configs/tiny_cpu.yaml --base-dir "$PWD" --set train.total_steps=50

``ray job submit --working-dir .`` runs this script in a *copy* of the repository on the head node, so
relative paths in the config (output folder, data, MLflow database) would land in that temporary copy:
``--base-dir "$PWD"`` (expanded by your shell) resolves them against the folder you submitted from. A bad
config fails here, before any worker starts, with the field and the value in the message (exit code 2).

Exit codes: 0 the job finished; 1 training failed (after ``ray.max_failures`` restarts); 2 bad config
or missing input files.
"""

from __future__ import annotations

import argparse
import json
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
    """The validated config with absolute paths; raises ``ConfigError`` naming the field and the value."""
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
    if cfg.data.source == "shards" and "://" not in cfg.data.shards and not Path(cfg.data.shards).exists():
        raise ConfigError(f"data.shards does not exist, got {cfg.data.shards!r}")
    for i, pairs in enumerate(cfg.train.eval_pairsets):
        if "://" not in pairs and not Path(pairs).is_file():
            raise ConfigError(f"train.eval_pairsets[{i}] does not exist, got {pairs!r}")
    return cfg


def connect(address: str | None) -> None:
    """``ray.init`` on the given cluster, the submitting cluster (``RAY_ADDRESS``), or a new local one."""
    import ray

    if address:
        ray.init(address=address)
    elif os.environ.get("RAY_ADDRESS"):  # set by `ray job submit` for the job's driver
        ray.init(address="auto")
    else:
        logger.info("no Ray cluster given: starting a local one")
        ray.init()


def summarize(result, cfg) -> dict:
    """The job's outcome as a flat JSON-able dict (rank 0's summary plus where things are)."""
    summary = dict(result.return_value or {})
    summary["ray_result_path"] = result.path
    summary["ray_checkpoint"] = result.checkpoint.path if result.checkpoint else None
    summary["tracking_uri"] = cfg.tracking.tracking_uri
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
    """Validate, connect, train, summarise; returns the exit code."""
    args = parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from distrib_face.config import ConfigError

    try:
        cfg = load_and_check(args)
    except ConfigError as err:
        print(f"ray_job.py: config error: {err}", file=sys.stderr)
        return 2

    import ray.train

    from distrib_face.train.ray_backend import launch_ray_training

    connect(args.address or cfg.ray.address)
    try:
        result = launch_ray_training(cfg)
    except ray.train.TrainingFailedError as err:
        print(f"ray_job.py: training failed: {err}", file=sys.stderr)
        return 1
    summary = summarize(result, cfg)
    print_summary(summary)
    if args.summary_json:
        path = Path(args.base_dir or ".") / args.summary_json
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

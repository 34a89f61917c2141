"""Subcommands of ``distrib_face.train``: ``train`` and ``bench train``, and the one training entry path.

``distrib-face train --config C [--set k=v ...]`` trains in this process (a world of 1), or as one rank
under ``torchrun`` / the deepspeed launcher (the process group comes from the environment):
``launch/train.py`` is the same :func:`train_command`. ``launch/ray_job.py`` shares :func:`preflight` and
the error reports of :mod:`distrib_face.cli.errors`.

Before anything heavy is imported, :func:`preflight` checks what the user controls: the config (validated
by ``load_config``), the input files it names, that the output folder (and Ray's storage folder) accept a
file, and that the MLflow store can be written. Exit codes (docs/training.md): 0 finished (or stopped by
``train.max_steps_this_run`` with a checkpoint), 1 training failed, 2 bad config or input (config, input
files, checkpoint, output location, MLflow store); every failure is one line on stderr, with a traceback
only at ``--log-level DEBUG`` (or for an unexpected error). A non-finite state at a checkpoint is a
training failure (1); a checkpoint or backbone file that is damaged, does not fit, or is refused because
loading it could run code is bad input (2).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from distrib_face.cli.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, report

if TYPE_CHECKING:
    from distrib_face.config import Config

log = logging.getLogger(__name__)

__all__ = ["EXIT_BAD_INPUT", "EXIT_FAILED", "EXIT_OK", "add_train_arguments", "check_shard_files",
           "load_checked_config", "preflight", "register", "train_command"]

#: Kept for callers of the old names.
EXIT_BAD_CONFIG = EXIT_BAD_INPUT

# Bytes written by the output probe: enough to meet a full disk, far below any file-size limit worth having.
_PROBE_BYTES = 4096


def register(sub: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    """Add ``train``, ``bench train`` and ``bench comm``."""
    p = sub.add_parser("train", help="train a face-recognition model from a YAML config (one process or torchrun)")
    add_train_arguments(p)
    p.set_defaults(func=lambda args: train_command(args, prog="distrib-face train"))

    b = groups["bench"].add_parser("train", help="img/s and peak memory of the full training step, with and without data")
    _config_args(b)
    b.add_argument("--steps", type=int, default=20, help="timed optimiser steps (default 20)")
    b.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    b.add_argument("--no-data", action="store_true", help="only the step on one fixed batch (skip the with-data run)")
    b.add_argument("--data-only", action="store_true", help="only the run that draws batches from the loader")
    b.set_defaults(func=_bench)

    c = groups["bench"].add_parser(
        "comm", help="bytes each collective moves in one training step, against the formula of docs/scale.md "
                     "(run under torchrun for several ranks)")
    _config_args(c)
    c.add_argument("--json", default=None, help="also write the counts to this JSON file (rank 0)")
    c.set_defaults(func=_bench_comm)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``distrib-face train`` (also ``launch/train.py``'s)."""
    _config_args(p)
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="continue from this checkpoint folder (default: train.resume, 'auto')")
    p.add_argument("--summary-json", default=None, help="also write the final summary to this JSON file (rank 0)")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=0.05 (repeatable)")


def load_checked_config(config: str | os.PathLike, overrides: list[str], resume: str | None = None) -> "Config":
    """``load_config`` then :func:`preflight`: the validated config of a run that can start.

    Raises:
        ConfigError, FileNotFoundError, OutputError, TrackingError: what :func:`preflight` says.
    """
    from distrib_face.config import load_config

    cfg = load_config(config, overrides)
    preflight(cfg, resume=resume)
    return cfg


def preflight(cfg: "Config", *, resume: str | None = None, ray_storage: bool = False) -> None:
    """Check, before any worker starts, what the user must fix when it is wrong; register the secrets.

    - the config's secrets are registered for redaction (every later log line of this process masks them);
    - the inputs named exist: ``data.shards`` (``source: shards``: its manifest and every shard it names, see
      :func:`check_shard_files`), each ``train.eval_pairsets`` file,
      ``train.init_backbone``, a ``train.resume`` folder and ``resume``;
    - ``train.output_dir`` (and ``ray.storage_path`` with ``ray_storage``, when it is a local path) can be
      created and takes a small file;
    - the MLflow store (when ``tracking.enabled``) accepts writes (a sqlite database's folder) or a
      connection (a server), see :func:`distrib_face.tracking.mlflow_tracker.check_tracking_store`.

    URIs (``s3://``, ``http://`` data) are not checked here.

    Raises:
        FileNotFoundError: an input is missing (the message names the field and the path).
        distrib_face.atomic.OutputError: the output location refuses a file (naming it).
        distrib_face.tracking.mlflow_tracker.TrackingError: the MLflow store is unusable (naming it).
    """
    from distrib_face.redact import install_log_redaction

    install_log_redaction(cfg.to_dict())
    inputs: list[tuple[str, str | None]] = []
    if cfg.data.source == "shards":
        inputs.append(("data.shards", cfg.data.shards))
    inputs += [(f"train.eval_pairsets[{i}]", path) for i, path in enumerate(cfg.train.eval_pairsets)]
    inputs.append(("train.init_backbone", cfg.train.init_backbone))
    if cfg.train.resume not in ("auto", "never"):
        inputs.append(("train.resume", cfg.train.resume))
    inputs.append(("--resume", resume))
    for name, path in inputs:
        if path and "://" not in path and not Path(path).exists():
            hint = (f" (make shards with `distrib-face pack SOURCE {path}` or `distrib-face synth {path}`)"
                    if name == "data.shards" else "")
            raise FileNotFoundError(f"{name} does not exist: {path}{hint}")
    if cfg.data.source == "shards" and cfg.data.shards and "://" not in cfg.data.shards:
        check_shard_files(cfg.data.shards, allow_missing=cfg.data.allow_missing_shards)
    check_writable_folder(cfg.train.output_dir, "train.output_dir")
    if ray_storage and cfg.ray.storage_path and "://" not in cfg.ray.storage_path:
        check_writable_folder(cfg.ray.storage_path, "ray.storage_path")
    if cfg.tracking.enabled:
        from distrib_face.tracking.mlflow_tracker import check_tracking_store, resolve_tracking_uri

        check_tracking_store(resolve_tracking_uri(cfg.tracking.tracking_uri))


def check_shard_files(shards: str | os.PathLike, *, allow_missing: bool = False) -> None:
    """Check that the local shard folder ``shards`` (or its ``manifest.json``) has a manifest and every shard
    it names: the manifest is read (not the shards) and each shard costs one ``stat``, so thousands of shards
    take milliseconds.

    Args:
        shards: ``data.shards``, a local path.
        allow_missing: ``data.allow_missing_shards``: missing shards are left to the loader, which trains
            without them and says so once; only a manifest whose every shard is missing is refused.

    Raises:
        FileNotFoundError: no manifest there, or a missing shard (the first one named, with how many more).
    """
    from distrib_face.data.manifest import manifest_location, read_manifest

    folder, location = Path(shards), Path(manifest_location(shards))
    if folder.is_file() and folder.suffix != ".json":
        raise FileNotFoundError(f"data.shards is a {folder.suffix or 'plain'} file, not a shard folder or its "
                                f"manifest.json: {folder}")
    if not location.is_file():
        raise FileNotFoundError(f"data.shards has no shard manifest: {location} (pack or synth writes one)")
    listed = read_manifest(location).shards
    missing = [path for path in listed if not os.path.isfile(path)]
    if not missing or (allow_missing and len(missing) < len(listed)):
        return
    names = [Path(path).name for path in missing]
    if allow_missing:
        raise FileNotFoundError(f"data.shards: all {len(listed)} shards listed in {location} are missing "
                                f"(data.allow_missing_shards cannot train without data)")
    more = f" (and {len(names) - 1} more: {', '.join(names[1:4])}{' ...' if len(names) > 4 else ''})" \
        if len(names) > 1 else ""
    raise FileNotFoundError(f"data.shards: {names[0]} is missing: {missing[0]} is listed in {location} but not "
                            f"there{more}; restore it, or set data.allow_missing_shards: true to train without it")


def check_writable_folder(path: str | os.PathLike, name: str) -> None:
    """Create the folder ``path`` if needed and write (then delete) a small file in it.

    Raises:
        distrib_face.atomic.OutputError: naming ``name`` and the path ("no space left on PATH" for a full
            disk, else the reason: read-only, not a folder, permission denied).
    """
    from distrib_face.atomic import OutputError, explain_os_error

    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_probe_", dir=folder)
        try:
            os.write(fd, b"\0" * _PROBE_BYTES)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as err:
        explained = explain_os_error(err, folder)
        if isinstance(explained, OutputError):
            message = f"{name}: {explained.strerror}"
        elif err.errno == errno.EEXIST or (err.errno == errno.ENOTDIR and folder.is_file()):
            message = f"{name}: {folder} is a file, not a folder"
        elif err.errno == errno.ENOTDIR:
            message = f"{name}: cannot create the folder {folder}: a part of that path is a file"
        else:
            message = f"{name}: cannot create or write into the folder {folder}: {err.strerror or err}"
        out = OutputError(err.errno, message)
        out.filename = str(folder)
        raise out from err


def train_command(args: argparse.Namespace, prog: str = "distrib-face train") -> int:
    """Validate, check, train this rank, print the summary: the whole of ``distrib-face train`` and
    ``launch/train.py``. Returns the exit code; a failure is reported as one line (see
    :mod:`distrib_face.cli.errors`)."""
    try:
        cfg = load_checked_config(args.config, args.overrides, resume=args.resume)
        from distrib_face.atomic import explain_write_failure, write_json
        from distrib_face.parallel import init_distributed
        from distrib_face.train import run_training

        ctx = init_distributed(device=cfg.device)
        try:
            summary = run_training(cfg, ctx, resume_from=args.resume)
        except Exception as err:
            # torch.save reports a full disk or the file-size limit as "unexpected pos": ask the disk.
            explained = explain_write_failure(err, cfg.train.output_dir)
            if explained is err:
                raise
            raise explained from err
        if ctx.is_main:
            _print_summary(summary)
            if args.summary_json:
                write_json(args.summary_json, summary, default=str)
    except Exception as err:
        return report(prog, err)
    return EXIT_OK


def _print_summary(summary: dict) -> None:
    rows = [
        ("steps", f"{summary['steps']} / {summary['total_steps']}" + ("" if summary["finished"] else " (stopped early)")),
        ("images/s (this run)", f"{summary['images_per_sec']:.1f}"),
        ("final loss", f"{summary['final_loss']:.4f}"),
        ("skipped (non-finite) steps", str(summary["skipped_steps"])),
    ]
    for name in sorted(set(summary["verification_before"]) | set(summary["verification_after"])):
        before = summary["verification_before"].get(name)
        after = summary["verification_after"].get(name)
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        rows.append((f"verification {name}", f"{fmt(before)} -> {fmt(after)}"))
    rows += [("checkpoint", str(summary["checkpoint"])), ("backbone", str(summary["backbone"])),
             ("onnx", str(summary["onnx"])), ("MLflow run", str(summary["mlflow_run_id"]))]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def _bench(args: argparse.Namespace) -> int:
    try:
        from distrib_face.config import load_config
        from distrib_face.redact import install_log_redaction

        cfg = load_config(args.config, args.overrides)  # the benchmark writes nothing: no output checks
        install_log_redaction(cfg.to_dict())
        from distrib_face.parallel import init_distributed
        from distrib_face.train.bench import bench_train

        ctx = init_distributed(device=cfg.device)
        modes = [True, False]
        if args.no_data:
            modes = [False]
        elif args.data_only:
            modes = [True]
        results = [bench_train(cfg, ctx, steps=args.steps, warmup=args.warmup, with_data=with_data)
                   for with_data in modes]
    except Exception as err:
        return report("distrib-face bench train", err)
    if ctx.is_main:
        print(f"backbone {cfg.model.backbone} @ {cfg.data.image_size}px, {ctx.world_size} rank(s) on {ctx.device}, "
              f"precision {cfg.deepspeed.precision}, ZeRO {cfg.deepspeed.zero_stage}, loss {cfg.loss.margin} "
              f"(sample rate {cfg.loss.sample_rate}), data {cfg.data.source}/{cfg.data.decoder}")
        print(f"{'mode':<10} {'global batch':>12} {'ms/step':>9} {'img/s':>9} {'peak MB':>9}  memory")
        for r in results:
            print(f"{r['mode']:<10} {r['global_batch']:>12} {r['median_step_ms']:>9.1f} {r['images_per_sec']:>9.1f} "
                  f"{r['peak_memory_mb']:>9.0f}  {r['peak_memory_kind']}")
    return EXIT_OK


def _bench_comm(args: argparse.Namespace) -> int:
    try:
        from distrib_face.config import load_config
        from distrib_face.parallel import init_distributed
        from distrib_face.train.bench import bench_comm

        cfg = load_config(args.config, args.overrides)
        ctx = init_distributed(device=cfg.device)
        result = bench_comm(cfg, ctx)
    except Exception as err:
        return report("distrib-face bench comm", err)
    if ctx.is_main:
        print(f"{ctx.world_size} ranks, global batch {result['global_batch']}, embedding {cfg.model.embedding_size}, "
              f"backbone {cfg.model.backbone} ({result['backbone_params']:,} parameters), "
              f"ZeRO {cfg.deepspeed.zero_stage}, sample rate {cfg.loss.sample_rate}")
        print(f"{'collective':<24} {'calls':>6} {'payload bytes':>14} {'wire bytes/rank':>16}")
        for row in result["rows"]:
            print(f"{row['name']:<24} {row['calls']:>6} {row['payload_bytes']:>14,} {row['wire_bytes']:>16,.0f}")
        print(f"{'kind':<24} {'counted':>14} {'formula':>14}")
        for kind in sorted(set(result["counted"]) | set(result["expected"])):
            print(f"{kind:<24} {result['counted'].get(kind, 0):>14,} {result['expected'].get(kind, 0):>14,}")
        if args.json:
            from distrib_face.atomic import write_json

            write_json(args.json, result)
    return EXIT_OK

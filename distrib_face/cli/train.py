"""Subcommands of ``distrib_face.train``: ``train`` and ``bench train``.

``distrib-face train --config C [--set k=v ...]`` trains in this process (a world of 1), or as one rank
under ``torchrun`` / the deepspeed launcher (the process group comes from the environment). Exit codes:
0 finished (or stopped by ``train.max_steps_this_run`` with a checkpoint), 1 training failed (too many
non-finite losses, a non-finite state at a checkpoint), 2 bad config or input (a checkpoint or backbone file
that is missing, damaged, does not fit, or is refused because loading it could run code).
"""

from __future__ import annotations

import argparse
import json
import logging

log = logging.getLogger(__name__)

EXIT_FAILED = 1
EXIT_BAD_CONFIG = 2


def register(sub: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    """Add ``train`` and ``bench train``."""
    p = sub.add_parser("train", help="train a face-recognition model from a YAML config (one process or torchrun)")
    _config_args(p)
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="continue from this checkpoint folder (default: train.resume, 'auto')")
    p.add_argument("--summary-json", default=None, help="also write the final summary to this JSON file")
    p.set_defaults(func=_train)

    b = groups["bench"].add_parser("train", help="img/s and peak memory of the full training step, with and without data")
    _config_args(b)
    b.add_argument("--steps", type=int, default=20, help="timed optimiser steps (default 20)")
    b.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    b.add_argument("--no-data", action="store_true", help="only the step on one fixed batch (skip the with-data run)")
    b.add_argument("--data-only", action="store_true", help="only the run that draws batches from the loader")
    b.set_defaults(func=_bench)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=0.05 (repeatable)")


def _load(args: argparse.Namespace):
    from distrib_face.config import ConfigError, load_config

    try:
        return load_config(args.config, args.overrides)
    except ConfigError as err:
        log.error("%s", err)
        return None


def _train(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if cfg is None:
        return EXIT_BAD_CONFIG
    from distrib_face.models.io import BackboneFileError
    from distrib_face.parallel import init_distributed
    from distrib_face.train import NonFiniteLossError, run_training
    from distrib_face.train.checkpoint import CheckpointError
    from distrib_face.train.divergence import NonFiniteStateError

    ctx = init_distributed(device=cfg.device)
    try:
        summary = run_training(cfg, ctx, resume_from=args.resume)
    except (NonFiniteLossError, NonFiniteStateError) as err:
        log.error("%s", err)
        return EXIT_FAILED
    except (CheckpointError, BackboneFileError) as err:
        log.error("%s", err)
        return EXIT_BAD_CONFIG
    if ctx.is_main:
        _print_summary(summary)
        if args.summary_json:
            with open(args.summary_json, "w") as handle:
                json.dump(summary, handle, indent=1, default=str)
    return 0


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
    cfg = _load(args)
    if cfg is None:
        return EXIT_BAD_CONFIG

    from distrib_face.parallel import init_distributed
    from distrib_face.train.bench import bench_train

    ctx = init_distributed(device=cfg.device)
    modes = [True, False]
    if args.no_data:
        modes = [False]
    elif args.data_only:
        modes = [True]
    results = []
    for with_data in modes:
        results.append(bench_train(cfg, ctx, steps=args.steps, warmup=args.warmup, with_data=with_data))
    if ctx.is_main:
        print(f"backbone {cfg.model.backbone} @ {cfg.data.image_size}px, {ctx.world_size} rank(s) on {ctx.device}, "
              f"precision {cfg.deepspeed.precision}, ZeRO {cfg.deepspeed.zero_stage}, loss {cfg.loss.margin} "
              f"(sample rate {cfg.loss.sample_rate}), data {cfg.data.source}/{cfg.data.decoder}")
        print(f"{'mode':<10} {'global batch':>12} {'ms/step':>9} {'img/s':>9} {'peak MB':>9}  memory")
        for r in results:
            print(f"{r['mode']:<10} {r['global_batch']:>12} {r['median_step_ms']:>9.1f} {r['img_s']:>9.1f} "
                  f"{r['peak_memory_mb']:>9.0f}  {r['peak_memory_kind']}")
    return 0

"""``distrib-face bench scale``: the million-identity run as one command, every phase the real command.

Phases, each a subprocess measured by :func:`distrib_face.train.proctree.measure_command` (wall time, peak
RSS of its whole process tree, CPU seconds):

1. ``synth``: ``python -m distrib_face synth DATA --identities N ...`` (skipped with ``shards``: an
   existing shard set, e.g. one made by an earlier run);
2. ``verify``: ``python -m distrib_face data verify DATA`` (every sample read once; must find no problem);
3. ``train@2``: ``torchrun --nproc-per-node 2 -m distrib_face train`` for ``steps`` steps on 2 gloo ranks
   with Partial FC, ending with a checkpoint (``train.max_steps_this_run``);
4. ``reshard``: ``python -m distrib_face reshard CKPT CKPT3/classifier --world-size 3`` into a copy of the
   checkpoint (its other files hard-linked), the classifier cut for 3 ranks;
5. ``train@3``: ``torchrun --nproc-per-node 3 -m distrib_face train --resume CKPT3`` for ``resume_steps``
   more steps (to the end of the schedule);
6. ``eval``: ``python -m distrib_face eval`` of the final backbone on the held-out pairs.

Everything lands in ``out``: ``data/`` (when synthesised), ``config_2.yaml`` / ``config_3.yaml``, the two runs'
output folders, the resharded checkpoint, a log per phase (``logs/PHASE.log``), and ``scale.json`` (the
phases' measurements and the training summaries).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distrib_face.train.proctree import TreeUsage, check, measure_command

log = logging.getLogger(__name__)

PHASES = ("synth", "verify", "train@2", "reshard", "train@3", "eval")
_RANK_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


@dataclass(kw_only=True)
class ScaleSpec:
    """What ``bench scale`` runs.

    Attributes:
        identities: training identities to synthesise (ignored with ``shards``).
        out: output folder (created; must not hold an earlier run's ``scale.json`` unless ``overwrite``).
        shards: an existing shard set to train on instead of synthesising one.
        steps: optimiser steps on 2 ranks before the checkpoint.
        resume_steps: further steps on 3 ranks after the reshard.
        image_size: side of the synthetic images and the backbone's input.
        batch_size: samples per rank per step.
        sample_rate: Partial FC sample rate.
        embedding_size: the backbone's embedding size.
        backbone: a registered backbone.
        min_images, max_images, zipf_a: the synthetic set's images-per-identity law (1..4 at 1.5: 1.67
            images an identity on average, 1.67M images for 1M identities).
        holdout, pairs: held-out identities and verification pairs (``holdout_pairs.npz``).
        workers: processes of synth and verify.
        seed: of the synthetic set and the training.
        timeout: seconds one phase may take.
        overwrite: reuse ``out`` even if it holds an earlier run.
    """

    identities: int = 1_000_000
    out: str
    shards: str | None = None
    steps: int = 50
    resume_steps: int = 20
    image_size: int = 16
    batch_size: int = 64
    sample_rate: float = 0.1
    embedding_size: int = 128
    backbone: str = "iresnet_tiny"
    min_images: int = 1
    max_images: int = 4
    zipf_a: float = 1.5
    holdout: int = 50
    pairs: int = 600
    workers: int = 2
    seed: int = 0
    timeout: float = 6 * 3600.0
    overwrite: bool = False

    def __post_init__(self) -> None:
        for name in ("identities", "steps", "resume_steps", "batch_size", "embedding_size", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"bench scale: {name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.sample_rate <= 1.0:
            raise ValueError(f"bench scale: sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.shards is None and self.holdout < 2:
            raise ValueError(f"bench scale: holdout must be >= 2 (the eval phase needs held-out pairs), got {self.holdout}")


@dataclass
class Phase:
    """One measured phase: its usage and what it reported."""

    name: str
    usage: TreeUsage
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class ScaleResult:
    """Every phase of one ``bench scale`` run, with where its outputs are."""

    spec: ScaleSpec
    phases: list[Phase]
    data: Path
    checkpoint_2: Path
    checkpoint_3: Path
    summary_2: dict[str, Any]
    summary_3: dict[str, Any]
    eval_results: list[dict[str, Any]]
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    num_classes: int = 0
    num_samples: int = 0


def _env() -> dict[str, str]:
    """This process's environment without a launcher's rank variables (each phase starts its own world)."""
    return {k: v for k, v in os.environ.items() if k not in _RANK_ENV}


def _python(*args: str) -> list[str]:
    return [sys.executable, "-m", "distrib_face", "--log-level", "INFO", *args]


def _torchrun(nproc: int, *args: str) -> list[str]:
    # torchrun of this interpreter's environment (a venv's bin/ beside its python)
    return [str(Path(sys.executable).with_name("torchrun")), "--standalone", f"--nproc-per-node={nproc}",
            "-m", "distrib_face", *args]


def training_config(spec: ScaleSpec, data: Path, output_dir: Path, stop_after: int | None) -> dict[str, Any]:
    """The training config of both runs (``stop_after``: ``train.max_steps_this_run`` of the first)."""
    return {
        "data": {"source": "shards", "shards": str(data), "batch_size": spec.batch_size, "decoder": "dali",
                 "image_size": spec.image_size, "num_workers": 1, "dali_threads": 1},
        "model": {"backbone": spec.backbone, "embedding_size": spec.embedding_size},
        "loss": {"margin": "cosface", "scale": 32.0, "additive_margin": 0.3, "sample_rate": spec.sample_rate},
        "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5.0e-4},
        "schedule": {"kind": "poly", "power": 2.0, "warmup_steps": 0},
        # ZeRO 0: the whole backbone optimiser state is saved, so it carries over to 3 ranks exactly
        "deepspeed": {"zero_stage": 0, "precision": "fp32"},
        "train": {"total_steps": spec.steps + spec.resume_steps, "max_steps_this_run": stop_after,
                  "output_dir": str(output_dir), "checkpoint_every": 0, "keep_checkpoints": 1,
                  "log_every": 10, "export_onnx": False, "eval_pairsets": [], "seed": spec.seed},
        "tracking": {"enabled": False},
        "device": "cpu",
    }


def link_checkpoint(src: Path, dst: Path) -> None:
    """``dst``: a copy of the checkpoint ``src`` without its ``classifier/`` folder (files hard-linked where
    the file system allows, else copied)."""
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if rel.parts[0] == "classifier":
            continue
        target = dst / rel
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)


def _summary(path: Path, phase: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RuntimeError(f"phase {phase}: no training summary at {path}: {err}") from err


def run_bench_scale(spec: ScaleSpec) -> ScaleResult:
    """Run every phase (see the module docstring) and return the measurements.

    Raises:
        FileExistsError: ``out`` holds an earlier run and ``overwrite`` is off.
        PhaseFailed: a phase exited non-zero (the message names it and ends with its log).
    """
    from distrib_face.data.manifest import read_manifest
    from distrib_face.train.checkpoint import resolve_checkpoint

    out = Path(spec.out)
    if (out / "scale.json").exists() and not spec.overwrite:
        raise FileExistsError(f"{out}: holds an earlier bench scale run (scale.json); use another --out or --overwrite")
    for name in ("train_2", "train_3", "checkpoint_3", "logs"):
        shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    logs, env, timeout = out / "logs", _env(), spec.timeout
    load_before = os.getloadavg()
    phases: list[Phase] = []

    def run(name: str, command: list[str]) -> TreeUsage:
        log.info("bench scale: %s: %s", name, " ".join(command))
        usage = check(measure_command(command, log_path=logs / f"{name.replace('@', '_')}.log", env=env,
                                      timeout=timeout), name)
        phases.append(Phase(name, usage))
        log.info("bench scale: %s done in %.1f s, peak RSS %.0f MB", name, usage.wall_s, usage.peak_rss_bytes / 2**20)
        return usage

    if spec.shards is None:
        data = out / "data"
        shutil.rmtree(data, ignore_errors=True)
        run("synth", _python("synth", str(data), "--identities", str(spec.identities), "--min-images",
                             str(spec.min_images), "--max-images", str(spec.max_images), "--zipf-a", str(spec.zipf_a),
                             "--holdout", str(spec.holdout), "--pairs", str(spec.pairs), "--image-size",
                             str(spec.image_size), "--seed", str(spec.seed), "--workers", str(spec.workers)))
    else:
        data = Path(spec.shards)
    manifest = read_manifest(data)
    run("verify", _python("data", "verify", str(data), "--workers", str(spec.workers), "--no-progress"))

    # 2 ranks, stopped after `steps` with a checkpoint
    config_2, config_3 = out / "config_2.yaml", out / "config_3.yaml"
    config_2.write_text(yaml.safe_dump(training_config(spec, data, out / "train_2", spec.steps), sort_keys=False))
    config_3.write_text(yaml.safe_dump(training_config(spec, data, out / "train_3", None), sort_keys=False))
    run("train@2", _torchrun(2, "train", "--config", str(config_2), "--summary-json", str(out / "summary_2.json")))
    summary_2 = _summary(out / "summary_2.json", "train@2")
    phases[-1].info["images_per_sec"] = summary_2["images_per_sec"]
    checkpoint_2 = resolve_checkpoint(out / "train_2" / "checkpoints")
    if checkpoint_2 is None:
        raise RuntimeError(f"phase train@2 wrote no checkpoint under {out / 'train_2' / 'checkpoints'}")

    # the checkpoint for 3 ranks: the same files, the classifier resharded by `distrib-face reshard`
    checkpoint_3 = out / "checkpoint_3" / checkpoint_2.name
    link_checkpoint(checkpoint_2, checkpoint_3)
    run("reshard", _python("reshard", str(checkpoint_2), str(checkpoint_3 / "classifier"), "--world-size", "3"))

    run("train@3", _torchrun(3, "train", "--config", str(config_3), "--resume", str(checkpoint_3),
                             "--summary-json", str(out / "summary_3.json")))
    summary_3 = _summary(out / "summary_3.json", "train@3")
    phases[-1].info["images_per_sec"] = summary_3["images_per_sec"]

    pairs = data / "holdout_pairs.npz"
    eval_json = out / "eval.json"
    run("eval", _python("eval", "--model", str(summary_3["backbone"]), "--pairs", str(pairs), "--json",
                        str(eval_json), "--batch-size", "256"))
    eval_results = json.loads(eval_json.read_text())["results"]
    result = ScaleResult(spec, phases, data, checkpoint_2, checkpoint_3, summary_2, summary_3, eval_results,
                         load_before, os.getloadavg(), manifest.num_classes, manifest.num_samples)
    write_result(result, out / "scale.json")
    return result


def write_result(result: ScaleResult, path: Path) -> None:
    """``scale.json``: the spec, each phase's measurements, the summaries and the eval results."""
    from distrib_face.atomic import write_json

    payload = {
        "spec": asdict(result.spec), "num_classes": result.num_classes, "num_samples": result.num_samples,
        "load_before": result.load_before, "load_after": result.load_after, "written": time.strftime("%Y-%m-%d %H:%M"),
        "phases": [{"name": p.name, **{k: v for k, v in asdict(p.usage).items() if k != "log_path"},
                    "log": str(p.usage.log_path), **p.info} for p in result.phases],
        "checkpoint_2": str(result.checkpoint_2), "checkpoint_3": str(result.checkpoint_3),
        "summary_2": result.summary_2, "summary_3": result.summary_3, "eval": result.eval_results,
    }
    write_json(path, payload, default=str)


def format_scale_table(result: ScaleResult) -> str:
    """The phases as a text table (wall s, peak RSS of the tree, CPU s, processes, img/s), then the eval."""
    lines = [f"bench scale: {result.num_classes:,} identities, {result.num_samples:,} images "
             f"({result.spec.image_size} px); {result.spec.steps} steps on 2 ranks, {result.spec.resume_steps} on 3; "
             f"batch {result.spec.batch_size}/rank, sample rate {result.spec.sample_rate}, "
             f"{result.spec.backbone} -> {result.spec.embedding_size}",
             f"load average before {_load(result.load_before)}, after {_load(result.load_after)}",
             f"{'phase':<9} {'wall s':>8} {'peak RSS MB':>11} {'CPU s':>8} {'procs':>5} {'img/s':>7}  largest process"]
    for phase in result.phases:
        usage = phase.usage
        rate = phase.info.get("images_per_sec")
        kinds = sorted(usage.by_kind.items(), key=lambda item: -item[1][1])
        largest = ", ".join(f"{kind} x{count} {rss / 2**20:.0f} MB" for kind, (count, rss) in kinds[:3])
        lines.append(f"{phase.name:<9} {usage.wall_s:>8.1f} {usage.peak_rss_bytes / 2**20:>11.0f} {usage.cpu_s:>8.1f} "
                     f"{usage.max_processes:>5} {'-' if rate is None else f'{rate:.0f}':>7}  {largest}")
    s2, s3 = result.summary_2, result.summary_3
    lines.append(f"train@2: steps {s2['steps']} / {s2['total_steps']}, final loss {s2['final_loss']:.4f}; "
                 f"train@3 resumed from {s3['resumed_from']} at step {s3['steps'] - s3['steps_this_run']}, "
                 f"steps {s3['steps']} / {s3['total_steps']}, final loss {s3['final_loss']:.4f}")
    for r in result.eval_results:
        lines.append(f"eval {r.get('name')}: accuracy {100 * r.get('accuracy', float('nan')):.2f}% "
                     f"(± {100 * r.get('accuracy_std', float('nan')):.2f}), AUC {100 * r.get('auc', float('nan')):.2f}%, "
                     f"{r.get('num_pairs')} pairs")
    return "\n".join(lines)


def _load(values: tuple[float, float, float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)

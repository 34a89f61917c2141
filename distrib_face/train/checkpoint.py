"""Training checkpoints: everything needed to continue a run exactly, written atomically.

Layout of ``<output_dir>/checkpoints/``::

    latest                      # text: the name of the newest complete checkpoint (replaced atomically)
    step_000000120/
        trainer.json            # step, micro-step, epoch, samples seen, world size, MLflow run id, loss history,
                                # the LR schedule's step, the config (also as config.yaml), secrets redacted
        config.yaml
        deepspeed_config.json   # the resolved DeepSpeed config the engine ran with, secrets redacted
        backbone.pt             # the consolidated fp32 backbone (distrib_face.models.save_backbone format)
        deepspeed/engine/...    # engine.save_checkpoint: module, backbone optimiser (ZeRO partitions per rank)
        classifier/classifier-RRRRR-of-WWWWW.pt   # class shards + ShardOptimizer state (parallel.checkpoint)
        ranks/rank_RRRRR.json   # this rank's data-loader position and Python RNG state
        ranks/rank_RRRRR_rng.pt # this rank's torch (and CUDA) and numpy RNG states

Every rank writes its parts into ``step_N.tmp/``; after a barrier rank 0 fsyncs the files, renames the
folder to ``step_N/`` and replaces ``latest``. A crash at any point leaves either the previous checkpoint
or the new one as ``latest``, never a partial folder. (When ranks see different file systems each node's
ranks rename their own copy; Ray merges them when the reporter uploads.)
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distrib_face.atomic import fsync_dir, fsync_tree, write_text
from distrib_face.parallel import barrier

logger = logging.getLogger(__name__)

LATEST = "latest"
TRAINER_FILE = "trainer.json"
FORMAT = "distrib_face.train_checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete or does not fit this run; the message names the path."""


@dataclass(kw_only=True)
class TrainerState:
    """The trainer's own counters, saved in ``trainer.json``.

    Attributes:
        step: optimiser steps completed.
        micro_step: batches drawn from the loader (the NaN test hook counts these).
        epoch: the loader epoch in progress.
        epoch_samples: images of that epoch consumed by all ranks together.
        samples_seen: images consumed by all ranks together (``micro_step x global micro-batch``).
        bad_steps: non-finite losses in a row at save time.
        skipped_steps: non-finite losses skipped so far in total.
        world_size: ranks that wrote the checkpoint.
        run_id: the MLflow run id, so a resumed run continues the same MLflow run.
        loss_history: ``[step, loss]`` pairs of the logged steps (for the loss curve).
        eval_history: ``[step, {name: accuracy}]`` of the verifications so far.
    """

    step: int = 0
    micro_step: int = 0
    epoch: int = 0
    epoch_samples: int = 0
    samples_seen: int = 0
    bad_steps: int = 0
    skipped_steps: int = 0
    world_size: int = 1
    run_id: str | None = None
    loss_history: list[list[float]] = field(default_factory=list)
    eval_history: list[list[Any]] = field(default_factory=list)


def step_dirname(step: int) -> str:
    """Folder name of the checkpoint after ``step`` optimiser steps."""
    return f"step_{step:09d}"


def resolve_checkpoint(path: str | os.PathLike) -> Path | None:
    """The complete checkpoint folder ``path`` designates, or None when there is none yet.

    ``path`` may be a checkpoint folder (holding ``trainer.json``) or a checkpoints root (holding ``latest``).
    """
    path = Path(path)
    if (path / TRAINER_FILE).is_file():
        return path
    latest = path / LATEST
    if latest.is_file():
        name = latest.read_text().strip()
        target = path / name
        if not (target / TRAINER_FILE).is_file():
            raise CheckpointError(f"{latest} points to {name!r}, which is not a complete checkpoint in {path}")
        return target
    return None


def capture_rng_state(device: torch.device) -> dict[str, Any]:
    """This process's torch (and CUDA), numpy and Python RNG states as tensors / plain values."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4]),
        },
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((
        "MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"], np_state["has_gauss"],
        np_state["cached_gaussian"],
    ))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(
    root: str | os.PathLike,
    *,
    ctx: Any,
    engine: Any,
    classifier: Any,
    shard_optimizer: Any,
    trainer_state: TrainerState,
    loader_state: dict[str, Any] | None,
    config: dict[str, Any],
    ds_config: dict[str, Any],
    backbone_file: tuple[Any, str, dict[str, Any]] | None,
    keep: int = 0,
    auxiliary: tuple[Any, Any] = (None, None),
) -> Path:
    """Write one checkpoint under ``root`` (collective: every rank calls it at the same step).

    Args:
        root: the checkpoints folder (``<output_dir>/checkpoints``).
        ctx: the :class:`~distrib_face.parallel.ProcessContext`.
        engine: the DeepSpeed engine of the backbone.
        classifier, shard_optimizer: this rank's class shard and its optimiser.
        trainer_state: the counters (rank 0's copy is written).
        loader_state: this rank's ``loader.state_dict()`` (JSON-able), or None.
        config: ``Config.to_dict()``.
        ds_config: the resolved DeepSpeed config.
        backbone_file: on rank 0, ``(fp32 module, registry name, kwargs)`` for ``backbone.pt``; else None.
        keep: keep only this many newest step checkpoints (0: all).
        auxiliary: ``(module, optimizer)`` of the auxiliary losses (their class centres are sharded like the
            classifier, so each rank writes its own ``ranks/rank_RRRRR_aux.pt``), or ``(None, None)``.

    Returns:
        The final checkpoint folder (the same path on every rank).
    """
    from distrib_face.models import save_backbone
    from distrib_face.parallel.checkpoint import save_shard

    root = Path(root)
    final = root / step_dirname(trainer_state.step)
    tmp = root / f"{final.name}.tmp"
    if ctx.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(ctx.group)
    tmp.mkdir(parents=True, exist_ok=True)  # ranks on another file system than rank 0
    engine.save_checkpoint(str(tmp / "deepspeed"), tag="engine", save_latest=False)
    save_shard(tmp / "classifier", classifier, shard_optimizer)
    ranks_dir = tmp / "ranks"
    ranks_dir.mkdir(exist_ok=True)
    rank_name = f"rank_{ctx.rank:05d}"
    (ranks_dir / f"{rank_name}.json").write_text(json.dumps({
        "rank": ctx.rank, "world_size": ctx.world_size, "loader": loader_state,
        "python_rng": _python_rng_to_json(random.getstate()),
    }))
    torch.save(capture_rng_state(ctx.device), ranks_dir / f"{rank_name}_rng.pt")
    aux_module, aux_optimizer = auxiliary
    if aux_module is not None:
        torch.save({"module": aux_module.state_dict(),
                    "optimizer": aux_optimizer.state_dict() if aux_optimizer is not None else None},
                   ranks_dir / f"{rank_name}_aux.pt")
    if ctx.rank == 0:
        if backbone_file is not None:
            module, name, kwargs = backbone_file
            save_backbone(tmp / "backbone.pt", module, name, kwargs)
        import yaml

        from distrib_face.redact import redact

        # The config travels with the checkpoint (Ray uploads it, people copy it): never its secrets. Resuming
        # reads only the counters; the run's own config (with its secrets) comes from the YAML.
        (tmp / "config.yaml").write_text(yaml.safe_dump(redact(config), sort_keys=False))
        (tmp / "deepspeed_config.json").write_text(json.dumps(redact(ds_config), indent=2, sort_keys=True))
        payload = {"format": FORMAT, "version": VERSION, **asdict(trainer_state), "config": redact(config)}
        (tmp / TRAINER_FILE).write_text(json.dumps(payload, indent=1))
    barrier(ctx.group)
    if ctx.rank == 0:
        _publish(root, tmp, final)
    barrier(ctx.group)
    if tmp.exists() and not final.exists():  # a rank on a file system rank 0 does not see
        _publish(root, tmp, final)
    if ctx.rank == 0 and keep > 0:
        _prune(root, keep)
    barrier(ctx.group)
    logger.info("rank %d: checkpoint %s written", ctx.rank, final)
    return final


def _publish(root: Path, tmp: Path, final: Path) -> None:
    fsync_tree(tmp)
    if final.exists():  # an earlier attempt at the same step (a restarted job): replace it
        shutil.rmtree(final)
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.exists():
            raise
    fsync_dir(root)
    write_text(root / LATEST, final.name + "\n")
    fsync_dir(root)


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _python_rng_to_json(state: tuple) -> list[Any]:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_rng_from_json(data: list[Any]) -> tuple:
    version, internal, gauss = data
    return (version, tuple(internal), gauss)


@dataclass
class LoadedCheckpoint:
    """What :func:`load_checkpoint` read besides the state it restored in place."""

    path: Path
    trainer_state: TrainerState
    config: dict[str, Any]
    loader_states: list[dict[str, Any] | None]
    """Every saving rank's loader state, in rank order (the length is the saving world size)."""
    same_world: bool


def read_trainer_state(path: Path) -> tuple[TrainerState, dict[str, Any]]:
    """``trainer.json`` of a checkpoint folder as ``(TrainerState, config dict)``."""
    try:
        payload = json.loads((path / TRAINER_FILE).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path / TRAINER_FILE}: cannot read the trainer state: {err}") from err
    if payload.get("format") != FORMAT:
        raise CheckpointError(f"{path / TRAINER_FILE}: not a distrib_face training checkpoint")
    config = payload.pop("config")
    for key in ("format", "version"):
        payload.pop(key)
    return TrainerState(**payload), config


def load_checkpoint(
    path: str | os.PathLike,
    *,
    ctx: Any,
    engine: Any,
    classifier: Any,
    shard_optimizer: Any,
    auxiliary: tuple[Any, Any] = (None, None),
) -> LoadedCheckpoint:
    """Restore a checkpoint in place (collective: every rank calls it).

    Restores the backbone and its optimiser (through DeepSpeed), the class shards and their optimiser (any
    saving world size: ``load_shard_from_dir`` reshards), and, at the same world size, this rank's RNG
    states. The loader position is returned, not applied: the caller re-derives it when the world size
    changed (see :func:`distrib_face.train.data.restore_loader`).

    With ZeRO stage >= 1 and a different world size, DeepSpeed cannot re-partition the backbone's optimiser
    state: the backbone weights are restored and its optimiser state (momentum) starts afresh, with a warning.
    """
    from distrib_face.parallel.checkpoint import load_shard_from_dir

    resolved = resolve_checkpoint(path)
    if resolved is None:
        raise CheckpointError(f"{path}: no checkpoint here (neither {TRAINER_FILE} nor a {LATEST} pointer)")
    state, config = read_trainer_state(resolved)
    same_world = state.world_size == ctx.world_size
    reset_optimizer = not same_world and engine.zero_optimization_stage() > 0
    if reset_optimizer:
        logger.warning(
            "%s was written by %d ranks, this run has %d: DeepSpeed cannot re-partition ZeRO stage %d "
            "optimiser state, so the backbone's weights are restored and its optimiser state starts afresh",
            resolved, state.world_size, ctx.world_size, engine.zero_optimization_stage(),
        )
    load_path, _ = engine.load_checkpoint(
        str(resolved / "deepspeed"), tag="engine", load_optimizer_states=not reset_optimizer,
        load_lr_scheduler_states=False, load_module_only=reset_optimizer,
    )
    if load_path is None:
        raise CheckpointError(f"{resolved / 'deepspeed'}: DeepSpeed found no engine checkpoint to load")
    load_shard_from_dir(resolved / "classifier", classifier, shard_optimizer)
    loader_states: list[dict[str, Any] | None] = []
    for rank in range(state.world_size):
        rank_file = resolved / "ranks" / f"rank_{rank:05d}.json"
        try:
            loader_states.append(json.loads(rank_file.read_text())["loader"])
        except (OSError, ValueError, KeyError) as err:
            raise CheckpointError(f"{rank_file}: cannot read the rank state: {err}") from err
    if same_world:
        rank_name = f"rank_{ctx.rank:05d}"
        random.setstate(_python_rng_from_json(json.loads((resolved / "ranks" / f"{rank_name}.json").read_text())["python_rng"]))
        rng = torch.load(resolved / "ranks" / f"{rank_name}_rng.pt", map_location="cpu", weights_only=True)
        restore_rng_state(rng, ctx.device)
    _load_auxiliary(resolved / "ranks" / f"rank_{ctx.rank:05d}_aux.pt", auxiliary, same_world)
    logger.info("rank %d: resumed from %s at step %d", ctx.rank, resolved, state.step)
    return LoadedCheckpoint(path=resolved, trainer_state=state, config=config, loader_states=loader_states, same_world=same_world)


def _load_auxiliary(path: Path, auxiliary: tuple[Any, Any], same_world: bool) -> None:
    """Restore the auxiliary losses' state (sharded class centres, ring radius) and their optimiser."""
    module, optimizer = auxiliary
    if module is None:
        return
    if not path.is_file():
        logger.warning("%s: no auxiliary-loss state in this checkpoint: the auxiliary losses start afresh", path)
        return
    if not same_world:
        # Their class centres are cut by rank like the classifier's rows; they are re-learnt rather than resharded.
        logger.warning("the world size changed: the auxiliary losses' class centres start afresh")
        return
    saved = torch.load(path, map_location="cpu", weights_only=True)
    module.load_state_dict(saved["module"])
    if optimizer is not None and saved["optimizer"] is not None:
        optimizer.load_state_dict(saved["optimizer"])

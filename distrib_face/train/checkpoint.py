"""Training checkpoints: everything needed to continue a run exactly, written atomically, read without unpickling.

Layout of ``<output_dir>/checkpoints/``::

    latest                      # text: the name of the newest complete checkpoint (replaced atomically)
    step_000000120/
        trainer.json            # step, micro-step, epoch, samples seen, world size, MLflow run id, loss history,
                                # the LR schedule's step, rollbacks and LR scale (train.on_divergence), the config
                                # (also as config.yaml), secrets redacted
        config.yaml
        deepspeed_config.json   # the resolved DeepSpeed config the engine ran with (written, never read back),
                                # secrets redacted
        backbone.pt             # the consolidated fp32 backbone (distrib_face.models.save_backbone format)
        engine/module.pt        # the engine's module state and step counters (distrib_face.train.engine_state)
        engine/optimizer-RRRRR-of-WWWWW.pt   # the backbone optimiser (ZeRO 1/2: this rank's partition)
        classifier/classifier-RRRRR-of-WWWWW.pt   # class shards + ShardOptimizer state (parallel.checkpoint)
        ranks/rank_RRRRR.json   # this rank's data-loader position and Python RNG state
        ranks/rank_RRRRR_rng.pt # this rank's torch (and CUDA) and numpy RNG states
        ranks/rank_RRRRR_aux.pt # the auxiliary losses' state and optimiser (when configured)

Safe to load: every ``.pt`` holds only tensors and plain values and is read with
``torch.load(weights_only=True)`` (:func:`distrib_face.safe_load.safe_torch_load`); the rest is JSON. A file
that asks for more (a pickled class or call) is refused with :class:`UnsafeCheckpointError` naming it,
before anything in it runs. DeepSpeed's own ``save_checkpoint`` / ``load_checkpoint`` are not used: they
pickle DeepSpeed objects and load with ``weights_only=False`` (see :mod:`distrib_face.train.engine_state`).

Finite to publish: before anything is written, every parameter, buffer and optimiser state is checked
finite (:func:`distrib_face.train.divergence.find_non_finite`: one all-reduce); a non-finite state raises
:class:`~distrib_face.train.divergence.NonFiniteStateError` on every rank and publishes nothing, so
``latest`` always names a finite checkpoint.

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
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import torch

from distrib_face.atomic import publish_dir, write_text
from distrib_face.parallel import barrier
from distrib_face.safe_load import UnsafeFileError, safe_torch_load
from distrib_face.train import engine_state
from distrib_face.train.divergence import (
    NonFiniteStateError,
    find_non_finite,
    non_finite_state_error,
)

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

    from distrib_face.parallel import ProcessContext, ShardedMarginClassifier
    from distrib_face.parallel.optim import ShardOptimizer

logger = logging.getLogger(__name__)

LATEST = "latest"
ENGINE_DIR = "engine"
TRAINER_FILE = "trainer.json"
FORMAT = "distrib_face.train_checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete or does not fit this run; the message names the path (exit 2)."""

    exit_code = 2


class UnsafeCheckpointError(CheckpointError, UnsafeFileError):
    """A checkpoint file asks for more than tensors and plain values; refused before anything in it runs.

    Raised on every rank alike (a rank that read a good copy raises it too); the message names the file.
    """

    def __init__(self, message: str, path: Path | None = None) -> None:
        ValueError.__init__(self, message)
        self.path = path
        self.reason = message


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
        lr_history: ``[step, backbone lr, classifier lr]`` of the logged steps (for the training figure).
        eval_history: ``[step, {name: accuracy}]`` of the verifications so far.
        rollbacks: how often ``train.on_divergence: rollback`` went back to an earlier checkpoint.
        lr_scale: what multiplies both peak learning rates (``train.rollback_lr_factor`` per rollback; 1.0).
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
    lr_history: list[list[float]] = field(default_factory=list)
    eval_history: list[list[Any]] = field(default_factory=list)
    rollbacks: int = 0
    lr_scale: float = 1.0


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
    ctx: ProcessContext,
    engine: DeepSpeedEngine,
    classifier: ShardedMarginClassifier,
    shard_optimizer: ShardOptimizer,
    trainer_state: TrainerState,
    loader_state: dict[str, Any] | None,
    config: dict[str, Any],
    ds_config: dict[str, Any],
    backbone_file: tuple[Any, str, dict[str, Any]] | None,
    keep: int = 0,
    auxiliary: tuple[Any, Any] = (None, None),
    before_publish: Callable[[], None] | None = None,
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
        before_publish: called on every rank once every part is written, before the folder is published
            (the test-only "killed in the middle of a checkpoint" fault).

    Returns:
        The final checkpoint folder (the same path on every rank).

    Raises:
        NonFiniteStateError: on every rank, when any rank's state holds NaN / Inf (see
            :func:`check_finite_state`); nothing was written and ``latest`` still names the last good one.
    """
    from distrib_face.models import save_backbone
    from distrib_face.parallel.checkpoint import save_shard

    root = Path(root)
    final = root / step_dirname(trainer_state.step)
    tmp = root / f"{final.name}.tmp"
    engine_snapshot = engine_state.capture(engine, ctx.rank, ctx.world_size)
    aux_state = _aux_state(auxiliary)
    # Nothing is written before the state is known finite on every rank: `latest` only ever names a finite one.
    try:
        _raise_if_non_finite(root, engine_snapshot, classifier, shard_optimizer, aux_state, ctx=ctx,
                             step=trainer_state.step)
    except NonFiniteStateError:
        if ctx.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a stale attempt at this step
        barrier(ctx.group)  # every rank raises with the folder already clean
        raise
    if ctx.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(ctx.group)
    tmp.mkdir(parents=True, exist_ok=True)  # ranks on another file system than rank 0
    engine_state.save(tmp / ENGINE_DIR, engine_snapshot)
    save_shard(tmp / "classifier", classifier, shard_optimizer)
    ranks_dir = tmp / "ranks"
    ranks_dir.mkdir(exist_ok=True)
    rank_name = f"rank_{ctx.rank:05d}"
    (ranks_dir / f"{rank_name}.json").write_text(json.dumps({
        "rank": ctx.rank, "world_size": ctx.world_size, "loader": loader_state,
        "python_rng": _python_rng_to_json(random.getstate()),
    }))
    torch.save(capture_rng_state(ctx.device), ranks_dir / f"{rank_name}_rng.pt")
    if aux_state is not None:
        torch.save(_to_cpu(aux_state), ranks_dir / f"{rank_name}_aux.pt")
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
    if before_publish is not None:
        before_publish()
    if ctx.rank == 0:
        _publish(root, tmp, final)
    barrier(ctx.group)
    # A node whose file system rank 0 does not see publishes its own copy, once: its first local rank (the
    # node's ranks share the folder, so two publishers there could remove each other's result).
    own_copy = ctx.local_rank == 0 and tmp.exists() and not final.exists()
    if own_copy:
        _publish(root, tmp, final)
    if (ctx.rank == 0 or own_copy) and keep > 0:  # rank 0's folder, and each node's own copy: one pruner each
        _prune(root, keep)
    barrier(ctx.group)
    logger.info("rank %d: checkpoint %s written", ctx.rank, final)
    return final


def check_finite_state(
    root: str | os.PathLike,
    *,
    ctx: ProcessContext,
    engine: DeepSpeedEngine,
    classifier: ShardedMarginClassifier,
    shard_optimizer: ShardOptimizer,
    step: int,
    auxiliary: tuple[Any, Any] = (None, None),
) -> None:
    """Raise :class:`NonFiniteStateError` on every rank when any rank's state holds NaN / Inf (collective).

    What :func:`save_checkpoint` checks before it writes anything, callable on its own (e.g. every
    ``train.log_every`` steps): the backbone's parameters, buffers and optimiser state, the class shard, its
    margin state and optimiser, the auxiliary losses and their optimiser. One ``aminmax`` per tensor, one
    all-reduce and one host read when all is finite.

    Args:
        root: the checkpoints folder (the error names its newest checkpoint as the last good one).
        step: the optimiser step, for the message.
    """
    _raise_if_non_finite(Path(root), engine_state.capture(engine, ctx.rank, ctx.world_size), classifier,
                         shard_optimizer, _aux_state(auxiliary), ctx=ctx, step=step, saving=False)


def _raise_if_non_finite(root: Path, engine_snapshot: engine_state.EngineState, classifier: ShardedMarginClassifier,
                         shard_optimizer: ShardOptimizer | None, aux_state: dict[str, Any] | None, *,
                         ctx: ProcessContext, step: int, saving: bool = True) -> None:
    findings = find_non_finite(_named_state(engine_snapshot, classifier, shard_optimizer, aux_state), ctx)
    if findings:
        raise non_finite_state_error(findings, step=step, refused=root / step_dirname(step) if saving else None,
                                     last_good=_last_good(root))


def _aux_state(auxiliary: tuple[Any, Any]) -> dict[str, Any] | None:
    module, optimizer = auxiliary
    if module is None:
        return None
    return {"module": module.state_dict(), "optimizer": optimizer.state_dict() if optimizer is not None else None}


def _named_state(engine_snapshot: engine_state.EngineState, classifier: ShardedMarginClassifier,
                 shard_optimizer: ShardOptimizer | None,
                 aux_state: dict[str, Any] | None) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor a checkpoint of this rank holds, named for the divergence message."""
    yield from engine_snapshot.named_tensors()
    for key, value in classifier.state_dict().items():
        yield f"classifier {key}", value
    if shard_optimizer is not None:
        for key, value in shard_optimizer.state_dict()["buffers"].items():
            yield f"classifier optimizer {key}", value
    if aux_state is not None:
        for key, value in aux_state["module"].items():
            yield f"auxiliary {key}", value
        if aux_state["optimizer"] is not None:
            for index, values in aux_state["optimizer"]["state"].items():
                for key, value in values.items():
                    if isinstance(value, torch.Tensor):
                        yield f"auxiliary optimizer state[{index}].{key}", value


def _last_good(root: Path) -> Path | None:
    try:
        return resolve_checkpoint(root)
    except CheckpointError:
        return None


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def _publish(root: Path, tmp: Path, final: Path) -> None:
    # replace: an earlier attempt at the same step (a restarted job); may_race: kept as a guard should two
    # publishers still meet on one folder (one per node is the rule above)
    publish_dir(tmp, final, replace=True, may_race=True)
    write_text(root / LATEST, final.name + "\n")


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
    ctx: ProcessContext,
    engine: DeepSpeedEngine,
    classifier: ShardedMarginClassifier,
    shard_optimizer: ShardOptimizer,
    auxiliary: tuple[Any, Any] = (None, None),
) -> LoadedCheckpoint:
    """Restore a checkpoint in place, into fresh or live (already trained) components (collective).

    Restores the backbone's module and optimiser (:mod:`distrib_face.train.engine_state`), the class shards
    and their optimiser (any saving world size: ``load_shard_from_dir`` reshards), the auxiliary losses
    and, at the same world size, this rank's RNG states; gradients left in live components are dropped.
    The loader position is returned, not applied: the caller re-derives it when the world size changed
    (see :func:`distrib_face.train.data.restore_loader`). Call it at an optimiser-step boundary.

    With ZeRO stage >= 1 and a different world size, a saved optimiser partition does not fit the new
    ranks: the backbone weights are restored and its optimiser state (momentum) starts afresh, with a warning.

    Every rank ends the same way: when any rank cannot read or apply its part, every rank raises (the
    message of the lowest failing rank), so that no rank waits forever in the next collective.

    Raises:
        UnsafeCheckpointError: a file would need an unrestricted unpickler (nothing in it ran).
        CheckpointError: a file is missing, damaged or does not fit this run; the message names it.
    """
    error: BaseException | None = None
    loaded: LoadedCheckpoint | None = None
    try:
        loaded = _load_local(path, ctx=ctx, engine=engine, classifier=classifier, shard_optimizer=shard_optimizer,
                             auxiliary=auxiliary)
    except Exception as err:  # noqa: BLE001 - every rank must learn of it before anyone raises (see below)
        error = err
    _agree(error, ctx)
    assert loaded is not None
    logger.info("rank %d: resumed from %s at step %d", ctx.rank, loaded.path, loaded.trainer_state.step)
    return loaded


_EXPECTED_LOAD_ERRORS = (CheckpointError, UnsafeFileError, engine_state.EngineStateError, ValueError, OSError,
                         RuntimeError, KeyError)


def _agree(error: BaseException | None, ctx: ProcessContext) -> None:
    """Raise on every rank when any rank failed (one all-reduce when all went well)."""
    from distrib_face.parallel.collectives import all_reduce_tensor, broadcast_object

    flags = torch.zeros(ctx.world_size, dtype=torch.float32, device=ctx.device)  # [W]: 1 where a rank failed
    flags[ctx.rank] = float(error is not None)
    failed = [rank for rank, flag in enumerate(all_reduce_tensor(flags, "sum", ctx.group).tolist()) if flag]
    if not failed:
        return
    first = failed[0]
    mine = None
    if ctx.rank == first:
        mine = (str(error), isinstance(error, UnsafeFileError), isinstance(error, _EXPECTED_LOAD_ERRORS))
    message, unsafe, expected = broadcast_object(mine, src=first, group=ctx.group)
    if ctx.world_size > 1:
        others = f" and on rank(s) {failed[1:]}" if len(failed) > 1 else ""
        message = f"{message} (rank {first}{others})"
    if error is not None and not isinstance(error, _EXPECTED_LOAD_ERRORS):
        raise error  # a bug, not a bad checkpoint: keep its traceback
    if unsafe:
        raise UnsafeCheckpointError(message, getattr(error, "path", None)) from error
    if expected:
        raise CheckpointError(message) from error
    raise RuntimeError(f"loading the checkpoint failed on rank {first}: {message}") from error


def _load_local(
    path: str | os.PathLike, *, ctx: ProcessContext, engine: DeepSpeedEngine, classifier: ShardedMarginClassifier,
    shard_optimizer: ShardOptimizer,
    auxiliary: tuple[Any, Any],
) -> LoadedCheckpoint:
    """This rank's part of :func:`load_checkpoint`: no collectives, so a failure cannot leave other ranks waiting."""
    from distrib_face.parallel.checkpoint import load_shard_from_dir

    resolved = resolve_checkpoint(path)
    if resolved is None:
        raise CheckpointError(f"{path}: no checkpoint here (neither {TRAINER_FILE} nor a {LATEST} pointer)")
    state, config = read_trainer_state(resolved)
    same_world = state.world_size == ctx.world_size
    engine_dir = resolved / ENGINE_DIR
    if not engine_dir.is_dir():
        legacy = " (DeepSpeed's own format, written before distrib_face read engines safely)" \
            if (resolved / "deepspeed").is_dir() else ""
        raise CheckpointError(f"{engine_dir}: missing: this checkpoint holds no engine state{legacy}")
    engine_state.load(engine_dir, engine, ctx.rank, ctx.world_size)
    load_shard_from_dir(resolved / "classifier", classifier, shard_optimizer)
    if shard_optimizer is not None:
        shard_optimizer.zero_grad()
    loader_states: list[dict[str, Any] | None] = []
    for rank in range(state.world_size):
        rank_file = resolved / "ranks" / f"rank_{rank:05d}.json"
        try:
            loader_states.append(json.loads(rank_file.read_text())["loader"])
        except (OSError, ValueError, KeyError) as err:
            raise CheckpointError(f"{rank_file}: cannot read the rank state: {err}") from err
    if same_world:
        rank_name = f"rank_{ctx.rank:05d}"
        rank_file = resolved / "ranks" / f"{rank_name}.json"
        try:
            python_rng = _python_rng_from_json(json.loads(rank_file.read_text())["python_rng"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{rank_file}: cannot read the Python RNG state: {err}") from err
        rng = _read_pt(resolved / "ranks" / f"{rank_name}_rng.pt", "RNG state")
        random.setstate(python_rng)
        restore_rng_state(rng, ctx.device)
    _load_auxiliary(resolved / "ranks" / f"rank_{ctx.rank:05d}_aux.pt", auxiliary, same_world)
    return LoadedCheckpoint(path=resolved, trainer_state=state, config=config, loader_states=loader_states,
                            same_world=same_world)


def _read_pt(path: Path, what: str) -> Any:
    """A checkpoint ``.pt`` read safely; an unsafe file raises :class:`UnsafeCheckpointError` naming it."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing: the checkpoint has no {what} for this rank")
    try:
        return safe_torch_load(path)
    except UnsafeFileError as err:
        raise UnsafeCheckpointError(str(err), path) from err
    except Exception as err:  # noqa: BLE001 - torch raises many types on a damaged file; re-raised naming it
        raise CheckpointError(f"{path}: cannot read the {what}: {type(err).__name__}: {err}") from err


def _load_auxiliary(path: Path, auxiliary: tuple[Any, Any], same_world: bool) -> None:
    """Restore the auxiliary losses' state (sharded class centres, ring radius) and their optimiser."""
    module, optimizer = auxiliary
    if module is None:
        return
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    if not path.is_file():
        logger.warning("%s: no auxiliary-loss state in this checkpoint: the auxiliary losses start afresh", path)
        return
    if not same_world:
        # Their class centres are cut by rank like the classifier's rows; they are re-learnt rather than resharded.
        logger.warning("the world size changed: the auxiliary losses' class centres start afresh")
        return
    saved = _read_pt(path, "auxiliary-loss state")
    try:
        module.load_state_dict(saved["module"])
        if optimizer is not None and saved["optimizer"] is not None:
            optimizer.load_state_dict(saved["optimizer"])
    except (KeyError, TypeError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"{path}: does not fit the configured auxiliary losses: {err}") from err

"""The backbone's DeepSpeed engine state in a format of our own, read back with ``torch.load(weights_only=True)``.

Why not ``engine.save_checkpoint`` / ``engine.load_checkpoint``: DeepSpeed 0.19.8 pickles objects of its own
into the ZeRO optimiser file (``LossScaler``, ``ZeroStageEnum``, ``fragment_address``) and reads every
checkpoint file with ``torch.load(weights_only=False)``, so a checkpoint folder could run code on resume.
Here we take the very state DeepSpeed would save -- ``engine.module.state_dict()`` and
``engine.optimizer.state_dict()`` --, turn those three objects into plain values, and restore it through
the same optimiser methods DeepSpeed's own ``load_checkpoint`` calls (``load_state_dict``,
``refresh_fp32_params``), so the partition arithmetic stays DeepSpeed's.

Files, in ``<checkpoint>/engine/``::

    module.pt                      rank 0: the module's parameters and buffers in the engine's dtypes (bf16
                                   under bf16), the engine's step counters, the optimiser kind / ZeRO stage /
                                   world size that wrote the checkpoint
    buffers-RRRRR-of-WWWWW.pt      ranks >= 1: their own buffers (BatchNorm statistics differ per rank: each
                                   rank normalises its own micro-batches, and verification embeds with them)
    optimizer-RRRRR-of-WWWWW.pt    the backbone optimiser: under ZeRO 1/2 every rank's partition (fp32 master
                                   weights and the torch optimiser's state of that slice); under ZeRO 0 only
                                   rank 0 writes (the state is the same on every rank)

Every rank loads ``module.pt``; at the same world size a rank >= 1 then puts back its own buffers (DeepSpeed's
own checkpoints give every rank rank 0's), and, when it restores the optimiser, reads its own optimizer file.

The optimisers DeepSpeed builds around our torch SGD / AdamW, and what their state holds:

============================================  ==================  =================================================
``engine.optimizer``                          when                state
============================================  ==================  =================================================
the torch optimiser itself                    ZeRO 0, fp32        its ``state_dict()``
``FP16_UnfusedOptimizer`` / ``FP16_Optimizer``  ZeRO 0, bf16 / fp16  loss-scale counters, the torch state, fp32 masters
``DeepSpeedZeroOptimizer`` (``BF16_Optimizer``)  ZeRO 1 / 2          loss scaler, this rank's fp32 master partition and
                                                                  its torch state, paddings, DeepSpeed's version
============================================  ==================  =================================================
"""

from __future__ import annotations

import enum
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch

from distrib_face.atomic import atomic_open

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

logger = logging.getLogger(__name__)

FORMAT = "distrib_face.engine_state"
VERSION = 1
MODULE_FILE = "module.pt"

KIND_TORCH = "torch"
KIND_MIXED_PRECISION = "mixed_precision"
KIND_ZERO = "zero"

# Objects DeepSpeed's ZeRO optimiser puts into its state dict, and what becomes of them here.
_LOSS_SCALER = "loss_scaler"  # a LossScaler / DynamicLossScaler: saved as its attributes, restored into the live one
_ZERO_STAGE = "zero_stage"  # a ZeroStageEnum (an int enum): saved as the int; the live optimiser's own is used
_SLICE_MAPPINGS = "param_slice_mappings"  # fragment_address per parameter: only DeepSpeed's universal-checkpoint
# converter reads them, never its load path, so they are not saved


class EngineStateError(ValueError):
    """The engine state cannot be written in, or read from, the plain format; the message names the file or key.

    Exit code 2 (a checkpoint the user must replace)."""

    exit_code = 2


def buffers_file(rank: int, world_size: int) -> str:
    """Name of rank ``rank``'s (>= 1) buffer file in a world of ``world_size``."""
    return f"buffers-{rank:05d}-of-{world_size:05d}.pt"


def optimizer_file(rank: int, world_size: int) -> str:
    """Name of rank ``rank``'s backbone-optimiser file in a world of ``world_size``."""
    return f"optimizer-{rank:05d}-of-{world_size:05d}.pt"


def optimizer_kind(engine: DeepSpeedEngine) -> str:
    """Which optimiser of the module docstring ``engine.optimizer`` is: ``torch``, ``mixed_precision`` or ``zero``.

    Raises:
        EngineStateError: any other (e.g. ZeRO-Offload's CPU Adam), which this format does not know.
    """
    if engine.zero_optimization():
        if engine.zero_optimization_stage() > 2:
            raise EngineStateError("ZeRO stage 3 engines are not supported by the checkpoint format (stages 0-2 are)")
        if engine.zero_elastic_checkpoint():
            raise EngineStateError("zero_optimization.elastic_checkpoint is not supported: each rank saves and "
                                   "restores its own partition")
        return KIND_ZERO
    optimizer = engine.optimizer
    if isinstance(optimizer, torch.optim.Optimizer):
        return KIND_TORCH
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if isinstance(optimizer, (FP16_Optimizer, FP16_UnfusedOptimizer)):
        return KIND_MIXED_PRECISION
    raise EngineStateError(f"cannot checkpoint the DeepSpeed optimizer {type(optimizer).__name__}: the plain "
                           "checkpoint format knows torch optimizers, FP16_(Unfused)Optimizer and the ZeRO 1/2 "
                           "optimizers")


@dataclass
class EngineState:
    """What :func:`capture` took from a live engine: tensors still on their devices, not yet copied.

    Attributes:
        module: the module's state dict (parameters and buffers, the engine's dtypes).
        buffer_names: the keys of ``module`` that are buffers.
        optimizer: the backbone optimiser's state as plain values (see :func:`to_plain`).
        kind: the optimiser kind (:func:`optimizer_kind`).
        meta: zero stage, world size, counters: what ``module.pt`` records besides the tensors.
    """

    module: dict[str, torch.Tensor]
    buffer_names: list[str]
    optimizer: dict[str, Any]
    kind: str
    meta: dict[str, Any]

    def named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor of the state with a readable name (``backbone bn1.running_var``, ``backbone optimizer...``)."""
        for key, value in self.module.items():
            yield f"backbone {key}", value
        yield from _walk_tensors(self.optimizer, "backbone optimizer")


def capture(engine: DeepSpeedEngine, rank: int, world_size: int) -> EngineState:
    """The engine's module and optimiser state, as references (no copy, no host sync)."""
    if getattr(engine, "dp_world_size", world_size) != world_size:
        raise EngineStateError(f"the engine's data-parallel size {engine.dp_world_size} is not the world size "
                               f"{world_size}: model / pipeline parallel engines are not supported")
    kind = optimizer_kind(engine)
    raw = engine.optimizer.state_dict()
    if kind == KIND_ZERO:
        raw = dict(raw)
        scaler = raw.pop(_LOSS_SCALER, None)
        stage = raw.pop(_ZERO_STAGE, None)
        raw.pop(_SLICE_MAPPINGS, None)
        if scaler is not None:
            raw[_LOSS_SCALER] = {"class": type(scaler).__name__, "attributes": dict(vars(scaler))}
        if stage is not None:
            raw[_ZERO_STAGE] = int(stage)
    meta = {
        "kind": kind,
        "zero_stage": int(engine.zero_optimization_stage()),
        "world_size": world_size,
        "rank": rank,
        "counters": {name: int(getattr(engine, name)) for name in ("global_steps", "global_samples", "skipped_steps",
                                                                    "micro_steps")},
    }
    module = dict(engine.module.state_dict())
    buffer_names = sorted({name for name, _ in engine.module.named_buffers()} & set(module))
    return EngineState(module=module, buffer_names=buffer_names, optimizer=to_plain(raw, "optimizer"), kind=kind,
                       meta=meta)


def save(directory: str | os.PathLike, state: EngineState) -> list[Path]:
    """Write this rank's files of ``state`` into ``directory`` (rank 0: ``module.pt``; see the module docstring)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rank, world_size = state.meta["rank"], state.meta["world_size"]
    written = []
    if rank == 0:
        payload = {"format": FORMAT, "version": VERSION, "what": "module", **state.meta,
                   "module": {k: v.detach().cpu() for k, v in state.module.items()}}
        written.append(_save(payload, directory / MODULE_FILE))
    elif state.buffer_names:
        payload = {"format": FORMAT, "version": VERSION, "what": "buffers", **state.meta,
                   "buffers": {k: state.module[k].detach().cpu() for k in state.buffer_names}}
        written.append(_save(payload, directory / buffers_file(rank, world_size)))
    if state.kind == KIND_ZERO or rank == 0:
        payload = {"format": FORMAT, "version": VERSION, "what": "optimizer", **state.meta,
                   "optimizer": _to_cpu(state.optimizer)}
        written.append(_save(payload, directory / optimizer_file(rank, world_size)))
    return written


def load(directory: str | os.PathLike, engine: DeepSpeedEngine, rank: int, world_size: int, *,
         load_optimizer: bool = True) -> bool:
    """Restore the module (always) and the optimiser (when it fits) into ``engine``, live or fresh.

    The optimiser state is restored when ``load_optimizer`` is set and the checkpoint was written by the same
    optimiser kind and ZeRO stage -- and, under ZeRO 1/2, the same world size (a partition only means something
    for the world that cut it). Otherwise only the module is loaded, the fp32 master weights are refreshed from
    it, and the optimiser's state is left as it is (fresh on a new engine), with a warning.

    Args:
        directory: the ``engine/`` folder of a checkpoint.
        engine: the DeepSpeed engine of the backbone.
        rank, world_size: this process's rank and the world size now.
        load_optimizer: False restores the module only.

    Returns:
        Whether the optimiser state was restored.

    Raises:
        UnsafeFileError: a file asks for more than plain data (refused before anything in it runs).
        EngineStateError: a file is missing, unreadable or does not fit; the message names it.
    """
    directory = Path(directory)
    module_payload = _read(directory / MODULE_FILE, "module")
    kind, stage = optimizer_kind(engine), int(engine.zero_optimization_stage())
    saved_kind, saved_stage = module_payload["kind"], module_payload["zero_stage"]
    saved_world = module_payload["world_size"]
    reason = None
    if not load_optimizer:
        reason = "not asked for"
    elif (saved_kind, saved_stage) != (kind, stage):
        reason = (f"it was written by a {saved_kind} optimizer at ZeRO stage {saved_stage}, this engine has a {kind} "
                  f"optimizer at ZeRO stage {stage}")
    elif kind == KIND_ZERO and saved_world != world_size:
        reason = f"it was partitioned for {saved_world} ranks, this run has {world_size}"
    own_buffers = None
    if rank > 0 and saved_world == world_size and (directory / buffers_file(rank, world_size)).exists():
        own_buffers = _read(directory / buffers_file(rank, world_size), "buffers")["buffers"]
    optimizer_payload = None
    if reason is None:
        name = optimizer_file(rank if kind == KIND_ZERO else 0, world_size if kind == KIND_ZERO else saved_world)
        optimizer_payload = _read(directory / name, "optimizer")
        if kind == KIND_ZERO and (optimizer_payload["rank"], optimizer_payload["world_size"]) != (rank, world_size):
            raise EngineStateError(f"{directory / name}: holds rank {optimizer_payload['rank']} of "
                                   f"{optimizer_payload['world_size']}, expected rank {rank} of {world_size}")
    try:
        engine.module.load_state_dict(module_payload["module"], strict=True)
    except (RuntimeError, TypeError) as err:
        raise EngineStateError(f"{directory / MODULE_FILE}: does not fit the backbone: {err}") from err
    if own_buffers is not None:
        live = dict(engine.module.named_buffers())
        unknown = sorted(set(own_buffers) - set(live))
        if unknown:
            raise EngineStateError(f"{directory / buffers_file(rank, world_size)}: buffers {unknown[:3]} are not "
                                   "in the backbone")
        with torch.no_grad():
            for name, value in own_buffers.items():
                live[name].copy_(value)
    _zero_grads(engine)
    if optimizer_payload is not None:
        _load_optimizer(engine, kind, optimizer_payload["optimizer"], world_size, rank, directory)
    else:
        if hasattr(engine.optimizer, "refresh_fp32_params"):
            engine.optimizer.refresh_fp32_params()  # fp32 masters from the module's (maybe bf16) weights
        if reason != "not asked for":
            logger.warning("%s: the backbone's weights are restored, its optimizer state (momentum) starts afresh: %s",
                           directory, reason)
    for name, value in module_payload["counters"].items():
        setattr(engine, name, int(value))
    return optimizer_payload is not None


def _load_optimizer(engine: DeepSpeedEngine, kind: str, state: dict[str, Any], world_size: int, rank: int,
                    directory: Path) -> None:
    optimizer = engine.optimizer
    try:
        if kind == KIND_TORCH:
            optimizer.load_state_dict(state)
        elif kind == KIND_MIXED_PRECISION:
            optimizer.load_state_dict(state, load_optimizer_states=True)
        else:
            state = dict(state)
            scaler = state.pop(_LOSS_SCALER, None)
            state.pop(_ZERO_STAGE, None)
            if scaler is not None:
                _restore_loss_scaler(optimizer, scaler, directory)
            # Without a loss_scaler key DeepSpeed keeps the live one (_load_global_state: sd.get(key, live one)).
            # Only this rank's entry is read unless elastic checkpoints are on (refused in optimizer_kind).
            states: list[dict[str, Any] | None] = [None] * world_size
            states[rank] = state
            optimizer.load_state_dict(state_dict_list=states, load_optimizer_states=True,
                                      load_from_fp32_weights=engine.zero_load_from_fp32_weights())
    except (KeyError, RuntimeError, ValueError, TypeError, IndexError, AssertionError) as err:
        raise EngineStateError(f"{directory}: the backbone optimizer state does not fit this engine: "
                               f"{type(err).__name__}: {err}") from err


def _restore_loss_scaler(optimizer: Any, saved: dict[str, Any], directory: Path) -> None:
    live = getattr(optimizer, _LOSS_SCALER, None)
    if live is None:
        return
    if saved["class"] != type(live).__name__:
        logger.warning("%s: the checkpoint's loss scaler is a %s, this engine's a %s: the engine keeps its own",
                       directory, saved["class"], type(live).__name__)
        return
    for key, value in saved["attributes"].items():
        if hasattr(live, key):
            setattr(live, key, value)


def _zero_grads(engine: DeepSpeedEngine) -> None:
    """Drop any gradient a live engine holds, so that a reload never mixes old gradients into the next step."""
    zero_grad = getattr(engine.optimizer, "zero_grad", None)
    if zero_grad is not None:
        try:
            zero_grad(set_to_none=True)
        except TypeError:
            zero_grad()
    for param in engine.module.parameters():
        param.grad = None


def to_plain(value: Any, where: str) -> Any:
    """``value`` with tensors detached, checked to hold only what ``torch.load(weights_only=True)`` reads back.

    Raises:
        EngineStateError: naming the key path of the first other object (nothing unloadable is ever written).
    """
    if isinstance(value, torch.Tensor):
        return value.detach()
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        if isinstance(value, enum.Enum):  # an IntEnum is an int: keep its value, not the class
            return value.value
        return value
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, (str, int)) or isinstance(key, enum.Enum):
                raise EngineStateError(f"{where}: key {key!r} ({type(key).__name__}) is not a string or an integer")
            out[key] = to_plain(item, f"{where}.{key}")
        return out
    if isinstance(value, (list, tuple)):
        items = [to_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
        return tuple(items) if isinstance(value, tuple) else items
    raise EngineStateError(f"{where} is a {type(value).__module__}.{type(value).__name__}, which the plain checkpoint "
                           "format cannot hold (tensors, numbers, strings, dtypes and lists / dicts of them)")


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_to_cpu(v) for v in value]
        return tuple(items) if isinstance(value, tuple) else items
    return value


def _walk_tensors(value: Any, where: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield where, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _walk_tensors(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _walk_tensors(item, f"{where}[{i}]")


def _save(payload: dict[str, Any], path: Path) -> Path:
    with atomic_open(path) as handle:
        torch.save(payload, handle)
    return path


def _read(path: Path, what: str) -> dict[str, Any]:
    from distrib_face.safe_load import UnsafeFileError, safe_torch_load

    if not path.is_file():
        raise EngineStateError(f"{path}: missing: the checkpoint's engine state is incomplete")
    try:
        payload = safe_torch_load(path)
    except UnsafeFileError:
        raise  # names the file and what it asked for
    except Exception as err:  # noqa: BLE001 - torch raises many types on a damaged file; re-raised naming it
        raise EngineStateError(f"{path}: not a readable engine-state file ({type(err).__name__}: {err})") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or payload.get("what") != what:
        raise EngineStateError(f"{path}: not a distrib_face engine {what} file")
    if payload.get("version") != VERSION:
        raise EngineStateError(f"{path}: engine-state format version {payload.get('version')}, this code reads "
                               f"{VERSION}")
    return payload

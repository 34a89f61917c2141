"""The backbone inside a DeepSpeed engine, and the class shard with its own optimiser beside it.

DeepSpeed wraps the backbone only. We always hand it a torch optimiser (a DeepSpeed ``"optimizer"``
block would JIT-build FusedAdam, ~75 s on CPU) and never let it see the classifier: the class shard is
not data-parallel, so nothing must average its gradient.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import nn

from distrib_face.config import Config
from distrib_face.dtypes import parse_dtype

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

logger = logging.getLogger(__name__)


class _KnownNoticeFilter(logging.Filter):
    """Drops DeepSpeed's "You are using ZeRO with an untested optimizer" warning.

    The config opts in on purpose (``zero_allow_untested_optimizer``): DeepSpeed calls every optimizer but its
    own untested, and torch SGD / AdamW under ZeRO 1-2 are what the training tests run. Repeated on every rank
    at every engine build, the notice said nothing a user could act on.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "untested optimizer" not in record.getMessage()


def quiet_known_notices() -> None:
    """Silence the two notices every ZeRO run printed and nobody can act on (idempotent).

    - DeepSpeed's untested-optimizer warning (see :class:`_KnownNoticeFilter`);
    - torch 2.13's ``FutureWarning`` that ``all_gather_into_tensor`` / ``reduce_scatter_tensor`` are deprecated:
      DeepSpeed 0.19.8's ZeRO step calls them (``deepspeed/comm/torch.py``); our own collectives already use
      the ``*_single`` names (``distrib_face/parallel/collectives.py``).
    """
    import warnings

    ds_logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _KnownNoticeFilter) for f in ds_logger.filters):
        ds_logger.addFilter(_KnownNoticeFilter())
    for name in ("all_gather_into_tensor", "reduce_scatter_tensor"):
        warnings.filterwarnings("ignore", message=rf"`torch\.distributed\.{name}` is deprecated", category=FutureWarning)


def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config the engine is built from (saved beside the run and logged to MLflow)."""
    ds = cfg.deepspeed
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        "train_batch_size": cfg.data.batch_size * cfg.optim.grad_accum * world_size,
        "zero_optimization": {"stage": ds.zero_stage},
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if ds.zero_stage > 0:
        # A torch optimizer (SGD in particular) is "untested" for ZeRO in DeepSpeed's eyes; it works.
        out["zero_allow_untested_optimizer"] = True
    # Always explicit: DeepSpeed 0.19.8 defaults to gradient_clipping 1.0, silently clipping every step.
    out["gradient_clipping"] = float(cfg.optim.grad_clip or 0.0)
    if ds.precision == "bf16":
        out["bf16"] = {"enabled": True}
        # Without this, BatchNorm's fp32 running stats meet bf16 activations: "expected scalar type BFloat16".
        out["data_types"] = {"buffer_dtype": "bf16"}
    elif ds.precision == "fp16":
        out["fp16"] = {
            "enabled": True,
            "loss_scale": ds.loss_scale,
            "initial_scale_power": ds.initial_scale_power,
            "loss_scale_window": ds.loss_scale_window,
            "hysteresis": ds.hysteresis,
            "min_loss_scale": ds.min_loss_scale,
        }
    return _merge(out, ds.extra)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def build_backbone(cfg: Config) -> nn.Module:
    """Create the configured backbone (fp32, training mode) with its memory / speed switches applied."""
    from distrib_face.models import create_backbone

    kwargs = dict(cfg.model.kwargs)
    kwargs.setdefault("input_size", cfg.data.image_size)
    if cfg.model.gradient_checkpointing:
        kwargs["gradient_checkpointing"] = True
    try:
        return create_backbone(
            cfg.model.backbone, embedding_size=cfg.model.embedding_size, dropout=cfg.model.dropout,
            channels_last=cfg.model.channels_last, **kwargs,
        )
    except TypeError as err:
        raise ValueError(
            f"model.backbone {cfg.model.backbone!r} does not accept the options {sorted(kwargs)} "
            f"(from model.kwargs, data.image_size, model.gradient_checkpointing): {err}"
        ) from err


def build_torch_optimizer(cfg: Config, params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """The backbone's torch optimiser (handed to DeepSpeed)."""
    if cfg.optim.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay)


@dataclass
class EngineBundle:
    """What :func:`build_engine` returns: the engine, its torch optimiser and the config it was built from."""

    engine: DeepSpeedEngine
    optimizer: torch.optim.Optimizer
    ds_config: dict[str, Any]
    input_dtype: torch.dtype


def build_engine(cfg: Config, backbone: nn.Module, lr: float, device: torch.device, world_size: int) -> EngineBundle:
    """Wrap ``backbone`` in a DeepSpeed engine (joining the existing process group).

    Must run on every rank (it broadcasts rank 0's initial weights).
    """
    import deepspeed

    quiet_known_notices()
    # The shared-memory comm op is never used by training and JIT-compiles for ~45 s on first init.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not deepspeed.comm.is_initialized():
        _init_single_process_group(deepspeed, device)
    backbone = backbone.to(device)
    if any(not p.is_contiguous() for p in backbone.parameters()):
        # DeepSpeed 0.19.8 broadcasts every parameter as p.data.view(torch.uint8) at initialisation (even in
        # a world of 1), which fails for channels_last weights. Keep the parameters contiguous: the step
        # feeds channels_last images, and cuDNN picks its NHWC kernels when the input is channels_last.
        backbone = backbone.to(memory_format=torch.contiguous_format)
    optimizer = build_torch_optimizer(cfg, [p for p in backbone.parameters() if p.requires_grad], lr)
    ds_config = deepspeed_config(cfg, world_size)
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=backbone, optimizer=optimizer, config=ds_config)
    del ds_optimizer  # the engine steps it; we set learning rates on the torch optimiser's param groups
    # DeepSpeed writes engine.config (the raw dict) into every checkpoint's model states; by now it has
    # parsed it (monitors built), so the copy it keeps can lose the secrets of deepspeed.extra.
    from distrib_face.redact import redact

    engine.config = redact(ds_config)
    return EngineBundle(engine=engine, optimizer=optimizer, ds_config=ds_config, input_dtype=parse_dtype(cfg.deepspeed.precision))


def _init_single_process_group(deepspeed: Any, device: torch.device) -> None:
    """Let DeepSpeed join the process group; for a lone process without one, make a world of 1 first.

    DeepSpeed reuses an existing torch process group (Ray, torchrun, tests); a single process started
    without any launcher gets ``RANK=0, WORLD_SIZE=1`` and a free local port so that DeepSpeed has one too.
    """
    import socket

    if int(os.environ.get("WORLD_SIZE", "1")) == 1 and "MASTER_ADDR" not in os.environ:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                           ("MASTER_PORT", str(port))):
            os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", auto_mpi_discovery=False)


def current_loss_scale(engine: DeepSpeedEngine) -> float:
    """The fp16 loss scale the last ``engine.backward`` used (1.0 without fp16)."""
    if not engine.fp16_enabled():
        return 1.0
    optimizer = engine.optimizer
    for attr in ("cur_scale", "loss_scale"):
        value = getattr(optimizer, attr, None)
        if value is not None:
            return float(value)
    raise RuntimeError(f"cannot read the loss scale of DeepSpeed optimizer {type(optimizer).__name__}")


def backbone_state_dict_fp32(engine: DeepSpeedEngine) -> dict[str, torch.Tensor]:
    """The backbone's full state dict, floating tensors in fp32, on the CPU (ZeRO stages 0-2 keep it whole)."""
    module = engine.module
    return {
        k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().clone()
        for k, v in module.state_dict().items()
    }


def save_ds_config(path: str | os.PathLike, ds_config: dict[str, Any]) -> Path:
    """Write the resolved DeepSpeed config as JSON (atomically), secrets redacted (``deepspeed.extra`` may
    hold e.g. a monitor's ``api_key``): the file is also an MLflow artifact."""
    from distrib_face.atomic import write_text
    from distrib_face.redact import redact

    return write_text(path, json.dumps(redact(ds_config), indent=2, sort_keys=True))

"""Everything one rank trains with, built from the config: :func:`build_components` returns :class:`Components`.

The trainer (:mod:`distrib_face.train.trainer`) and ``distrib-face bench train`` (:mod:`distrib_face.train.bench`)
build the same parts the same way:

- the data (a shard loader or in-memory random batches, see :mod:`distrib_face.train.data`);
- the backbone inside its DeepSpeed engine, with the engine's torch optimiser;
- this rank's class shard (:class:`~distrib_face.parallel.ShardedMarginClassifier`) and its own optimiser
  (:class:`~distrib_face.parallel.optim.ShardOptimizer`), never inside DeepSpeed: nothing averages it;
- the auxiliary losses (``loss.auxiliary``) and their optimiser, also not data-parallel;
- the learning-rate schedule, the peak rate of every optimiser, and the run length in steps;
- the tracker (MLflow on rank 0, a no-op elsewhere or when asked for none).

Seeding: torch is seeded with ``train.seed`` right before the backbone is built, so every rank builds the same
initial backbone (DeepSpeed also broadcasts rank 0's); the class shard draws its rows from ``train.seed`` per
class block (world-size independent).
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from distrib_face.config import Config
from distrib_face.dtypes import parse_dtype
from distrib_face.parallel import ProcessContext, ShardedMarginClassifier
from distrib_face.parallel.auxiliary import AuxiliaryLosses, build_auxiliary_losses
from distrib_face.parallel.optim import ShardOptimizer
from distrib_face.tracking import Tracker, create_tracker, run_name_for
from distrib_face.train.data import TrainData, build_train_data, epochs_to_steps
from distrib_face.train.engine import build_backbone, build_engine
from distrib_face.train.schedule import LRSchedule, peak_learning_rates

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

logger = logging.getLogger(__name__)


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed torch, numpy and Python; optionally switch torch to deterministic algorithms."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for determinism
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


@dataclass
class Components:
    """One rank's training parts (see the module docstring); built by :func:`build_components`.

    ``optimizers[i]`` runs at ``peaks[i] x schedule.factor(step)``: the backbone's, the class shard's, and the
    auxiliary losses' when there are any.
    """

    data: TrainData
    engine: DeepSpeedEngine
    backbone_optimizer: torch.optim.Optimizer
    ds_config: dict[str, Any]
    input_dtype: torch.dtype
    classifier: ShardedMarginClassifier
    shard_optimizer: ShardOptimizer
    auxiliary: AuxiliaryLosses | None
    aux_optimizer: torch.optim.Optimizer | None
    schedule: LRSchedule
    total_steps: int
    optimizers: list[torch.optim.Optimizer]
    peaks: list[float]
    tracker: Tracker


def classifier_kwargs(cfg: Config, ctx: ProcessContext, equal_batches: bool = True) -> dict[str, Any]:
    """Keyword arguments of ``ShardedMarginClassifier(num_classes, **kwargs)`` for this rank.

    The ``loss`` section: the margin, Partial FC rate, storage dtype (``loss.weight_dtype``), host offload
    (``loss.offload``), chunking, compute dtype and kernel; ``train.seed`` for the weights.

    Args:
        cfg: the validated config.
        ctx: the process context (``group``, ``device``, ``world_size``).
        equal_batches: every rank passes the same batch size each call (true for the trainer, whose loaders
            drop the last partial batch): the gathers then skip the size exchange and its host sync.
    """
    from distrib_face.losses.margins import create_margin

    loss = cfg.loss
    overrides: dict[str, Any] = {
        key: getattr(loss, key)
        for key in ("scale", "angular_margin", "additive_margin", "multiplicative_margin")
        if getattr(loss, key) is not None
    }
    if loss.options:
        overrides["options"] = dict(loss.options)
    kwargs: dict[str, Any] = dict(
        embedding_size=cfg.model.embedding_size, margin=create_margin(loss.margin, **overrides),
        sample_rate=loss.sample_rate, group=ctx.group, dtype=parse_dtype(loss.weight_dtype, "loss.weight_dtype"),
        device=ctx.device, seed=cfg.train.seed,
        compute_dtype=parse_dtype(loss.compute_dtype, "loss.compute_dtype") if loss.compute_dtype else None,
        # DeepSpeed averages the backbone's gradients over ranks; the classifier gives each rank the exact
        # gradient of the global mean loss, so the embeddings' gradient is scaled back up by the world size.
        embedding_grad_scale=float(ctx.world_size), equal_batches=equal_batches, offload=loss.offload,
        kernel=loss.kernel, grad_filter=loss.grad_filter,
    )
    if loss.chunk_size is not None:
        kwargs["chunk_size"] = loss.chunk_size
    return kwargs


def build_classifier(cfg: Config, num_classes: int, ctx: ProcessContext,
                     equal_batches: bool = True) -> tuple[ShardedMarginClassifier, ShardOptimizer]:
    """The class shard of this rank and its optimiser (peak learning rate set later by the schedule)."""
    classifier = ShardedMarginClassifier(num_classes, **classifier_kwargs(cfg, ctx, equal_batches))
    optimizer = ShardOptimizer(
        classifier, name=cfg.optim.name, lr=cfg.optim.lr, momentum=cfg.optim.momentum,
        weight_decay=cfg.optim.weight_decay, betas=cfg.optim.betas,
    )
    return classifier, optimizer


def build_auxiliary(
    cfg: Config, num_classes: int, ctx: ProcessContext, class_counts: Any = None,
) -> tuple[AuxiliaryLosses | None, torch.optim.Optimizer | None]:
    """The configured auxiliary losses (``loss.auxiliary``) and a plain SGD / AdamW over their own parameters
    (sharded class centres, the ring radius), or ``(None, None)`` when none is configured.

    Like the class shard, these parameters are not data-parallel: nothing averages them over ranks.
    """
    if not cfg.loss.auxiliary:
        return None, None
    aux = build_auxiliary_losses(
        cfg.loss.auxiliary, num_classes=num_classes, embedding_size=cfg.model.embedding_size, group=ctx.group,
        device=ctx.device, embedding_grad_scale=float(ctx.world_size), class_counts=class_counts, seed=cfg.train.seed,
    )
    params = [p for p in aux.parameters() if p.requires_grad]
    if not params:
        return aux, None
    if cfg.optim.name == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=cfg.optim.betas,
                                                             weight_decay=0.0)
    else:
        optimizer = torch.optim.SGD(params, lr=cfg.optim.lr, momentum=cfg.optim.momentum)
    return aux, optimizer


def load_init_backbone(backbone: torch.nn.Module, path: str) -> None:
    """Fine-tuning: copy weights from a backbone file or one of our checkpoint folders into ``backbone``."""
    from distrib_face.models import load_backbone
    from distrib_face.train.checkpoint import resolve_checkpoint

    source = Path(path)
    if source.is_dir():
        resolved = resolve_checkpoint(source)
        if resolved is None and (source / "backbone.pt").is_file():
            resolved = source
        if resolved is None:
            raise FileNotFoundError(f"train.init_backbone {path!r}: no backbone.pt or checkpoint in this folder")
        source = resolved / "backbone.pt"
    loaded = load_backbone(source, map_location="cpu")
    try:
        backbone.load_state_dict(loaded.state_dict())
    except RuntimeError as err:
        raise ValueError(f"train.init_backbone {str(source)!r} does not fit model.backbone: {err}") from err
    logger.info("backbone initialised from %s (fine-tuning with a new classifier)", source)


def build_components(
    cfg: Config,
    ctx: ProcessContext,
    *,
    init_backbone: bool = True,
    tracking: bool = True,
    run_id: str | None = None,
    resumed: bool = False,
) -> Components:
    """Build every part one rank trains with (collective: every rank calls it; DeepSpeed broadcasts weights).

    Args:
        cfg: the validated config.
        ctx: this rank's process context.
        init_backbone: apply ``train.init_backbone`` (fine-tuning); a resumed run passes False.
        tracking: open the MLflow run on rank 0 (``cfg.tracking``); False gives a no-op tracker (benchmarks).
        run_id: continue this MLflow run (a resumed checkpoint's), else ``tracking.run_id`` or a new run.
        resumed: this job continues a checkpoint (the tracker records what changed, see ``record_resume``).
    """
    data = build_train_data(cfg, ctx.rank, ctx.world_size, ctx.device)
    batches_per_epoch = len(data.loader)
    total_steps = cfg.train.total_steps or epochs_to_steps(cfg.train.epochs, batches_per_epoch, cfg.optim.grad_accum)

    torch.manual_seed(cfg.train.seed)  # the same initial backbone on every rank
    backbone = build_backbone(cfg)
    if init_backbone and cfg.train.init_backbone:
        load_init_backbone(backbone, cfg.train.init_backbone)
    backbone_lr, classifier_lr = peak_learning_rates(cfg, ctx.world_size)
    bundle = build_engine(cfg, backbone, backbone_lr, ctx.device, ctx.world_size)
    if cfg.model.compile:
        bundle.engine.compile()
    classifier, shard_optimizer = build_classifier(cfg, data.num_classes, ctx)
    class_counts = data.manifest.class_counts if data.manifest is not None else None
    auxiliary, aux_optimizer = build_auxiliary(cfg, data.num_classes, ctx, class_counts=class_counts)

    optimizers: list[torch.optim.Optimizer] = [bundle.optimizer, shard_optimizer]
    peaks = [backbone_lr, classifier_lr]
    if aux_optimizer is not None:
        optimizers.append(aux_optimizer)
        peaks.append(classifier_lr)  # class centres / radius learn like the class shard
    schedule = LRSchedule.from_config(cfg.schedule, total_steps, batches_per_epoch / cfg.optim.grad_accum)

    tcfg = cfg.tracking
    tracker = create_tracker(
        enabled=tracking and tcfg.enabled and ctx.is_main, tracking_uri=tcfg.tracking_uri,
        experiment=tcfg.experiment, run_id=run_id or tcfg.run_id, run_name=run_name_for(cfg, data.manifest),
        artifact_location=tcfg.artifact_location or str((Path(cfg.train.output_dir) / "mlartifacts").resolve()),
        resumed=resumed if (run_id or tcfg.run_id) else None,
    )
    return Components(
        data=data, engine=bundle.engine, backbone_optimizer=bundle.optimizer, ds_config=bundle.ds_config,
        input_dtype=bundle.input_dtype, classifier=classifier, shard_optimizer=shard_optimizer,
        auxiliary=auxiliary, aux_optimizer=aux_optimizer, schedule=schedule, total_steps=total_steps,
        optimizers=optimizers, peaks=peaks, tracker=tracker,
    )

"""The training loop: :func:`run_training` runs one rank of a job, start to finish or resume to finish.

Per optimiser step, on every rank::

    for each of grad_accum micro-batches:
        embeddings = engine(images)                  # backbone under DeepSpeed, [B_local, D]
        loss = classifier(embeddings, labels)         # class-sharded margin softmax, mean over the global batch
        engine.backward(loss)                         # fills backbone grads (averaged over ranks at the
                                                      # boundary) and this rank's class-shard grads
        engine.step()                                 # steps the backbone at the accumulation boundary
    shard_optimizer.step()                            # the class shard: never averaged, never in DeepSpeed

The classifier gives each rank the exact gradient of the global mean loss with respect to its local
embeddings; DeepSpeed then *averages* the backbone's gradients over ranks, so the classifier multiplies the
embeddings' gradient by the world size (``embedding_grad_scale``) to make the average the true gradient.

The loss is identical on all ranks, so every rank takes the same decisions (skip a non-finite loss, stop,
checkpoint, verify) without extra communication.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol, runtime_checkable

import numpy as np
import torch

from distrib_face.config import Config
from distrib_face.dtypes import parse_dtype

logger = logging.getLogger(__name__)


@runtime_checkable
class Reporter(Protocol):
    """Receives metrics and checkpoints as training goes (the Ray worker forwards them to ``ray.train.report``).

    Every rank calls :meth:`report` at the same points: after each checkpoint (with its folder) and at the end.
    """

    def report(self, metrics: Mapping[str, Any], checkpoint_dir: str | None) -> None:
        """Take ``metrics`` (JSON-able scalars, including ``step``) and an optional checkpoint folder."""


class NonFiniteLossError(RuntimeError):
    """The loss was NaN or Inf for ``train.max_bad_steps`` micro-batches in a row."""


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed torch, numpy and Python; optionally switch torch to deterministic algorithms."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for determinism
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def build_classifier(cfg: Config, num_classes: int, ctx: Any) -> tuple[Any, Any]:
    """The class shard of this rank and its optimiser (peak learning rate set later by the schedule)."""
    from distrib_face.losses.margins import create_margin
    from distrib_face.parallel import ShardedMarginClassifier
    from distrib_face.parallel.optim import ShardOptimizer

    loss = cfg.loss
    overrides = {
        key: getattr(loss, key)
        for key in ("scale", "angular_margin", "additive_margin", "multiplicative_margin")
        if getattr(loss, key) is not None
    }
    if loss.options:
        overrides["options"] = dict(loss.options)
    margin = create_margin(loss.margin, **overrides)
    kwargs: dict[str, Any] = {}
    if loss.chunk_size is not None:
        kwargs["chunk_size"] = loss.chunk_size
    classifier = ShardedMarginClassifier(
        num_classes, cfg.model.embedding_size, margin=margin, sample_rate=loss.sample_rate, group=ctx.group,
        dtype=torch.float32, device=ctx.device, seed=cfg.train.seed,
        compute_dtype=parse_dtype(loss.compute_dtype) if loss.compute_dtype else None,
        embedding_grad_scale=float(ctx.world_size), **kwargs,
    )
    optimizer = ShardOptimizer(
        classifier, name=cfg.optim.name, lr=cfg.optim.lr, momentum=cfg.optim.momentum,
        weight_decay=cfg.optim.weight_decay, betas=cfg.optim.betas,
    )
    return classifier, optimizer


def build_auxiliary(cfg: Config, num_classes: int, ctx: Any, class_counts: Any = None) -> tuple[Any, Any]:
    """The configured auxiliary losses (``loss.auxiliary``) and a plain SGD / AdamW over their own
    parameters (sharded class centres, the ring radius), or ``(None, None)`` when none is configured.

    Like the class shard, these parameters are not data-parallel: nothing averages them over ranks.
    """
    if not cfg.loss.auxiliary:
        return None, None
    from distrib_face.losses.auxiliary import build_auxiliary_losses

    aux = build_auxiliary_losses(
        cfg.loss.auxiliary, num_classes=num_classes, embedding_size=cfg.model.embedding_size, group=ctx.group,
        device=ctx.device, embedding_grad_scale=float(ctx.world_size), class_counts=class_counts, seed=cfg.train.seed,
    )
    params = [p for p in aux.parameters() if p.requires_grad]
    if not params:
        return aux, None
    if cfg.optim.name == "adamw":
        optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=0.0)
    else:
        optimizer = torch.optim.SGD(params, lr=cfg.optim.lr, momentum=cfg.optim.momentum)
    return aux, optimizer


def _load_init_backbone(backbone: torch.nn.Module, path: str) -> None:
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


def _global_grad_norm(engine: Any, classifier_grad: torch.Tensor | None, ctx: Any) -> float:
    """L2 norm of the backbone gradient (already averaged) and the classifier gradient (all shards)."""
    from distrib_face.parallel.collectives import all_reduce_tensor

    sq = torch.zeros((), dtype=torch.float64, device=ctx.device)
    if engine.zero_optimization_stage() == 0:
        for p in engine.module.parameters():
            if p.grad is not None:
                sq += p.grad.detach().double().pow(2).sum()
        backbone_sq = float(sq)
    else:
        norm = engine.get_global_grad_norm()
        backbone_sq = float(norm) ** 2 if norm is not None else float("nan")
    clf_sq = torch.zeros((), dtype=torch.float64, device=ctx.device)
    if classifier_grad is not None:
        clf_sq += classifier_grad.detach().double().pow(2).sum()
    clf_sq = float(all_reduce_tensor(clf_sq, "sum", ctx.group))
    return math.sqrt(backbone_sq + clf_sq)


def _clip_classifier_grad(grad: torch.Tensor, max_norm: float, ctx: Any) -> float:
    """Scale the class-shard gradient so that its norm over all shards is at most ``max_norm``."""
    from distrib_face.parallel.collectives import all_reduce_tensor

    sq = all_reduce_tensor(grad.detach().double().pow(2).sum(), "sum", ctx.group)
    norm = float(sq.sqrt())
    if norm > max_norm:
        grad.mul_(max_norm / (norm + 1e-6))
    return norm


class StepRunner:
    """The training step of one rank, shared by :func:`run_training` and ``distrib-face bench train``.

    Args:
        cfg: the config (precision, memory format, grad clipping).
        ctx: the process context.
        engine: the backbone's DeepSpeed engine.
        classifier, shard_optimizer: this rank's class shard and its optimiser.
        input_dtype: dtype the backbone takes (bf16 / fp16 under DeepSpeed mixed precision).
    """

    def __init__(self, cfg: Config, ctx: Any, engine: Any, classifier: Any, shard_optimizer: Any,
                 input_dtype: torch.dtype, auxiliary: Any = None, aux_optimizer: Any = None) -> None:
        self.cfg, self.ctx, self.engine = cfg, ctx, engine
        self.classifier, self.shard_optimizer, self.input_dtype = classifier, shard_optimizer, input_dtype
        self.auxiliary, self.aux_optimizer = auxiliary, aux_optimizer
        self.memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format

    def forward_backward(self, images: torch.Tensor, labels: torch.Tensor, poison: bool = False) -> float:
        """Forward one micro-batch and, when its loss is finite, backward it; returns the loss.

        The loss is the mean over the global micro-batch, identical on every rank. A non-finite loss is
        returned without a backward pass (``poison`` makes it NaN: the ``train.debug_nan_steps`` hook).
        Before the accumulation boundary the engine's micro-step is also taken here.
        """
        images = images.to(self.ctx.device, dtype=self.input_dtype, non_blocking=True)
        images = images.contiguous(memory_format=self.memory_format)
        labels = labels.to(self.ctx.device, non_blocking=True)
        embeddings = self.engine(images)  # [B_local, D]
        loss = self.classifier(embeddings.float(), labels)
        if self.auxiliary is not None:
            aux_total, _ = self.auxiliary(embeddings.float(), labels, classifier=self.classifier)
            loss = loss + aux_total
        if poison:
            loss = loss * float("nan")
        value = float(loss.detach())  # a host sync per micro-batch: every rank must see the same verdict
        if not math.isfinite(value):
            return value
        self.engine.backward(loss)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # DeepSpeed only counts the micro-step
        return value

    def finish_step(self, want_grad_norm: bool = False) -> float | None:
        """At the accumulation boundary: step the backbone (DeepSpeed) and the class shard.

        Under fp16 the class-shard gradient carries DeepSpeed's loss scale: it is unscaled first, and
        the shard's step is skipped together with the backbone's when either overflowed.

        Returns:
            The global gradient norm (backbone and all class shards) when ``want_grad_norm``, else None.
        """
        engine, ctx = self.engine, self.ctx
        clf_grad = self.classifier.active_rows()[1].grad
        grad_norm = None
        clf_finite = True
        if engine.fp16_enabled() and clf_grad is not None:
            from distrib_face.train.engine import current_loss_scale

            clf_finite = self.shard_optimizer.unscale_(1.0 / current_loss_scale(engine))
        if want_grad_norm and engine.zero_optimization_stage() == 0:
            grad_norm = _global_grad_norm(engine, clf_grad, ctx)  # grads are still there before the step
        engine.step()
        if engine.fp16_enabled() and (not engine.was_step_applied() or not clf_finite):
            logger.warning("fp16 overflow: the class-shard step is skipped with the backbone's")
        else:
            if self.cfg.optim.grad_clip and clf_grad is not None:
                _clip_classifier_grad(clf_grad, self.cfg.optim.grad_clip, ctx)
            self.shard_optimizer.step()
            if self.aux_optimizer is not None:
                if engine.fp16_enabled():
                    from distrib_face.train.engine import current_loss_scale

                    inv_scale = 1.0 / current_loss_scale(engine)
                    for group in self.aux_optimizer.param_groups:
                        for p in group["params"]:
                            if p.grad is not None:
                                p.grad.mul_(inv_scale)
                self.aux_optimizer.step()
        if self.aux_optimizer is not None:
            self.aux_optimizer.zero_grad(set_to_none=True)
        if want_grad_norm and grad_norm is None:
            grad_norm = _global_grad_norm(engine, clf_grad, ctx)
        self.shard_optimizer.zero_grad()
        return grad_norm


@dataclass
class _Window:
    """Counters between two log lines."""

    start: float
    images: int = 0
    losses: float = 0.0
    count: int = 0


def run_training(
    cfg: Config,
    ctx: Any,
    reporter: Reporter | None = None,
    resume_from: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Train one rank of the job described by ``cfg`` (every rank of the group calls it).

    Args:
        cfg: a validated :class:`~distrib_face.config.Config`.
        ctx: this rank's :class:`~distrib_face.parallel.ProcessContext` (from ``init_distributed``).
        reporter: receives metrics and checkpoint folders (Ray's reporter under Ray Train), or None.
        resume_from: a checkpoint folder (or checkpoints root) to continue from; None applies
            ``train.resume`` (``auto`` continues from ``<output_dir>/checkpoints`` when a checkpoint is there).

    Returns:
        A summary: ``steps``, ``finished`` (False when ``train.max_steps_this_run`` stopped it early),
        ``images_per_sec``, ``final_loss``, ``verification_before`` / ``verification_after``
        (``{set: accuracy}``), ``skipped_steps``, ``checkpoint``, ``backbone``, ``onnx``, ``output_dir``,
        ``mlflow_run_id`` and ``resumed_from``.

    Raises:
        NonFiniteLossError: ``train.max_bad_steps`` non-finite losses in a row.
    """
    from distrib_face.train.checkpoint import (
        TrainerState, load_checkpoint, resolve_checkpoint, save_checkpoint,
    )
    from distrib_face.train.data import build_train_data, epochs_to_steps, restore_loader
    from distrib_face.train.engine import backbone_state_dict_fp32, build_backbone, build_engine, save_ds_config
    from distrib_face.train.progress import Progress
    from distrib_face.train.schedule import LRSchedule, peak_learning_rates, set_learning_rates
    from distrib_face.train.verify import load_pairsets, summarize, verify

    tcfg = cfg.train
    output_dir = Path(tcfg.output_dir)
    ckpt_root = output_dir / "checkpoints"
    if ctx.rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(tcfg.seed, tcfg.deterministic)

    # ------------------------------------------------------------------ where to start
    resume_path = None
    if resume_from is not None:
        resume_path = resolve_checkpoint(resume_from)
        if resume_path is None:
            raise FileNotFoundError(f"resume_from {str(resume_from)!r}: no checkpoint there")
    elif tcfg.resume == "auto":
        resume_path = resolve_checkpoint(ckpt_root)
    elif tcfg.resume != "never":
        resume_path = resolve_checkpoint(tcfg.resume)
        if resume_path is None:
            raise FileNotFoundError(f"train.resume {tcfg.resume!r}: no checkpoint there")

    # ------------------------------------------------------------------ data, model, classifier
    data = build_train_data(cfg, ctx.rank, ctx.world_size, ctx.device)
    loader = data.loader
    batches_per_epoch = len(loader)
    steps_per_epoch = batches_per_epoch / cfg.optim.grad_accum
    total_steps = tcfg.total_steps or epochs_to_steps(tcfg.epochs, batches_per_epoch, cfg.optim.grad_accum)

    torch.manual_seed(tcfg.seed)  # the same initial backbone on every rank (DeepSpeed also broadcasts rank 0's)
    backbone = build_backbone(cfg)
    if tcfg.init_backbone and resume_path is None:
        _load_init_backbone(backbone, tcfg.init_backbone)
    backbone_lr, classifier_lr = peak_learning_rates(cfg, ctx.world_size)
    bundle = build_engine(cfg, backbone, backbone_lr, ctx.device, ctx.world_size)
    engine = bundle.engine
    if cfg.model.compile:
        engine.compile()
    classifier, shard_optimizer = build_classifier(cfg, data.num_classes, ctx)
    auxiliary, aux_optimizer = build_auxiliary(
        cfg, data.num_classes, ctx, class_counts=data.manifest.class_counts if data.manifest is not None else None,
    )
    schedule = LRSchedule.from_config(cfg.schedule, total_steps, steps_per_epoch)
    optimizers, peaks = [bundle.optimizer, shard_optimizer], [backbone_lr, classifier_lr]
    if aux_optimizer is not None:
        optimizers.append(aux_optimizer)
        peaks.append(classifier_lr)  # class centres / radius learn like the class shard

    state = TrainerState(world_size=ctx.world_size)
    if resume_path is not None:
        loaded = load_checkpoint(resume_path, ctx=ctx, engine=engine, classifier=classifier,
                                 shard_optimizer=shard_optimizer, auxiliary=(auxiliary, aux_optimizer))
        state = loaded.trainer_state
        restore_loader(loader, loaded.loader_states, ctx.rank, ctx.world_size, epoch=state.epoch,
                       samples_in_epoch=state.epoch_samples, batch_size=cfg.data.batch_size)
        if not loaded.same_world:
            state.epoch, state.epoch_samples = loader.epoch, 0
            torch.manual_seed(tcfg.seed * 1000 + state.step * 10 + ctx.rank)
        state.world_size = ctx.world_size
    else:
        torch.manual_seed(tcfg.seed + 1 + ctx.rank)  # per-rank dropout / augmentation streams
    start_step = state.step

    # ------------------------------------------------------------------ tracking
    from distrib_face.tracking import create_tracker

    run_id = state.run_id or cfg.tracking.run_id
    tracker = create_tracker(
        enabled=cfg.tracking.enabled and ctx.is_main, tracking_uri=cfg.tracking.tracking_uri,
        experiment=cfg.tracking.experiment, run_id=run_id, run_name=cfg.tracking.run_name,
        artifact_location=cfg.tracking.artifact_location or str((output_dir / "mlartifacts").resolve()),
    )
    from distrib_face.parallel.collectives import broadcast_object

    state.run_id = broadcast_object(tracker.run_id, 0, ctx.group)
    ds_config_path = output_dir / "deepspeed_config.json"
    if ctx.rank == 0:
        save_ds_config(ds_config_path, bundle.ds_config)
        if start_step == 0:
            tracker.log_params(cfg.to_dict())
            tracker.set_tags({
                "world_size": ctx.world_size, "device": str(ctx.device), "num_classes": data.num_classes,
                "total_steps": total_steps, "global_batch": cfg.data.batch_size * ctx.world_size * cfg.optim.grad_accum,
            })
            tracker.log_artifact(ds_config_path)
            if data.manifest is not None:
                hist = _plot_class_sizes(data.manifest.class_counts, output_dir / "class_sizes.png")
                tracker.log_artifact(hist, subdir="plots")
        else:
            tracker.set_tags({f"resumed_at_step_{start_step}": f"world_size={ctx.world_size}"})

    pairsets = load_pairsets(tcfg.eval_pairsets) if tcfg.eval_pairsets else []

    def run_verification(step: int, tag: str) -> dict[str, Any]:
        results = verify(engine.module, pairsets, ctx, embedding_size=cfg.model.embedding_size,
                         image_size=cfg.data.image_size, batch_size=tcfg.eval_batch_size)
        accuracies = {name: r.accuracy for name, r in results.items()}
        state.eval_history.append([step, accuracies])
        tracker.log_metrics(summarize(results), step=step)
        progress.message(f"verification at step {step} ({tag}): "
                         + ", ".join(f"{n} {a:.4f}" for n, a in accuracies.items()))
        return results

    progress = Progress(total_steps, start_step, enabled=ctx.is_main)
    status = "FAILED"
    summary: dict[str, Any] = {}
    try:
        verification_before: dict[str, float] = {}
        if pairsets and start_step == 0 and tcfg.eval_at_start:
            verification_before = {n: r.accuracy for n, r in run_verification(0, "before training").items()}
        elif state.eval_history:
            verification_before = dict(state.eval_history[0][1])

        # -------------------------------------------------------------- the loop
        runner = StepRunner(cfg, ctx, engine, classifier, shard_optimizer, bundle.input_dtype,
                            auxiliary=auxiliary, aux_optimizer=aux_optimizer)
        global_micro_batch = cfg.data.batch_size * ctx.world_size
        nan_steps = set(tcfg.debug_nan_steps)
        data_iter = iter(loader)
        window = _Window(start=time.perf_counter())
        run_start, run_images = time.perf_counter(), 0
        last_loss = float("nan")
        last_checkpoint: Path | None = None
        stop_at = total_steps
        if tcfg.max_steps_this_run is not None:
            stop_at = min(total_steps, start_step + tcfg.max_steps_this_run)
        engine.train()
        classifier.train()

        def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
            nonlocal data_iter
            for _ in range(2):
                try:
                    return next(data_iter)
                except StopIteration:
                    state.epoch, state.epoch_samples = loader.epoch, 0
                    data_iter = iter(loader)
            raise RuntimeError(f"the loader yielded no batch for epoch {state.epoch} on rank {ctx.rank}")

        while state.step < stop_at:
            set_learning_rates(optimizers, peaks, schedule.factor(state.step))
            log_now = (state.step + 1) % tcfg.log_every == 0 or state.step + 1 == total_steps
            good = 0
            step_loss = 0.0
            while good < cfg.optim.grad_accum:
                images, labels = next_batch()
                micro = state.micro_step
                state.micro_step += 1
                state.samples_seen += global_micro_batch
                state.epoch_samples += global_micro_batch
                loss_value = runner.forward_backward(images, labels, poison=micro in nan_steps)
                if not math.isfinite(loss_value):
                    state.bad_steps += 1
                    state.skipped_steps += 1
                    progress.message(f"non-finite loss ({loss_value}) at step {state.step} (micro-batch {micro}): "
                                     f"skipped, {state.bad_steps} in a row")
                    tracker.log_metrics({"skipped_steps": state.skipped_steps}, step=state.step)
                    if state.bad_steps >= tcfg.max_bad_steps:
                        raise NonFiniteLossError(
                            f"aborting at step {state.step}: the loss was non-finite for {state.bad_steps} "
                            f"micro-batches in a row (train.max_bad_steps={tcfg.max_bad_steps}); lower optim.lr, "
                            "set optim.grad_clip, check the data, or use deepspeed.precision fp32/bf16"
                        )
                    continue
                state.bad_steps = 0
                good += 1
                step_loss += loss_value
                window.images += global_micro_batch
                run_images += global_micro_batch
            grad_norm = runner.finish_step(want_grad_norm=log_now)
            state.step += 1
            last_loss = step_loss / cfg.optim.grad_accum
            window.losses += last_loss
            window.count += 1

            metrics = None
            if log_now:
                elapsed = max(time.perf_counter() - window.start, 1e-9)
                metrics = {
                    "loss": window.losses / window.count,
                    "lr": bundle.optimizer.param_groups[0]["lr"],
                    "lr_classifier": shard_optimizer.param_groups[0]["lr"],
                    "img_s": window.images / elapsed,
                    "epoch": state.epoch,
                }
                if grad_norm is not None and math.isfinite(grad_norm):
                    metrics["grad_norm"] = grad_norm
                tracker.log_metrics(metrics, step=state.step)
                state.loss_history.append([state.step, metrics["loss"]])
                window = _Window(start=time.perf_counter())
            progress.step(state.step, metrics)

            if pairsets and tcfg.eval_every and state.step % tcfg.eval_every == 0 and state.step < total_steps:
                run_verification(state.step, "during training")
                window = _Window(start=time.perf_counter())
            if (tcfg.checkpoint_every and state.step % tcfg.checkpoint_every == 0) or state.step == stop_at:
                last_checkpoint = _checkpoint(
                    cfg, ctx, ckpt_root, engine, classifier, shard_optimizer, state, loader, bundle,
                    save_checkpoint, backbone_state_dict_fp32, auxiliary=(auxiliary, aux_optimizer),
                )
                if reporter is not None and state.step < stop_at:
                    reporter.report({"step": state.step, "loss": last_loss}, str(last_checkpoint))
                window = _Window(start=time.perf_counter())

        run_seconds = time.perf_counter() - run_start
        finished = state.step >= total_steps
        if last_checkpoint is None and resume_path is not None and state.step == start_step:
            last_checkpoint = resume_path  # restarted after the final checkpoint: nothing left to train
        progress.close()

        # -------------------------------------------------------------- the end
        verification_after: dict[str, float] = {}
        roc_results: dict[str, Any] = {}
        if finished and pairsets:
            roc_results = run_verification(state.step, "after training")
            verification_after = {n: r.accuracy for n, r in roc_results.items()}
        backbone_path = last_checkpoint / "backbone.pt" if last_checkpoint is not None else None
        onnx_path = None
        if ctx.rank == 0 and finished:
            if backbone_path is not None:
                final_backbone = output_dir / "backbone.pt"
                _copy_file(backbone_path, final_backbone)
                backbone_path = final_backbone
            _log_final_artifacts(tracker, state, roc_results, output_dir)
            if tcfg.export_onnx and backbone_path is not None:
                onnx_path = _export_onnx(cfg, backbone_path, output_dir, tracker)
        images_per_sec = run_images / run_seconds if run_seconds > 0 else float("nan")
        summary = {
            "steps": state.step,
            "total_steps": total_steps,
            "finished": finished,
            "steps_this_run": state.step - start_step,
            "images_per_sec": images_per_sec,
            "final_loss": last_loss,
            "verification_before": verification_before,
            "verification_after": verification_after,
            "skipped_steps": state.skipped_steps,
            "checkpoint": str(last_checkpoint) if last_checkpoint else None,
            "backbone": str(backbone_path) if backbone_path else None,
            "onnx": str(onnx_path) if onnx_path else None,
            "output_dir": str(output_dir),
            "mlflow_run_id": state.run_id,
            "resumed_from": str(resume_path) if resume_path else None,
            "world_size": ctx.world_size,
        }
        if ctx.rank == 0:
            tracker.log_metrics({"images_per_sec_run": images_per_sec, "final_loss": last_loss}, step=state.step)
            tracker.log_dict(_json_safe(summary), "summary.json")
        if reporter is not None:
            report = {"step": state.step, "loss": last_loss, "images_per_sec": images_per_sec, "finished": finished}
            report.update({f"verify/{n}": a for n, a in verification_after.items()})
            reporter.report(report, str(last_checkpoint) if last_checkpoint else None)
        status = "FINISHED"
        return summary
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        progress.close()
        tracker.end(status=status)


def _checkpoint(cfg: Config, ctx: Any, root: Path, engine: Any, classifier: Any, shard_optimizer: Any, state: Any,
                loader: Any, bundle: Any, save_checkpoint: Any, backbone_state_dict_fp32: Any,
                auxiliary: tuple[Any, Any] = (None, None)) -> Path:
    backbone_file = None
    if ctx.rank == 0:
        from distrib_face.train.engine import build_backbone

        with torch.random.fork_rng(devices=[]):  # building it must not move the training RNG
            fp32 = build_backbone(cfg)  # a plain fp32 copy: the engine's module may be bf16
        fp32.load_state_dict(backbone_state_dict_fp32(engine))
        kwargs = dict(cfg.model.kwargs)
        kwargs.setdefault("input_size", cfg.data.image_size)
        if cfg.model.gradient_checkpointing:
            kwargs["gradient_checkpointing"] = False  # a file to evaluate / export; fine-tuning sets its own
        backbone_file = (fp32, cfg.model.backbone,
                         {"embedding_size": cfg.model.embedding_size, "dropout": cfg.model.dropout, **kwargs})
    return save_checkpoint(
        root, ctx=ctx, engine=engine, classifier=classifier, shard_optimizer=shard_optimizer, trainer_state=state,
        loader_state=loader.state_dict(), config=cfg.to_dict(), ds_config=bundle.ds_config,
        backbone_file=backbone_file, keep=cfg.train.keep_checkpoints, auxiliary=auxiliary,
    )


def _copy_file(src: Path, dst: Path) -> None:
    import shutil

    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _plot_class_sizes(class_counts: Any, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.sort(np.asarray(class_counts))[::-1]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    left.plot(np.arange(1, len(counts) + 1), counts)
    left.set(xscale="log", yscale="log", xlabel="identity rank", ylabel="images", title="images per identity")
    right.hist(counts, bins=min(50, max(5, len(np.unique(counts)))))
    right.set(xlabel="images per identity", ylabel="identities", yscale="log", title="class-size histogram")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_loss_curve(history: list[list[float]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    if history:
        steps, losses = zip(*history)
        ax.plot(steps, losses)
    ax.set(xlabel="step", ylabel="loss", title="training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _log_final_artifacts(tracker: Any, state: Any, roc_results: dict[str, Any], output_dir: Path) -> None:
    plots = []
    plots.append(_plot_loss_curve(state.loss_history, output_dir / "loss_curve.png"))
    if roc_results:
        from distrib_face.eval import plot_roc

        roc_path = output_dir / "roc.png"
        plot_roc(roc_results, roc_path)
        plots.append(roc_path)
    for path in plots:
        tracker.log_artifact(path, subdir="plots")


def _export_onnx(cfg: Config, backbone_path: Path, output_dir: Path, tracker: Any) -> Path | None:
    """Export the final backbone to ONNX with the export package and log it as an MLflow model."""
    from distrib_face.export import export_onnx
    from distrib_face.models import load_backbone

    onnx_path = output_dir / "backbone.onnx"
    model = load_backbone(backbone_path, map_location="cpu")
    export_onnx(model, onnx_path, input_size=cfg.data.image_size,
                metadata={"backbone": cfg.model.backbone, "embedding_size": str(cfg.model.embedding_size)})
    tracker.log_onnx_model(onnx_path, name="model", register_as=cfg.tracking.register_model)
    return onnx_path

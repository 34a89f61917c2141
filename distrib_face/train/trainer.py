"""The trainer: :class:`Trainer` runs one rank of a job, start to finish or resume to finish.

Every rank of the group builds a :class:`Trainer` and calls :meth:`Trainer.train`::

    trainer = Trainer(cfg, ctx, reporter=None, resume_from=None)   # resume point, components, state, tracking
    summary = trainer.train()                                      # the loop, then finish()

The loop itself is short; cadence belongs to the parts that own it::

    while state.step < stop_at:
        metrics = train_step()                     # grad_accum micro-batches, one optimiser step
        log(metrics); progress.step(...)
        if verifier.should_eval(step): verify
        if checkpointer.maybe_save(state, stop_at): report to Ray

The loss is identical on all ranks, so every rank takes the same decisions (skip a non-finite loss, stop,
checkpoint, verify) without extra communication. :func:`run_training` is the functional entry point the
CLI, torchrun's launcher and the Ray worker call.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Mapping, Protocol, runtime_checkable

import numpy as np
import torch

from distrib_face.config import Config
from distrib_face.parallel import ProcessContext
from distrib_face.parallel.collectives import all_gather_json, all_reduce_tensor, broadcast_object
from distrib_face.parallel.metrics import MetricAggregator
from distrib_face.tracking import STOPPED_EARLY_STATUS
from distrib_face.train.checkpoint import (
    TrainerState,
    load_checkpoint,
    read_trainer_state,
    resolve_checkpoint,
    save_checkpoint,
)
from distrib_face.train.components import Components, build_components, seed_everything
from distrib_face.train.data import restore_loader
from distrib_face.train.divergence import NonFiniteStateError, rollback_to_last_good
from distrib_face.train.engine import backbone_state_dict_fp32, build_backbone, save_ds_config
from distrib_face.train.faults import InjectedFaults
from distrib_face.train.progress import Progress
from distrib_face.train.schedule import set_learning_rates
from distrib_face.train.step import StepRunner
from distrib_face.train.verify import load_pairsets, summarize, verify

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

    exit_code = 1


def resolve_resume(cfg: Config, resume_from: str | os.PathLike | None) -> Path | None:
    """The checkpoint folder to continue from: ``resume_from``, else what ``train.resume`` says, else None."""
    if resume_from is not None:
        path = resolve_checkpoint(resume_from)
        if path is None:
            raise FileNotFoundError(f"resume_from {str(resume_from)!r}: no checkpoint there")
        return path
    resume = cfg.train.resume
    if resume == "never":
        return None
    if resume == "auto":
        return resolve_checkpoint(Path(cfg.train.output_dir) / "checkpoints")
    path = resolve_checkpoint(resume)
    if path is None:
        raise FileNotFoundError(f"train.resume {resume!r}: no checkpoint there")
    return path


class Verifier:
    """Verification on the configured pair sets (``train.eval_pairsets``), spread over the ranks."""

    def __init__(self, cfg: Config, ctx: ProcessContext, parts: Components) -> None:
        self.cfg, self.ctx, self.parts = cfg, ctx, parts
        self.pairsets = load_pairsets(cfg.train.eval_pairsets) if cfg.train.eval_pairsets else []
        # Training-image counts by identity name, for the sets whose images name training identities.
        manifest = parts.data.manifest
        self.class_counts = None
        if manifest is not None and any(p.identities is not None for p in self.pairsets):
            # a view over the manifest: its name index is built at the first lookup, not a copy per rank
            self.class_counts = manifest.counts_by_name()

    def should_eval(self, step: int) -> bool:
        """Whether to verify after ``step`` during training (the final verification is :meth:`run` in finish)."""
        every = self.cfg.train.eval_every
        return bool(self.pairsets) and every > 0 and step % every == 0 and step < self.parts.total_steps

    def run(self) -> dict[str, Any]:
        """``{set name: VerificationResult}`` of the backbone as it is now (collective)."""
        tcfg = self.cfg.train
        return verify(self.parts.engine.module, self.pairsets, self.ctx, embedding_size=self.cfg.model.embedding_size,
                      image_size=self.cfg.data.image_size, batch_size=tcfg.eval_batch_size,
                      class_counts=self.class_counts, class_size_edges=tcfg.eval_class_size_edges)


class Checkpointer:
    """Writes checkpoints every ``train.checkpoint_every`` steps and at the end of this process's run."""

    def __init__(self, cfg: Config, ctx: ProcessContext, parts: Components, root: Path, faults: InjectedFaults) -> None:
        self.cfg, self.ctx, self.parts, self.root, self.faults = cfg, ctx, parts, root, faults
        self.last: Path | None = None

    def maybe_save(self, state: TrainerState, stop_at: int) -> Path | None:
        """Save when ``state.step`` is a checkpoint step or the last step of this run; returns the folder."""
        every = self.cfg.train.checkpoint_every
        if (every and state.step % every == 0) or state.step == stop_at:
            return self.save(state)
        return None

    def save(self, state: TrainerState) -> Path:
        """Write a checkpoint of everything (collective); returns its folder."""
        cfg, ctx, parts = self.cfg, self.ctx, self.parts
        parts.classifier.check_step_errors()
        self.last = save_checkpoint(
            self.root, ctx=ctx, engine=parts.engine, classifier=parts.classifier,
            shard_optimizer=parts.shard_optimizer, trainer_state=state, loader_state=parts.data.loader.state_dict(),
            config=cfg.to_dict(), ds_config=parts.ds_config, backbone_file=self._backbone_file(),
            keep=cfg.train.keep_checkpoints, auxiliary=(parts.auxiliary, parts.aux_optimizer),
            before_publish=lambda: self.faults.maybe_exit(state.step, in_checkpoint=True),
        )
        return self.last

    def _backbone_file(self) -> tuple[torch.nn.Module, str, dict[str, Any]] | None:
        """On rank 0: a plain fp32 copy of the backbone for ``backbone.pt`` (the engine's module may be bf16)."""
        if self.ctx.rank != 0:
            return None
        cfg = self.cfg
        with torch.random.fork_rng(devices=[]):  # building it must not move the training RNG
            fp32 = build_backbone(cfg)
        fp32.load_state_dict(backbone_state_dict_fp32(self.parts.engine))
        kwargs = dict(cfg.model.kwargs)
        kwargs.setdefault("input_size", cfg.data.image_size)
        if cfg.model.gradient_checkpointing:
            kwargs["gradient_checkpointing"] = False  # a file to evaluate / export; fine-tuning sets its own
        return fp32, cfg.model.backbone, {"embedding_size": cfg.model.embedding_size, "dropout": cfg.model.dropout,
                                          **kwargs}


class Trainer:
    """One rank of a training job (every rank of the group builds one and calls :meth:`train`).

    Args:
        cfg: a validated :class:`~distrib_face.config.Config`.
        ctx: this rank's process context (from ``init_distributed``).
        reporter: receives metrics and checkpoint folders (Ray's reporter under Ray Train), or None.
        resume_from: a checkpoint folder (or checkpoints root) to continue from; None applies ``train.resume``
            (``auto`` continues from ``<output_dir>/checkpoints`` when a checkpoint is there).
    """

    def __init__(self, cfg: Config, ctx: ProcessContext, reporter: Reporter | None = None,
                 resume_from: str | os.PathLike | None = None) -> None:
        self.cfg, self.ctx, self.reporter = cfg, ctx, reporter
        self.output_dir = Path(cfg.train.output_dir)
        if ctx.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.train.seed, cfg.train.deterministic)
        self.resume_path = resolve_resume(cfg, resume_from)
        saved_run_id = read_trainer_state(self.resume_path)[0].run_id if self.resume_path is not None else None
        self.parts = build_components(cfg, ctx, init_backbone=self.resume_path is None, run_id=saved_run_id,
                                      resumed=self.resume_path is not None)
        self.state = self._restore()
        self.state.run_id = broadcast_object(self.parts.tracker.run_id, 0, ctx.group)
        self.start_step = self.state.step
        self.stop_at = self.parts.total_steps
        if cfg.train.max_steps_this_run is not None:
            self.stop_at = min(self.stop_at, self.start_step + cfg.train.max_steps_this_run)
        self.faults = InjectedFaults.from_env()
        self._nan_injected: set[str] = set()
        self.runner = StepRunner(cfg, ctx, self.parts)
        self.verifier = Verifier(cfg, ctx, self.parts)
        self.checkpointer = Checkpointer(cfg, ctx, self.parts, self.output_dir / "checkpoints", self.faults)
        self.progress = Progress(self.parts.total_steps, self.start_step, enabled=ctx.is_main)
        self.window = MetricAggregator(group=ctx.group, device=ctx.device)
        self.global_micro_batch = cfg.data.batch_size * ctx.world_size
        self._data_iter = iter(self.parts.data.loader)
        # Throughput counts training-step time only (not logging, verification or checkpoints).
        self.run_images, self.run_seconds = 0, 0.0
        self._window_images, self._window_seconds = 0, 0.0
        self.last_loss = float("nan")
        self.data_note = ""  # what the readers skipped so far, for the progress line ("" when nothing)
        self.verification_before: dict[str, float] = {}

    # ---------------------------------------------------------------------------------------------- set-up
    def _restore(self) -> TrainerState:
        """The trainer state after loading the resume checkpoint in place, or a fresh one."""
        cfg, ctx, parts = self.cfg, self.ctx, self.parts
        if self.resume_path is None:
            torch.manual_seed(cfg.train.seed + 1 + ctx.rank)  # per-rank dropout / augmentation streams
            return TrainerState(world_size=ctx.world_size)
        loaded = load_checkpoint(self.resume_path, ctx=ctx, engine=parts.engine, classifier=parts.classifier,
                                 shard_optimizer=parts.shard_optimizer, auxiliary=(parts.auxiliary, parts.aux_optimizer))
        state = loaded.trainer_state
        restore_loader(parts.data.loader, loaded.loader_states, ctx.rank, ctx.world_size, epoch=state.epoch,
                       samples_in_epoch=state.epoch_samples, batch_size=cfg.data.batch_size)
        if not loaded.same_world:
            state.epoch, state.epoch_samples = parts.data.loader.epoch, 0
            torch.manual_seed(cfg.train.seed * 1000 + state.step * 10 + ctx.rank)
        state.world_size = ctx.world_size
        return state

    def _begin_tracking(self) -> None:
        """Rank 0: the DeepSpeed config, params, tags and the class-size plot (fresh runs), or a resume tag."""
        if not self.ctx.is_main:
            return
        parts, cfg, tracker = self.parts, self.cfg, self.parts.tracker
        ds_config_path = save_ds_config(self.output_dir / "deepspeed_config.json", parts.ds_config)
        if self.resume_path is not None:
            tracker.record_resume(cfg.to_dict(), step=self.start_step, world_size=self.ctx.world_size,
                                  checkpoint=self.resume_path)
            return
        tracker.log_params(cfg.to_dict())
        tracker.set_tags({
            "world_size": self.ctx.world_size, "device": str(self.ctx.device), "num_classes": parts.data.num_classes,
            "total_steps": parts.total_steps, "global_batch": self.global_micro_batch * cfg.optim.grad_accum,
        })
        tracker.log_artifact(ds_config_path)
        if parts.data.manifest is not None:
            from distrib_face.tracking.plots import plot_class_histogram

            tracker.log_training_data(parts.data.manifest)
            plot = plot_class_histogram(parts.data.manifest.class_counts, self.output_dir / "class_sizes.png")
            tracker.log_artifact(plot, subdir="plots")

    # ---------------------------------------------------------------------------------------------- the loop
    def train(self) -> dict[str, Any]:
        """Train until the end of the schedule (or ``train.max_steps_this_run``), then :meth:`finish`.

        Returns:
            The summary (see :meth:`finish`).

        Raises:
            NonFiniteLossError: ``train.max_bad_steps`` non-finite losses in a row, and
            NonFiniteStateError: a non-finite state when a checkpoint was due (nothing is published), when
                ``train.on_divergence`` is ``abort`` or the rollbacks (``train.max_rollbacks``) are used up.
        """
        status = "FAILED"
        finished = False
        try:
            self._begin_tracking()
            if self.verifier.pairsets and self.start_step == 0 and self.cfg.train.eval_at_start:
                self.verification_before = self._verify("before training")
            elif self.state.eval_history:
                self.verification_before = dict(self.state.eval_history[0][1])
            self.parts.engine.train()
            self.parts.classifier.train()
            while self.state.step < self.stop_at:
                try:
                    self._advance()
                except (NonFiniteLossError, NonFiniteStateError) as err:
                    self._roll_back(err)  # re-raises unless train.on_divergence is rollback
            summary = self.finish()
            finished = summary["finished"]
            status = "FINISHED" if finished else STOPPED_EARLY_STATUS
            return summary
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            self.progress.close()
            self.parts.tracker.end(status=status)

    def _advance(self) -> None:
        """One step and what is due after it: the progress line, verification, a checkpoint, a report."""
        metrics = self.train_step()
        self.progress.step(self.state.step, metrics, note=self.data_note)
        self._inject_nan_state()
        if self.verifier.should_eval(self.state.step):
            self._verify("during training")
        saved = self.checkpointer.maybe_save(self.state, self.stop_at)  # refuses a non-finite state
        if saved is not None and self.reporter is not None and self.state.step < self.stop_at:
            self.reporter.report({"step": self.state.step, "loss": self.last_loss}, str(saved))
        self.faults.maybe_exit(self.state.step)

    def _roll_back(self, err: Exception) -> None:
        """``train.on_divergence: rollback``: reload the last good checkpoint into the live components, lower
        the learning rates and go on from there (collective); re-raises ``err`` when the config says abort or
        the rollbacks are used up (:func:`~distrib_face.train.divergence.rollback_to_last_good`)."""
        parts, ctx = self.parts, self.ctx
        diverged_at = self.state.step
        loaded = rollback_to_last_good(
            err, self.output_dir / "checkpoints", train_cfg=self.cfg.train, trainer_state=self.state, ctx=ctx,
            engine=parts.engine, classifier=parts.classifier, shard_optimizer=parts.shard_optimizer,
            auxiliary=(parts.auxiliary, parts.aux_optimizer),
        )
        # Gradients of the diverged micro-batches must not reach the first step after the rollback.
        parts.engine.zero_grad()
        parts.shard_optimizer.zero_grad()
        if parts.aux_optimizer is not None:
            parts.aux_optimizer.zero_grad(set_to_none=True)
        self.state = loaded.trainer_state
        self.state.run_id = self.parts.tracker.run_id or self.state.run_id
        restore_loader(parts.data.loader, loaded.loader_states, ctx.rank, ctx.world_size, epoch=self.state.epoch,
                       samples_in_epoch=self.state.epoch_samples, batch_size=self.cfg.data.batch_size)
        self._data_iter = iter(parts.data.loader)
        self.window = MetricAggregator(group=ctx.group, device=ctx.device)  # the diverged steps' losses go
        self._window_images, self._window_seconds = 0, 0.0
        self.checkpointer.last = loaded.path
        parts.tracker.set_tags({f"rolled_back_at_step_{diverged_at}": f"to step {self.state.step}: {str(err)[:200]}"})
        parts.tracker.log_metrics({"rollbacks": self.state.rollbacks, "lr_scale": self.state.lr_scale},
                                  step=self.state.step)
        self.progress.message(f"diverged at step {diverged_at}: rolled back to step {self.state.step}, learning rates "
                              f"x{self.state.lr_scale:g} (rollback {self.state.rollbacks} of "
                              f"{self.cfg.train.max_rollbacks})")

    def _inject_nan_state(self) -> None:
        """The test-only faults of :mod:`distrib_face.train.faults`: NaN in one class row or one backbone
        buffer, on one rank, once per process."""
        faults, step = self.faults, self.state.step
        due = [name for name, at in (("weights", faults.nan_weights_at_step), ("buffer", faults.nan_buffer_at_step))
               if at == step and name not in self._nan_injected]
        for name in due:
            self._nan_injected.add(name)
            if self.ctx.rank != faults.nan_rank:
                continue
            with torch.no_grad():
                if name == "weights":
                    self.parts.classifier.weight[0, 0] = float("nan")
                else:
                    next(b for b in self.parts.engine.module.buffers() if b.is_floating_point()).fill_(float("nan"))

    def train_step(self) -> dict[str, float] | None:
        """One optimiser step (``optim.grad_accum`` good micro-batches); the logged metrics on logging steps.

        A micro-batch whose loss is non-finite is skipped (no backward) and another is drawn; after
        ``train.max_bad_steps`` in a row the run aborts with :class:`NonFiniteLossError`.
        """
        cfg, state, parts = self.cfg, self.state, self.parts
        start = time.perf_counter()
        # state.lr_scale: 1, or lower after rollbacks (train.on_divergence); it is saved with the checkpoints.
        peaks = [peak * state.lr_scale for peak in parts.peaks]
        set_learning_rates(parts.optimizers, peaks, parts.schedule.factor(state.step))
        # Every rank logs at the same steps (the window is a collective), and always at the last step of this
        # run, so the summary's final_loss is the last logged loss.
        log_now = (state.step + 1) % cfg.train.log_every == 0 or state.step + 1 in (parts.total_steps, self.stop_at)
        step_loss = sum(self._good_micro_batch() for _ in range(cfg.optim.grad_accum)) / cfg.optim.grad_accum
        grad_norm = self.runner.finish_step(want_grad_norm=log_now)
        state.step += 1
        self.last_loss = step_loss
        self.window.update({"loss": step_loss})
        seconds = time.perf_counter() - start
        self.run_seconds += seconds
        self._window_seconds += seconds
        if not log_now:
            return None
        parts.classifier.check_step_errors()  # labels outside the classes, counted on the device since the last log
        metrics = self.window.compute(state.step)
        metrics.update({
            "lr": parts.backbone_optimizer.param_groups[0]["lr"],
            "lr_classifier": parts.shard_optimizer.param_groups[0]["lr"],
            "images_per_sec": self._window_images / max(self._window_seconds, 1e-9),
            "epoch": state.epoch,
        })
        self._window_images, self._window_seconds = 0, 0.0
        if grad_norm is not None and math.isfinite(grad_norm):
            metrics["grad_norm"] = grad_norm
        data_counts = self._data_counts()
        if data_counts is not None:
            metrics.update(data_counts.metrics())
            self.data_note = data_counts.progress_text()
        parts.tracker.log_metrics(metrics, step=state.step)
        state.loss_history.append([state.step, metrics["loss"]])
        state.lr_history.append([state.step, metrics["lr"], metrics["lr_classifier"]])
        return metrics

    def _good_micro_batch(self) -> float:
        """Forward-backward micro-batches until one has a finite loss; returns that loss."""
        cfg, state = self.cfg, self.state
        while True:
            images, labels = self._next_batch()
            micro = state.micro_step
            state.micro_step += 1
            state.samples_seen += self.global_micro_batch
            state.epoch_samples += self.global_micro_batch
            loss = self.runner.forward_backward(images, labels, poison=micro in self.faults.nan_micro_steps)
            if math.isfinite(loss):
                state.bad_steps = 0
                self._window_images += self.global_micro_batch
                self.run_images += self.global_micro_batch
                return loss
            state.bad_steps += 1
            state.skipped_steps += 1
            self.progress.message(f"non-finite loss ({loss}) at step {state.step} (micro-batch {micro}): skipped, "
                                  f"{state.bad_steps} in a row")
            self.parts.tracker.log_metrics({"skipped_steps": state.skipped_steps}, step=state.step)
            if state.bad_steps >= cfg.train.max_bad_steps:
                raise NonFiniteLossError(
                    f"aborting at step {state.step}: the loss was non-finite for {state.bad_steps} micro-batches in "
                    f"a row (train.max_bad_steps={cfg.train.max_bad_steps}); lower optim.lr, set optim.grad_clip, "
                    "check the data, or use deepspeed.precision fp32/bf16"
                )

    def _data_counts(self) -> Any:
        """What the readers of all ranks skipped and repaired so far (``DataCounts``), or None without shards.

        Collective (one all-reduce of a few integers), at log steps only. Above ``data.max_skip_fraction`` every
        rank raises the same :class:`~distrib_face.data.quality.DataQualityError`, naming the worst shard of
        all ranks (their per-shard counts are gathered only then).
        """
        counts = getattr(self.parts.data.loader, "counts", None)
        if counts is None:
            return None
        from distrib_face.data.quality import DataCounts, check_skip_fraction

        if self.ctx.world_size == 1:
            return counts  # the loader checks its own fraction
        summed = all_reduce_tensor(torch.tensor(counts.vector(), dtype=torch.float64, device=self.ctx.device),
                                   "sum", self.ctx.group)
        total = DataCounts.from_vector(summed.cpu().tolist())
        limit, after = self.cfg.data.max_skip_fraction, self.cfg.data.skip_check_after
        try:
            check_skip_fraction(total, limit, after)
        except Exception:  # noqa: BLE001 - the same verdict on every rank: gather the shard counts, re-raise
            everyone = all_gather_json(counts.to_dict(), self.ctx.group, self.ctx.device)
            check_skip_fraction(DataCounts.merged(everyone), limit, after, where="all ranks: ")
            raise
        return total

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch; at the end of an epoch the loader moves to the next one by itself."""
        loader = self.parts.data.loader
        for _ in range(2):
            try:
                return next(self._data_iter)
            except StopIteration:
                self.state.epoch, self.state.epoch_samples = loader.epoch, 0
                self._data_iter = iter(loader)
        raise RuntimeError(f"the loader yielded no batch for epoch {self.state.epoch} on rank {self.ctx.rank}")

    def _verify(self, when: str) -> dict[str, float]:
        """Verify now (collective), log it, remember it; returns ``{set: accuracy}``."""
        self._last_results = self.verifier.run()
        accuracies = {name: r.accuracy for name, r in self._last_results.items()}
        self.state.eval_history.append([self.state.step, accuracies])
        self.parts.tracker.log_metrics(summarize(self._last_results), step=self.state.step)
        self.progress.message(f"verification at step {self.state.step} ({when}): "
                              + ", ".join(f"{n} {a:.4f}" for n, a in accuracies.items()))
        return accuracies

    # ---------------------------------------------------------------------------------------------- the end
    def finish(self) -> dict[str, Any]:
        """Final verification, ``backbone.pt``, ONNX export and MLflow artifacts (finished runs), the summary.

        Returns:
            ``steps``, ``total_steps``, ``finished`` (False when ``train.max_steps_this_run`` stopped it early),
            ``steps_this_run``, ``images_per_sec``, ``final_loss``, ``verification_before`` /
            ``verification_after`` (``{set: accuracy}``), ``skipped_steps``, ``checkpoint``, ``backbone``,
            ``onnx``, ``output_dir``, ``mlflow_run_id``, ``resumed_from`` and ``world_size``.
        """
        state, parts, ctx = self.state, self.parts, self.ctx
        finished = state.step >= parts.total_steps
        last_checkpoint = self.checkpointer.last
        if last_checkpoint is None and self.resume_path is not None and state.step == self.start_step:
            last_checkpoint = self.resume_path  # restarted after the final checkpoint: nothing left to train
        self.progress.close()
        verification_after: dict[str, float] = {}
        if finished and self.verifier.pairsets:
            verification_after = self._verify("after training")
        backbone_path = last_checkpoint / "backbone.pt" if last_checkpoint is not None else None
        onnx_path = None
        if ctx.is_main and finished:
            if backbone_path is not None:
                final_backbone = self.output_dir / "backbone.pt"
                _copy_file(backbone_path, final_backbone)
                backbone_path = final_backbone
            self._log_final_plots(verification_after)
            if self.cfg.train.export_onnx and backbone_path is not None:
                onnx_path = self._export_onnx(backbone_path)
        images_per_sec = self.run_images / self.run_seconds if self.run_seconds > 0 else float("nan")
        # The last logged loss (the mean over its log window): the number the MLflow curve ends on.
        final_loss = state.loss_history[-1][1] if state.loss_history else float("nan")
        summary = {
            "steps": state.step, "total_steps": parts.total_steps, "finished": finished,
            "steps_this_run": state.step - self.start_step, "images_per_sec": images_per_sec,
            "final_loss": final_loss, "verification_before": self.verification_before,
            "verification_after": verification_after, "skipped_steps": state.skipped_steps,
            "checkpoint": str(last_checkpoint) if last_checkpoint else None,
            "backbone": str(backbone_path) if backbone_path else None, "onnx": str(onnx_path) if onnx_path else None,
            "output_dir": str(self.output_dir), "mlflow_run_id": state.run_id,
            "resumed_from": str(self.resume_path) if self.resume_path else None, "world_size": ctx.world_size,
        }
        counts = getattr(parts.data.loader, "counts", None)
        if counts is not None:  # what the readers of every rank skipped and repaired (docs/faults.md)
            from distrib_face.data.quality import DataCounts

            everyone = all_gather_json(counts.to_dict(), ctx.group, ctx.device)
            summary["data"] = DataCounts.merged(everyone).to_dict()
        if ctx.is_main:
            parts.tracker.log_dict(_json_safe(summary), "summary.json")
        if self.reporter is not None:
            report = {"step": state.step, "loss": final_loss, "images_per_sec": images_per_sec, "finished": finished}
            report.update({f"verify/{n}": a for n, a in verification_after.items()})
            self.reporter.report(report, str(last_checkpoint) if last_checkpoint else None)
        return summary

    def _log_final_plots(self, verification_after: dict[str, float]) -> None:
        """The training figure (loss, learning rates, verification over steps) and the ROC curves."""
        from distrib_face.tracking.plots import plot_training_curves

        parts, history = self.parts, self.state.loss_history
        tracker = parts.tracker
        if history:
            rates = self.state.lr_history  # what each logged step ran with (rollbacks included)
            lr_history = {"backbone": [(s, lr) for s, lr, _ in rates], "classifier": [(s, lr) for s, _, lr in rates]}
            figure = plot_training_curves(history, self.output_dir / "training.png", lr_history=lr_history,
                                          eval_history=self.state.eval_history)
            tracker.log_artifact(figure, subdir="plots")
        if verification_after:
            from distrib_face.eval import plot_roc

            tracker.log_artifact(plot_roc(self._last_results, self.output_dir / "roc.png"), subdir="plots")

    def _export_onnx(self, backbone_path: Path) -> Path:
        """Export the final backbone to ONNX with the export package and log it as an MLflow model."""
        from distrib_face.export import export_onnx
        from distrib_face.models import load_backbone

        cfg = self.cfg
        onnx_path = self.output_dir / "backbone.onnx"
        model = load_backbone(backbone_path, map_location="cpu")
        export_onnx(model, onnx_path, input_size=cfg.data.image_size,
                    metadata={"backbone": cfg.model.backbone, "embedding_size": str(cfg.model.embedding_size)})
        self.parts.tracker.log_onnx_model(onnx_path, name="model", register_as=cfg.tracking.register_model,
                                          step=self.state.step)
        return onnx_path


def run_training(cfg: Config, ctx: ProcessContext, reporter: Reporter | None = None,
                 resume_from: str | os.PathLike | None = None) -> dict[str, Any]:
    """Train one rank of the job described by ``cfg`` (every rank of the group calls it); see :class:`Trainer`.

    Returns:
        The summary of :meth:`Trainer.finish`.

    Raises:
        NonFiniteLossError: ``train.max_bad_steps`` non-finite losses in a row.
    """
    return Trainer(cfg, ctx, reporter=reporter, resume_from=resume_from).train()


def _copy_file(src: Path, dst: Path) -> None:
    from distrib_face.atomic import atomic_path

    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value

"""The training configuration: typed sections, validation, YAML in, dotted overrides.

A :class:`Config` is a tree of keyword-only dataclasses. Every section validates itself in
``__post_init__`` and :class:`Config` checks the rules that span sections, so a bad value fails
here, on the submitting machine, before any worker starts. Errors are :class:`ConfigError` and
name the field path and the value::

    ConfigError: optim.lr must be > 0, got -1.0

Typical use::

    cfg = load_config("configs/tiny_cpu.yaml", overrides=["optim.lr=0.05", "train.total_steps=20"])
    cfg.to_dict()  # plain nested dict, round-trips through Config.from_dict
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence, Union

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


def _fail(path: str, rule: str, value: Any) -> None:
    raise ConfigError(f"{path} {rule}, got {value!r}")


def _check_choice(path: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ConfigError(f"{path} must be one of {list(choices)}, got {value!r}")


def _check_positive(path: str, value: float | int) -> None:
    if not value > 0:
        _fail(path, "must be > 0", value)


def _check_non_negative(path: str, value: float | int) -> None:
    if not value >= 0:
        _fail(path, "must be >= 0", value)


def _check_finite_tree(path: str, value: Any) -> None:
    """Refuse NaN / Inf anywhere in ``value`` (nested mappings and lists too), naming the field path."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{path} must be a finite number, got {value!r}")
    if isinstance(value, Mapping):
        for key, item in value.items():
            _check_finite_tree(f"{path}.{key}" if path else str(key), item)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_finite_tree(f"{path}[{i}]", item)


@dataclass(kw_only=True)
class DataConfig:
    """Where the training images come from and how they are decoded."""

    source: Literal["shards", "random"] = "shards"
    """``shards``: webdataset shards read by :func:`distrib_face.data.build_loader`; ``random``: fixed random
    tensors made in memory (no files, no decoding), for benchmarks of the step alone and quick checks."""
    shards: str | None = None
    """A shard folder holding ``manifest.json``, or the manifest file itself (``source: shards``)."""
    random_num_classes: int = 1000
    """Number of identities when ``source: random``."""
    random_num_samples: int = 4096
    """Number of distinct random images when ``source: random`` (one epoch)."""
    batch_size: int = 128
    """Images per rank per micro-step (the global batch is ``batch_size x world_size x grad_accum``)."""
    decoder: Literal["dali", "pil"] = "dali"
    """JPEG decoder: the DALI pipeline (CPU here, ``mixed`` on a GPU device) or PIL."""
    image_size: int = 112
    """Side of the square images fed to the backbone (the shards are resized to it if they differ)."""
    num_workers: int = 2
    """Loader worker processes per rank."""
    dali_threads: int = 2
    """DALI CPU threads per rank."""
    rebalance: Literal["sqrt", "repeat_factor"] | None = None
    """Long-tail re-sampling of identities: ``sqrt`` or ``repeat_factor``; ``None`` reads each image once an epoch."""
    augment: bool | dict[str, Any] | None = None
    """Augmentations passed to the loader (``None`` or ``false``: none; ``true``: the loader's defaults;
    a mapping: the loader's options)."""
    resampled: bool = False
    """Draw shards with replacement (an endless stream) instead of epochs over the shard list."""
    shuffle: bool = True
    """Shuffle the shard order and the samples of each epoch; off: every epoch (and every refill pass) reads
    the shards in manifest order, for inspecting what the readers meet."""
    max_skip_fraction: float = 0.01
    """Stop training (``DataQualityError``, naming the worst shard) once more than this fraction of the
    samples read had to be skipped (bad images, bad labels, lost shard samples); checked once
    ``data.skip_check_after`` samples were read, over the whole run (all ranks together when there are
    several, at every log step). 0 tolerates nothing, 1 never stops."""
    skip_check_after: int = 1000
    """Samples read (per rank in a world of 1, over all ranks otherwise) before ``data.max_skip_fraction`` is
    checked, so that one bad image among the first few does not stop a run."""
    allow_missing_shards: bool = False
    """Train without the shards the manifest names but that are missing (said once in the log). Off: a
    missing shard is an error naming it."""
    max_image_pixels: int = 36_000_000
    """Largest ``width x height`` an image header may claim; larger ones (decompression bombs) are skipped
    as ``too_large`` before any decoder allocates memory for them. Must be at least ``image_size**2``."""

    def __post_init__(self) -> None:
        _check_choice("data.source", self.source, ("shards", "random"))
        _check_choice("data.decoder", self.decoder, ("dali", "pil"))
        _check_choice("data.rebalance", self.rebalance, (None, "sqrt", "repeat_factor"))
        _check_positive("data.batch_size", self.batch_size)
        _check_non_negative("data.num_workers", self.num_workers)
        _check_positive("data.dali_threads", self.dali_threads)
        _check_positive("data.random_num_classes", self.random_num_classes)
        _check_positive("data.random_num_samples", self.random_num_samples)
        if not 16 <= self.image_size <= 1024:
            _fail("data.image_size", "must be in [16, 1024]", self.image_size)
        if not 0.0 <= self.max_skip_fraction <= 1.0:
            _fail("data.max_skip_fraction", "must be in [0, 1]", self.max_skip_fraction)
        _check_non_negative("data.skip_check_after", self.skip_check_after)
        if isinstance(self.max_image_pixels, bool) or not self.max_image_pixels >= self.image_size ** 2:
            _fail("data.max_image_pixels", f"must be an integer >= data.image_size**2 = {self.image_size ** 2}",
                  self.max_image_pixels)
        if self.source == "shards" and not self.shards:
            raise ConfigError("data.shards must name a shard folder or manifest when data.source is 'shards', got None")
        if isinstance(self.augment, dict):
            from distrib_face.data.augment import resolve_augment  # the loader's own reading of the mapping

            try:
                resolve_augment(self.augment)
            except (TypeError, ValueError) as err:
                text = str(err)
                raise ConfigError(f"data.{text}" if text.startswith("augment") else f"data.augment: {text}") from err


@dataclass(kw_only=True)
class ModelConfig:
    """The backbone (from the :mod:`distrib_face.models` registry) and its speed / memory switches."""

    backbone: str = "iresnet50"
    """Registered backbone name (``distrib-face`` lists them via ``distrib_face.models.list_backbones``)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the backbone constructor."""
    embedding_size: int = 512
    """Dimension of the face embedding."""
    dropout: float = 0.0
    """Dropout before the embedding layer."""
    channels_last: bool = False
    """Run the backbone and its inputs in ``torch.channels_last`` memory format."""
    compile: bool = False
    """``torch.compile`` the backbone."""
    gradient_checkpointing: bool = False
    """Recompute the activations of each residual stage in the backward pass (saves memory, costs ~30% time)."""

    def __post_init__(self) -> None:
        from distrib_face.models.registry import backbone_options, is_backbone, list_backbones

        if not self.backbone or not is_backbone(self.backbone):
            raise ConfigError(f"model.backbone must be a registered backbone ({', '.join(list_backbones())}), "
                              f"got {self.backbone!r}")
        _check_positive("model.embedding_size", self.embedding_size)
        if not 0.0 <= self.dropout < 1.0:
            _fail("model.dropout", "must be in [0, 1)", self.dropout)
        for key, owner in _MODEL_FIELDS.items():
            if key in self.kwargs:
                raise ConfigError(f"model.kwargs.{key} is set by {owner}, got {self.kwargs[key]!r}: use {owner}")
        accepted = backbone_options(self.backbone)
        if accepted is not None:  # None: a factory taking any keyword (nothing to check against)
            options = sorted(set(accepted) - set(_MODEL_FIELDS))
            for key, value in self.kwargs.items():
                if key not in accepted:
                    raise ConfigError(f"model.kwargs.{key} is not an option of backbone {self.backbone!r}, got "
                                      f"{value!r} (accepted: {', '.join(options)})")
            if self.gradient_checkpointing and "gradient_checkpointing" not in accepted:
                raise ConfigError(f"model.gradient_checkpointing is not supported by backbone {self.backbone!r}, "
                                  f"got True (its options: {', '.join(options)})")


_MODEL_FIELDS = {"embedding_size": "model.embedding_size", "dropout": "model.dropout",
                 "channels_last": "model.channels_last"}
"""Backbone keywords the trainer passes from their own config fields (so model.kwargs must not repeat them)."""


@dataclass(kw_only=True)
class LossConfig:
    """The margin softmax of the class-sharded classifier."""

    margin: str = "arcface"
    """Margin name from the :mod:`distrib_face.losses` registry: ``arcface``, ``cosface``, ``sphereface``, ``combined``..."""
    scale: float | None = None
    """Logit scale s (``None``: the margin's default, 64)."""
    angular_margin: float | None = None
    """Additive angular margin m2 (ArcFace); ``None``: the margin's default."""
    additive_margin: float | None = None
    """Additive cosine margin m3 (CosFace); ``None``: the margin's default."""
    multiplicative_margin: float | None = None
    """Multiplicative angular margin m1 (SphereFace); ``None``: the margin's default."""
    options: dict[str, Any] = field(default_factory=dict)
    """Margin-specific extras (e.g. ``easy_margin``), passed to the margin."""
    sample_rate: float = 1.0
    """Partial-FC: fraction of each rank's classes (all positives plus random negatives) used per step, in (0, 1]."""
    chunk_size: int | None = None
    """Classes per chunk of the logit computation (bounds the peak memory); ``None``: the classifier's default."""
    compute_dtype: Literal["fp32", "bf16", "fp16"] | None = None
    """dtype of the logit matmul (``None``: fp32, whatever ``weight_dtype`` is)."""
    weight_dtype: Literal["fp32", "bf16"] = "fp32"
    """Storage dtype of the class weights and of their optimizer state (SGD momentum, AdamW moments). ``bf16``
    halves the shard (2 bytes per value); softmax statistics, target logits and the update's arithmetic stay
    fp32, and updated rows are written back with stochastic rounding (docs/classifier.md: accuracy effect)."""
    offload: Literal["none", "host"] = "none"
    """``host``: the class shard and its optimizer state live in host memory (pinned on CUDA) and each step moves
    only the rows in use to the device, overlapped with the backbone's forward; ``none``: all on the device."""
    kernel: Literal["auto", "torch", "triton"] = "auto"
    """How the margin softmax of ``s * cos`` margins (normface, cosface, arcface, combined) is computed:
    ``torch`` (chunked matmuls, any device), ``triton`` (fused kernels that never write a ``[B, chunk]``
    logit block; needs the triton package and a CUDA device) or ``auto`` (triton on CUDA when it imports,
    else torch). Other margins always take the torch path. See docs/classifier.md."""
    grad_filter: float | Literal["auto"] | None = None
    """Gradient filtering of the fused backward: skip class tiles whose softmax probabilities are all
    below this (``auto``: ``eps(compute dtype) / 32``, 2^-12 for bf16, as Cut Cross-Entropy). ``None``
    (default): exact gradients. Not with ``kernel: torch``; its measured effect is in docs/classifier.md."""
    auxiliary: list[dict[str, Any]] = field(default_factory=list)
    """Metric / regularising losses added to the margin softmax, each ``{name, weight, options}``: triplet,
    contrastive, center, ring, intra_angle, inter_angle, uploss, magface (see distrib_face.losses.auxiliary)."""

    def __post_init__(self) -> None:
        from distrib_face.losses.auxiliary import AuxLossSpec
        from distrib_face.losses.margins import list_margins  # the registry is the source of truth

        seen: dict[str, int] = {}
        for i, spec in enumerate(self.auxiliary):
            if not isinstance(spec, Mapping):
                raise ConfigError(f"loss.auxiliary[{i}] must be a mapping {{name, weight, options}}, got {spec!r}")
            try:
                name = AuxLossSpec.from_dict(dict(spec)).name
            except (TypeError, ValueError) as err:
                raise ConfigError(f"loss.auxiliary[{i}]: {err}") from err
            if name in seen:
                raise ConfigError(f"loss.auxiliary[{i}]: auxiliary loss {name!r} is already "
                                  f"loss.auxiliary[{seen[name]}], got {dict(spec)!r}: list each loss once")
            seen[name] = i

        _check_choice("loss.margin", self.margin, list_margins())
        if not 0.0 < self.sample_rate <= 1.0:
            _fail("loss.sample_rate", "must be in (0, 1]", self.sample_rate)
        if self.scale is not None:
            _check_positive("loss.scale", self.scale)
        for name in ("angular_margin", "additive_margin"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.6:
                _fail(f"loss.{name}", "must be in [0, 1.6) (radians / cosine units)", value)
        if self.multiplicative_margin is not None and self.multiplicative_margin < 1.0:
            _fail("loss.multiplicative_margin", "must be >= 1", self.multiplicative_margin)
        if self.chunk_size is not None:
            _check_positive("loss.chunk_size", self.chunk_size)
        _check_choice("loss.compute_dtype", self.compute_dtype, (None, "fp32", "bf16", "fp16"))
        _check_choice("loss.weight_dtype", self.weight_dtype, ("fp32", "bf16"))
        _check_choice("loss.offload", self.offload, ("none", "host"))
        if self.offload == "host" and any(dict(spec).get("name") == "uploss" for spec in self.auxiliary):
            _fail("loss.offload", "must be 'none' with the auxiliary loss 'uploss' (it differentiates the whole "
                  "shard in device memory)", self.offload)
        _check_choice("loss.kernel", self.kernel, ("auto", "torch", "triton"))
        if self.grad_filter is not None:
            if self.kernel == "torch":
                _fail("loss.grad_filter", "filters the fused triton backward; loss.kernel: torch is exact",
                      self.grad_filter)
            if self.grad_filter != "auto" and (
                isinstance(self.grad_filter, (bool, str)) or not 0.0 <= float(self.grad_filter) < 1.0
            ):
                _fail("loss.grad_filter", "must be 'auto', a probability in [0, 1) or null", self.grad_filter)
        self._check_margin_builds()

    def _check_margin_builds(self) -> None:
        """Build the margin as the trainer will (cheap: a few scalars): its options are checked by the margin itself."""
        from distrib_face.losses.margins import create_margin

        overrides: dict[str, Any] = {key: getattr(self, key) for key in
                                     ("scale", "angular_margin", "additive_margin", "multiplicative_margin")
                                     if getattr(self, key) is not None}
        try:
            create_margin(self.margin, **overrides, options=dict(self.options))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"loss.options {dict(self.options)!r} (loss.margin {self.margin!r}): {err}") from err


@dataclass(kw_only=True)
class OptimConfig:
    """Optimisers of the backbone (inside DeepSpeed) and of the classifier shards (outside it)."""

    name: Literal["sgd", "adamw"] = "sgd"
    """``sgd`` (with momentum) or ``adamw``; the same kind drives both the backbone and the classifier."""
    lr: float = 0.1
    """Peak learning rate of the backbone (after warm-up, before any batch scaling)."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 5e-4
    """Weight decay (L2 for SGD, decoupled for AdamW)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    classifier_lr_mult: float = 1.0
    """The classifier's learning rate is ``lr x classifier_lr_mult``."""
    scale_lr_by_batch: bool = False
    """Multiply the learning rate by ``global_batch / reference_batch`` (the linear scaling rule)."""
    reference_batch: int = 512
    """The global batch ``lr`` was tuned for, used when ``scale_lr_by_batch`` is set."""
    grad_clip: float | None = None
    """Clip the gradient norm of the backbone (DeepSpeed) and of the classifier (global over shards) to this; ``None``: off."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimiser step."""

    def __post_init__(self) -> None:
        _check_choice("optim.name", self.name, ("sgd", "adamw"))
        _check_positive("optim.lr", self.lr)
        if not 0.0 <= self.momentum < 1.0:
            _fail("optim.momentum", "must be in [0, 1)", self.momentum)
        _check_non_negative("optim.weight_decay", self.weight_decay)
        self.betas = tuple(self.betas)  # YAML gives a list
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            _fail("optim.betas", "must be two numbers in [0, 1)", self.betas)
        _check_positive("optim.classifier_lr_mult", self.classifier_lr_mult)
        _check_positive("optim.reference_batch", self.reference_batch)
        if self.grad_clip is not None:
            _check_positive("optim.grad_clip", self.grad_clip)
        _check_positive("optim.grad_accum", self.grad_accum)


@dataclass(kw_only=True)
class ScheduleConfig:
    """The learning-rate schedule: linear warm-up, then ``poly``, ``cosine`` or ``steps`` decay, per optimiser step."""

    kind: Literal["poly", "cosine", "steps"] = "poly"
    """Decay after warm-up."""
    warmup_steps: int = 0
    """Linear warm-up length in optimiser steps."""
    warmup_epochs: float = 0.0
    """Warm-up length in epochs (converted to steps; used when ``warmup_steps`` is 0)."""
    power: float = 2.0
    """Exponent of the ``poly`` decay: ``(1 - t) ** power``."""
    min_lr_ratio: float = 0.0
    """Floor of the ``poly`` and ``cosine`` decays as a fraction of the peak learning rate."""
    milestones: list[int] = field(default_factory=list)
    """``steps`` decay: optimiser steps at which the learning rate is multiplied by ``gamma``."""
    milestone_epochs: list[float] = field(default_factory=list)
    """``steps`` decay given in epochs instead (used when ``milestones`` is empty)."""
    gamma: float = 0.1
    """``steps`` decay factor."""

    def __post_init__(self) -> None:
        _check_choice("schedule.kind", self.kind, ("poly", "cosine", "steps"))
        _check_non_negative("schedule.warmup_steps", self.warmup_steps)
        _check_non_negative("schedule.warmup_epochs", self.warmup_epochs)
        _check_positive("schedule.power", self.power)
        if not 0.0 <= self.min_lr_ratio < 1.0:
            _fail("schedule.min_lr_ratio", "must be in [0, 1)", self.min_lr_ratio)
        if not 0.0 < self.gamma <= 1.0:
            _fail("schedule.gamma", "must be in (0, 1]", self.gamma)
        for name in ("milestones", "milestone_epochs"):
            values = list(getattr(self, name))
            if any(v <= 0 for v in values) or values != sorted(values):
                _fail(f"schedule.{name}", "must be positive and increasing", values)
        if self.kind == "steps" and not (self.milestones or self.milestone_epochs):
            raise ConfigError("schedule.milestones (or schedule.milestone_epochs) must be set for schedule.kind 'steps', got []")


@dataclass(kw_only=True)
class DeepSpeedConfig:
    """How DeepSpeed wraps the backbone (the classifier shards are never inside the engine)."""

    zero_stage: int = 0
    """ZeRO stage of the backbone's optimiser state (0: plain data parallel; 1: optimiser states; 2: + gradients; 3: + parameters)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Backbone precision. fp16 uses dynamic loss scaling and needs ``device: cuda``."""
    loss_scale: float = 0.0
    """fp16 static loss scale; 0 means dynamic."""
    initial_scale_power: int = 16
    """fp16 dynamic loss scale starts at ``2 ** initial_scale_power``."""
    loss_scale_window: int = 1000
    """fp16: steps without overflow before the dynamic scale doubles."""
    hysteresis: int = 2
    """fp16: overflows tolerated before the scale is lowered."""
    min_loss_scale: float = 1.0
    """fp16: the dynamic scale never goes below this."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Raw keys merged into the generated DeepSpeed JSON config (an escape hatch; see docs/training.md)."""

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            _fail("deepspeed.zero_stage", "must be one of 0, 1, 2, 3", self.zero_stage)
        _check_choice("deepspeed.precision", self.precision, ("fp32", "bf16", "fp16"))
        _check_non_negative("deepspeed.loss_scale", self.loss_scale)
        _check_positive("deepspeed.loss_scale_window", self.loss_scale_window)
        _check_positive("deepspeed.hysteresis", self.hysteresis)
        _check_positive("deepspeed.min_loss_scale", self.min_loss_scale)
        _check_extra(self.extra)


_DEEPSPEED_OWNED: dict[str, str] = {
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "train_batch_size": "data.batch_size (times optim.grad_accum and the world size)",
    "gradient_accumulation_steps": "optim.grad_accum",
    "gradient_clipping": "optim.grad_clip",
    "optimizer": "optim.name: the trainer passes a torch optimizer (a DeepSpeed optimizer block JIT-builds "
                 "FusedAdam, ~75 s)",
    "scheduler": "schedule: the trainer sets both optimisers' learning rates every step",
    "bf16": "deepspeed.precision",
    "fp16": "deepspeed.precision and deepspeed.loss_scale / initial_scale_power / loss_scale_window / hysteresis / "
            "min_loss_scale",
    "amp": "deepspeed.precision",
    "zero_optimization.stage": "deepspeed.zero_stage",
    "data_types.buffer_dtype": "deepspeed.precision (bf16 keeps the BatchNorm buffers in bf16)",
}
"""Keys of the DeepSpeed JSON the trainer sets from its own fields: deepspeed.extra must not override them."""

_DEEPSPEED_UNSUPPORTED: dict[str, str] = {
    "zero_optimization.elastic_checkpoint": "every rank checkpoints and restores its own ZeRO partition "
                                            "(distrib_face.train.engine_state)",
}


def _check_extra(extra: Mapping[str, Any]) -> None:
    for dotted, owner in _DEEPSPEED_OWNED.items():
        found, value = _dig(extra, dotted)
        if found:
            raise ConfigError(f"deepspeed.extra.{dotted} is not allowed, got {value!r}: the trainer sets it from "
                              f"{owner}; set that instead")
    for dotted, why in _DEEPSPEED_UNSUPPORTED.items():
        found, value = _dig(extra, dotted)
        if found and value:
            raise ConfigError(f"deepspeed.extra.{dotted} is not supported, got {value!r}: {why}")


def _dig(tree: Mapping[str, Any], dotted: str) -> tuple[bool, Any]:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


@dataclass(kw_only=True)
class TrainConfig:
    """Length of the run, checkpoints, verification, logging and fault handling."""

    total_steps: int | None = None
    """Optimiser steps to train; exactly one of ``total_steps`` and ``epochs`` is set."""
    epochs: float | None = None
    """Epochs to train (converted to optimiser steps from the loader's length)."""
    seed: int = 0
    """Seed of the backbone initialisation, the classifier, the data order and the augmentations."""
    deterministic: bool = False
    """``torch.use_deterministic_algorithms(True)``: bit-reproducible runs on CPU, slower on GPU."""
    output_dir: str = "runs/default"
    """Folder for checkpoints, the final backbone, the ONNX export, plots and the DeepSpeed config."""
    checkpoint_every: int = 0
    """Write a checkpoint every this many optimiser steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """How many step checkpoints to keep (older ones are deleted; 0 keeps all)."""
    resume: Literal["auto", "never"] | str = "auto"
    """``auto``: continue from ``output_dir/checkpoints/latest`` when it exists; ``never``; or a checkpoint folder."""
    init_backbone: str | None = None
    """Fine-tuning: start the backbone from a ``backbone.pt`` (``save_backbone`` format) or one of our
    checkpoint folders; the classifier starts fresh. Ignored when resuming."""
    eval_every: int = 0
    """Run verification every this many optimiser steps (0: only before and after training)."""
    eval_pairsets: list[str] = field(default_factory=list)
    """Pair-set files (``.npz``, see ``distrib_face.data.pairset``) verified during training."""
    eval_batch_size: int = 64
    """Images per forward pass during verification."""
    eval_at_start: bool = True
    """Also verify the untrained (or initial) backbone, for a before / after comparison."""
    eval_class_size_edges: list[int] = field(default_factory=lambda: [10, 100])
    """Pair sets whose images name training identities are also verified per class-size bucket: tail (fewer
    than the first edge training images), torso, head (at least the second edge)."""
    log_every: int = 10
    """Log a progress line (and MLflow metrics) every this many optimiser steps."""
    max_bad_steps: int = 5
    """Abort after this many non-finite losses in a row (each is skipped and logged)."""
    max_steps_this_run: int | None = None
    """Stop (with a checkpoint) after this many optimiser steps in this process, without changing the schedule:
    for time-sliced jobs and resume tests."""
    export_onnx: bool = True
    """Export the final backbone to ONNX (and log it to MLflow)."""
    on_divergence: Literal["abort", "rollback"] = "abort"
    """What a non-finite training state found when a checkpoint is due does (the checkpoint is never written):
    ``abort`` raises ``NonFiniteStateError`` naming the tensors and the last good checkpoint (exit 1);
    ``rollback`` reloads the last good checkpoint, multiplies both learning rates by ``rollback_lr_factor``
    and trains on, at most ``max_rollbacks`` times."""
    rollback_lr_factor: float = 0.5
    """``on_divergence: rollback``: what multiplies the learning rates at each rollback, in (0, 1]."""
    max_rollbacks: int = 3
    """``on_divergence: rollback``: give up (abort) after this many rollbacks in one run."""

    def __post_init__(self) -> None:
        if (self.total_steps is None) == (self.epochs is None):
            raise ConfigError(
                f"exactly one of train.total_steps and train.epochs must be set, got total_steps={self.total_steps!r} "
                f"and epochs={self.epochs!r}"
            )
        if self.total_steps is not None:
            _check_positive("train.total_steps", self.total_steps)
        if self.epochs is not None:
            _check_positive("train.epochs", self.epochs)
        for name in ("checkpoint_every", "keep_checkpoints", "eval_every"):
            _check_non_negative(f"train.{name}", getattr(self, name))
        edges = list(self.eval_class_size_edges)
        if len(edges) != 2 or not 1 <= edges[0] < edges[1]:
            _fail("train.eval_class_size_edges", "must be two increasing counts >= 1", edges)
        for name in ("eval_batch_size", "log_every", "max_bad_steps"):
            _check_positive(f"train.{name}", getattr(self, name))
        if self.max_steps_this_run is not None:
            _check_positive("train.max_steps_this_run", self.max_steps_this_run)
        if not self.output_dir:
            _fail("train.output_dir", "must be a folder path", self.output_dir)
        if not self.resume:
            _fail("train.resume", "must be 'auto', 'never' or a checkpoint folder", self.resume)
        _check_choice("train.on_divergence", self.on_divergence, ("abort", "rollback"))
        if not 0.0 < self.rollback_lr_factor <= 1.0:
            _fail("train.rollback_lr_factor", "must be in (0, 1]", self.rollback_lr_factor)
        _check_non_negative("train.max_rollbacks", self.max_rollbacks)
        if self.on_divergence == "rollback" and self.max_rollbacks == 0:
            raise ConfigError("train.max_rollbacks must be > 0 when train.on_divergence is 'rollback', got 0 "
                              "(or set train.on_divergence: abort)")


@dataclass(kw_only=True)
class RayConfig:
    """Ray Train scaling (read by ``launch/ray_job.py``)."""

    num_workers: int = 2
    """Training workers (ranks)."""
    use_gpu: bool = False
    """One GPU per worker."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker."""
    storage_path: str | None = None
    """Where Ray persists checkpoints and results (``None``: ``<train.output_dir>/ray``)."""
    max_failures: int = 0
    """Worker-group restarts Ray attempts after a failure (-1: unlimited)."""
    address: str | None = None
    """Ray cluster to join (``None``: the one the job was submitted to, or a local one)."""

    def __post_init__(self) -> None:
        _check_positive("ray.num_workers", self.num_workers)
        _check_positive("ray.cpus_per_worker", self.cpus_per_worker)
        if self.max_failures < -1:
            _fail("ray.max_failures", "must be >= -1", self.max_failures)


@dataclass(kw_only=True)
class TrackingConfig:
    """MLflow tracking (rank 0 only)."""

    enabled: bool = True
    """Log the run to MLflow."""
    tracking_uri: str | None = None
    """MLflow tracking URI (``None``: ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlruns.db``)."""
    experiment: str = "distrib_face"
    """Experiment name."""
    run_name: str | None = None
    """Run name (``None``: MLflow picks one)."""
    run_id: str | None = None
    """Continue this run instead of starting one (a resumed checkpoint's run id takes precedence)."""
    artifact_location: str | None = None
    """Artifact location of a new experiment (``None``: ``<train.output_dir>/mlartifacts``)."""
    register_model: str | None = None
    """Register the exported ONNX model in the model registry under this name (``None``: do not register)."""


_SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "loss": LossConfig,
    "optim": OptimConfig,
    "schedule": ScheduleConfig,
    "deepspeed": DeepSpeedConfig,
    "train": TrainConfig,
    "ray": RayConfig,
    "tracking": TrackingConfig,
}


@dataclass(kw_only=True)
class Config:
    """The whole training configuration; :meth:`from_dict` / :meth:`to_dict` convert from / to plain dicts."""

    data: DataConfig
    """Training data."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Backbone."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Margin softmax and partial FC."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimisers."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate schedule."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """DeepSpeed engine of the backbone."""
    train: TrainConfig
    """Run length, checkpoints, verification."""
    ray: RayConfig = field(default_factory=RayConfig)
    """Ray Train scaling."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow."""
    device: Literal["cpu", "cuda"] = "cpu"
    """Where each rank computes: ``cpu``, or ``cuda`` (the rank's local GPU)."""

    def __post_init__(self) -> None:
        _check_finite_tree("", self.to_dict())  # also for sections built directly, not through from_dict
        _check_choice("device", self.device, ("cpu", "cuda"))
        if self.deepspeed.precision == "fp16" and self.device == "cpu":
            raise ConfigError(
                "deepspeed.precision must be 'fp32' or 'bf16' with device 'cpu', got 'fp16': DeepSpeed 0.19.8 "
                "refuses fp16 on CPU ('Type fp16 is not supported on your device'); use bf16 or fp32 there"
            )
        if self.loss.compute_dtype == "fp16" and self.device == "cpu":
            raise ConfigError("loss.compute_dtype must not be 'fp16' with device 'cpu', got 'fp16': use bf16 or fp32")
        if self.deepspeed.zero_stage == 3:
            raise ConfigError(
                "deepspeed.zero_stage must be 0, 1 or 2 for training, got 3: stage 3 partitions the backbone's "
                "parameters, which in-training verification and the consolidated backbone.pt read whole; the "
                "backbones here fit one device, so stage 2 gives the optimiser- and gradient-memory savings"
            )
        if self.optim.grad_accum > 1 and self.loss.sample_rate < 1.0:
            raise ConfigError(
                f"optim.grad_accum must be 1 when loss.sample_rate < 1, got {self.optim.grad_accum}: Partial FC samples "
                "new classifier rows every micro-batch, so their gradients cannot be accumulated; raise data.batch_size "
                "or use sample_rate 1.0"
            )
        if self.ray.use_gpu and self.device != "cuda":
            raise ConfigError(f"ray.use_gpu is true but device is {self.device!r}: set device: cuda to use the GPUs")

    # ---------------------------------------------------------------- conversion

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Config":
        """Build a validated config from a nested mapping (e.g. parsed YAML); unknown keys are refused."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"the config must be a mapping of sections, got {type(data).__name__}")
        unknown = sorted(set(data) - set(_SECTIONS) - {"device"})
        if unknown:
            raise ConfigError(
                f"unknown config section {unknown[0]!r} (known: {sorted([*_SECTIONS, 'device'])})"
            )
        for required in ("data", "train"):
            if required not in data:
                raise ConfigError(f"{required} section is required, got none")
        _check_finite_tree("", data)  # before the sections, whose range checks would let +inf pass
        kwargs: dict[str, Any] = {}
        for name, section_cls in _SECTIONS.items():
            if name in data:
                kwargs[name] = _build_section(section_cls, data[name], name)
        if "device" in data:
            kwargs["device"] = _coerce("device", data["device"], str)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain nested dicts / lists / scalars (YAML- and JSON-serialisable)."""
        out = {name: _to_plain(dataclasses.asdict(getattr(self, name))) for name in _SECTIONS}
        out["device"] = self.device
        return out

    def to_yaml(self) -> str:
        """The config as YAML text (``load_config`` reads it back to an equal config)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, overrides: Iterable[str]) -> "Config":
        """A new validated config with dotted ``key=value`` overrides applied."""
        return Config.from_dict(apply_overrides(self.to_dict(), overrides))


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _build_section(section_cls: type, data: Any, path: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(section_cls)
    fields = {f.name for f in dataclasses.fields(section_cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"unknown config key '{path}.{unknown[0]}' (known in {path}: {sorted(fields)})")
    kwargs = {key: _coerce(f"{path}.{key}", value, hints[key]) for key, value in data.items()}
    try:
        return section_cls(**kwargs)
    except TypeError as err:  # a required field is missing
        raise ConfigError(f"{path}: {err}") from err


def _coerce(path: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field annotation (ints widen to floats); raise ConfigError naming ``path``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(path, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"{path} must be {_describe(annotation)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path} must be one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} must be a list, got {value!r}")
        item_type = args[0] if args else Any
        items = [_coerce(f"{path}[{i}]", v, item_type) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path} must be a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path} must be a string, got {value!r}")
        return value
    return value


def _describe(annotation: Any) -> str:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    names = []
    for arg in args:
        if typing.get_origin(arg) is Literal:
            names.append(" or ".join(repr(v) for v in typing.get_args(arg)))
        else:
            names.append(getattr(arg, "__name__", str(arg)))
    optional = type(None) in typing.get_args(annotation)
    return " or ".join(names) + (" or null" if optional else "")


# -------------------------------------------------------------------- YAML and overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``"optim.lr=0.05"`` into ``(["optim", "lr"], 0.05)``; the value is parsed as a YAML scalar / list."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override must look like section.key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: the value is not valid YAML: {err}") from err
    return key.split("."), value


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply dotted ``key=value`` overrides to a nested dict (a copy); keys are checked later by ``from_dict``."""
    out = _to_plain(dict(data))
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(parts[: i + 1])} is not a section, it is {child!r}")
            node = child
        node[parts[-1]] = value
    return out


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> Config:
    """Read a YAML config, apply dotted overrides (``["optim.lr=0.05"]``) and validate it.

    Raises:
        ConfigError: the file is missing or not YAML, a key is unknown, or a value is invalid.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from err
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    try:
        return Config.from_dict(apply_overrides(data, overrides))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err

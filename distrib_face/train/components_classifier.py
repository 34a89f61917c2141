"""The class shard and its optimizer, built from the config: what the trainer's ``build_classifier`` calls.

:func:`classifier_kwargs` maps the ``loss`` section (and the process context) onto
:class:`~distrib_face.parallel.ShardedMarginClassifier`'s arguments, including the storage dtype
(``loss.weight_dtype``), host offload (``loss.offload``) and the equal-batch gathers the trainer's
``drop_last`` batches allow; :func:`build_classifier` returns the classifier and its
:class:`~distrib_face.parallel.optim.ShardOptimizer`.

Per step the trainer then calls (see docs/classifier.md, "In the training loop"):

- optionally ``classifier.prefetch(labels)`` as soon as the batch's labels are known, before the backbone's
  forward (samples the classes and, with offload, starts the host-to-device copy of their rows);
- ``loss = classifier(embeddings, labels)``, ``backward``, ``shard_optimizer.step()``, ``zero_grad()``;
- ``classifier.check_step_errors()`` where it already synchronises (every ``log_every`` steps and before a
  checkpoint): it raises on labels outside ``[0, num_classes)`` that reached the classifier.
"""

from __future__ import annotations

from typing import Any

from distrib_face.config import Config
from distrib_face.dtypes import parse_dtype


def classifier_kwargs(cfg: Config, ctx: Any, equal_batches: bool = True) -> dict[str, Any]:
    """Keyword arguments of ``ShardedMarginClassifier(num_classes, **kwargs)`` for this rank.

    Args:
        cfg: the validated config (its ``loss``, ``model.embedding_size`` and ``train.seed`` are read).
        ctx: the process context (``group``, ``device``, ``world_size``).
        equal_batches: every rank passes the same batch size each call (true for the trainer, whose loaders
            drop the last partial batch): the gathers then skip the size exchange and its host sync.
    """
    from distrib_face.losses.margins import create_margin

    loss = cfg.loss
    overrides = {
        key: getattr(loss, key)
        for key in ("scale", "angular_margin", "additive_margin", "multiplicative_margin")
        if getattr(loss, key) is not None
    }
    if loss.options:
        overrides["options"] = dict(loss.options)
    kwargs: dict[str, Any] = dict(
        embedding_size=cfg.model.embedding_size,
        margin=create_margin(loss.margin, **overrides),
        sample_rate=loss.sample_rate,
        group=ctx.group,
        dtype=parse_dtype(loss.weight_dtype, "loss.weight_dtype"),
        device=ctx.device,
        seed=cfg.train.seed,
        compute_dtype=parse_dtype(loss.compute_dtype, "loss.compute_dtype") if loss.compute_dtype else None,
        embedding_grad_scale=float(ctx.world_size),
        equal_batches=equal_batches,
        offload=loss.offload,
        kernel=loss.kernel,
        grad_filter=loss.grad_filter,
    )
    if loss.chunk_size is not None:
        kwargs["chunk_size"] = loss.chunk_size
    return kwargs


def build_classifier(cfg: Config, num_classes: int, ctx: Any, equal_batches: bool = True) -> tuple[Any, Any]:
    """This rank's class shard and its optimiser (peak learning rate set later by the schedule)."""
    from distrib_face.parallel import ShardedMarginClassifier
    from distrib_face.parallel.optim import ShardOptimizer

    classifier = ShardedMarginClassifier(num_classes, **classifier_kwargs(cfg, ctx, equal_batches))
    optimizer = ShardOptimizer(
        classifier, name=cfg.optim.name, lr=cfg.optim.lr, momentum=cfg.optim.momentum,
        weight_decay=cfg.optim.weight_decay, betas=cfg.optim.betas,
    )
    return classifier, optimizer

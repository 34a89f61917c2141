"""Verification during training, spread over the ranks.

Each rank embeds a contiguous slice of every pair set's pairs (flip test-time augmentation), the
embeddings are gathered in rank order with one ``all_gather_variable`` per set, and every rank computes
the same metrics from the whole set (cheap next to the embedding), so no rank waits on another's result.

The numbers equal ``distrib-face eval`` on the saved backbone at any world size. The one thing ranks do
not share is the backbone's buffers: BatchNorm's running mean and variance are updated by each rank from
its own micro-batches, and nothing averages them (DeepSpeed broadcasts rank 0's module only at start-up).
In eval mode those statistics *are* the model, and the backbone that is saved is rank 0's; so for the
duration of :func:`verify` every rank evaluates with rank 0's buffers (one broadcast per dtype) and gets
its own back afterwards, leaving training untouched.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from distrib_face.data.pairset import PairSet, load_pairset
from distrib_face.parallel import ProcessContext
from distrib_face.parallel.shard import even_split

logger = logging.getLogger(__name__)


def load_pairsets(paths: Sequence[str | os.PathLike]) -> list[PairSet]:
    """Read the configured pair-set files (``train.eval_pairsets``); names must be unique."""
    sets = [load_pairset(p) for p in paths]
    names = [s.name for s in sets]
    if len(set(names)) != len(names):
        raise ValueError(f"train.eval_pairsets: pair-set names must be unique, got {names} from {list(paths)}")
    return sets


@contextlib.contextmanager
def rank0_buffers(module: torch.nn.Module, ctx: ProcessContext) -> Iterator[None]:
    """Give ``module`` rank 0's buffers (BatchNorm running statistics) inside the block, its own after it.

    Collective: every rank enters it. Parameters are left alone (data parallelism keeps them identical).
    """
    from distrib_face.parallel.collectives import broadcast_tensors_

    buffers = [b for b in module.buffers()]
    if ctx.world_size == 1 or not buffers:
        yield
        return
    own = [b.detach().clone() for b in buffers]
    broadcast_tensors_(buffers, 0, ctx.group)
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, own):
                buffer.copy_(value)


def verify(
    module: torch.nn.Module,
    pairsets: Sequence[PairSet],
    ctx: ProcessContext,
    *,
    embedding_size: int,
    image_size: int,
    batch_size: int = 64,
    class_counts: Mapping[str, int] | None = None,
    class_size_edges: Sequence[int] = (10, 100),
) -> dict[str, Any]:
    """Verification results of ``module`` on each pair set (collective: every rank calls it).

    Args:
        module: the backbone (any dtype; left in its train / eval mode afterwards).
        pairsets: the sets to verify.
        ctx: the :class:`~distrib_face.parallel.ProcessContext`; ``ctx.group`` carries the gathers.
        embedding_size: output size of ``module`` (for ranks with no pairs to embed).
        image_size: side of the square inputs ``module`` expects.
        batch_size: images per forward pass.
        class_counts: ``{identity name: training images}`` (the training manifest's): sets whose images carry
            identity names (or counts of their own) also get ``result.class_sizes``, the accuracy per
            head / torso / tail bucket (:func:`distrib_face.eval.buckets.class_size_for_pairset`).
        class_size_edges: the bucket edges ``(tail below, head from)``.

    Returns:
        ``{set name: VerificationResult}``, identical on every rank, and equal to
        ``distrib_face.eval.evaluate_pairset`` on rank 0's module (the saved backbone) in one process.
    """
    from distrib_face.eval.buckets import class_size_for_pairset

    results = {}
    with rank0_buffers(module, ctx):
        for pairs in pairsets:
            result, everyone, complete = _verify_one(module, pairs, ctx, embedding_size, image_size, batch_size)
            # (the class-size split needs every pair: a set with undecodable images gets none, and says so)
            if complete and (pairs.identities is not None or pairs.image_counts is not None):
                result.class_sizes = class_size_for_pairset(pairs, everyone, class_counts, edges=class_size_edges)
            results[pairs.name] = result
    return results


def _verify_one(
    module: torch.nn.Module, pairs: PairSet, ctx: ProcessContext, embedding_size: int, image_size: int, batch_size: int
) -> tuple[Any, np.ndarray, bool]:
    """One pair set: this rank's slice embedded, every slice gathered in rank order; the metrics of the usable
    pairs, the gathered embeddings ``[2 N, D]``, and whether every pair was usable."""
    from distrib_face.eval import embed_images, verification_metrics
    from distrib_face.eval.embed import skipped_pairs_note, usable_pairs
    from distrib_face.parallel.collectives import all_gather_variable

    start, stop = even_split(pairs.num_pairs, ctx.rank, ctx.world_size)  # this rank's pairs
    images = pairs.images[2 * start:2 * stop]
    skipped: dict[int, str] = {}
    if images:
        local = embed_images(module, images, batch_size=batch_size, device=ctx.device, flip=True,
                             image_size=(image_size, image_size), skipped=skipped)  # [2 * (stop - start), D]
    else:
        local = np.zeros((0, embedding_size), np.float32)
    # One gather carries the embeddings and, in a last column, which images could not be decoded (their rows
    # are zeros; a NaN embedding of a decodable image means the model diverged, and stays NaN).
    bad = np.zeros((local.shape[0], 1), np.float32)
    bad[sorted(skipped)] = 1.0
    local = np.where(bad > 0, 0.0, local).astype(np.float32)
    gathered = all_gather_variable(torch.from_numpy(np.concatenate([local, bad], 1)).to(ctx.device), ctx.group)
    gathered = gathered.cpu().numpy()
    everyone, everyone_bad = gathered[:, :-1], np.flatnonzero(gathered[:, -1] > 0)  # [2 * N, D]
    if everyone.shape[0] != 2 * pairs.num_pairs:
        raise RuntimeError(f"pair set {pairs.name!r}: gathered {everyone.shape[0]} embeddings for {pairs.num_pairs} pairs")
    keep = usable_pairs(pairs.num_pairs, everyone_bad)
    if not keep.any():
        raise ValueError(f"pair set {pairs.name!r}: no pair has two decodable images")
    result = verification_metrics(
        everyone[0::2][keep], everyone[1::2][keep], np.asarray(pairs.issame)[keep],
        folds=None if pairs.folds is None else np.asarray(pairs.folds)[keep], name=pairs.name,
    )
    if len(everyone_bad):
        note = skipped_pairs_note(everyone.shape[0], {int(i): "unusable" for i in everyone_bad}, keep)
        logger.warning("pair set %s: %s", pairs.name, note)
        result.notes.append(note)
    return result, everyone, bool(keep.all())


def summarize(results: dict[str, Any], prefix: str = "verify") -> dict[str, float]:
    """Flat MLflow metrics of verification results: accuracy (mean, std), AUC, EER and TAR@FAR per set."""
    out: dict[str, float] = {}
    for name, result in results.items():
        if result.class_sizes is not None:
            out.update(result.class_sizes.summarize(prefix))
        d = result.to_dict()
        for key in ("accuracy", "accuracy_std", "auc", "eer"):
            if key in d and isinstance(d[key], (int, float)):
                out[f"{prefix}/{name}/{key}"] = float(d[key])
        for far, tar in (d.get("tar_at_far") or {}).items():
            if isinstance(tar, (int, float)) and np.isfinite(tar):
                out[f"{prefix}/{name}/tar_at_far_{far}"] = float(tar)
    return out

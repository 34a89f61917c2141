"""Verification during training, spread over the ranks.

Each rank embeds a contiguous slice of every pair set's pairs (flip test-time augmentation), the
embeddings are gathered in rank order with one ``all_gather_variable`` per set, and every rank computes
the same metrics from the whole set (cheap next to the embedding), so no rank waits on another's result.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import numpy as np
import torch

from distrib_face.data.pairset import PairSet, load_pairset

logger = logging.getLogger(__name__)


def load_pairsets(paths: Sequence[str | os.PathLike]) -> list[PairSet]:
    """Read the configured pair-set files (``train.eval_pairsets``); names must be unique."""
    sets = [load_pairset(p) for p in paths]
    names = [s.name for s in sets]
    if len(set(names)) != len(names):
        raise ValueError(f"train.eval_pairsets: pair-set names must be unique, got {names} from {list(paths)}")
    return sets


def pair_range(num_pairs: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous ``[start, stop)`` of pairs rank ``rank`` embeds (sizes differ by at most one)."""
    base, extra = divmod(num_pairs, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def verify(
    module: torch.nn.Module,
    pairsets: Sequence[PairSet],
    ctx: Any,
    *,
    embedding_size: int,
    image_size: int,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Verification results of ``module`` on each pair set (collective: every rank calls it).

    Args:
        module: the backbone (any dtype; left in its train / eval mode afterwards).
        pairsets: the sets to verify.
        ctx: the :class:`~distrib_face.parallel.ProcessContext`; ``ctx.group`` carries the gathers.
        embedding_size: output size of ``module`` (for ranks with no pairs to embed).
        image_size: side of the square inputs ``module`` expects.
        batch_size: images per forward pass.

    Returns:
        ``{set name: VerificationResult}``, identical on every rank.
    """
    from distrib_face.eval import embed_images, verification_metrics
    from distrib_face.eval.embed import skipped_pairs_note, usable_pairs
    from distrib_face.parallel.collectives import all_gather_variable

    results = {}
    for pairs in pairsets:
        start, stop = pair_range(pairs.num_pairs, ctx.rank, ctx.world_size)
        images = pairs.images[2 * start:2 * stop]
        skipped: dict[int, str] = {}
        if images:
            local = embed_images(module, images, batch_size=batch_size, device=ctx.device, flip=True,
                                 image_size=(image_size, image_size), skipped=skipped)
        else:
            local = np.zeros((0, embedding_size), np.float32)
        # one gather carries the embeddings and, in a last column, which images could not be decoded
        # (their rows are NaN; a NaN embedding of a decodable image means the model diverged and stays NaN)
        bad = np.zeros((local.shape[0], 1), np.float32)
        bad[sorted(skipped)] = 1.0
        local = np.where(bad > 0, 0.0, local).astype(np.float32)
        gathered = all_gather_variable(torch.from_numpy(np.concatenate([local, bad], 1)).to(ctx.device), ctx.group)
        gathered = gathered.cpu().numpy()
        everyone, everyone_bad = gathered[:, :-1], np.flatnonzero(gathered[:, -1] > 0)
        if everyone.shape[0] != 2 * pairs.num_pairs:
            raise RuntimeError(f"pair set {pairs.name!r}: gathered {everyone.shape[0]} embeddings for {pairs.num_pairs} pairs")
        keep = usable_pairs(pairs.num_pairs, everyone_bad)
        if not keep.any():
            raise ValueError(f"pair set {pairs.name!r}: no pair has two decodable images")
        results[pairs.name] = verification_metrics(
            everyone[0::2][keep], everyone[1::2][keep], np.asarray(pairs.issame)[keep],
            folds=None if pairs.folds is None else np.asarray(pairs.folds)[keep], name=pairs.name,
        )
        if len(everyone_bad):
            reasons = {int(i): "unusable" for i in everyone_bad}
            note = skipped_pairs_note(everyone.shape[0], reasons, keep)
            logger.warning("pair set %s: %s", pairs.name, note)
            results[pairs.name].notes.append(note)
    return results


def summarize(results: dict[str, Any], prefix: str = "verify") -> dict[str, float]:
    """Flat MLflow metrics of verification results: accuracy (mean, std), AUC, EER and TAR@FAR per set."""
    out: dict[str, float] = {}
    for name, result in results.items():
        d = result.to_dict()
        for key in ("accuracy", "accuracy_std", "auc", "eer"):
            if key in d and isinstance(d[key], (int, float)):
                out[f"{prefix}/{name}/{key}"] = float(d[key])
        for far, tar in (d.get("tar_at_far") or {}).items():
            if isinstance(tar, (int, float)) and np.isfinite(tar):
                out[f"{prefix}/{name}/tar_at_far_{far}"] = float(tar)
    return out

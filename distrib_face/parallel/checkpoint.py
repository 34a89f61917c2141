"""Classifier-shard checkpoints: one file per rank, loadable at any world size.

A shard file ``classifier-RRRRR-of-WWWWW.pt`` holds ``meta`` (num_classes, embedding_size,
num_subcenters, the class range, rank, world size, the margin spec, the storage dtype), the weight rows
``[C_r, K, D]`` in their storage dtype (float32 or bfloat16), the margin's state, the sampling step and,
optionally, the :class:`ShardOptimizer` state rows (same dtype). Files are written atomically (temp file,
fsync, rename) and read with ``torch.load(weights_only=True)``. A shard loads into a classifier of either
storage dtype (values are converted; bf16 -> fp32 is exact) and into an offloaded one (rows in host memory).

Because a class's rows carry their global class index implicitly (the class range), any set of shards
written by W ranks can be cut into W' shards: :func:`load_shard_from_dir` takes this rank's slice from
whichever files overlap it, and :func:`reshard` writes a new set (W' = 1 gives the whole matrix).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from distrib_face.atomic import atomic_open
from distrib_face.dtypes import short_name
from distrib_face.parallel.classifier import ShardedMarginClassifier
from distrib_face.parallel.optim import ShardOptimizer
from distrib_face.parallel.shard import class_range
from distrib_face.safe_load import UnsafeFileError, safe_torch_load

logger = logging.getLogger(__name__)

FORMAT = "distrib_face.classifier_shard"
VERSION = 1
_NAME = re.compile(r"^classifier-(\d{5})-of-(\d{5})\.pt$")


def shard_filename(rank: int, world_size: int) -> str:
    """File name of rank ``rank``'s shard in a world of ``world_size``."""
    return f"classifier-{rank:05d}-of-{world_size:05d}.pt"


def _atomic_torch_save(obj: Any, path: Path) -> None:
    with atomic_open(path) as handle:
        torch.save(obj, handle)


def _shard_payload(
    meta: dict[str, Any], weight: Tensor, margin_state: dict[str, Tensor], sample_step: int,
    optimizer: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "format": FORMAT, "version": VERSION, "meta": meta, "weight": weight,
        "margin_state": margin_state, "sample_step": sample_step, "optimizer": optimizer,
    }


def save_shard(directory: str | os.PathLike, classifier: ShardedMarginClassifier,
               optimizer: ShardOptimizer | None = None) -> Path:
    """Write this rank's shard (and its optimizer state) into ``directory``; returns the file path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    classifier.flush()  # offload: pending row updates land in host memory first
    start, stop = classifier.class_range
    meta = {
        "num_classes": classifier.num_classes,
        "embedding_size": classifier.embedding_size,
        "num_subcenters": classifier.num_subcenters,
        "class_start": start,
        "class_stop": stop,
        "rank": classifier.rank,
        "world_size": classifier.world_size,
        "margin": classifier.margin.spec.to_dict(),
        "seed": classifier.seed,
        "sample_rate": classifier.sample_rate,
        "weight_dtype": short_name(classifier.weight.dtype),
    }
    k, d = classifier.num_subcenters, classifier.weight.shape[1]  # d includes a bias column if the margin has one
    opt_state = None
    if optimizer is not None:
        state = optimizer.state_dict()
        opt_state = {
            "name": state["name"],
            "param_group": state["param_group"],
            "buffers": {n: b.detach().cpu().view(-1, k, d) for n, b in state["buffers"].items()},
            "row_steps": state["row_steps"].cpu(),
            "num_steps": int(state["num_steps"]),
        }
    path = directory / shard_filename(classifier.rank, classifier.world_size)
    payload = _shard_payload(
        meta, classifier.weight.detach().cpu().view(-1, k, d),
        {n: t.detach().cpu() for n, t in classifier.margin.state_dict().items()},
        int(classifier.sample_step), opt_state,
    )
    _atomic_torch_save(payload, path)
    return path


@dataclass
class _Source:
    path: Path
    meta: dict[str, Any]
    payload: dict[str, Any]


def _read(path: Path) -> dict[str, Any]:
    try:
        payload = safe_torch_load(path, mmap=True)
    except UnsafeFileError:
        raise  # its message names the file and what it asked for
    except Exception as err:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"{path}: not a readable classifier shard ({err})") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a distrib_face classifier shard file")
    if payload.get("version") != VERSION:
        raise ValueError(f"{path}: shard format version {payload.get('version')}, this code reads {VERSION}")
    return payload


def read_shards(directory: str | os.PathLike) -> list[_Source]:
    """Every shard file of ``directory`` (one complete set written by one world size), by rank."""
    directory = Path(directory)
    files = sorted(p for p in directory.iterdir() if _NAME.match(p.name)) if directory.is_dir() else []
    if not files:
        raise FileNotFoundError(f"{directory}: no classifier shard files (classifier-RRRRR-of-WWWWW.pt)")
    worlds = {int(_NAME.match(p.name).group(2)) for p in files}
    if len(worlds) != 1:
        raise ValueError(f"{directory}: shard files from several world sizes {sorted(worlds)}: keep one set per folder")
    world = worlds.pop()
    ranks = sorted(int(_NAME.match(p.name).group(1)) for p in files)
    if ranks != list(range(world)):
        missing = sorted(set(range(world)) - set(ranks))
        raise ValueError(f"{directory}: incomplete shard set of world size {world}, missing ranks {missing}")
    sources = []
    for path in files:
        payload = _read(path)
        sources.append(_Source(path, payload["meta"], payload))
    first = sources[0].meta
    for src in sources[1:]:
        for key in ("num_classes", "embedding_size", "num_subcenters"):
            if src.meta[key] != first[key]:
                raise ValueError(f"{src.path}: {key}={src.meta[key]} differs from {sources[0].path}: {first[key]}")
    return sources


def _check_fits(source: _Source, num_classes: int, embedding_size: int, num_subcenters: int) -> None:
    meta = source.meta
    for key, want in (("num_classes", num_classes), ("embedding_size", embedding_size),
                      ("num_subcenters", num_subcenters)):
        if meta[key] != want:
            raise ValueError(f"{source.path}: checkpoint has {key}={meta[key]}, the classifier has {key}={want}")


def _assemble(sources: list[_Source], start: int, stop: int, with_optimizer: bool) -> dict[str, Any]:
    """Rows ``[start, stop)`` (and optimizer rows) gathered from the overlapping source shards."""
    weights, buffers, row_steps, opt_name, opt_group, num_steps = [], {}, [], None, None, 0
    for src in sources:
        lo, hi = max(start, src.meta["class_start"]), min(stop, src.meta["class_stop"])
        if lo >= hi:
            continue
        a, b = lo - src.meta["class_start"], hi - src.meta["class_start"]
        weights.append(src.payload["weight"][a:b])
        if with_optimizer:
            opt = src.payload["optimizer"]
            if opt is None:
                raise ValueError(f"{src.path}: has no optimizer state to restore")
            opt_name, opt_group = opt["name"], opt["param_group"]
            num_steps = max(num_steps, int(opt.get("num_steps", 0)))
            for name, buf in opt["buffers"].items():
                buffers.setdefault(name, []).append(buf[a:b])
            row_steps.append(opt["row_steps"][a:b])
    out: dict[str, Any] = {"weight": torch.cat(weights)}
    if with_optimizer:
        out["optimizer"] = {
            "name": opt_name, "param_group": opt_group,
            "buffers": {n: torch.cat(parts) for n, parts in buffers.items()},
            "row_steps": torch.cat(row_steps),
            "num_steps": num_steps,
        }
    return out


def load_shard_from_dir(directory: str | os.PathLike, classifier: ShardedMarginClassifier,
                        optimizer: ShardOptimizer | None = None) -> None:
    """Load this rank's slice from a shard set written at any world size (resharding on the fly).

    Raises:
        ValueError: naming both values when the checkpoint's num_classes, embedding size or sub-centre
            count differs from the classifier's, or when the optimizer kinds differ.
    """
    sources = read_shards(directory)
    _check_fits(sources[0], classifier.num_classes, classifier.embedding_size, classifier.num_subcenters)
    start, stop = classifier.class_range
    part = _assemble(sources, start, stop, with_optimizer=optimizer is not None)
    weight = classifier.weight
    with torch.no_grad():
        weight.copy_(part["weight"].reshape(weight.shape).to(weight.dtype))
    classifier.margin.load_state_dict(sources[0].payload["margin_state"])
    # The sampling stream is part of the training state: a resumed run draws what the original would have.
    classifier.sample_step.fill_(int(sources[0].payload["sample_step"]))
    classifier.seed = int(sources[0].meta["seed"])
    if optimizer is not None:
        opt = part["optimizer"]
        optimizer.load_state_dict({
            "name": opt["name"], "param_group": opt["param_group"],
            "buffers": {n: b.reshape(weight.shape).to(weight.device, weight.dtype) for n, b in opt["buffers"].items()},
            "row_steps": opt["row_steps"].to(weight.device),
            "num_steps": opt["num_steps"],
        })
    logger.info("loaded classes [%d, %d) from %d shard file(s) in %s", start, stop, len(sources), directory)


def reshard(src_dir: str | os.PathLike, dst_dir: str | os.PathLike, world_size: int) -> list[Path]:
    """Rewrite the shard set in ``src_dir`` as ``world_size`` shards in ``dst_dir`` (1: the whole matrix).

    Weights, optimizer state and margin state carry over unchanged; only the class ranges move.
    """
    sources = read_shards(src_dir)
    meta0 = sources[0].meta
    with_optimizer = all(src.payload["optimizer"] is not None for src in sources)
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    stale = [p for p in dst.iterdir() if _NAME.match(p.name)]
    if stale:
        raise FileExistsError(f"{dst}: already holds shard files ({stale[0].name}, ...): use an empty folder")
    written = []
    for rank in range(world_size):
        start, stop = class_range(meta0["num_classes"], rank, world_size)
        part = _assemble(sources, start, stop, with_optimizer)
        meta = {**meta0, "class_start": start, "class_stop": stop, "rank": rank, "world_size": world_size}
        payload = _shard_payload(meta, part["weight"], sources[0].payload["margin_state"],
                                 int(sources[0].payload["sample_step"]), part.get("optimizer"))
        path = dst / shard_filename(rank, world_size)
        _atomic_torch_save(payload, path)
        written.append(path)
    return written


def load_full_matrix(directory: str | os.PathLike) -> Tensor:
    """The whole weight matrix ``[num_classes, K, D]`` of a shard set (for analysis or fine-tuning)."""
    sources = read_shards(directory)
    return _assemble(sources, 0, sources[0].meta["num_classes"], with_optimizer=False)["weight"]

"""Names that say what ran: the training data set's name and a default MLflow run name.

MLflow names an unnamed run at random (``overjoyed-slug-911``); twenty runs of a sweep then read alike.
The default here is ``<backbone>-<margin>-<data set>-<YYYYmmdd-HHMM>``, e.g.
``iresnet50-arcface-ms1mv3-20261201-0818``; ``tracking.run_name`` overrides it.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import PurePosixPath
from typing import Any

#: Folder and file stems that say nothing about a data set; the name is taken from the folder above.
GENERIC_NAMES = frozenset({
    "data", "dataset", "datasets", "shards", "shard", "train", "training", "wds", "webdataset", "tars", "tar",
    "images", "imgs", "out", "output", "manifest", "rec", "recordio", "packed",
})
_SUFFIXES = (".json", ".rec", ".idx", ".lst", ".txt", ".tar")


def _clean(name: str) -> str:
    """A name safe in run names and file names: letters, digits, ``.``, ``_`` and ``-``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_.-") or "data"


def _name_from_path(path: str) -> str | None:
    """The last meaningful component of a path or URL (``/data/ms1mv3/train.rec`` -> ``ms1mv3``)."""
    without_scheme = path.split("://", 1)[-1]
    for part in reversed(PurePosixPath(without_scheme.rstrip("/")).parts):
        stem = part
        for suffix in _SUFFIXES:
            if stem.lower().endswith(suffix):
                stem = stem[: -len(suffix)]
        if stem and stem != "/" and stem.lower() not in GENERIC_NAMES:
            return _clean(stem)
    return None


def dataset_name(manifest: Any = None, shards: str | None = None, source: str = "shards") -> str:
    """The training data set's short name.

    In this order: ``"random"`` for ``data.source: random``; the manifest's ``source["name"]``;
    ``"synthetic"`` for ``distrib-face synth`` shards; the meaningful end of the path the shards were packed
    from (``source["path"]``: ``/data/ms1mv3/train.rec`` -> ``ms1mv3``); the meaningful end of the shard
    folder or manifest location (``/data/shards/ms1mv3`` -> ``ms1mv3``; generic names such as ``shards``,
    ``data``, ``train`` are skipped); else ``"data"``.

    Args:
        manifest: the :class:`~distrib_face.data.manifest.Manifest`, when read.
        shards: ``data.shards`` (a folder, a manifest file or a URL).
        source: ``data.source``.
    """
    if source == "random":
        return "random"
    info = dict(getattr(manifest, "source", None) or {})
    if info.get("name"):
        return _clean(str(info["name"]))
    if info.get("kind") == "synthetic":
        return "synthetic"
    for candidate in (info.get("path"), shards, getattr(manifest, "location", None)):
        if candidate:
            name = _name_from_path(str(candidate))
            if name:
                return name
    return "data"


def default_run_name(backbone: str, margin: str, dataset: str, when: datetime | None = None) -> str:
    """``<backbone>-<margin>-<dataset>-<YYYYmmdd-HHMM>`` (local time), e.g. ``iresnet50-arcface-ms1mv3-20261201-0818``."""
    stamp = (when or datetime.now()).strftime("%Y%m%d-%H%M")
    return "-".join(_clean(str(part)) for part in (backbone, margin, dataset)) + f"-{stamp}"


def run_name_for(cfg: Any, manifest: Any = None, when: datetime | None = None) -> str:
    """The run name for a :class:`~distrib_face.config.Config`: ``tracking.run_name`` if set, else
    :func:`default_run_name` of ``model.backbone``, ``loss.margin`` and :func:`dataset_name`."""
    if cfg.tracking.run_name:
        return str(cfg.tracking.run_name)
    data = dataset_name(manifest, shards=cfg.data.shards, source=cfg.data.source)
    return default_run_name(cfg.model.backbone, cfg.loss.margin, data, when)

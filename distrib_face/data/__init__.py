"""distrib_face.data: packing to webdataset shards, reading them (DALI or PIL), long-tail sampling, synthetic data.

Public API (imported lazily, so ``import distrib_face.data.pairset`` does not pull in torch or DALI)::

    from distrib_face.data import read_manifest, build_loader, write_synthetic
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "Manifest": "distrib_face.data.manifest",
    "read_manifest": "distrib_face.data.manifest",
    "write_manifest": "distrib_face.data.manifest",
    "build_loader": "distrib_face.data.loader",
    "TrainLoader": "distrib_face.data.loader",
    "AugmentConfig": "distrib_face.data.augment",
    "write_synthetic": "distrib_face.data.synthetic",
    "pack": "distrib_face.data.pack",
    "PairSet": "distrib_face.data.pairset",
    "DataCounts": "distrib_face.data.quality",
    "DataQualityError": "distrib_face.data.quality",
    "DaliFallbackError": "distrib_face.data.quality",
    "WorkerError": "distrib_face.data.procs",
    "BadSample": "distrib_face.data.decode",
    "inspect_image": "distrib_face.data.decode",
    "decode_image": "distrib_face.data.decode",
    "verify_shards": "distrib_face.data.verify",
    "save_pairset": "distrib_face.data.pairset",
    "load_pairset": "distrib_face.data.pairset",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'distrib_face.data' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)

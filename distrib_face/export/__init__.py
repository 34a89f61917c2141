"""ONNX / TorchScript export of backbones and parity checks against PyTorch. See docs/export.md.

Names are loaded lazily (``distrib-face --help`` imports ``distrib_face.cli.export`` and must not pay
for torch / onnx): ``from distrib_face.export import export_onnx, check_parity`` works as usual.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "export_onnx": "exporter",
    "export_torchscript": "exporter",
    "load_for_export": "exporter",
    "resolve_backbone_file": "exporter",
    "prepare_for_export": "exporter",
    "ExportSourceError": "exporter",
    "INPUT_NAME": "exporter",
    "OUTPUT_NAME": "exporter",
    "INPUT_MEAN": "exporter",
    "INPUT_STD": "exporter",
    "DEFAULT_OPSET": "exporter",
    "insightface_routes": "exporter",
    "check_parity": "parity",
    "check_torchscript_parity": "parity",
    "preprocess": "parity",
    "load_image_folder": "parity",
    "onnx_embeddings": "parity",
    "torch_embeddings": "parity",
    "torchscript_embeddings": "parity",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"distrib_face.export.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'distrib_face.export' has no attribute {name!r}")

"""The backbone file: a trained backbone that can be rebuilt without the code that trained it.

One ``torch.save`` file holding only plain types and tensors, so it loads with
``torch.load(weights_only=True)`` (no arbitrary unpickling):

- ``name``: the registry name, e.g. ``"iresnet50"``;
- ``kwargs``: the keyword arguments given to ``create_backbone`` (``embedding_size``, ``input_size``, ...),
  plain values only (None, bool, int, float, str, and lists / tuples / dicts of them);
- ``state_dict``: the module's parameters and buffers (CPU tensors, in the dtype they were trained in);
- ``version``: the format version, 1.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from distrib_face.atomic import atomic_open
from distrib_face.models.registry import create_backbone, is_backbone, list_backbones
from distrib_face.safe_load import UnsafeFileError, safe_torch_load

FORMAT_VERSION = 1
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


class BackboneFileError(ValueError):
    """A backbone file that cannot be read or does not fit the backbone it names; the message names the file."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain backbone inside ``torch.compile``, DeepSpeed-engine or DDP wrappers."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(getattr(model, "module"), nn.Module):
            model = model.module
        else:
            return model


def _check_plain(value: Any, where: str) -> None:
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"backbone kwargs key {where}.{key!r} is not a string")
            _check_plain(item, f"{where}.{key}")
        return
    raise TypeError(
        f"backbone kwargs value {where} = {value!r} ({type(value).__name__}) is not a plain value "
        "(None, bool, int, float, str, or lists / dicts of them)"
    )


def save_backbone(path: str | os.PathLike, model: nn.Module, name: str, kwargs: Mapping[str, Any]) -> Path:
    """Write a backbone file atomically (a temp file in the same folder, then ``os.replace``).

    Args:
        path: destination file (its folder is created).
        model: the backbone, or a ``torch.compile`` / DeepSpeed / DDP wrapper of it.
        name: its registry name (``create_backbone(name, **kwargs)`` must rebuild it).
        kwargs: the keyword arguments it was created with.

    Returns:
        The path written.

    Raises:
        ValueError: if ``name`` is not a registered backbone.
        TypeError: if a kwargs value is not a plain value.
    """
    if not is_backbone(name):
        raise ValueError(f"cannot save backbone as {name!r}: not registered ({', '.join(list_backbones())})")
    kwargs = dict(kwargs)
    _check_plain(kwargs, "kwargs")
    state_dict = {k: v.detach().cpu() for k, v in unwrap_model(model).state_dict().items()}
    payload = {"name": name, "kwargs": kwargs, "state_dict": state_dict, "version": FORMAT_VERSION}
    path = Path(path)
    with atomic_open(path) as handle:
        torch.save(payload, handle)
    return path


def read_backbone_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a backbone file without building the model.

    Returns:
        ``{"name", "kwargs", "state_dict", "version"}`` with CPU tensors.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        BackboneFileError: if it is not a backbone file, or names an unknown backbone.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone file not found: {path}")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; the unpickler's complaint would be jargon
        raise BackboneFileError(
            f"{path}: not a backbone file (save_backbone writes a torch zip archive; an exported model is an .onnx)"
        )
    try:
        payload = safe_torch_load(path)
    except UnsafeFileError as exc:
        raise BackboneFileError(str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - the restricted unpickler raises many types on foreign files
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BackboneFileError(f"{path}: not a backbone file written by save_backbone ({first_line})") from exc
    if not isinstance(payload, dict) or not {"name", "kwargs", "state_dict"} <= set(payload):
        found = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise BackboneFileError(f"{path}: expected keys name, kwargs, state_dict; found {found}")
    if payload.get("version", FORMAT_VERSION) > FORMAT_VERSION:
        raise BackboneFileError(f"{path}: format version {payload['version']} is newer than {FORMAT_VERSION}")
    name = payload["name"]
    if not isinstance(name, str) or not is_backbone(name):
        raise BackboneFileError(
            f"{path}: unknown backbone name {name!r}; registered: {', '.join(list_backbones())}"
        )
    if not isinstance(payload["kwargs"], dict) or not isinstance(payload["state_dict"], dict):
        raise BackboneFileError(f"{path}: kwargs and state_dict must be dicts")
    return payload


def load_backbone(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a backbone from a file written by :func:`save_backbone`.

    Args:
        path: the backbone file.
        map_location: device for the returned model.

    Returns:
        The backbone with its weights, in eval mode (call ``.train()`` to fine-tune it).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        BackboneFileError: if the file is not a backbone file, names an unknown backbone, its kwargs do
            not build it, or its state dict does not fit (missing / unexpected keys, wrong shapes).
    """
    payload = read_backbone_file(path)
    name, kwargs = payload["name"], payload["kwargs"]
    try:
        model = create_backbone(name, **kwargs)
    except (TypeError, ValueError) as exc:
        raise BackboneFileError(f"{path}: kwargs {kwargs} do not build backbone {name!r} ({exc})") from exc
    state_dict = _strip_wrapper_prefix(payload["state_dict"])
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise BackboneFileError(f"{path}: state dict does not fit backbone {name!r} with {kwargs}: {exc}") from exc
    return model.to(map_location).eval()


def _strip_wrapper_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # State dicts taken from a compiled or DeepSpeed-wrapped module carry a prefix on every key.
    for prefix in _WRAPPER_PREFIXES:
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict

"""Parity checks: an exported model against the PyTorch backbone it came from, on the same images."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from distrib_face.export.exporter import INPUT_MEAN, INPUT_STD, input_size_of, prepare_for_export

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".webp")


def preprocess(images: np.ndarray | torch.Tensor, input_size: int = 112) -> np.ndarray:
    """Images to the exported models' input: float32 ``[N, 3, S, S]`` RGB, ``(x - 127.5) / 127.5``.

    Args:
        images: uint8 ``[N, H, W, 3]`` RGB or ``[N, H, W]`` grey (resized to ``input_size`` with
            bilinear filtering when ``H, W`` differ from it), or float ``[N, 3, S, S]`` already normalised
            (returned as float32).
        input_size: image side.

    Returns:
        float32 array ``[N, 3, input_size, input_size]``.

    Raises:
        ValueError: on an unexpected shape or dtype.
    """
    array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if array.dtype != np.uint8:
        if array.ndim != 4 or array.shape[1] != 3:
            raise ValueError(f"float images must be [N, 3, S, S] normalised, got shape {array.shape}")
        return np.ascontiguousarray(array, dtype=np.float32)
    if array.ndim == 3:
        array = np.repeat(array[..., None], 3, axis=3)  # grey -> RGB
    if array.ndim != 4 or array.shape[3] != 3:
        raise ValueError(f"uint8 images must be [N, H, W, 3] RGB or [N, H, W] grey, got shape {array.shape}")
    if array.shape[1:3] != (input_size, input_size):
        from PIL import Image

        array = np.stack(
            [np.asarray(Image.fromarray(img).resize((input_size, input_size), Image.BILINEAR)) for img in array]
        )
    blob = (array.astype(np.float32) - INPUT_MEAN) / INPUT_STD
    return np.ascontiguousarray(blob.transpose(0, 3, 1, 2))


def load_image_folder(folder: str | os.PathLike, limit: int | None = None) -> np.ndarray:
    """Read images under ``folder`` (recursively, sorted by path) as uint8 RGB ``[N, H, W, 3]``.

    All images must share one size; grey images are converted to RGB.

    Raises:
        FileNotFoundError: if the folder holds no image.
        ValueError: if the images differ in size (the message names the first that differs).
    """
    from PIL import Image

    folder = Path(folder)
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if limit is not None:
        paths = paths[:limit]
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    images = []
    for path in paths:
        with Image.open(path) as img:
            images.append(np.asarray(img.convert("RGB")))
        if images[-1].shape != images[0].shape:
            raise ValueError(f"{path}: size {images[-1].shape} differs from {paths[0]}'s {images[0].shape}")
    return np.stack(images)


def torch_embeddings(model: nn.Module, blob: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Embeddings of a preprocessed ``blob`` by an fp32 CPU eval copy of ``model``."""
    model = prepare_for_export(model)
    outputs = []
    with torch.no_grad():
        for start in range(0, len(blob), batch_size):
            outputs.append(model(torch.from_numpy(blob[start : start + batch_size])).numpy())
    return np.concatenate(outputs)


def onnx_embeddings(onnx_path: str | os.PathLike, blob: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Embeddings of a preprocessed ``blob`` by ONNX Runtime (CPU) on ``onnx_path``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    outputs = [
        session.run(None, {input_name: blob[start : start + batch_size]})[0]
        for start in range(0, len(blob), batch_size)
    ]
    return np.concatenate(outputs)


def torchscript_embeddings(path: str | os.PathLike, blob: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Embeddings of a preprocessed ``blob`` by the TorchScript module at ``path``."""
    module = torch.jit.load(str(path), map_location="cpu").eval()
    outputs = []
    with torch.no_grad():
        for start in range(0, len(blob), batch_size):
            outputs.append(module(torch.from_numpy(blob[start : start + batch_size])).numpy())
    return np.concatenate(outputs)


def _max_abs_diff(reference: np.ndarray, other: np.ndarray, what: str) -> float:
    if reference.shape != other.shape:
        raise ValueError(f"{what}: output shape {other.shape} differs from PyTorch's {reference.shape}")
    return float(np.max(np.abs(reference.astype(np.float64) - other.astype(np.float64))))


def check_parity(
    torch_model: nn.Module, onnx_path: str | os.PathLike, images: np.ndarray | torch.Tensor, batch_size: int = 32
) -> float:
    """Largest absolute difference between ONNX Runtime and PyTorch embeddings of the same images.

    Args:
        torch_model: the backbone that was exported (evaluated as an fp32 CPU eval copy).
        onnx_path: the exported ``.onnx`` file.
        images: see :func:`preprocess` (uint8 RGB / grey faces, or a normalised float batch).
        batch_size: images per run (ONNX batches of other sizes than the export's exercise the dynamic axis).

    Returns:
        ``max |onnx - torch|`` over all images and embedding dimensions.
    """
    blob = preprocess(images, input_size_of(torch_model))
    diff = _max_abs_diff(
        torch_embeddings(torch_model, blob, batch_size), onnx_embeddings(onnx_path, blob, batch_size), str(onnx_path)
    )
    logger.info("ONNX parity on %d images: max |diff| = %.3g", len(blob), diff)
    return diff


def check_torchscript_parity(
    torch_model: nn.Module, script_path: str | os.PathLike, images: np.ndarray | torch.Tensor, batch_size: int = 32
) -> float:
    """Largest absolute difference between the TorchScript module and PyTorch on the same images."""
    blob = preprocess(images, input_size_of(torch_model))
    diff = _max_abs_diff(
        torch_embeddings(torch_model, blob, batch_size),
        torchscript_embeddings(script_path, blob, batch_size),
        str(script_path),
    )
    logger.info("TorchScript parity on %d images: max |diff| = %.3g", len(blob), diff)
    return diff


def random_face_like_images(num: int, input_size: int = 112, seed: int = 0) -> np.ndarray:
    """uint8 ``[num, S, S, 3]`` smooth random images, for a parity check when no real faces are given."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(num, 8, 8, 3), dtype=np.uint8)
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(c).resize((input_size, input_size), Image.BICUBIC)) for c in coarse])


__all__: Sequence[str] = [
    "check_parity",
    "check_torchscript_parity",
    "load_image_folder",
    "onnx_embeddings",
    "preprocess",
    "random_face_like_images",
    "torch_embeddings",
    "torchscript_embeddings",
]

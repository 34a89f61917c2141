"""ONNX and TorchScript export of a backbone, and where a backbone to export comes from.

The exported model's contract (the one insightface's recognition models follow):

- input ``"input"``: float32 ``[N, 3, S, S]`` (``S`` = 112 unless the backbone was built for another
  size), RGB, normalised as ``(x - 127.5) / 127.5``; ``N`` is dynamic;
- output ``"embedding"``: float32 ``[N, embedding_size]`` (512 by default), not L2-normalised.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from distrib_face.atomic import atomic_path
from distrib_face.models.io import BackboneFileError, load_backbone, read_backbone_file

if TYPE_CHECKING:  # onnx is imported where it is used (an optional import at run time)
    import onnx

logger = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "embedding"
INPUT_MEAN = 127.5
INPUT_STD = 127.5
DEFAULT_OPSET = 17
BACKBONE_FILENAME = "backbone.pt"


class ExportSourceError(FileNotFoundError):
    """The ``--checkpoint`` path holds no backbone to export; the message names the path and what was tried."""


def resolve_backbone_file(path: str | os.PathLike) -> Path:
    """Find the backbone file for a ``--checkpoint`` argument.

    Accepted, in this order:

    - a backbone file written by ``distrib_face.models.save_backbone``;
    - a checkpoint directory holding ``backbone.pt``;
    - a training output directory whose ``latest`` file names a checkpoint sub-directory holding
      ``backbone.pt`` (the trainer's layout: the pointer is written atomically after the checkpoint).

    Raises:
        ExportSourceError: if none of these applies.
    """
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise ExportSourceError(f"checkpoint path does not exist: {path}")
    direct = path / BACKBONE_FILENAME
    if direct.is_file():
        return direct
    latest = path / "latest"
    if latest.is_file():
        target = path / latest.read_text().strip()
        if (target / BACKBONE_FILENAME).is_file():
            return target / BACKBONE_FILENAME
        raise ExportSourceError(f"{latest} points to {target}, which holds no {BACKBONE_FILENAME}")
    raise ExportSourceError(
        f"{path} is a directory without {BACKBONE_FILENAME} or a 'latest' pointer to a checkpoint holding one"
    )


def load_for_export(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """Load the backbone a ``--checkpoint`` argument refers to, ready to export.

    Returns:
        ``(model, info)``: the model in eval mode, fp32, on the CPU; ``info`` holds ``name``, ``kwargs``,
        ``input_size`` and ``source`` (the backbone file).

    Raises:
        ExportSourceError: if no backbone file is found.
        BackboneFileError: if the file cannot be read or does not fit its backbone.
    """
    backbone_file = resolve_backbone_file(path)
    header = read_backbone_file(backbone_file)
    model = prepare_for_export(load_backbone(backbone_file))
    info = {
        "name": header["name"],
        "kwargs": header["kwargs"],
        "input_size": input_size_of(model),
        "source": str(backbone_file),
    }
    return model, info


def input_size_of(model: nn.Module) -> int:
    """The image side a backbone was built for (its ``input_size`` attribute, 112 when absent)."""
    return int(getattr(model, "input_size", 112))


def prepare_for_export(model: nn.Module) -> nn.Module:
    """A CPU, fp32, contiguous-format, eval-mode copy of ``model`` (the original is left untouched)."""
    from distrib_face.models.io import unwrap_model

    model = copy.deepcopy(unwrap_model(model)).cpu().float()
    model = model.to(memory_format=torch.contiguous_format)
    for module in model.modules():  # training-only switches must not reach the traced graph
        if hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = False
    return model.eval()


def insightface_routes(size: int) -> bool:
    """Whether insightface's model zoo loads a one-input ``size x size`` ONNX model as a recognition model.

    ``insightface.model_zoo.get_model`` routes by input shape (``ModelRouter.get_model`` in
    python-package/insightface/model_zoo/model_zoo.py): 192 x 192 goes to ``Landmark``, 96 x 96 to
    ``Attribute``, and only a square input of side >= 112 divisible by 16 to ``ArcFaceONNX``; anything else
    returns ``None``.
    """
    return size >= 112 and size % 16 == 0 and size != 192


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    input_size: int | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Export ``model`` to ONNX with a dynamic batch axis, written atomically.

    Uses the TorchScript-based exporter (``dynamo=False``): it needs no extra packages and folds
    BatchNorm into the preceding convolutions. The graph is checked with ``onnx.checker``, and the
    preprocessing contract is recorded in the model's metadata (``input_mean``, ``input_std``,
    ``color_order``, plus ``metadata``).

    Args:
        model: the backbone (any device / dtype / wrapper; an fp32 CPU eval copy is exported).
        path: output ``.onnx`` file.
        opset: ONNX opset version (>= 14, for the attention of the ViT).
        input_size: image side; default: the backbone's own ``input_size`` (112).
        metadata: extra string key / values for the model's ``metadata_props``.

    Returns:
        The path written.

    Raises:
        ValueError: if ``opset`` is below 14.
    """
    import onnx

    if opset < 14:
        raise ValueError(f"ONNX opset {opset} is too old: 14 or newer is needed")
    path = Path(path)
    model = prepare_for_export(model)
    size = input_size or input_size_of(model)
    example = torch.zeros(2, 3, size, size)
    with atomic_path(path) as target:
        with warnings.catch_warnings():
            # The TorchScript-based exporter is deprecated in favour of the dynamo one, which needs onnxscript.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model,
                (example,),
                str(target),
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=opset,
                do_constant_folding=True,
            )
        proto = onnx.load(str(target))
        props = {"input_mean": str(INPUT_MEAN), "input_std": str(INPUT_STD), "color_order": "RGB"}
        props.update(metadata or {})
        for key, value in props.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, str(value)
        proto.producer_name = "distrib_face"
        _warn_if_insightface_misreads(proto, path)
        if not insightface_routes(size):
            logger.warning(
                "%s: insightface's model zoo will not load this %dx%d model as a recognition model "
                "(get_model routes square inputs >= 112 px, divisible by 16, other than 192; train at 112 for that)",
                path, size, size,
            )
        onnx.checker.check_model(proto)
        onnx.save(proto, str(target))
    logger.info("exported ONNX (opset %d, input %dx%d, dynamic batch) to %s", opset, size, size, path)
    return path


def _warn_if_insightface_misreads(proto: onnx.ModelProto, path: Path) -> None:
    # insightface's ArcFaceONNX takes a graph whose first eight nodes include both a Sub* / _minus* and a
    # Mul* / _mul* node for an MXNet model that normalises internally, and then feeds raw 0..255 pixels.
    names = [node.name for node in proto.graph.node[:8]]
    has_sub = any(n.startswith(("Sub", "_minus")) for n in names)
    has_mul = any(n.startswith(("Mul", "_mul")) for n in names)
    if has_sub and has_mul:
        logger.warning(
            "%s: the first graph nodes %s look like in-graph normalisation to insightface, which would feed "
            "unnormalised pixels", path, names,
        )


def export_torchscript(model: nn.Module, path: str | os.PathLike, *, input_size: int | None = None) -> Path:
    """Export ``model`` as a traced TorchScript module (``torch.jit.load``-able), written atomically.

    Args:
        model: the backbone (an fp32 CPU eval copy is traced).
        path: output file (``.pt``).
        input_size: image side of the example input; default: the backbone's own.

    Returns:
        The path written.
    """
    path = Path(path)
    model = prepare_for_export(model)
    size = input_size or input_size_of(model)
    example = torch.zeros(2, 3, size, size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(model, example, check_trace=False)
        traced = torch.jit.freeze(traced)
    with atomic_path(path) as target:
        torch.jit.save(traced, str(target))
    logger.info("exported TorchScript (input %dx%d) to %s", size, size, path)
    return path


__all__ = [
    "BACKBONE_FILENAME",
    "BackboneFileError",
    "DEFAULT_OPSET",
    "ExportSourceError",
    "INPUT_MEAN",
    "INPUT_NAME",
    "INPUT_STD",
    "OUTPUT_NAME",
    "export_onnx",
    "export_torchscript",
    "input_size_of",
    "load_for_export",
    "prepare_for_export",
    "resolve_backbone_file",
]

"""Images to embeddings: decoding, preprocessing, flip test-time augmentation, and model loading.

A model is either a torch ``nn.Module`` (our backbones, on whatever device it lives) or an ONNX file run by
ONNX Runtime on the CPU provider. Both take float [N, 3, H, W] RGB normalised as (x - 127.5) / 127.5.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from distrib_face.data.decode import DEFAULT_MAX_IMAGE_PIXELS, BadSample, decode_image, resize_rgb
from distrib_face.data.pairset import PairSet
from distrib_face.eval.metrics import DEFAULT_FAR_TARGETS, VerificationResult, verification_metrics

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DEFAULT_IMAGE_SIZE: tuple[int, int] = (112, 112)  # (height, width)


class OnnxEmbedder:
    """An ONNX face-embedding model run by ONNX Runtime (CPU provider unless told otherwise).

    Args:
        path: the ``.onnx`` file; one input [N, 3, H, W], the first output is the embedding.
        providers: ONNX Runtime execution providers.
        num_threads: intra-op threads (0 lets ONNX Runtime choose).
    """

    def __init__(
        self, path: str | os.PathLike, providers: Sequence[str] = ("CPUExecutionProvider",), num_threads: int = 0
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
        except Exception as err:  # onnxruntime raises its own untyped errors
            raise ValueError(f"{path}: cannot load ONNX model: {err}") from err
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise ValueError(f"{path}: expected one [N, 3, H, W] input, got {[(i.name, i.shape) for i in inputs]}")
        self.input_name = inputs[0].name
        height, width = inputs[0].shape[2:]
        self.input_size = (
            (int(height), int(width)) if isinstance(height, int) and isinstance(width, int) else DEFAULT_IMAGE_SIZE
        )
        self.fixed_batch = inputs[0].shape[0] if isinstance(inputs[0].shape[0], int) else None
        self.path = Path(path)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Embeddings [N, D] (float32) of a float32 [N, 3, H, W] batch."""
        if self.fixed_batch is not None and batch.shape[0] != self.fixed_batch:
            # a static-batch export: run it one fixed-size slice at a time, padding the last one
            outputs = []
            for start in range(0, batch.shape[0], self.fixed_batch):
                part = batch[start:start + self.fixed_batch]
                pad = self.fixed_batch - part.shape[0]
                if pad:
                    part = np.concatenate([part, np.zeros((pad, *part.shape[1:]), part.dtype)])
                outputs.append(self.session.run(None, {self.input_name: part})[0][: self.fixed_batch - pad])
            return np.concatenate(outputs).astype(np.float32)
        return np.asarray(self.session.run(None, {self.input_name: batch})[0], dtype=np.float32)


class TorchEmbedder:
    """A torch backbone evaluated in eval mode without gradients; its train/eval mode is restored afterwards.

    Args:
        module: maps float [N, 3, H, W] to [N, D].
        device: where inputs go; ``None`` means the device of the module's first parameter.
        input_size: (height, width) the module expects; default: the module's ``input_size`` attribute
            (our backbones have one), else 112 x 112.
    """

    def __init__(
        self,
        module: "torch.nn.Module",
        device: "str | torch.device | None" = None,
        input_size: tuple[int, int] | None = None,
    ) -> None:
        import torch

        self.module = module
        first = next(module.parameters(), None)
        self.device = torch.device(device) if device is not None else (first.device if first is not None else "cpu")
        self.dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
        if input_size is None:
            side = getattr(module, "input_size", None)
            input_size = (side, side) if isinstance(side, int) else tuple(side) if side else DEFAULT_IMAGE_SIZE
        self.input_size = input_size

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Embeddings [N, D] (float32) of a float32 [N, 3, H, W] batch."""
        import torch

        was_training = self.module.training
        self.module.eval()
        try:
            with torch.inference_mode():
                x = torch.from_numpy(batch).to(device=self.device, dtype=self.dtype)
                out = self.module(x)
                if isinstance(out, (tuple, list)):
                    out = out[0]
                return out.float().cpu().numpy()
        finally:
            self.module.train(was_training)


Embedder = Callable[[np.ndarray], np.ndarray]


def load_model(path: str | os.PathLike, device: str = "cpu", num_threads: int = 0) -> OnnxEmbedder | TorchEmbedder:
    """Load a model for evaluation from a file.

    Args:
        path: an ``.onnx`` file (ONNX Runtime, CPU provider); a backbone file written by
            ``distrib_face.models.save_backbone``; a checkpoint folder holding ``backbone.pt``; or a
            checkpoints folder (or training output folder) whose ``latest`` file names such a checkpoint.
        device: torch device for a backbone (ONNX always runs on the CPU provider here).
        num_threads: ONNX Runtime intra-op threads (0: its default).

    Raises:
        FileNotFoundError: nothing at ``path``, or a folder without a backbone (the message says what was tried).
        ValueError: a file that is neither ONNX nor a backbone file (``BackboneFileError``).
    """
    path = Path(path)
    if path.is_dir():
        path = _backbone_in_folder(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file")
    if path.suffix == ".onnx":
        return OnnxEmbedder(path, num_threads=num_threads)
    from distrib_face.models import load_backbone

    module = load_backbone(path, map_location=device)
    return TorchEmbedder(module, device=device)


def _backbone_in_folder(folder: Path) -> Path:
    """``backbone.pt`` of a checkpoint folder, of ``<folder>/latest``'s checkpoint, or of ``checkpoints/latest``."""
    if (folder / "backbone.pt").is_file():
        return folder / "backbone.pt"
    for root in (folder, folder / "checkpoints"):
        latest = root / "latest"
        if latest.is_file():
            target = root / latest.read_text().strip()
            if (target / "backbone.pt").is_file():
                return target / "backbone.pt"
            raise FileNotFoundError(f"{latest} names {target}, which holds no backbone.pt")
    raise FileNotFoundError(
        f"{folder}: a folder given as a model must hold backbone.pt (a checkpoint) or a 'latest' pointer to one "
        "(a checkpoints folder)"
    )


def as_embedder(model: Any, device: "str | torch.device | None" = None) -> OnnxEmbedder | TorchEmbedder | Embedder:
    """Wrap ``model`` (an ``nn.Module``, an ONNX Runtime session, a path, or a callable on arrays) as an embedder."""
    if isinstance(model, (OnnxEmbedder, TorchEmbedder)):
        return model
    if isinstance(model, (str, os.PathLike)):
        return load_model(model, device=str(device or "cpu"))
    import torch

    if isinstance(model, torch.nn.Module):
        return TorchEmbedder(model, device=device)
    if type(model).__name__ == "InferenceSession":
        wrapper = OnnxEmbedder.__new__(OnnxEmbedder)
        wrapper.session = model
        wrapper.input_name = model.get_inputs()[0].name
        shape = model.get_inputs()[0].shape
        wrapper.input_size = (shape[2], shape[3]) if all(isinstance(s, int) for s in shape[2:]) else DEFAULT_IMAGE_SIZE
        wrapper.fixed_batch = shape[0] if isinstance(shape[0], int) else None
        wrapper.path = Path("<session>")
        return wrapper
    if callable(model):
        return model
    raise TypeError(f"cannot evaluate a {type(model).__name__}: pass an nn.Module, an ONNX session or a model path")


def decode_rgb(data: bytes, size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
               max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode one encoded image to uint8 [H, W, 3] RGB at ``size`` = (height, width), as :func:`preprocess` does.

    The data side's safe decoder (:func:`distrib_face.data.decode.decode_image`: header checked before any
    decoding, grey / CMYK / RGBA / 16-bit converted), then a bilinear resize. ``distrib-face embed`` runs it in
    its reader processes, so its embeddings equal ``embed_images`` on the same bytes.

    Raises:
        BadSample: the image cannot be used (``reason``: too_large, not_an_image, truncated, undecodable).
    """
    return np.asarray(resize_rgb(decode_image(bytes(data), max_pixels=max_image_pixels), size))


def preprocess(
    images: Sequence[bytes] | np.ndarray,
    size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
    *,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    skipped: dict[int, str] | None = None,
    offset: int = 0,
) -> np.ndarray:
    """Decode and normalise images to float32 [N, 3, H, W] RGB in [-1, 1] as (x - 127.5) / 127.5.

    Encoded images go through the data side's safe decoder (:mod:`distrib_face.data.decode`): the header's
    pixel count is checked before anything is decoded, and grey, palette, CMYK, RGBA and 16-bit images are
    converted to 8-bit RGB.

    Args:
        images: encoded images (JPEG, PNG, WebP, BMP, PPM, TIFF, GIF) or a uint8 array [N, H, W, 3]
            (or [N, H, W] grey).
        size: (height, width); images of another size are resized bilinearly.
        max_image_pixels: largest ``width * height`` a header may claim.
        skipped: if given, an image that cannot be used becomes a row of zeros and ``skipped[offset + i]``
            gets its reason (``too_large``, ``not_an_image``, ``truncated``, ``undecodable``); if None, it
            raises.
        offset: index of ``images[0]`` in the caller's list (for ``skipped`` and messages).

    Raises:
        ValueError: an image cannot be used and ``skipped`` is None (the message names its index and reason).
    """
    height, width = size
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError(f"image array must be uint8 [N, H, W, 3] or [N, H, W]: got {images.dtype} {images.shape}")
        arrays = images if images.ndim == 4 else np.repeat(images[..., None], 3, axis=-1)
        if arrays.shape[-1] != 3:
            raise ValueError(f"image array must have 3 channels last: got shape {images.shape}")
        if arrays.shape[1:3] != (height, width):
            arrays = np.stack([np.asarray(Image.fromarray(a).resize((width, height), Image.BILINEAR)) for a in arrays])
    else:
        decoded = []
        for i, data in enumerate(images):
            try:
                decoded.append(decode_rgb(data, (height, width), max_image_pixels))
            except BadSample as bad:
                if skipped is None:
                    raise ValueError(f"image {offset + i}: cannot decode {len(data)} bytes: {bad}") from bad
                skipped[offset + i] = bad.reason
                logger.warning("image %d cannot be used: %s", offset + i, bad)
                decoded.append(np.zeros((height, width, 3), np.uint8))
        arrays = np.stack(decoded) if decoded else np.zeros((0, height, width, 3), np.uint8)
    x = (arrays.astype(np.float32) - 127.5) / 127.5
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))  # [N, 3, H, W]


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def embed_images(
    model: Any,
    images: Sequence[bytes] | np.ndarray,
    batch_size: int = 64,
    device: "str | torch.device | None" = None,
    flip: bool = True,
    image_size: tuple[int, int] | None = None,
    skipped: dict[int, str] | None = None,
) -> np.ndarray:
    """Embed images in batches.

    Args:
        model: an ``nn.Module`` (left on its device; its train/eval mode is restored), an ONNX Runtime
            session, a model path (see :func:`load_model`) or a callable mapping float32 [N, 3, H, W] to [N, D].
        images: encoded images or a uint8 array [N, H, W, 3].
        batch_size: images per forward pass (the flipped copies ride in the same pass).
        device: torch device for the inputs; ``None`` means the module's own device.
        flip: test-time augmentation: the embedding is ``f(image) + f(mirror(image))``.
        image_size: (height, width) the model expects; default: the ONNX input size, else 112 x 112.
        skipped: if given, an image that cannot be decoded does not raise: its index gets its reason here
            and its embedding row is NaN (so a caller that forgets to drop it sees NaN, never a made-up
            number).

    Returns:
        float32 [N, D] raw (unnormalised) embeddings.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1: got {batch_size}")
    embedder = as_embedder(model, device=device)
    size = image_size or getattr(embedder, "input_size", DEFAULT_IMAGE_SIZE)
    outputs = []
    for part in _batches(len(images), batch_size):
        x = preprocess(images[part], size, skipped=skipped, offset=part.start)
        if flip:
            both = embedder(np.concatenate([x, x[..., ::-1].copy()]))
            outputs.append(both[: len(x)] + both[len(x):])
        else:
            outputs.append(embedder(x))
    if not outputs:
        raise ValueError("no images to embed")
    embeddings = np.concatenate(outputs).astype(np.float32)
    if skipped:
        embeddings[sorted(skipped)] = np.nan
    return embeddings


def usable_pairs(num_pairs: int, bad_images: Iterable[int]) -> np.ndarray:
    """bool [num_pairs]: pairs whose two images (``2k``, ``2k + 1``) are both usable."""
    keep = np.ones(num_pairs, dtype=bool)
    for index in bad_images:
        keep[int(index) // 2] = False
    return keep


def skipped_pairs_note(num_images: int, skipped: dict[int, str], keep: np.ndarray) -> str:
    """A readable note: how many images were unusable, why, and how many pairs were left out."""
    reasons: dict[str, int] = {}
    for reason in skipped.values():
        reasons[reason] = reasons.get(reason, 0) + 1
    by_reason = ", ".join(f"{r} {n}" for r, n in sorted(reasons.items()))
    return (f"{len(skipped)} of {num_images} images could not be used ({by_reason}): "
            f"{int((~keep).sum())} of {keep.size} pairs left out")


def evaluate_pairset(
    model: Any,
    pairset: PairSet,
    batch_size: int = 64,
    device: "str | torch.device | None" = None,
    flip: bool = True,
    nfolds: int = 10,
    far_targets: Sequence[float] = DEFAULT_FAR_TARGETS,
    image_size: tuple[int, int] | None = None,
) -> VerificationResult:
    """Embed a pair set's images and compute its verification metrics.

    The set's own folds (``PairSet.folds``) are used when present, else ``nfolds`` contiguous folds.
    See :func:`embed_images` for ``model``, ``batch_size``, ``device``, ``flip`` and ``image_size``.
    """
    skipped: dict[int, str] = {}
    embeddings = embed_images(
        model, pairset.images, batch_size=batch_size, device=device, flip=flip, image_size=image_size,
        skipped=skipped,
    )
    keep = usable_pairs(pairset.num_pairs, skipped)
    if not keep.any():
        raise ValueError(f"pair set {pairset.name!r}: no pair has two usable images")
    issame = np.asarray(pairset.issame)
    result = verification_metrics(
        embeddings[0::2][keep],
        embeddings[1::2][keep],
        issame[keep],
        nfolds=nfolds,
        far_targets=far_targets,
        folds=None if pairset.folds is None else np.asarray(pairset.folds)[keep],
        name=pairset.name,
    )
    if skipped:
        note = skipped_pairs_note(len(pairset.images), skipped, keep)
        logger.warning("pair set %s: %s", pairset.name, note)
        result.notes.append(note)
    return result

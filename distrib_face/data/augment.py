"""Training augmentations, in two implementations that agree in distribution: PIL (worker processes) and DALI.

Both decode to RGB, resize to the output size when the image differs from it, then apply in order: random
resized crop, colour jitter (brightness / contrast / saturation), random grey, Gaussian blur, horizontal
flip. Normalisation to [-1, 1] as ``(x - 127.5) / 127.5`` and the HWC -> CHW transpose come last.

The definitions are DALI's, and the PIL side computes the same thing: the random resized crop is
torchvision's (area uniform in the range, log-uniform aspect ratio, 10 tries, else the whole image; DALI's
``fn.random_resized_crop`` draws the same way); colour jitter is DALI's ``fn.color_twist``
(:func:`color_twist`); grey is saturation 0; the blur is Gaussian with sigma uniform in ``blur_sigma``; the
flip of each sample is :func:`flip_bit` of its stream position in both paths. ``tests/integration/
test_data_augment.py`` compares the two paths' distributions (crop area, brightness, fraction blurred /
flipped / grey) for each augmentation alone and all together.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np


@dataclass(frozen=True)
class AugmentConfig:
    """Which augmentations run, and how strongly.

    Attributes:
        flip: random horizontal flip with probability 0.5.
        random_resized_crop: ``(min_area, max_area)`` fraction of the image kept, or ``None`` for off.
        crop_ratio: aspect-ratio range of the random resized crop.
        color_jitter: brightness / contrast / saturation factors drawn from ``[1 - j, 1 + j]``; 0 is off.
        grey_prob: probability of turning the image grey (kept as 3 channels).
        blur_prob: probability of a Gaussian blur with sigma drawn from ``blur_sigma``.
        blur_sigma: sigma range of the blur.
    """

    flip: bool = True
    random_resized_crop: tuple[float, float] | None = None
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    color_jitter: float = 0.0
    grey_prob: float = 0.0
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)

    def __post_init__(self) -> None:
        if self.random_resized_crop is not None:
            low, high = self.random_resized_crop
            if not 0 < low <= high <= 1:
                raise ValueError(f"augment.random_resized_crop must satisfy 0 < min <= max <= 1, got {(low, high)}")
        if not 0 <= self.color_jitter < 1:
            raise ValueError(f"augment.color_jitter must be in [0, 1), got {self.color_jitter}")
        for name in ("grey_prob", "blur_prob"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"augment.{name} must be in [0, 1], got {value}")

    @property
    def is_identity(self) -> bool:
        """True when no augmentation runs at all."""
        return (not self.flip and self.random_resized_crop is None and self.color_jitter == 0
                and self.grey_prob == 0 and self.blur_prob == 0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)


NO_AUGMENT = AugmentConfig(flip=False)


def resolve_augment(augment: AugmentConfig | Mapping[str, Any] | bool | None) -> AugmentConfig:
    """``None`` or ``True``: flip only (the default); ``False``: nothing; a mapping: :class:`AugmentConfig` fields."""
    if augment is None or augment is True:
        return AugmentConfig()
    if augment is False:
        return NO_AUGMENT
    if isinstance(augment, AugmentConfig):
        return augment
    if isinstance(augment, Mapping):
        known = set(AugmentConfig.__dataclass_fields__)
        unknown = set(augment) - known
        if unknown:
            raise ValueError(f"augment: unknown fields {sorted(unknown)} (known: {sorted(known)})")
        values = dict(augment)
        for key in ("random_resized_crop", "crop_ratio", "blur_sigma"):
            if values.get(key) is not None:
                values[key] = tuple(float(v) for v in values[key])
        return AugmentConfig(**values)
    raise ValueError(f"augment: expected None, a bool, a mapping or AugmentConfig, got {type(augment).__name__}")


def _crop_box(width: int, height: int, area_range: tuple[float, float], ratio: tuple[float, float],
              rng: random.Random) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box: 10 tries at a random area and log-uniform ratio, else the whole image."""
    area = width * height
    log_low, log_high = np.log(ratio[0]), np.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(*area_range)
        aspect = float(np.exp(rng.uniform(log_low, log_high)))
        w = int(round((target * aspect) ** 0.5))
        h = int(round((target / aspect) ** 0.5))
        if 0 < w <= width and 0 < h <= height:
            left = rng.randint(0, width - w)
            top = rng.randint(0, height - h)
            return left, top, left + w, top + h
    return 0, 0, width, height


def flip_bit(seed: int, epoch: int, origin: tuple[int, ...]) -> int:
    """Whether to mirror the sample at ``origin`` (pass, worker, position) in ``epoch``: a fair coin that is a
    pure function of its arguments (splitmix64), so resuming mid-epoch repeats the same flips, and the DALI
    and the PIL paths mirror the same samples."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    for part in origin:
        x = (x ^ (int(part) + 0x94D049BB133111EB)) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return int(x >> 63)


_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601: PIL's convert("L") and DALI's saturation axis


def color_twist(rgb: np.ndarray, brightness: float, contrast: float, saturation: float) -> np.ndarray:
    """DALI's ``fn.color_twist`` on a uint8 [H, W, 3] array: ``b * (128 + c * (S(x) - 128))``, where ``S`` blends
    each pixel with its luma by ``saturation`` (0: grey) and contrast pivots on mid-grey 128 (DALI's
    centre, not the image mean that ``PIL.ImageEnhance.Contrast`` uses); rounded and clipped once."""
    x = rgb.astype(np.float64)
    if saturation != 1.0:
        luma = (x @ _LUMA)[..., None]
        x = luma + saturation * (x - luma)
    x = brightness * (128.0 + contrast * (x - 128.0))
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def augment_pil(image: Any, size: tuple[int, int] | None, augment: AugmentConfig, rng: random.Random,
                flip: bool | None = None) -> np.ndarray:
    """Resize / augment a decoded 8-bit RGB ``PIL.Image`` like the DALI pipeline does; uint8 [H, W, 3].

    Args:
        image: the decoded image.
        size: output (H, W); ``None`` keeps the image's size (then no crop either).
        augment: which augmentations run.
        rng: draws the crop, colour, grey and blur parameters.
        flip: mirror or not (the loader passes :func:`flip_bit` of the sample); ``None`` draws it from ``rng``
            when ``augment.flip``.
    """
    from PIL import Image, ImageFilter

    if augment.random_resized_crop is not None and size is not None:
        box = _crop_box(image.width, image.height, augment.random_resized_crop, augment.crop_ratio, rng)
        image = image.resize((size[1], size[0]), Image.BILINEAR, box=box)
    elif size is not None and (image.height, image.width) != tuple(size):
        image = image.resize((size[1], size[0]), Image.BILINEAR)
    if augment.color_jitter > 0 or augment.grey_prob > 0:
        j = augment.color_jitter
        brightness = rng.uniform(1 - j, 1 + j) if j > 0 else 1.0
        contrast = rng.uniform(1 - j, 1 + j) if j > 0 else 1.0
        saturation = rng.uniform(1 - j, 1 + j) if j > 0 else 1.0
        if augment.grey_prob > 0 and rng.random() < augment.grey_prob:
            saturation = 0.0  # grey, kept as 3 channels: DALI multiplies its saturation by 0 the same way
        image = Image.fromarray(color_twist(np.asarray(image), brightness, contrast, saturation))
    if augment.blur_prob > 0 and rng.random() < augment.blur_prob:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(*augment.blur_sigma)))
    if flip is None:
        flip = augment.flip and rng.random() < 0.5
    array = np.asarray(image, dtype=np.uint8)
    return np.ascontiguousarray(array[:, ::-1]) if flip and augment.flip else array


def decode_pil(data: bytes, size: tuple[int, int] | None, augment: AugmentConfig, rng: random.Random,
               flip: bool | None = None, max_pixels: int | None = None) -> np.ndarray:
    """Decode ``data`` safely (:func:`distrib_face.data.decode.decode_image`) and :func:`augment_pil` it.

    Raises:
        distrib_face.data.decode.BadSample: the bytes cannot be used (the reason says why).
    """
    from distrib_face.data.decode import DEFAULT_MAX_IMAGE_PIXELS, decode_image

    image = decode_image(data, max_pixels=max_pixels or DEFAULT_MAX_IMAGE_PIXELS)
    return augment_pil(image, size, augment, rng, flip)

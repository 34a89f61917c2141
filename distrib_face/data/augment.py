"""Training augmentations, in two implementations that agree in distribution: PIL (worker processes) and DALI.

Both decode to RGB, resize to the output size when the image differs from it, then apply in order: random
resized crop, colour jitter (brightness / contrast / saturation), random grey, Gaussian blur, horizontal
flip. Normalisation to [-1, 1] as ``(x - 127.5) / 127.5`` and the HWC -> CHW transpose come last.
"""

from __future__ import annotations

import io
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


def decode_pil(data: bytes, size: tuple[int, int] | None, augment: AugmentConfig,
               rng: random.Random) -> np.ndarray:
    """Decode ``data`` with PIL to RGB uint8 [H, W, 3], resized to ``size`` = (H, W) if given, and augment it.

    Raises:
        OSError, ValueError: the bytes are not a decodable image (PIL's own errors, passed on).
    """
    from PIL import Image, ImageEnhance, ImageFilter, ImageOps

    with Image.open(io.BytesIO(data)) as opened:
        image = opened.convert("RGB")
    if augment.random_resized_crop is not None and size is not None:
        box = _crop_box(image.width, image.height, augment.random_resized_crop, augment.crop_ratio, rng)
        image = image.resize((size[1], size[0]), Image.BILINEAR, box=box)
    elif size is not None and (image.height, image.width) != tuple(size):
        image = image.resize((size[1], size[0]), Image.BILINEAR)
    if augment.color_jitter > 0:
        j = augment.color_jitter
        image = ImageEnhance.Brightness(image).enhance(rng.uniform(1 - j, 1 + j))
        image = ImageEnhance.Contrast(image).enhance(rng.uniform(1 - j, 1 + j))
        image = ImageEnhance.Color(image).enhance(rng.uniform(1 - j, 1 + j))
    if augment.grey_prob > 0 and rng.random() < augment.grey_prob:
        image = image.convert("L").convert("RGB")
    if augment.blur_prob > 0 and rng.random() < augment.blur_prob:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(*augment.blur_sigma)))
    if augment.flip and rng.random() < 0.5:
        image = ImageOps.mirror(image)
    return np.asarray(image, dtype=np.uint8)

"""Every augmentation runs in DALI (CPU here; ``tests/gpu/test_data_gpu.py`` runs the same checks on ``mixed``)
without a single PIL fallback, and DALI's outputs follow the PIL path's distribution: each augmentation alone,
then all together. Images are built so that one number per image measures what an augmentation did (the crop
box from coordinate ramps, the colour twist from a flat colour, the blur from a checkerboard, the flip from a
ramp's direction). Distributions are compared with a two-sample Kolmogorov-Smirnov test (scipy), fractions
with binomial limits of 4 standard deviations for the sample size, both against each other and against the
closed-form value where there is one."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from distrib_face.data import build_loader
from distrib_face.data.manifest import Manifest, content_hash, write_manifest
from distrib_face.data.shards import ShardWriter

SIZE = 64
NUM = 400  # images per set: a KS test at p < 1e-3 then detects a shift of about 0.14 standard deviations
P_MIN = 1e-3


def _jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=100, subsampling=0)
    return buffer.getvalue()


def _write(root, array: np.ndarray):
    """``NUM`` copies of one image, label = index."""
    root.mkdir(parents=True)
    writer = ShardWriter(root, prefix="aug", max_count=200)
    data = _jpeg(array)
    for i in range(NUM):
        writer.write(f"{i:06d}", data, i)
    done = writer.close()
    write_manifest(root, Manifest(NUM, NUM, [str(f.path) for f in done], [f.count for f in done], [1] * NUM,
                                  content_hash=content_hash([f.sha256 for f in done]), image_size=(SIZE, SIZE)))
    return root


def _ramps() -> np.ndarray:
    x = np.linspace(0, 255, SIZE)
    image = np.empty((SIZE, SIZE, 3), np.uint8)
    image[..., 0] = np.rint(x)[None, :]
    image[..., 1] = np.rint(x)[:, None]
    image[..., 2] = 128
    return image


def _bands() -> np.ndarray:
    """Four vertical bands: grey 60, 128, 180 and the colour (100, 150, 100)."""
    image = np.empty((SIZE, SIZE, 3), np.uint8)
    for band, colour in enumerate([(60, 60, 60), (128, 128, 128), (180, 180, 180), (100, 150, 100)]):
        image[:, band * 16:(band + 1) * 16] = colour
    return image


def twist_factors(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Brightness, contrast and saturation of each output of the band image, solved from the colour twist
    ``b * (128 + c * (Y + s (x - Y) - 128))``: mid-grey gives ``b``, light grey then ``c``, the colour band's
    green minus red (50 before) then ``s``."""
    band = [images[:, 8:56, 16 * k + 4:16 * k + 12].mean(axis=(1, 2)) for k in range(4)]  # [N, 3] each
    b = band[1][:, 0] / 128
    c = (band[2][:, 0] / b - 128) / 52
    s = (band[3][:, 1] - band[3][:, 0]) / (50 * b * c)
    return b, c, s


def _checkerboard() -> np.ndarray:
    cells = (np.arange(SIZE)[:, None] // 4 + np.arange(SIZE)[None, :] // 4) % 2
    return np.repeat((60 + 130 * cells).astype(np.uint8)[..., None], 3, axis=2)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("augment")
    return {"ramps": _write(root / "ramps", _ramps()),
            "flat": _write(root / "flat", np.tile(np.array([100, 150, 100], np.uint8), (SIZE, SIZE, 1))),
            "bands": _write(root / "bands", _bands()),
            "checker": _write(root / "checker", _checkerboard())}


def images_of(shards, decoder: str, augment, device: str = "cpu", seed: int = 0) -> np.ndarray:
    """uint8-scaled [N, H, W, 3] float64 outputs of one epoch, in label order, and the fallback count."""
    loader = build_loader(shards, batch_size=100, rank=0, world_size=1, num_workers=0, decoder=decoder,
                          device=device, augment=augment, shuffle=False, seed=seed, drop_last=False, dali_threads=2)
    out = np.zeros((NUM, SIZE, SIZE, 3))
    for images, labels in loader:
        arrays = images.float().cpu().numpy().transpose(0, 2, 3, 1) * 127.5 + 127.5
        out[labels.cpu().numpy()] = arrays
    assert loader.counts.dali_fallback_batches == 0, "no batch may fall back to PIL"
    assert loader.counts.delivered == NUM
    return out


def crop_boxes(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop area fraction and aspect ratio (w / h) of each output of the ramp image: bilinear upsampling of a
    linear ramp is exact away from the border, so the slope between columns 8 and 55 gives the box width."""
    ramp_per_px = 255 / (SIZE - 1)
    width = (images[:, :, 55, 0].mean(1) - images[:, :, 8, 0].mean(1)) / 47 * SIZE / ramp_per_px
    height = (images[:, 55, :, 1].mean(1) - images[:, 8, :, 1].mean(1)) / 47 * SIZE / ramp_per_px
    return width * height / SIZE**2, width / height


def _same_distribution(a: np.ndarray, b: np.ndarray, what: str) -> None:
    result = stats.ks_2samp(a, b)
    assert result.pvalue > P_MIN, (f"{what}: DALI and PIL differ (KS p={result.pvalue:.2g}; means "
                                   f"{a.mean():.4f} vs {b.mean():.4f}, std {a.std():.4f} vs {b.std():.4f})")


def _fraction_near(count: int, p: float, what: str) -> None:
    sigma = math.sqrt(p * (1 - p) / NUM)
    assert abs(count / NUM - p) < 4 * sigma, f"{what}: {count} of {NUM}, expected {p:.2f} +- {4 * sigma:.3f}"


def check_crop(sets, device: str = "cpu") -> None:
    augment = {"flip": False, "random_resized_crop": (0.7, 1.0)}
    dali_area, dali_ratio = crop_boxes(images_of(sets["ramps"], "dali", augment, device))
    pil_area, pil_ratio = crop_boxes(images_of(sets["ramps"], "pil", augment))
    for area in (dali_area, pil_area):
        assert area.min() > 0.69 and area.max() < 1.01  # inside the configured range (+ measurement noise)
    _same_distribution(dali_area, pil_area, "crop area")
    _same_distribution(dali_ratio, pil_ratio, "crop aspect ratio")


def check_color_jitter(sets, device: str = "cpu") -> None:
    augment = {"flip": False, "color_jitter": 0.3}
    dali = twist_factors(images_of(sets["bands"], "dali", augment, device))
    pil = twist_factors(images_of(sets["bands"], "pil", augment))
    for name, a, b in zip(("brightness", "contrast", "saturation"), dali, pil):
        _same_distribution(a, b, f"colour twist {name}")
        # closed form: each factor is uniform in [1 - j, 1 + j] = [0.7, 1.3], independently
        for values, who in ((a, "DALI"), (b, "PIL")):
            fit = stats.kstest(values, "uniform", args=(0.7, 0.6))
            assert fit.pvalue > P_MIN, f"{who} {name} is not U(0.7, 1.3): KS p={fit.pvalue:.2g}"


def check_grey(sets, device: str = "cpu") -> None:
    augment = {"flip": False, "grey_prob": 0.3}
    for decoder in ("dali", "pil"):
        images = images_of(sets["flat"], decoder, augment, device if decoder == "dali" else "cpu")
        grey = int((np.abs(images[..., 0] - images[..., 1]).mean(axis=(1, 2)) < 3).sum())
        _fraction_near(grey, 0.3, f"{decoder} grey")


def _edge_energy(images: np.ndarray) -> np.ndarray:
    return np.abs(np.diff(images[..., 0], axis=2)).mean(axis=(1, 2))


def check_blur(sets, device: str = "cpu") -> None:
    augment = {"flip": False, "blur_prob": 0.3, "blur_sigma": (1.0, 2.0)}
    sharp = _edge_energy(images_of(sets["checker"], "pil", False)).mean()
    for decoder in ("dali", "pil"):
        energy = _edge_energy(images_of(sets["checker"], decoder, augment, device if decoder == "dali" else "cpu"))
        blurred = int((energy < 0.8 * sharp).sum())  # sigma >= 1 flattens 4-pixel cells' edges far below that
        _fraction_near(blurred, 0.3, f"{decoder} blurred")


def check_flip(sets, device: str = "cpu") -> None:
    augment = {"flip": True}
    flipped = {}
    for decoder in ("dali", "pil"):
        images = images_of(sets["ramps"], decoder, augment, device if decoder == "dali" else "cpu")
        flipped[decoder] = images[:, :, -1, 0].mean(1) < images[:, :, 0, 0].mean(1)  # red ramp runs right to left
        _fraction_near(int(flipped[decoder].sum()), 0.5, f"{decoder} flipped")
    # both paths mirror the same samples: flip_bit of the sample's stream position
    assert np.array_equal(flipped["dali"], flipped["pil"])


def check_all_together(sets, device: str = "cpu") -> None:
    augment = {"flip": True, "random_resized_crop": [0.7, 1.0], "color_jitter": 0.3, "blur_prob": 0.1}
    for name in ("ramps", "checker"):
        dali = images_of(sets[name], "dali", augment, device)
        pil = images_of(sets[name], "pil", augment)
        _same_distribution(dali.mean(axis=(1, 2, 3)), pil.mean(axis=(1, 2, 3)), f"{name}: image mean")
        _same_distribution(dali.std(axis=(1, 2, 3)), pil.std(axis=(1, 2, 3)), f"{name}: image contrast")
        _same_distribution(_edge_energy(dali), _edge_energy(pil), f"{name}: edge energy")


@pytest.mark.parametrize("check", [check_crop, check_color_jitter, check_grey, check_blur, check_flip,
                                   check_all_together], ids=lambda f: f.__name__[6:])
def test_dali_cpu_augmentation_matches_pil(sets, check):
    check(sets, "cpu")


def test_the_issue_config_runs_in_dali_without_a_fallback(tmp_path):
    """The configuration of issue 9, which made every batch fail with "Critical error in pipeline:"."""
    from distrib_face.data.testing import write_indexed_shards

    write_indexed_shards(tmp_path, [64, 64], image_size=24)
    loader = build_loader(tmp_path, batch_size=16, rank=0, world_size=1, num_workers=2, decoder="dali",
                          augment={"flip": True, "random_resized_crop": [0.7, 1.0], "color_jitter": 0.3,
                                   "blur_prob": 0.1}, image_size=20)
    batches = [images for images, _ in loader]
    assert len(batches) == 8 and all(b.shape == (16, 3, 20, 20) for b in batches)
    assert loader.counts.dali_fallback_batches == 0

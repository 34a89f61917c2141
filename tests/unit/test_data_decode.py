"""The one safe inspect + decode (distrib_face/data/decode.py): header sizes read without decoding, every
reason named, every mode converted to 8-bit RGB, labels checked; and manifest validation naming the field."""

from __future__ import annotations

import io
import json
import struct

import numpy as np
import pytest
from PIL import Image

from distrib_face.data.decode import (
    CONVERTED,
    DEFAULT_MAX_IMAGE_PIXELS,
    RESIZED,
    BadSample,
    decode_image,
    inspect_image,
    parse_label,
    repair_flags,
)
from distrib_face.data.manifest import read_manifest
from distrib_face.data.testing import write_indexed_shards


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _rgb(h=12, w=10, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _reason(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> str:
    with pytest.raises(BadSample) as caught:
        decode_image(data, max_pixels=max_pixels)
    return caught.value.reason


def test_header_sizes_and_modes_without_decoding():
    cases = {
        "JPEG": (_encode(Image.fromarray(_rgb()), "JPEG"), "RGB"),
        "grey JPEG": (_encode(Image.fromarray(_rgb()[..., 0]), "JPEG"), "L"),
        "progressive JPEG": (_encode(Image.fromarray(_rgb()), "JPEG", progressive=True), "RGB"),
        "CMYK JPEG": (_encode(Image.fromarray(_rgb()).convert("CMYK"), "JPEG"), "CMYK"),
        "PNG": (_encode(Image.fromarray(_rgb()), "PNG"), "RGB"),
        "16-bit PNG": (_encode(Image.fromarray(_rgb()[..., 0].astype(np.uint16) * 257), "PNG"), "I;16"),
        "RGBA PNG": (_encode(Image.fromarray(np.dstack([_rgb(), _rgb()[..., :1]])), "PNG"), "RGBA"),
        "WebP": (_encode(Image.fromarray(_rgb()), "WEBP", lossless=True), "RGB"),
        "BMP": (_encode(Image.fromarray(_rgb()), "BMP"), "RGB"),
    }
    for name, (data, mode) in cases.items():
        header = inspect_image(data)
        assert (header.height, header.width, header.mode) == (12, 10, mode), name
        assert header.dali_ready == (name in ("JPEG", "progressive JPEG")), name
        assert bool(repair_flags(header, (12, 10)) & CONVERTED) == (mode != "RGB"), name
        assert repair_flags(header, (16, 16)) & RESIZED, name


def test_a_bomb_header_is_refused_before_any_decoder_runs():
    jpeg = _encode(Image.fromarray(_rgb()), "JPEG")
    at = jpeg.index(b"\xff\xc0")
    for side in (60000, 12000):
        bomb = jpeg[:at + 5] + struct.pack(">HH", side, side) + jpeg[at + 9:]
        assert _reason(bomb) == "too_large"
    # the limit is the caller's: 12 x 10 = 120 pixels
    assert _reason(jpeg, max_pixels=119) == "too_large"
    assert decode_image(jpeg, max_pixels=120).size == (10, 12)
    png = _encode(Image.fromarray(_rgb()), "PNG")
    big_png = png[:16] + struct.pack(">II", 50000, 50000) + png[24:]  # IHDR width / height
    assert _reason(big_png) == "too_large"
    # a format whose header PIL reads: PIL's own bomb check also counts as too_large
    gif = _encode(Image.fromarray(_rgb()[..., 0]), "GIF")
    big_gif = gif[:6] + struct.pack("<HH", 65000, 65000) + gif[10:]
    assert inspect_image(gif).format == "GIF" and _reason(big_gif) == "too_large"


def test_truncated_garbage_and_text_have_their_reasons():
    jpeg = _encode(Image.fromarray(_rgb(64, 64)), "JPEG")
    assert _reason(jpeg[: len(jpeg) // 2]) == "truncated"
    assert _reason(jpeg[:-2]) == "truncated"  # only the end-of-image marker is missing
    png = _encode(Image.fromarray(_rgb(64, 64)), "PNG")
    assert _reason(png[: len(png) - 20]) == "truncated"
    assert _reason(b"a text file named like a JPEG") == "not_an_image"
    assert _reason(b"") == "not_an_image"
    assert _reason(bytes(range(256)) * 3) == "not_an_image"
    # Encapsulated PostScript would run Ghostscript: not a format we open
    assert _reason(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n") == "not_an_image"


def test_whole_jpegs_with_trailing_bytes_or_thumbnails_are_not_called_truncated():
    image = Image.fromarray(_rgb(32, 32))
    jpeg = _encode(image, "JPEG")
    assert decode_image(jpeg + b"\x00" * 100).size == (32, 32)  # padding after the end marker
    assert decode_image(jpeg + b"trailing camera data").size == (32, 32)
    # an EXIF thumbnail carries its own FF D9 before the main scan: a cut main image is still truncated
    thumb = _encode(Image.fromarray(_rgb(8, 8)), "JPEG")
    app1 = b"\xff\xe1" + struct.pack(">H", len(thumb) + 8) + b"Exif\x00\x00" + thumb
    with_thumb = jpeg[:2] + app1 + jpeg[2:]
    assert inspect_image(with_thumb).width == 32 and decode_image(with_thumb).size == (32, 32)
    assert _reason(with_thumb[: len(with_thumb) - 200]) == "truncated"


def test_every_mode_becomes_8_bit_rgb_and_16_bit_is_scaled_not_clipped():
    grey = _rgb()[..., 0]
    sixteen = grey.astype(np.uint16) * 256 + 100  # PIL's convert("L") would clip almost all of these to 255
    out = np.asarray(decode_image(_encode(Image.fromarray(sixteen), "PNG")))
    assert out.dtype == np.uint8 and out.shape == (12, 10, 3)
    np.testing.assert_array_equal(out[..., 0], np.rint(sixteen.astype(np.float64) * 255 / 65535).astype(np.uint8))
    np.testing.assert_array_equal(out[..., 1], out[..., 0])
    rgba = np.dstack([_rgb(), np.zeros((12, 10), np.uint8)])
    np.testing.assert_array_equal(np.asarray(decode_image(_encode(Image.fromarray(rgba), "PNG"))), rgba[..., :3])
    np.testing.assert_array_equal(np.asarray(decode_image(_encode(Image.fromarray(grey), "PNG")))[..., 2], grey)
    cmyk = np.asarray(decode_image(_encode(Image.fromarray(_rgb()).convert("CMYK"), "JPEG", quality=100)))
    assert cmyk.shape == (12, 10, 3) and np.abs(cmyk.astype(int) - _rgb().astype(int)).mean() < 12


def test_a_broken_huffman_table_is_undecodable():
    jpeg = bytearray(_encode(Image.fromarray(_rgb(32, 32)), "JPEG"))
    at = jpeg.index(b"\xff\xc4")
    jpeg[at + 5:at + 21] = b"\xff" * 16
    inspect_image(bytes(jpeg))  # the header is fine
    assert _reason(bytes(jpeg)) == "undecodable"


@pytest.mark.parametrize("raw,reason", [(None, "missing_label"), (b"seven", "bad_label"), (b"1.5", "bad_label"),
                                        (b"", "bad_label"), (b"9" * 30, "bad_label"), (b"-1", "label_out_of_range"),
                                        (b"10", "label_out_of_range")])
def test_labels_outside_the_classes_are_refused(raw, reason):
    with pytest.raises(BadSample) as caught:
        parse_label(raw, num_classes=10)
    assert caught.value.reason == reason
    assert parse_label(b" 9\n", 10) == 9 and parse_label(b"0", 10) == 0


def _edit_manifest(root, change):
    """Rewrite ``root``'s manifest in format 1 (class counts and label map inline), changed by ``change``."""
    path = root / "manifest.json"
    raw = read_manifest(root).to_json_dict_v1()
    change(raw)
    path.write_text(json.dumps(raw))


@pytest.mark.parametrize("change,field", [
    (lambda m: m["shards"][1].update(count=-3), r"shards\[1\]\.count must be >= 0"),
    (lambda m: m["shards"][0].update(count=2.5), r"shards\[0\]\.count must be an integer"),
    (lambda m: m.update(num_samples=m["num_samples"] + 1), "num_samples=13 but the shard counts sum to 12"),
    (lambda m: m["class_counts"].__setitem__(3, -1), r"class_counts\[3\] must be >= 0"),
    (lambda m: m.update(num_classes=0), "num_classes must be >= 1"),
    (lambda m: m.update(num_classes="12"), "num_classes must be an integer"),
    (lambda m: m["shards"][1].update(name=m["shards"][0]["name"]), "lists 'part-000000.tar' twice"),
    (lambda m: m["shards"][0].update(name="../x.tar"), r"shards\[0\]\.name must be a file name"),
    (lambda m: m.pop("class_counts"), "missing field 'class_counts'"),
    (lambda m: m.update(image_size=[16, 0]), "image_size must be"),
    (lambda m: m["label_map"].update({"x": 99}), r"label_map\['x'\]=99 is outside"),
])
def test_a_format1_manifest_with_bad_counts_is_refused_naming_the_field(tmp_path, change, field):
    write_indexed_shards(tmp_path, [5, 7])
    _edit_manifest(tmp_path, change)
    with pytest.raises(ValueError, match=field):
        read_manifest(tmp_path)


def test_the_config_default_pixel_limit_is_the_decoders():
    from distrib_face.config import ConfigError, DataConfig

    assert DataConfig(source="random").max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS
    for field, value in (("max_skip_fraction", 1.5), ("max_skip_fraction", -0.1), ("max_image_pixels", 100)):
        with pytest.raises(ConfigError, match=f"data.{field}"):
            DataConfig(source="random", **{field: value})

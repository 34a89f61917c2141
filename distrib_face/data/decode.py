"""Inspect and decode one image safely: the single implementation the loader, ``pack``, ``data verify`` and the
evaluation readers share.

Every sample goes through two steps, and every failure has a named reason (:data:`SKIP_REASONS`):

1. :func:`inspect_image` reads the header only. JPEG frame headers (SOF) and PNG ``IHDR`` chunks are parsed
   here by hand, other formats by ``PIL.Image.open`` (which reads the header only), so a decompression bomb
   (a tiny file whose header claims 60000 x 60000 pixels) is refused before any decoder allocates anything:
   the pixel limit is ``max_image_pixels`` (``data.max_image_pixels``). The same step catches bytes that are
   no image at all (``not_an_image``) and JPEG / PNG files cut short (``truncated``: no end-of-image marker
   after the scan data, no ``IEND`` chunk).
2. :func:`decode_image` decodes with PIL (only the formats in :data:`SAFE_FORMATS`: PIL plugins such as EPS
   would start external programs) and converts to 8-bit RGB: grey, palette, CMYK, RGBA and 16-bit images are
   used, not dropped, and counted as ``converted`` (16-bit values are scaled to 8 bits, not clipped as
   ``Image.convert`` does). An image whose size differs from the shard set's is resized and counted as
   ``resized``. Those two are *repairs* (:data:`REPAIR_REASONS`): the sample is still used.

Labels are checked by :func:`parse_label` against the manifest's ``num_classes``, so an out-of-range label
is dropped on the data path and never reaches the classifier.

This module imports only numpy and PIL (no torch), so reader processes start fast.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

DEFAULT_MAX_IMAGE_PIXELS = 36_000_000
"""Default pixel limit (6000 x 6000): far above aligned faces (112 x 112) and above most camera photos that
``pack`` may read, far below the 60000 x 60000 of a decompression bomb."""

SKIP_REASONS: tuple[str, ...] = (
    "too_large",           # the header claims more pixels than max_image_pixels (decompression bomb)
    "not_an_image",        # bytes no decoder recognises (garbage, a text file named .jpg, empty)
    "truncated",           # JPEG without end-of-image after its scan, PNG without IEND: the file was cut
    "undecodable",         # the header is fine but decoding failed (corrupt data, unsupported variant)
    "missing_image",       # a sample without an image member
    "missing_label",       # a sample without its .cls
    "bad_label",           # a .cls that is not an integer
    "label_out_of_range",  # a label < 0 or >= num_classes
    "truncated_shard",     # samples a cut-short shard tar did not deliver (manifest count - samples read)
    "missing_shard",       # samples of a shard that could not be opened (only with allow_missing_shards)
)
"""Why a sample was dropped. The counts of the loader, ``pack`` and ``data verify`` use these names."""

REPAIR_REASONS: tuple[str, ...] = (
    "resized",    # the image's size differs from the shard set's image_size: resized to it
    "converted",  # not 8-bit RGB (grey, palette, CMYK, RGBA, 16-bit): converted to 8-bit RGB
)
"""Why a sample was changed before use (it is still used)."""

RESIZED = 1
CONVERTED = 2
"""Bit flags of :data:`REPAIR_REASONS` carried per sample (``flags & RESIZED``)."""

SAFE_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "PPM", "TIFF", "GIF")
"""Formats PIL may open here. Others (EPS, for one, runs Ghostscript) are ``not_an_image``."""

_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM, RST0-7: markers without a length
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_MODES = {0: "L", 2: "RGB", 3: "P", 4: "LA", 6: "RGBA"}


class BadSample(ValueError):
    """A sample that cannot be used, with its reason (one of :data:`SKIP_REASONS`) and a readable detail."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageHeader:
    """What the header of an encoded image says.

    Attributes:
        format: ``JPEG``, ``PNG`` or PIL's format name.
        width, height: pixels.
        mode: PIL-style mode: ``RGB``, ``L``, ``CMYK``, ``RGBA``, ``LA``, ``P``, ``I;16`` ...
        bits: bits per channel (8, 16, or 12 for a 12-bit JPEG).
    """

    format: str
    width: int
    height: int
    mode: str
    bits: int = 8

    @property
    def is_rgb8(self) -> bool:
        """8-bit RGB: used as it is (anything else is converted)."""
        return self.mode == "RGB" and self.bits == 8

    @property
    def dali_ready(self) -> bool:
        """An 8-bit colour baseline/progressive JPEG: DALI decodes these bytes as they are."""
        return self.format == "JPEG" and self.is_rgb8


def _check_pixels(width: int, height: int, max_pixels: int, what: str) -> None:
    if width < 1 or height < 1:
        raise BadSample("undecodable", f"{what} header gives an empty size {width}x{height}")
    if width * height > max_pixels:
        raise BadSample("too_large", f"{what} header claims {width}x{height} = {width * height} pixels, above "
                                     f"the limit of {max_pixels} (data.max_image_pixels)")


def _inspect_jpeg(data: bytes, max_pixels: int) -> ImageHeader:
    i, n = 2, len(data)
    header: ImageHeader | None = None
    while True:
        # markers: 0xFF (fill bytes allowed), then the marker code
        while i < n and data[i] != 0xFF:
            i += 1  # tolerate junk between segments, as libjpeg does (with a warning)
        while i < n and data[i] == 0xFF:
            i += 1
        if i >= n:
            raise BadSample("truncated", f"JPEG ends before its scan data ({n} bytes)")
        marker = data[i]
        i += 1
        if marker in _JPEG_STANDALONE:
            continue
        if marker == 0xD9:
            raise BadSample("undecodable", "JPEG ends (EOI) before any scan")
        if i + 2 > n:
            raise BadSample("truncated", f"JPEG segment 0x{marker:02X} cut at byte {n}")
        (length,) = struct.unpack(">H", data[i:i + 2])
        if length < 2 or i + length > n:
            raise BadSample("truncated", f"JPEG segment 0x{marker:02X} of {length} bytes at byte {i} runs past "
                                         f"the end ({n} bytes)")
        if marker in _JPEG_SOF:
            if length < 8:
                raise BadSample("undecodable", f"JPEG frame header of {length} bytes")
            precision, height, width, components = struct.unpack(">BHHB", data[i + 2:i + 8])
            _check_pixels(width, height, max_pixels, "JPEG")
            mode = {1: "L", 3: "RGB", 4: "CMYK"}.get(components)
            if mode is None:
                raise BadSample("undecodable", f"JPEG with {components} colour components")
            header = ImageHeader("JPEG", width, height, mode, precision)
        elif marker == 0xDA:  # start of scan: the entropy-coded data follows
            if header is None:
                raise BadSample("undecodable", "JPEG scan without a frame header (SOF)")
            # Entropy-coded data never holds FF D9 (0xFF is stuffed as FF 00) and an EXIF thumbnail's end
            # marker sits before the scan, so an end-of-image marker after here means the file is whole.
            if data.rfind(b"\xff\xd9") < i:
                raise BadSample("truncated", f"JPEG without an end-of-image marker after its scan ({n} bytes)")
            return header
        i += length


def _inspect_png(data: bytes, max_pixels: int) -> ImageHeader:
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise BadSample("truncated" if len(data) < 33 else "undecodable", "PNG without a complete IHDR chunk")
    width, height, bits, colour = struct.unpack(">IIBB", data[16:26])
    _check_pixels(width, height, max_pixels, "PNG")
    mode = _PNG_MODES.get(colour)
    if mode is None:
        raise BadSample("undecodable", f"PNG colour type {colour}")
    if mode == "L" and bits == 16:
        mode = "I;16"
    if data.rfind(b"IEND") < 33:
        raise BadSample("truncated", f"PNG without its IEND chunk ({len(data)} bytes)")
    return ImageHeader("PNG", width, height, mode, bits)


def _open_pil(data: bytes) -> Any:
    from PIL import Image

    # Our own header check already applied the pixel limit; PIL's bomb *error* (above twice its global
    # Image.MAX_IMAGE_PIXELS) still applies and is reported as too_large. Its warning is noise here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data), formats=SAFE_FORMATS)


def inspect_image(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> ImageHeader:
    """Read the header of encoded image ``data`` without decoding (nothing is allocated for the pixels).

    Args:
        data: the encoded image.
        max_pixels: the largest ``width * height`` accepted.

    Returns:
        The :class:`ImageHeader`.

    Raises:
        BadSample: ``too_large``, ``not_an_image``, ``truncated`` or ``undecodable``.
    """
    if data[:3] == b"\xff\xd8\xff":
        return _inspect_jpeg(data, max_pixels)
    if data[:8] == _PNG_SIGNATURE:
        return _inspect_png(data, max_pixels)
    from PIL import Image, UnidentifiedImageError

    try:
        with _open_pil(data) as image:
            _check_pixels(image.width, image.height, max_pixels, image.format or "image")
            bits = 16 if image.mode.startswith("I;16") else 8
            return ImageHeader(image.format or "?", image.width, image.height, image.mode, bits)
    except Image.DecompressionBombError as err:
        raise BadSample("too_large", str(err)) from err
    except UnidentifiedImageError as err:
        raise BadSample("not_an_image", f"no known image format in {len(data)} bytes starting {data[:8]!r}") from err
    except (OSError, ValueError, SyntaxError, struct.error, EOFError) as err:
        if isinstance(err, BadSample):
            raise
        raise BadSample("undecodable", f"{type(err).__name__}: {err}") from err


def to_rgb8(image: Any, bits: int = 8) -> Any:
    """``image`` (a loaded PIL image of any mode) as 8-bit RGB; 16-bit grey is scaled, never clipped."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if bits == 16 or image.mode.startswith("I;16"):
            values = values * (255.0 / 65535.0)
        grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        # drop the alpha channel (what PIL's convert does); a transparent pixel keeps its stored colour
        return image.convert("RGBA").convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes, header: ImageHeader | None = None,
                 max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Any:
    """Decode ``data`` with PIL to an 8-bit RGB ``PIL.Image`` (after :func:`inspect_image` when no header is given).

    Raises:
        BadSample: any of the reasons of :func:`inspect_image`, or ``undecodable``.
    """
    from PIL import Image

    if header is None:
        header = inspect_image(data, max_pixels)
    try:
        with _open_pil(data) as opened:
            if opened.size != (header.width, header.height):
                raise BadSample("undecodable", f"PIL reads {opened.size[0]}x{opened.size[1]}, the header says "
                                               f"{header.width}x{header.height}")
            opened.load()
            return to_rgb8(opened, header.bits)
    except Image.DecompressionBombError as err:
        raise BadSample("too_large", str(err)) from err
    except BadSample:
        raise
    except (OSError, ValueError, SyntaxError, struct.error, EOFError, IndexError) as err:
        raise BadSample("undecodable", f"{type(err).__name__}: {err}") from err


def repair_flags(header: ImageHeader, expected_size: tuple[int, int] | None) -> int:
    """:data:`RESIZED` / :data:`CONVERTED` bits for an image with ``header`` in a set of ``expected_size`` (H, W)."""
    flags = 0 if header.is_rgb8 else CONVERTED
    if expected_size is not None and (header.height, header.width) != tuple(expected_size):
        flags |= RESIZED
    return flags


def flag_names(flags: int) -> list[str]:
    """The :data:`REPAIR_REASONS` set in ``flags``."""
    return [name for bit, name in ((RESIZED, "resized"), (CONVERTED, "converted")) if flags & bit]


def encode_png(image: Any) -> bytes:
    """Lossless PNG bytes of a PIL image (fast compression: these are rare, repaired samples)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def parse_label(raw: bytes | str | None, num_classes: int | None) -> int:
    """The label in a sample's ``.cls`` member, checked against ``[0, num_classes)``.

    Raises:
        BadSample: ``missing_label`` (``raw`` is None), ``bad_label`` (not an integer) or ``label_out_of_range``.
    """
    if raw is None:
        raise BadSample("missing_label", "the sample has no .cls")
    text = raw.decode("ascii", "replace") if isinstance(raw, (bytes, bytearray)) else str(raw)
    text = text.strip()
    if not (text.isdigit() or (text[:1] in "+-" and text[1:].isdigit())) or len(text) > 19:
        raise BadSample("bad_label", f"label {text[:40]!r} is not an integer")
    label = int(text)
    if label < 0 or (num_classes is not None and label >= num_classes):
        raise BadSample("label_out_of_range", f"label {label} is outside [0, {num_classes})")
    return label


def resize_rgb(image: Any, size: tuple[int, int]) -> Any:
    """``image`` resized bilinearly to ``size`` = (H, W) (unchanged when it has that size)."""
    from PIL import Image

    if (image.height, image.width) == tuple(size):
        return image
    return image.resize((size[1], size[0]), Image.BILINEAR)

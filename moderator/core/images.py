"""Bytes to an opened image, with everything checked that can be checked before decoding.

Limits on bytes and pixels, only the accepted formats' parsers ever run, and the file's
structure (JPEG scans, TIFF pages) counted from the raw bytes. What the model is then shown of
the image is core/views.py. Neither module needs torch: they run in the decode worker
processes (serving/decode_pool.py).
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageFile, UnidentifiedImageError

from moderator.config import ImageConfig
from moderator.core.structure import count_jpeg_scans, count_tiff_pages
from moderator.errors import ImageErrorCode, InvalidImage

# Our own pixel limit is checked from each frame's header before it is decoded (check_pixels).
# Pillow's bomb check stays as a second line of defence with MAX_IMAGE_PIXELS set to the
# service's limit (open_image), its warning an error: nothing over the limit is ever decoded.
warnings.simplefilter("error", Image.DecompressionBombWarning)
ImageFile.LOAD_TRUNCATED_IMAGES = False

_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def check_byte_size(data: bytes, limits: ImageConfig) -> None:
    if not data:
        raise InvalidImage(ImageErrorCode.EMPTY, "image has no bytes")
    if len(data) > limits.max_bytes:
        raise InvalidImage(
            ImageErrorCode.TOO_MANY_BYTES,
            f"image has {len(data)} bytes, the limit is {limits.max_bytes}",
        )


def open_image(data: bytes, limits: ImageConfig) -> Image.Image:
    """Identify the format and read the header only: nothing is decoded yet.

    Only the accepted formats' plugins ever see the bytes: Pillow would otherwise run the header
    parser of every format it knows (PSD, FITS, DDS, ...) until one claims them.
    """
    Image.MAX_IMAGE_PIXELS = limits.max_pixels
    try:
        image = Image.open(io.BytesIO(data), formats=_plugins_for(limits.formats))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidImage(
            ImageErrorCode.TOO_MANY_PIXELS,
            f"image has more pixels than the limit of {limits.max_pixels}",
        ) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        known = sniff_format(data)
        if known in limits.formats:
            raise InvalidImage(ImageErrorCode.CORRUPT, f"broken {known} header: {exc}") from exc
        raise InvalidImage(
            ImageErrorCode.UNSUPPORTED_FORMAT,
            f"not an image in an accepted format (accepted: {', '.join(sorted(limits.formats))})",
        ) from exc
    if image.format not in limits.formats:
        raise InvalidImage(
            ImageErrorCode.UNSUPPORTED_FORMAT,
            f"format {image.format} is not accepted "
            f"(accepted: {', '.join(sorted(limits.formats))})",
        )
    check_pixels(image.size, limits)
    return image


def _plugins_for(formats: frozenset[str]) -> list[str]:
    """Pillow's openers for `formats`: MPO files are opened by the JPEG plugin."""
    Image.init()
    wanted = set(formats) | ({"JPEG"} if "MPO" in formats else set())
    return sorted(f for f in wanted if f in Image.OPEN)


def check_structure(data: bytes, image_format: str | None, limits: ImageConfig) -> None:
    """Refuse, before decoding, a file whose structure would cost too much to decode."""
    if image_format in ("JPEG", "MPO"):
        scans = count_jpeg_scans(data, limits.max_jpeg_scans)
        if scans > limits.max_jpeg_scans:
            raise too_complex(f"JPEG has over {limits.max_jpeg_scans} scans")
    elif image_format == "TIFF":
        pages = count_tiff_pages(data, limits.max_tiff_pages)
        if pages > limits.max_tiff_pages:
            raise too_complex(f"TIFF has over {limits.max_tiff_pages} pages")


def too_complex(reason: str) -> InvalidImage:
    return InvalidImage(ImageErrorCode.TOO_COMPLEX, f"{reason}; the limit is set by the service")


def check_pixels(size: tuple[int, int], limits: ImageConfig) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise InvalidImage(ImageErrorCode.CORRUPT, f"image header says {width}x{height}")
    if width * height > limits.max_pixels:
        raise InvalidImage(
            ImageErrorCode.TOO_MANY_PIXELS,
            f"image is {width}x{height} = {width * height} pixels, "
            f"the limit is {limits.max_pixels}",
        )


def sniff_format(data: bytes) -> str | None:
    """The format promised by the first bytes, whether or not the rest is intact."""
    for signature, name in _SIGNATURES:
        if data.startswith(signature):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None

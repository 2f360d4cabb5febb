"""Bytes to model-ready pixels: limits, formats, EXIF, colour modes, frames, tiles.

Every image becomes one or more square *views* of `size` x `size` uint8 RGB pixels:
the whole picture letterboxed (never a centre crop), plus square tiles along the long side
when the aspect ratio is extreme, for each sampled frame of an animation. The model scores
every view and a policy's score for the image is its maximum over the views.

Normalisation (mean/std) and the cast to the model's dtype happen on the model's device, on the
whole batch at once (see core/clip.py), so the host moves 1 byte per channel instead of 4.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

from moderator.config import ImageConfig
from moderator.core.structure import count_jpeg_scans, count_tiff_pages
from moderator.errors import ImageErrorCode, InvalidImage

# Our own pixel limit is checked from each frame's header before it is decoded (check_pixels:
# what Pillow's bomb warning would say, with the sizes). Pillow's bomb check stays as a second
# line of defence with MAX_IMAGE_PIXELS set to the service's limit (open_image): it raises
# DecompressionBombError at twice that in any path we do not check ourselves.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)
ImageFile.LOAD_TRUNCATED_IMAGES = False

_EXIF_ORIENTATION = 0x0112
_ORIENTATION_TRANSPOSE: dict[int, tuple[Image.Transpose, ...]] = {
    2: (Image.Transpose.FLIP_LEFT_RIGHT,),
    3: (Image.Transpose.ROTATE_180,),
    4: (Image.Transpose.FLIP_TOP_BOTTOM,),
    5: (Image.Transpose.TRANSPOSE,),
    6: (Image.Transpose.ROTATE_270,),
    7: (Image.Transpose.TRANSVERSE,),
    8: (Image.Transpose.ROTATE_90,),
}
_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
# Formats whose extra frames are content (animations, pages). MPO's extra frames are depth or
# gain maps and stereo pairs, so MPO is scored on its first frame like a JPEG.
_MULTI_FRAME_FORMATS = frozenset({"GIF", "WEBP", "PNG", "TIFF"})
# Transparent pixels are shown over white, as most viewers show them.
_ALPHA_BACKGROUND = (255, 255, 255)


@dataclass(frozen=True)
class Preprocessing:
    """What the model needs from the image pipeline: input size and letterbox fill colour."""

    size: int
    fill: tuple[int, int, int]


Box = tuple[int, int, int, int]


def decode_views(data: bytes, limits: ImageConfig, prep: Preprocessing) -> torch.Tensor:
    """Decode one image into its views, a uint8 tensor [V, 3, size, size].

    Raises InvalidImage with a specific code; never anything else for bad bytes.
    """
    check_byte_size(data, limits)
    image = open_image(data, limits)
    check_structure(data, image.format, limits)
    try:
        views = [to_chw_tensor(view) for view in iter_views(image, limits, prep)]
    except InvalidImage:
        raise
    except Image.DecompressionBombError as exc:
        raise InvalidImage(ImageErrorCode.TOO_MANY_PIXELS, str(exc)) from exc
    except Exception as exc:  # Pillow's decoders raise many types; one image must not fail a batch
        raise InvalidImage(ImageErrorCode.CORRUPT, f"cannot decode {image.format}: {exc}") from exc
    return torch.stack(views)


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
    except Image.DecompressionBombError as exc:
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
            raise _too_complex(f"JPEG has over {limits.max_jpeg_scans} scans")
    elif image_format == "TIFF":
        pages = count_tiff_pages(data, limits.max_tiff_pages)
        if pages > limits.max_tiff_pages:
            raise _too_complex(f"TIFF has over {limits.max_tiff_pages} pages")


def _too_complex(reason: str) -> InvalidImage:
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


def iter_views(
    image: Image.Image, limits: ImageConfig, prep: Preprocessing
) -> Iterator[Image.Image]:
    orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    if image.format in ("JPEG", "MPO"):
        request_draft(image, limits, prep.size)
    max_frames = limits.max_frames if image.format in _MULTI_FRAME_FORMATS else 1
    for frame in iter_frames(image, max_frames, limits):
        rgb = apply_orientation(to_rgb(frame), orientation)
        for box in view_boxes(rgb.width, rgb.height, limits):
            yield fit_to_square(rgb.crop(box) if box != (0, 0, *rgb.size) else rgb, prep)


def request_draft(image: Image.Image, limits: ImageConfig, size: int) -> None:
    """Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the views still get enough pixels."""
    width, height = image.size
    long_side, short_side = max(width, height), min(width, height)
    needs_tiles = long_side / short_side > limits.tile_aspect_ratio
    scale = size / (short_side if needs_tiles else long_side)
    if scale < 1:
        image.draft(image.mode, (math.ceil(width * scale), math.ceil(height * scale)))


def iter_frames(image: Image.Image, max_frames: int, limits: ImageConfig) -> Iterator[Image.Image]:
    """The first frame of a still image; up to `max_frames` spread over an animation or pages.

    Each frame's size is checked before it is decoded: frames need not share the first's size.
    """
    n_frames = getattr(image, "n_frames", 1)
    if n_frames <= 1 or max_frames <= 1:
        yield image
        return
    # Reaching a frame composes every frame before it on the full canvas.
    width, height = image.size
    if n_frames * width * height > limits.max_animation_pixels:
        raise _too_complex(
            f"animation of {n_frames} frames on a {width}x{height} canvas is over "
            f"{limits.max_animation_pixels} frame pixels"
        )
    count = min(max_frames, n_frames)
    for index in sorted({round(i * (n_frames - 1) / (count - 1)) for i in range(count)}):
        image.seek(index)
        check_pixels(image.size, limits)
        yield image.copy()


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: 16-bit and float scaled, alpha composited on white."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _high_depth_to_rgb(image)
    if mode in ("LA", "PA", "La", "RGBa") or "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, _ALPHA_BACKGROUND)
        background.paste(image, mask=image.getchannel("A"))
        return background
    if image.mode != "RGB":
        return image.convert("RGB")
    image.load()
    return image


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float grey to 8-bit RGB, never through float64: a 50 MP
    16-bit image costs 150 MB here, not 1.5 GB."""
    pixels = np.asarray(image)
    if image.mode.startswith("I;16"):
        gray = (pixels.astype(np.uint16, copy=False) >> 8).astype(np.uint8)
    else:
        values = pixels.astype(np.float32, copy=False)
        finite = np.isfinite(values)
        low = float(values[finite].min()) if finite.any() else 0.0
        high = float(values[finite].max()) if finite.any() else 0.0
        scale = 255.0 / (high - low) if high > low else 0.0
        values = np.where(finite, values, low)
        gray = np.clip((values - low) * scale + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def apply_orientation(image: Image.Image, orientation: int) -> Image.Image:
    for method in _ORIENTATION_TRANSPOSE.get(orientation, ()):
        image = image.transpose(method)
    return image


def view_boxes(width: int, height: int, limits: ImageConfig) -> list[Box]:
    """The whole image, plus overlapping square tiles along the long side if it is extreme."""
    boxes: list[Box] = [(0, 0, width, height)]
    long_side, short_side = max(width, height), min(width, height)
    if long_side / short_side <= limits.tile_aspect_ratio or limits.max_tiles < 2:
        return boxes
    count = min(limits.max_tiles, math.ceil(long_side / short_side))
    step = (long_side - short_side) / (count - 1)
    for i in range(count):
        start = round(i * step)
        if width >= height:
            boxes.append((start, 0, start + short_side, height))
        else:
            boxes.append((0, start, width, start + short_side))
    return boxes


def fit_to_square(image: Image.Image, prep: Preprocessing) -> Image.Image:
    """Resize the longer side to `size` and pad the shorter one: the whole image stays."""
    size = prep.size
    width, height = image.size
    scale = size / max(width, height)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if new_size != image.size:
        image = image.resize(new_size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    if new_size == (size, size):
        return image
    canvas = Image.new("RGB", (size, size), prep.fill)
    canvas.paste(image, ((size - new_size[0]) // 2, (size - new_size[1]) // 2))
    return canvas


def to_chw_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)

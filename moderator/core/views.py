"""What the model is shown of an image: its views.

Every image becomes one or more square *views* of `size` x `size` uint8 RGB pixels, and the
model scores each; a policy's score for the image is its maximum over the views. The views are
chosen so the model sees what people can see:

- the whole picture letterboxed (never a centre crop), plus tiles along the long side when the
  aspect ratio is extreme, covering its whole length;
- every frame of a short animation, or frames sampled by display time from a long one (first
  and last included);
- a picture with transparency composited on white and on black (viewers use either), plus its
  raw RGB when nearly transparent pixels carry content (a thumbnailer that drops alpha shows it);
- colours converted to sRGB when the file carries an ICC profile.

Like core/images.py (opening and checks before decoding), this module needs no torch: it runs
in the decode worker processes (serving/decode_pool.py). Normalisation and the cast to the
model's dtype happen on the model's device, on the whole
batch at once (see core/clip.py), so the host moves 1 byte per channel instead of 4.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageCms

from moderator.config import ImageConfig
from moderator.core.colour import srgb_transform
from moderator.core.images import (
    check_byte_size,
    check_pixels,
    check_structure,
    open_image,
    too_complex,
)
from moderator.core.pdq import PDQ_MIN_SIDE, Pdq, pdq_of
from moderator.core.structure import read_timeline
from moderator.errors import ImageErrorCode, InvalidImage

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
# Formats whose extra frames are content (animations, pages). MPO's extra frames are depth or
# gain maps and stereo pairs, so MPO is scored on its first frame like a JPEG.
_MULTI_FRAME_FORMATS = frozenset({"GIF", "WEBP", "PNG", "TIFF"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "La", "RGBa"})
_WHITE, _BLACK = (255, 255, 255), (0, 0, 0)
_UNKNOWN_DURATION_MS = 100
# Pixels at most half opaque show faintly or not at all when composited; RGB that varies under
# them may be content someone hid, and is scored raw as well (so are anti-aliased edges: one
# extra view for some logos is the price).
_HIDDEN_ALPHA = 127
_HIDDEN_RGB_SPREAD = 16


@dataclass(frozen=True)
class Preprocessing:
    """What the model needs from the image pipeline: input size and letterbox fill colour."""

    size: int
    fill: tuple[int, int, int]


Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class DecodedImage:
    views: np.ndarray  # uint8 [V, 3, size, size], V <= limits.max_views
    pdq: Pdq  # of the first frame's pixels as stored (core/pdq.py)


def decode_views(data: bytes, limits: ImageConfig, prep: Preprocessing) -> np.ndarray:
    """The views of one image: decode_image's, its hash computed and dropped."""
    return decode_image(data, limits, prep).views


def decode_image(data: bytes, limits: ImageConfig, prep: Preprocessing) -> DecodedImage:
    """Decode one image into its views and its PDQ hash.

    Raises InvalidImage with a specific code; never anything else for bad bytes.
    """
    check_byte_size(data, limits)
    image = open_image(data, limits)
    check_structure(data, image.format, limits)
    try:
        pictures = image_views(image, data, limits, prep)
        views = [to_chw_array(view) for view in pictures.views]
        pdq = pdq_of(pictures.as_stored)
    except InvalidImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidImage(ImageErrorCode.TOO_MANY_PIXELS, str(exc)) from exc
    except MemoryError as exc:
        raise too_complex("decoding it needs more memory than the budget") from exc
    except Exception as exc:  # Pillow's decoders raise many types; one image must not fail a batch
        raise InvalidImage(ImageErrorCode.CORRUPT, f"cannot decode {image.format}: {exc}") from exc
    return DecodedImage(np.stack(views), pdq)


# -- frames ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pictures:
    views: list[Image.Image]  # every view, at most limits.max_views
    as_stored: Image.Image  # the first frame as stored (no EXIF turn, no alpha): PDQ's input


def image_views(
    image: Image.Image, data: bytes, limits: ImageConfig, prep: Preprocessing
) -> Pictures:
    """Every view of the image, at most `limits.max_views`."""
    orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    if image.format in ("JPEG", "MPO"):
        request_draft(image, limits, prep.size)
    durations, canvas = frame_plan(image, data, limits)
    width, height = _oriented_size(canvas, orientation)
    boxes = len(view_boxes(width, height, limits))
    if boxes > limits.max_views:
        raise too_complex(
            f"a {width}x{height} image needs {boxes} views, over the {limits.max_views} allowed"
        )
    to_srgb = srgb_transform(image.info.get("icc_profile"))
    picked = frames_by_display_time(durations, min(limits.max_frames, limits.max_views // boxes))
    per_frame = []
    as_stored: Image.Image | None = None
    for index in picked:
        frame = select_frame(image, index, len(durations), limits)
        if as_stored is None:
            as_stored = stored_rgb(frame)
        layers = [apply_orientation(layer, orientation) for layer in visible_layers(frame)]
        per_frame.append(frame_views(layers, limits, prep, to_srgb))
    assert as_stored is not None  # every image has a frame
    views = fit_views(per_frame, [durations[i] for i in picked], limits.max_views)
    return Pictures(views, as_stored)


def stored_rgb(frame: Image.Image) -> Image.Image:
    """A frame's pixels in RGB as numpy reads them from the file, alpha dropped: what
    python-threatexchange hashes (hash lists are made with it)."""
    if frame.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _high_depth_to_rgb(frame)
    return frame if frame.mode == "RGB" else frame.convert("RGB")


def frame_views(
    layers: list[Image.Image],
    limits: ImageConfig,
    prep: Preprocessing,
    to_srgb: ImageCms.ImageCmsTransform | None,
) -> list[Image.Image]:
    """One frame's views: for each visible layer (oriented), the whole layer and its tiles."""
    views = []
    for layer in layers:
        for box in view_boxes(layer.width, layer.height, limits):
            crop = layer.crop(box) if box != (0, 0, *layer.size) else layer
            views.append(fit_to_square(crop, prep, to_srgb))
    return views


def fit_views(
    per_frame: list[list[Image.Image]], durations: Sequence[int], max_views: int
) -> list[Image.Image]:
    """All views if they fit in `max_views`; else those of fewer frames, picked again by
    display time (frames with transparency have 2-3 layers, known only once decoded)."""
    for count in range(len(per_frame), 0, -1):
        kept = frames_by_display_time(durations, count)
        if sum(len(per_frame[i]) for i in kept) <= max_views:
            return [view for i in kept for view in per_frame[i]]
    raise too_complex(f"one frame of the image needs over {max_views} views")


def _oriented_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    return (size[1], size[0]) if orientation in (5, 6, 7, 8) else size


def request_draft(image: Image.Image, limits: ImageConfig, size: int) -> None:
    """Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the views still get enough pixels, and
    the PDQ hash its PDQ_MIN_SIDE."""
    width, height = image.size
    long_side, short_side = max(width, height), min(width, height)
    needs_tiles = long_side / short_side > limits.tile_aspect_ratio
    scale = max(size / (short_side if needs_tiles else long_side), PDQ_MIN_SIDE / long_side)
    if scale < 1:
        image.draft(image.mode, (math.ceil(width * scale), math.ceil(height * scale)))


def frame_plan(
    image: Image.Image, data: bytes, limits: ImageConfig
) -> tuple[Sequence[int], tuple[int, int]]:
    """Each frame's display time and the canvas they are composed on: one frame for a still.

    For animations both come from the file's structure, read without decoding: Pillow composes
    every frame before the one it seeks to on the full canvas (a GIF's canvas grows when a
    frame reaches past it), and an APNG's declared frame count can lie. What that work would
    cost is refused here, before any frame is decoded. TIFF pages count as frames.
    """
    if image.format not in _MULTI_FRAME_FORMATS:
        return [1], image.size
    if image.format == "TIFF":  # pages already counted (check_structure)
        return [1] * getattr(image, "n_frames", 1), image.size
    most = min(limits.max_animation_frames, limits.max_animation_pixels // _area(image.size))
    timeline = read_timeline(data, image.format or "", most)
    durations, canvas = (
        (timeline.durations_ms, timeline.canvas) if timeline is not None else ([1], image.size)
    )
    if image.format == "WEBP":
        # libwebp's own count is read without decoding; if the walk found fewer frames (a
        # header it misread), trust libwebp rather than leave frames unseen.
        counted = getattr(image, "n_frames", 1)
        if len(durations) < min(counted, most + 1):
            durations, canvas = [_UNKNOWN_DURATION_MS] * counted, image.size
    frames = len(durations)
    if frames == 1:
        return durations, canvas
    if frames > limits.max_animation_frames:
        raise too_complex(f"animation has over {limits.max_animation_frames} frames")
    if frames * _area(canvas) > limits.max_animation_pixels:
        raise too_complex(
            f"animation on a {canvas[0]}x{canvas[1]} canvas has over "
            f"{limits.max_animation_pixels // _area(canvas)} frames, over "
            f"{limits.max_animation_pixels} frame pixels"
        )
    check_pixels(canvas, limits)
    return durations, canvas


def select_frame(image: Image.Image, index: int, frames: int, limits: ImageConfig) -> Image.Image:
    """Frame `index`, its size checked before it is decoded."""
    if frames == 1:
        return image
    image.seek(index)
    check_pixels(image.size, limits)
    return image.copy()


def _area(size: tuple[int, int]) -> int:
    return max(1, size[0] * size[1])


def frames_by_display_time(durations: Sequence[int], count: int) -> list[int]:
    """Every frame if there are at most `count`; otherwise the frames on screen at `count`
    instants spread evenly over the animation's running time, first and last frame included
    (with room for only 2: the first and the longest shown; for 1: the longest shown).

    Frames that stay up longer are likelier picked, as they are likelier seen; if instants fall
    on the same frame, the longest-shown frames not yet picked fill the remaining places.
    """
    frames = len(durations)
    if frames <= count:
        return list(range(frames))
    picked: set[int] = set()
    if count >= 3:
        starts = [0] * frames
        for i in range(1, frames):
            starts[i] = starts[i - 1] + max(0, durations[i - 1])
        total = starts[-1] + max(0, durations[-1])
        picked = {0, frames - 1}
        for i in range(1, count - 1):
            picked.add(bisect.bisect_right(starts, i * total / (count - 1)) - 1)
    elif count == 2:
        picked = {0}
    for index in sorted(range(frames), key=lambda i: (-durations[i], i)):
        if len(picked) >= count:
            break
        picked.add(index)
    return sorted(picked)


# -- colour and transparency -------------------------------------------------------------------


def visible_layers(frame: Image.Image) -> list[Image.Image]:
    """The frame as people may see it, in 8-bit RGB: opaque as is; with transparency composited
    on white and on black, plus its raw RGB when hidden pixels carry content."""
    if frame.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return [_high_depth_to_rgb(frame)]
    if frame.mode in _ALPHA_MODES or "transparency" in frame.info:
        rgba = frame.convert("RGBA")
        alpha = rgba.getchannel("A")
        if alpha.getextrema()[0] != 255:
            layers = [_composite(rgba, alpha, _WHITE), _composite(rgba, alpha, _BLACK)]
            raw = rgba.convert("RGB")
            if carries_hidden_content(raw, alpha):
                layers.append(raw)
            return layers
        frame = rgba
    if frame.mode != "RGB":
        return [frame.convert("RGB")]
    frame.load()
    return [frame]


def _composite(rgba: Image.Image, alpha: Image.Image, colour: tuple[int, int, int]) -> Image.Image:
    background = Image.new("RGB", rgba.size, colour)
    background.paste(rgba, mask=alpha)
    return background


def carries_hidden_content(raw: Image.Image, alpha: Image.Image) -> bool:
    """Whether the RGB under (nearly) transparent pixels varies: a uniform colour there is how
    encoders store empty space; anything else was drawn where compositing hides it."""
    hidden = np.asarray(alpha) <= _HIDDEN_ALPHA
    if not hidden.any():
        return False
    colours = np.asarray(raw)[hidden]
    spread = colours.max(axis=0).astype(np.int16) - colours.min(axis=0)
    return bool((spread > _HIDDEN_RGB_SPREAD).any())


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


# -- geometry ----------------------------------------------------------------------------------


def view_boxes(width: int, height: int, limits: ImageConfig) -> list[Box]:
    """The whole image, plus tiles along the long side if it is extreme: each tile at most
    `tile_aspect_ratio` long, overlapping, together covering the whole length.

    An image that needs more than `max_tiles` tiles is refused, never partly seen.
    """
    boxes: list[Box] = [(0, 0, width, height)]
    long_side, short_side = max(width, height), min(width, height)
    if long_side / short_side <= limits.tile_aspect_ratio:
        return boxes
    tile_long = math.floor(short_side * limits.tile_aspect_ratio)
    count = math.ceil(long_side / tile_long)
    if count > limits.max_tiles:
        raise too_complex(
            f"a {width}x{height} image needs {count} tiles to be seen whole, over the "
            f"{limits.max_tiles} allowed"
        )
    step = (long_side - tile_long) / (count - 1)
    for i in range(count):
        start = round(i * step)
        if width >= height:
            boxes.append((start, 0, start + tile_long, height))
        else:
            boxes.append((0, start, width, start + tile_long))
    return boxes


def fit_to_square(
    image: Image.Image,
    prep: Preprocessing,
    to_srgb: ImageCms.ImageCmsTransform | None = None,
) -> Image.Image:
    """Resize the longer side to `size` and pad the shorter one: the whole image stays. Colours
    go to sRGB after resizing (the same result to within rounding, at a fraction of the cost)."""
    size = prep.size
    width, height = image.size
    scale = size / max(width, height)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if new_size != image.size:
        image = image.resize(new_size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    if to_srgb is not None:
        image = ImageCms.applyTransform(image, to_srgb) or image
    if new_size == (size, size):
        return image
    canvas = Image.new("RGB", (size, size), prep.fill)
    canvas.paste(image, ((size - new_size[0]) // 2, (size - new_size[1]) // 2))
    return canvas


def to_chw_array(image: Image.Image) -> np.ndarray:
    """An RGB image as a contiguous uint8 array [3, H, W], the model's layout."""
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))

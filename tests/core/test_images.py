from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from moderator.config import ImageConfig
from moderator.core.images import (
    Preprocessing,
    decode_views,
    fit_to_square,
    open_image,
    request_draft,
    view_boxes,
)
from moderator.errors import ImageErrorCode, InvalidImage
from tests.helpers import encode

PREP = Preprocessing(size=64, fill=(123, 117, 104))
LIMITS = ImageConfig()
RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def pixel(views: torch.Tensor, view: int, x: int, y: int) -> tuple[int, ...]:
    return tuple(int(v) for v in views[view, :, y, x])


def close_to(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 12) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


def error_code(data: bytes, limits: ImageConfig = LIMITS) -> ImageErrorCode:
    with pytest.raises(InvalidImage) as info:
        decode_views(data, limits, PREP)
    return info.value.code


def png_claiming_size(width: int, height: int) -> bytes:
    """A valid tiny PNG whose header claims width x height (a decompression bomb)."""
    data = bytearray(encode(Image.new("RGB", (1, 1))))
    ihdr = 8 + 8  # signature, then chunk length + type
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def test_square_image_becomes_one_view_of_model_size() -> None:
    views = decode_views(encode(Image.new("RGB", (100, 100), RED)), LIMITS, PREP)
    assert views.shape == (1, 3, 64, 64)
    assert views.dtype == torch.uint8
    assert close_to(pixel(views, 0, 32, 32), RED)


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", ImageErrorCode.EMPTY),
        (b"this is not an image at all", ImageErrorCode.UNSUPPORTED_FORMAT),
        (encode(Image.new("RGB", (8, 8)), "PPM"), ImageErrorCode.UNSUPPORTED_FORMAT),
        (encode(Image.new("RGB", (64, 64), RED), "JPEG")[:300], ImageErrorCode.CORRUPT),
        (encode(Image.new("RGB", (64, 64), RED), "PNG")[:-40], ImageErrorCode.CORRUPT),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, ImageErrorCode.CORRUPT),
        (png_claiming_size(100_000, 100_000), ImageErrorCode.TOO_MANY_PIXELS),
    ],
)
def test_bad_bytes_get_a_specific_code(data: bytes, code: ImageErrorCode) -> None:
    assert error_code(data) is code


def test_byte_and_pixel_limits_are_configurable() -> None:
    data = encode(Image.new("RGB", (300, 300), RED))
    assert error_code(data, ImageConfig(max_bytes=len(data) - 1)) is ImageErrorCode.TOO_MANY_BYTES
    assert error_code(data, ImageConfig(max_pixels=300 * 300 - 1)) is ImageErrorCode.TOO_MANY_PIXELS
    decode_views(data, ImageConfig(max_bytes=len(data), max_pixels=300 * 300), PREP)


def test_pixel_limit_is_checked_from_the_header_before_decoding() -> None:
    image = open_image(png_claiming_size(1000, 1000), LIMITS)
    assert image.size == (1000, 1000)  # header read; the 1x1 payload was never decoded
    with pytest.raises(InvalidImage) as info:
        open_image(png_claiming_size(100_000, 100_000), LIMITS)
    assert info.value.code is ImageErrorCode.TOO_MANY_PIXELS
    with pytest.raises(InvalidImage, match="12000x12000 = 144000000 pixels"):
        open_image(png_claiming_size(12_000, 12_000), ImageConfig(max_pixels=10**8))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_supported_formats_decode(fmt: str) -> None:
    views = decode_views(encode(Image.new("RGB", (80, 80), BLUE), fmt), LIMITS, PREP)
    assert close_to(pixel(views, 0, 32, 32), BLUE, tolerance=20)


def test_letterbox_keeps_the_whole_image_and_pads() -> None:
    image = Image.new("RGB", (200, 100), WHITE)
    image.paste(RED, (190, 0, 200, 100))  # a red strip at the far right edge
    square = fit_to_square(image, PREP)
    assert square.size == (64, 64)
    assert close_to(square.getpixel((63, 32)), RED, tolerance=40)  # type: ignore[arg-type]
    assert square.getpixel((32, 2)) == PREP.fill  # padding above, not a crop
    assert close_to(square.getpixel((32, 32)), WHITE)  # type: ignore[arg-type]


def test_extreme_aspect_ratio_adds_tiles_covering_the_whole_image() -> None:
    boxes = view_boxes(1000, 100, LIMITS)
    assert boxes[0] == (0, 0, 1000, 100)
    tiles = boxes[1:]
    assert len(tiles) == LIMITS.max_tiles
    assert tiles[0][0] == 0
    assert tiles[-1][2] == 1000
    assert all(box[2] - box[0] == 100 for box in tiles)
    assert view_boxes(150, 100, LIMITS) == [(0, 0, 150, 100)]
    assert len(view_boxes(100, 1000, LIMITS)) == 1 + LIMITS.max_tiles


def test_tiles_see_an_edge_detail_at_full_scale() -> None:
    image = Image.new("RGB", (1000, 100), WHITE)
    image.paste(RED, (930, 20, 990, 80))
    views = decode_views(encode(image), LIMITS, PREP)
    assert views.shape[0] == 1 + LIMITS.max_tiles
    last_tile = views[-1]
    red_pixels = ((last_tile[0] > 200) & (last_tile[1] < 60)).sum()
    assert red_pixels > 500  # the detail fills a good part of the last tile


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (200, 100), RED)
    image.paste(BLUE, (100, 0, 200, 100))  # stored: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    views = decode_views(encode(image, "JPEG", exif=exif, quality=95), LIMITS, PREP)
    assert close_to(pixel(views, 0, 32, 8), RED, tolerance=30)  # left went to the top
    assert close_to(pixel(views, 0, 32, 56), BLUE, tolerance=30)
    assert pixel(views, 0, 2, 32) == PREP.fill  # now portrait: padded left and right


def test_colour_modes_become_correct_rgb() -> None:
    gray = Image.new("L", (32, 32), 200)
    assert close_to(pixel(decode_views(encode(gray), LIMITS, PREP), 0, 32, 32), (200, 200, 200))

    transparent = Image.new("RGBA", (32, 32), (255, 0, 0, 0))
    assert close_to(pixel(decode_views(encode(transparent), LIMITS, PREP), 0, 32, 32), WHITE)

    half = Image.new("LA", (32, 32), (0, 255))
    assert close_to(pixel(decode_views(encode(half), LIMITS, PREP), 0, 32, 32), (0, 0, 0))

    palette = Image.new("P", (32, 32), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette.info["transparency"] = 0
    assert close_to(pixel(decode_views(encode(palette), LIMITS, PREP), 0, 32, 32), BLUE)

    cmyk = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # pure red in CMYK
    assert close_to(pixel(decode_views(encode(cmyk, "JPEG"), LIMITS, PREP), 0, 32, 32), RED, 30)


def test_sixteen_bit_images_are_scaled_not_clipped() -> None:
    array = np.full((32, 32), 32768, dtype=np.uint16)  # mid-gray in 16 bits
    image = Image.fromarray(array)
    assert image.mode.startswith("I;16")
    views = decode_views(encode(image), LIMITS, PREP)
    assert close_to(pixel(views, 0, 32, 32), (128, 128, 128), tolerance=2)


def test_large_jpeg_is_decoded_at_reduced_scale() -> None:
    big = encode(Image.new("RGB", (4000, 3000), RED), "JPEG")
    image = Image.open(io.BytesIO(big))
    request_draft(image, LIMITS, size=224)
    assert image.size == (500, 375)  # 1/8 scale still covers 224 on the long side
    image = Image.open(io.BytesIO(big))
    request_draft(image, LIMITS, size=1100)
    assert image.size == (2000, 1500)
    views = decode_views(big, LIMITS, PREP)
    assert close_to(pixel(views, 0, 32, 32), RED, tolerance=20)


def test_animated_images_are_checked_beyond_the_first_frame() -> None:
    frames = [Image.new("RGB", (40, 40), (0, 0, 200 + i)) for i in range(9)]
    frames.append(Image.new("RGB", (40, 40), RED))
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    views = decode_views(buffer.getvalue(), LIMITS, PREP)
    assert views.shape[0] == LIMITS.max_frames
    assert close_to(pixel(views, 0, 32, 32), (0, 0, 200), tolerance=20)
    assert close_to(pixel(views, views.shape[0] - 1, 32, 32), RED, tolerance=20)


@pytest.mark.parametrize("max_tiles", [4, 1])
def test_max_views_is_the_most_views_an_image_gets(max_tiles: int) -> None:
    limits = ImageConfig(max_tiles=max_tiles)
    frames = [Image.new("RGB", (400, 40), (i * 50, 0, 0)) for i in range(6)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert decode_views(buffer.getvalue(), limits, PREP).shape[0] == limits.max_views


def test_every_page_of_a_multi_page_image_is_size_checked() -> None:
    buffer = io.BytesIO()
    small, huge = Image.new("RGB", (8, 8), RED), Image.new("L", (2000, 2000))
    small.save(buffer, "TIFF", save_all=True, append_images=[huge])
    assert error_code(buffer.getvalue(), ImageConfig(max_pixels=1_000_000)) is (
        ImageErrorCode.TOO_MANY_PIXELS
    )
    assert decode_views(buffer.getvalue(), LIMITS, PREP).shape[0] == 2  # both pages scored


def test_transparent_colour_of_an_rgb_png_is_shown_as_white() -> None:
    image = Image.new("RGB", (32, 32), RED)
    views = decode_views(encode(image, transparency=RED), LIMITS, PREP)
    assert close_to(pixel(views, 0, 32, 32), WHITE)


def gif_of_tiny_frames(frames: int, canvas: int) -> bytes:
    """A few hundred bytes: 1x1 frames on a huge logical screen, each composed on all of it."""
    out = bytearray(b"GIF89a" + struct.pack("<HH", canvas, canvas) + bytes([0x80, 0, 0]))
    out += bytes([0, 0, 0, 255, 255, 255])
    for i in range(frames):
        out += b"\x21\xf9\x04\x00\x01\x00\x00\x00"  # graphic control: 10 ms
        out += b"\x2c" + struct.pack("<HHHH", i % 100, 0, 1, 1) + b"\x00"
        out += bytes([2, 2, 0x4C, 0x01, 0])  # LZW minimum code size 2, one data sub-block
    return bytes(out + b"\x3b")


def test_an_animation_over_the_frame_pixel_budget_is_too_complex() -> None:
    bomb = gif_of_tiny_frames(frames=20, canvas=6000)
    assert len(bomb) < 1000
    with pytest.raises(InvalidImage, match="20 frames on a 6000x6000 canvas") as info:
        decode_views(bomb, LIMITS, PREP)
    assert info.value.code is ImageErrorCode.TOO_COMPLEX
    small = gif_of_tiny_frames(frames=20, canvas=64)
    assert decode_views(small, LIMITS, PREP).shape[0] == LIMITS.max_frames


def test_a_jpeg_with_too_many_scans_is_too_complex() -> None:
    image = Image.effect_noise((96, 96), 40).convert("RGB")
    progressive = encode(image, "JPEG", progressive=True)
    assert decode_views(progressive, LIMITS, PREP).shape[0] == 1
    assert error_code(progressive, ImageConfig(max_jpeg_scans=3)) is ImageErrorCode.TOO_COMPLEX


def test_a_tiff_with_too_many_pages_is_too_complex() -> None:
    pages = [Image.new("RGB", (16, 16), colour) for colour in ("red", "green", "blue")]
    data = encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    assert decode_views(data, LIMITS, PREP).shape[0] == 3
    assert error_code(data, ImageConfig(max_tiff_pages=2)) is ImageErrorCode.TOO_COMPLEX


def test_only_accepted_formats_are_ever_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import PcxImagePlugin

    def must_not_run(self: object) -> None:
        raise AssertionError("the PCX header parser ran for a format that is not accepted")

    pcx = encode(Image.new("RGB", (8, 8), "red"), "PCX")
    monkeypatch.setattr(PcxImagePlugin.PcxImageFile, "_open", must_not_run)
    assert error_code(pcx) is ImageErrorCode.UNSUPPORTED_FORMAT


def test_sixteen_bit_images_are_reduced_without_float64_copies() -> None:
    import tracemalloc

    side = 1500
    ramp = np.tile(np.linspace(0, 65535, side, dtype=np.uint16), (side, 1))
    data = encode(Image.fromarray(ramp), "PNG")
    tracemalloc.start()
    try:
        decode_views(data, LIMITS, PREP)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    float64_copy = side * side * 8
    assert peak < float64_copy

"""Opening an image: limits, formats and structure checked before anything is decoded."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from PIL import Image

from moderator.config import ImageConfig
from moderator.core.images import open_image
from moderator.core.views import Preprocessing, decode_views
from moderator.demo.hostile import gif_of_tiny_frames, png_claiming_size
from moderator.errors import ImageErrorCode, InvalidImage
from tests.helpers import close_to, encode, pixel

PREP = Preprocessing(size=64, fill=(123, 117, 104))
LIMITS = ImageConfig()
RED, BLUE = (255, 0, 0), (0, 0, 255)


def error_code(data: bytes, limits: ImageConfig = LIMITS) -> ImageErrorCode:
    with pytest.raises(InvalidImage) as info:
        decode_views(data, limits, PREP)
    return info.value.code


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


def test_only_accepted_formats_are_ever_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import PcxImagePlugin

    def must_not_run(self: object) -> None:
        raise AssertionError("the PCX header parser ran for a format that is not accepted")

    pcx = encode(Image.new("RGB", (8, 8), "red"), "PCX")
    monkeypatch.setattr(PcxImagePlugin.PcxImageFile, "_open", must_not_run)
    assert error_code(pcx) is ImageErrorCode.UNSUPPORTED_FORMAT


def test_every_page_of_a_multi_page_image_is_size_checked() -> None:
    small, huge = Image.new("RGB", (8, 8), RED), Image.new("L", (2000, 2000))
    data = encode(small, "TIFF", save_all=True, append_images=[huge])
    assert error_code(data, ImageConfig(max_pixels=1_000_000)) is ImageErrorCode.TOO_MANY_PIXELS
    assert decode_views(data, LIMITS, PREP).shape[0] == 2  # both pages scored


def test_an_animation_over_the_frame_pixel_budget_is_too_complex() -> None:
    bomb = gif_of_tiny_frames(frames=20, canvas=6000)
    assert len(bomb) < 1000
    with pytest.raises(InvalidImage, match="6000x6000 canvas has over 13 frames") as info:
        decode_views(bomb, LIMITS, PREP)
    assert info.value.code is ImageErrorCode.TOO_COMPLEX
    assert decode_views(gif_of_tiny_frames(frames=20, canvas=64), LIMITS, PREP).shape[0] >= 16


def test_an_animation_over_the_frame_count_is_too_complex() -> None:
    many = gif_of_tiny_frames(frames=50, canvas=64)
    assert error_code(many, ImageConfig(max_animation_frames=49)) is ImageErrorCode.TOO_COMPLEX
    assert decode_views(many, ImageConfig(max_animation_frames=50), PREP).shape[0] >= 16


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


def test_sixteen_bit_images_are_reduced_without_float64_copies() -> None:
    side = 1500
    ramp = np.tile(np.linspace(0, 65535, side, dtype=np.uint16), (side, 1))
    data = encode(Image.fromarray(ramp), "PNG")
    tracemalloc.start()
    try:
        decode_views(data, LIMITS, PREP)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < side * side * 8  # one float64 copy


def test_pillow_bomb_check_is_the_service_limit() -> None:
    open_image(encode(Image.new("L", (10, 10))), ImageConfig(max_pixels=100))
    assert Image.MAX_IMAGE_PIXELS == 100

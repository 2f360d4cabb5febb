"""The hostile image generators: small bytes, the right format, and the structure they claim."""

from __future__ import annotations

import io
import random
import struct
import subprocess
import sys

import pytest
from PIL import Image

from moderator.core.structure import count_jpeg_scans, count_tiff_pages
from moderator.demo.hostile import (
    HOSTILE_SAMPLES,
    apng_lying_frame_count,
    gif_growing_canvas,
    gif_of_tiny_frames,
    hidden_under_alpha,
    long_strip,
    many_frame_gif,
    mutate,
    png_claiming_size,
    png_pixel_bomb,
    progressive_jpeg_with_scans,
    sixteen_bit_png,
    tiff_with_pages,
)
from moderator.demo.shapes import DEFAULT_BACKGROUND, render_shape

RED_STAR = render_shape("red", "star", 64, 64)


def opened(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def frames(image: Image.Image) -> int:
    return int(getattr(image, "n_frames", 1))


def near(actual: object, expected: tuple[int, int, int], tolerance: int = 40) -> bool:
    assert isinstance(actual, tuple)
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


def test_gif_of_tiny_frames_claims_a_huge_canvas_in_a_few_bytes() -> None:
    data = gif_of_tiny_frames(frames=20, canvas=6000)
    assert len(data) < 1000
    image = opened(data)
    assert (image.format, image.size, frames(image)) == ("GIF", (6000, 6000), 20)


def test_gif_canvas_grows_past_the_logical_screen_at_seek() -> None:
    data = gif_growing_canvas(frames=3, screen=1, extent=300)
    assert len(data) < 100
    image = opened(data)
    assert (image.format, image.size, frames(image)) == ("GIF", (1, 1), 3)
    image.seek(1)
    assert image.size == (300, 300)


@pytest.mark.parametrize(("declared", "actual"), [(100_000, 3), (1, 4)])
def test_apng_frame_count_is_the_declared_one(declared: int, actual: int) -> None:
    data = apng_lying_frame_count(declared, actual)
    assert len(data) < 1000
    at = data.index(b"acTL")
    assert struct.unpack(">I", data[at + 4 : at + 8])[0] == declared
    assert data.count(b"fcTL") == actual
    image = opened(data)  # the CRC was fixed, or Pillow would refuse the chunk
    assert (image.format, frames(image)) == ("PNG", declared)


def test_png_claiming_size_has_a_huge_header_and_no_data() -> None:
    data = png_claiming_size(1000, 1000)
    assert len(data) < 100
    image = opened(data)
    assert (image.format, image.size) == ("PNG", (1000, 1000))
    with pytest.raises(OSError, match="truncated"):
        image.load()


def test_png_pixel_bomb_is_real_and_compresses_a_thousand_fold() -> None:
    data = png_pixel_bomb(2000, 2000)
    assert len(data) < 2000 * 2000 // 500
    image = opened(data)
    assert (image.format, image.mode, image.size) == ("PNG", "L", (2000, 2000))
    assert image.getextrema() == (0, 0)


def test_sixteen_bit_png_spans_the_full_range() -> None:
    data = sixteen_bit_png(300, 200)
    assert len(data) < 20_000
    image = opened(data)
    assert (image.format, image.size) == ("PNG", (300, 200))
    assert image.mode.startswith("I;16")
    assert image.getextrema() == (0, 65535)


def test_progressive_jpeg_has_exactly_the_requested_scans_and_decodes() -> None:
    small = progressive_jpeg_with_scans(20, side=64)
    assert count_jpeg_scans(small, 10_000) == 20
    image = opened(small)
    assert (image.format, image.size) == ("JPEG", (64, 64))
    assert image.info.get("progressive") or image.info.get("progression")
    image.load()
    assert near(image.getpixel((32, 32)), (128, 128, 128), tolerance=8)

    many = progressive_jpeg_with_scans(2000)
    assert count_jpeg_scans(many, 10_000) == 2000
    assert len(many) < 2000 * 16
    with pytest.raises(ValueError, match="has 10 scans"):
        progressive_jpeg_with_scans(5)


def test_tiff_pages_share_one_strip() -> None:
    data = tiff_with_pages(300, side=16)
    assert len(data) < 300 * 120 + 16 * 16 + 16
    assert count_tiff_pages(data, 10_000) == 300
    image = opened(data)
    assert (image.format, image.size, frames(image)) == ("TIFF", (16, 16), 300)
    image.seek(299)
    assert image.getextrema() == (0, 255)


def test_hidden_under_alpha_is_blank_to_a_viewer_and_content_without_alpha() -> None:
    data = hidden_under_alpha(RED_STAR)
    image = opened(data)
    assert (image.format, image.mode) == ("PNG", "RGBA")
    assert image.getchannel("A").getextrema() == (0, 0)
    assert image.convert("RGB").tobytes() == RED_STAR.tobytes()
    on_white = Image.new("RGB", image.size, (255, 255, 255))
    on_white.paste(image, mask=image.getchannel("A"))
    assert on_white.getextrema() == ((255, 255), (255, 255), (255, 255))


@pytest.mark.parametrize(("position", "centre"), [(1.0, 1970), (0.5, 1000)])
def test_long_strip_puts_content_where_asked(position: float, centre: int) -> None:
    data = long_strip(2000, 60, RED_STAR, position=position)
    assert len(data) < 5000
    image = opened(data).convert("RGB")
    assert image.size == (2000, 60)
    assert near(image.getpixel((centre, 30)), (220, 30, 30))
    assert image.getpixel((100, 30)) == DEFAULT_BACKGROUND


def test_many_frame_gif_shows_the_content_in_one_frame_only() -> None:
    data = many_frame_gif(frames=40, side=32, content_frame_index=21, content=RED_STAR)
    assert len(data) < 4000
    image = opened(data)
    assert (image.format, frames(image)) == ("GIF", 40)
    for index in (0, 13, 20, 21, 22, 39):
        image.seek(index)
        red = near(image.convert("RGB").getpixel((16, 16)), (220, 30, 30))
        assert red == (index == 21), index
    image.seek(21)
    assert image.info["duration"] == 5000


def test_mutate_is_deterministic_for_a_seed() -> None:
    data = progressive_jpeg_with_scans(12, side=32)
    first = [mutate(data, random.Random(seed)) for seed in range(50)]
    again = [mutate(data, random.Random(seed)) for seed in range(50)]
    assert first == again
    assert len(set(first)) > 45
    assert all(m and m != data for m in first)
    assert mutate(b"", random.Random(1))


SAMPLE_FORMATS = {
    "gif_of_tiny_frames": "GIF",
    "gif_growing_canvas": "GIF",
    "apng_lying_frame_count": "PNG",
    "apng_hiding_frames": "PNG",
    "png_claiming_size": "PNG",
    "png_pixel_bomb": "PNG",
    "sixteen_bit_png": "PNG",
    "progressive_jpeg_with_scans": "JPEG",
    "tiff_with_pages": "TIFF",
    "hidden_under_alpha": "PNG",
    "long_strip": "PNG",
    "many_frame_gif": "GIF",
    "mutated_jpeg": None,
}
MAGIC = {"GIF": b"GIF89a", "PNG": b"\x89PNG\r\n\x1a\n", "JPEG": b"\xff\xd8\xff", "TIFF": b"II*\x00"}


def test_every_sample_is_small_and_of_its_format() -> None:
    assert set(HOSTILE_SAMPLES) == set(SAMPLE_FORMATS)
    for name, make in HOSTILE_SAMPLES.items():
        data = make()
        assert make() is data  # generated once
        assert 0 < len(data) < 200_000, name
        fmt = SAMPLE_FORMATS[name]
        assert fmt is None or data.startswith(MAGIC[fmt]), name


def test_the_module_imports_without_torch() -> None:
    code = "import sys, moderator.demo.hostile; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)

from __future__ import annotations

import io
import struct

from PIL import Image

from moderator.core.structure import count_jpeg_scans, count_tiff_pages


def noise(size: int = 96) -> Image.Image:
    return Image.effect_noise((size, size), 40).convert("RGB")


def jpeg(progressive: bool) -> bytes:
    buffer = io.BytesIO()
    noise().save(buffer, "JPEG", progressive=progressive, quality=90)
    return buffer.getvalue()


def tiff(pages: int, big: bool = False) -> bytes:
    buffer = io.BytesIO()
    frames = [noise(16) for _ in range(pages)]
    frames[0].save(buffer, "TIFF", save_all=True, append_images=frames[1:], big_tiff=big)
    return buffer.getvalue()


def test_jpeg_scans_are_counted_without_decoding() -> None:
    assert count_jpeg_scans(jpeg(progressive=False), 100) == 1
    progressive = count_jpeg_scans(jpeg(progressive=True), 100)
    assert 2 < progressive < 20
    assert count_jpeg_scans(jpeg(progressive=True), 3) == 4  # stops one past the limit


def test_an_exif_thumbnail_is_not_counted_as_scans() -> None:
    buffer = io.BytesIO()
    thumbnail = jpeg(progressive=True)
    exif = Image.Exif()
    exif[0x010E] = "x"
    image = noise()
    image.save(buffer, "JPEG", exif=b"Exif\x00\x00" + thumbnail)  # a JPEG inside APP1
    assert count_jpeg_scans(buffer.getvalue(), 100) == 1


def test_truncated_or_garbage_jpeg_ends_the_walk() -> None:
    data = jpeg(progressive=True)
    assert count_jpeg_scans(data[: len(data) // 2], 100) >= 1
    assert count_jpeg_scans(b"\xff\xd8\xff", 100) == 0
    assert count_jpeg_scans(b"\xff\xd8" + b"\x00" * 64, 100) == 0


def test_tiff_pages_are_counted_in_both_layouts() -> None:
    assert count_tiff_pages(tiff(1), 10) == 1
    assert count_tiff_pages(tiff(3), 10) == 3
    assert count_tiff_pages(tiff(2, big=True), 10) == 2
    assert count_tiff_pages(tiff(5), 2) == 3  # stops one past the limit


def test_a_looping_ifd_chain_is_counted_once() -> None:
    # little-endian classic TIFF: header -> IFD at 8 with no entries, whose next IFD is itself
    data = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 0) + struct.pack("<I", 8)
    assert count_tiff_pages(data, 1000) == 1


def test_offsets_outside_the_file_end_the_chain() -> None:
    data = b"MM\x00*" + struct.pack(">I", 10_000)
    assert count_tiff_pages(data, 10) == 0
    assert count_tiff_pages(b"II*\x00", 10) == 0

from __future__ import annotations

import io
import random
import struct
import time
import zlib

import pytest
from PIL import Image

from moderator.core.structure import Timeline, count_jpeg_scans, count_tiff_pages, read_timeline
from tests.helpers import encode


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


# Animations: read_timeline must agree with what Pillow shows at image.seek(i).

ANIMATED = {"GIF": {}, "PNG": {}, "WEBP": {"lossless": True}}


def animation(fmt: str, durations: list[int], **save_args: object) -> bytes:
    """One distinct frame per duration (Pillow's writers merge identical neighbours)."""
    frames = [
        Image.new("RGB", (12, 8), (40 * i % 256, 255 - 30 * i % 256, 7 * i))
        for i in range(len(durations))
    ]
    return encode(
        frames[0],
        fmt,
        save_all=True,
        append_images=frames[1:],
        duration=durations,
        **ANIMATED[fmt],
        **save_args,
    )


def n_frames(image: Image.Image) -> int:
    return int(getattr(image, "n_frames", 1))


def shown(duration: float) -> int:
    """How browsers show a delay: under 20 ms (or none) for 100 ms."""
    return 100 if duration < 20 else round(duration)


def pillow_timeline(
    data: bytes, frames: int | None = None
) -> tuple[tuple[int, ...], tuple[int, int]]:
    """Display times at image.seek(i), every frame's or the first `frames`; the final size."""
    with Image.open(io.BytesIO(data)) as image:
        durations = []
        for index in range(n_frames(image) if frames is None else frames):
            image.seek(index)
            image.load()  # WebP knows a frame's duration only once it is decoded
            durations.append(shown(image.info.get("duration", 0)))
        return tuple(durations), image.size


@pytest.mark.parametrize("fmt", sorted(ANIMATED))
@pytest.mark.parametrize(
    "durations", [[100, 250, 40, 1000], [0, 0, 0], [0, 10, 20, 30, 15], [70, 70]]
)
def test_a_timeline_matches_what_pillow_shows_frame_by_frame(
    fmt: str, durations: list[int]
) -> None:
    data = animation(fmt, durations)
    timeline = read_timeline(data, fmt, 100)
    assert timeline is not None
    with Image.open(io.BytesIO(data)) as image:
        assert timeline.frames == n_frames(image)
    assert (timeline.durations_ms, timeline.canvas) == pillow_timeline(data)
    assert timeline.largest_frame_pixels <= 12 * 8
    assert all(d >= 20 for d in timeline.durations_ms)


def test_an_apng_default_image_outside_the_animation_is_pillows_frame_0() -> None:
    # the first image becomes the default; durations go to the appended ones: 300 ms, then 0 ms
    data = animation("PNG", [300, 0, 50], default_image=True)
    timeline = read_timeline(data, "PNG", 100)
    assert timeline is not None
    with Image.open(io.BytesIO(data)) as image:
        assert n_frames(image) == timeline.frames == 3  # the default image, then 2 frames
        assert "duration" not in image.info  # the default image has no delay of its own
    assert timeline.durations_ms == pillow_timeline(data)[0] == (100, 300, 100)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, pos = [], 8
    while pos < len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        chunks.append((kind, data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return chunks


def png_from(chunks: list[tuple[bytes, bytes]]) -> bytes:
    return PNG_SIGNATURE + b"".join(
        struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        for kind, body in chunks
    )


def with_actl(data: bytes, declared: int) -> bytes:
    """The APNG with its acTL declaring `declared` frames (its CRC fixed, as a liar would)."""
    chunks = png_chunks(data)
    return png_from(
        [(k, struct.pack(">I", declared) + b[4:] if k == b"acTL" else b) for k, b in chunks]
    )


def test_an_apng_actl_that_overstates_is_not_believed() -> None:
    data = with_actl(animation("PNG", [100, 200, 300]), 1000)
    timeline = read_timeline(data, "PNG", 100)
    assert timeline is not None
    assert timeline.frames == 3
    with Image.open(io.BytesIO(data)) as image:
        assert n_frames(image) == 1000  # Pillow believes it
        image.seek(2)
        with pytest.raises(OSError, match="Truncated"):
            image.seek(3)  # ...until it seeks past the frames that are there
    assert timeline.durations_ms == pillow_timeline(data, 3)[0] == (100, 200, 300)


def test_an_apng_actl_that_understates_bounds_what_pillow_shows() -> None:
    data = with_actl(animation("PNG", [100, 200, 300]), 2)
    timeline = read_timeline(data, "PNG", 100)
    assert timeline is not None
    with Image.open(io.BytesIO(data)) as image:
        assert n_frames(image) == timeline.frames == 2
    assert timeline.durations_ms == (100, 200)


def test_an_apng_frame_out_of_sequence_ends_the_walk_where_pillow_stops() -> None:
    chunks = png_chunks(animation("PNG", [100, 200, 300, 400]))
    controls = [i for i, (kind, _) in enumerate(chunks) if kind == b"fcTL"]
    kind, body = chunks[controls[2]]
    chunks[controls[2]] = (kind, struct.pack(">I", 99) + body[4:])  # frame 2: sequence 99
    data = png_from(chunks)
    timeline = read_timeline(data, "PNG", 100)
    assert timeline is not None
    assert timeline.durations_ms == (100, 200)
    with Image.open(io.BytesIO(data)) as image:
        image.seek(1)
        with pytest.raises(SyntaxError, match="sequence"):
            image.seek(2)


def test_an_apng_frame_without_image_data_is_not_counted() -> None:
    chunks = png_chunks(animation("PNG", [100, 200, 300]))
    data = png_from([c for i, c in enumerate(chunks) if i != len(chunks) - 2])  # last fdAT
    timeline = read_timeline(data, "PNG", 100)
    assert timeline is not None
    assert timeline.durations_ms == (100, 200)
    with Image.open(io.BytesIO(data)) as image:
        image.seek(1)
        with pytest.raises(EOFError):
            image.seek(2)


def test_a_png_without_actl_or_with_it_after_the_image_data_is_still() -> None:
    assert read_timeline(encode(noise(16)), "PNG", 100) is None
    chunks = png_chunks(animation("PNG", [100, 200]))
    actl = next(c for c in chunks if c[0] == b"acTL")
    moved = [c for c in chunks if c[0] != b"acTL"]
    moved.insert(-1, actl)  # before IEND, after everything else
    data = png_from(moved)
    with Image.open(io.BytesIO(data)) as image:
        assert n_frames(image) == 1
    assert read_timeline(data, "PNG", 100) is None


def gif_image_data(width: int, height: int) -> bytes:
    """LZW code size and sub-blocks of a width x height frame, taken from Pillow's own GIF."""
    data = encode(Image.new("L", (width, height)), "GIF")
    pos = data.index(b",", 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0))
    assert not data[pos + 9] & 0x80  # no local colour table
    return data[pos + 10 : -1]  # up to the trailer


def gif(
    screen: tuple[int, int], frames: list[tuple[int, int, int, int]], delays: list[int | None]
) -> bytes:
    """A GIF89a with a 2-colour global table and one frame per (left, top, width, height)."""
    out = [b"GIF89a", struct.pack("<HHBBB", *screen, 0x80, 0, 0), b"\x00\x00\x00\xff\xff\xff"]
    for (left, top, width, height), delay in zip(frames, delays, strict=True):
        if delay is not None:
            out.append(b"\x21\xf9\x04\x00" + struct.pack("<H", delay) + b"\x00\x00")
        out.append(b"," + struct.pack("<4HB", left, top, width, height, 0))
        out.append(gif_image_data(width, height))
    return b"".join([*out, b";"])


def test_a_gif_canvas_grows_as_pillow_grows_it() -> None:
    data = gif((4, 4), [(0, 0, 4, 4), (2, 3, 5, 6), (1, 1, 2, 2)], [5, None, 0])
    timeline = read_timeline(data, "GIF", 100)
    assert timeline == Timeline(canvas=(7, 9), durations_ms=(50, 100, 100), largest_frame_pixels=30)
    with Image.open(io.BytesIO(data)) as image:
        assert image.size == (4, 4)
        image.seek(1)
        assert image.size == (7, 9)
    assert pillow_timeline(data) == (timeline.durations_ms, timeline.canvas)


def test_a_gif_graphic_control_applies_to_the_next_frame_only() -> None:
    data = gif((2, 2), [(0, 0, 2, 2)] * 3, [30, None, 2])
    timeline = read_timeline(data, "GIF", 100)
    assert timeline is not None
    assert timeline.durations_ms == pillow_timeline(data)[0] == (300, 100, 20)


def many_frames_gif(count: int) -> bytes:
    frame = b"," + struct.pack("<4HB", 0, 0, 1, 1, 0) + gif_image_data(1, 1)
    return b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0x80, 0, 0) + b"\x00" * 6 + frame * count + b";"


def test_the_walk_stops_one_frame_past_the_limit_and_fast() -> None:
    data = many_frames_gif(10_000)
    started = time.perf_counter()
    timeline = read_timeline(data, "GIF", 1000)
    elapsed = time.perf_counter() - started
    assert timeline is not None
    assert timeline.frames == 1001
    assert elapsed < 0.05
    whole = read_timeline(data, "GIF", 20_000)
    assert whole is not None
    with Image.open(io.BytesIO(data)) as image:
        assert whole.frames == n_frames(image) == 10_000


@pytest.mark.parametrize("fmt", sorted(ANIMATED))
def test_two_frames_are_read_whatever_the_limit(fmt: str) -> None:
    timeline = read_timeline(animation(fmt, [100, 200, 300]), fmt, 0)
    assert timeline is not None
    assert timeline.frames == 2  # enough to tell an animation from a still image


@pytest.mark.parametrize("fmt", sorted(ANIMATED))
def test_still_images_and_other_formats_have_no_timeline(fmt: str) -> None:
    assert read_timeline(encode(noise(16), fmt, **ANIMATED[fmt]), fmt, 100) is None
    assert read_timeline(jpeg(progressive=False), "JPEG", 100) is None
    assert read_timeline(animation(fmt, [100, 100]), "JPEG", 100) is None
    assert read_timeline(b"", fmt, 100) is None


@pytest.mark.parametrize("fmt", sorted(ANIMATED))
def test_every_prefix_of_an_animation_ends_the_walk(fmt: str) -> None:
    data = animation(fmt, [100, 0, 50, 30])
    whole = read_timeline(data, fmt, 100)
    assert whole is not None
    for end in range(len(data)):
        timeline = read_timeline(data[:end], fmt, 100)
        assert timeline is None or timeline.durations_ms == whole.durations_ms[: timeline.frames]


def test_a_truncated_gif_counts_the_frames_pillow_counts() -> None:
    data = animation("GIF", [100, 0, 50, 30])
    for end in range(len(data)):
        try:
            with Image.open(io.BytesIO(data[:end])) as image:
                expected = n_frames(image)
        except (OSError, SyntaxError, IndexError, struct.error):
            continue  # Pillow cannot read this prefix
        timeline = read_timeline(data[:end], "GIF", 100)
        assert (timeline.frames if timeline else 1) == expected, end


@pytest.mark.parametrize("fmt", sorted(ANIMATED))
def test_random_damage_never_raises_or_hangs(fmt: str) -> None:
    rng = random.Random(1234)
    data = animation(fmt, [100, 0, 50, 30])
    started = time.perf_counter()
    for _ in range(2000):
        damaged = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        timeline = read_timeline(bytes(damaged), fmt, 100)
        assert timeline is None or 2 <= timeline.frames <= 101
    assert time.perf_counter() - started < 5

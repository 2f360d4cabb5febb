"""Hostile images, generated small: for the tests, the fuzz test and the soak benchmark.

Each generator returns the encoded bytes of one attack, built in memory from Pillow, numpy and
struct only (no torch: this module imports without it). Two kinds of attack are here:

- cost: a few bytes or kilobytes that make a naive decoder spend seconds or gigabytes
  (frames x canvas, growing canvases, scan counts, page counts, pixel bombs);
- evasion: images that decode cheaply but show a viewer something a naive moderation pipeline
  never looks at (content under zero alpha, at the far end of a strip, in an unsampled frame).

`HOSTILE_SAMPLES` holds one small instance of each, sized so the service's default limits refuse
it or decode it quickly; `mutate` makes fuzz cases from any bytes.
"""

from __future__ import annotations

import functools
import io
import random
import struct
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image

from moderator.demo.shapes import DEFAULT_BACKGROUND, render_shape

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SOS = 0xDA
_EOI = 0xD9


def _encode(image: Image.Image, fmt: str, **save_args: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    return buffer.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload))
    )


def gif_of_tiny_frames(frames: int, canvas: int) -> bytes:
    """1x1 frames on a `canvas` x `canvas` logical screen: 23 bytes a frame.

    Attack: frames x canvas area. Every frame is composed on the whole canvas, so reaching the
    last frame costs a naive decoder `frames` full-canvas passes for a file of a few hundred
    bytes (20 frames of 6000x6000, 480 bytes: 1.8 s and 311 MB peak in plain Pillow).
    """
    out = bytearray(b"GIF89a" + struct.pack("<HH", canvas, canvas) + bytes([0x80, 0, 0]))
    out += bytes([0, 0, 0, 255, 255, 255])  # global colour table: black, white
    for i in range(frames):
        out += b"\x21\xf9\x04\x00\x01\x00\x00\x00"  # graphic control: 10 ms
        out += b"\x2c" + struct.pack("<HHHH", i % 100, 0, 1, 1) + b"\x00"
        out += bytes([2, 2, 0x4C, 0x01, 0])  # LZW minimum code size 2, one data sub-block
    return bytes(out + b"\x3b")


def gif_growing_canvas(frames: int = 2, screen: int = 1, extent: int = 12_000) -> bytes:
    """A `screen` x `screen` logical screen whose frames after the first are 1x1 images placed
    at (`extent` - 1, `extent` - 1), far past it.

    Attack: Pillow grows the canvas to `extent` x `extent` when it seeks to such a frame (after
    the file was opened, so a size check at open sees `screen` x `screen`, and so does a
    frames x canvas check made with the opened size). Each later frame is then composed on the
    grown canvas: `frames` x `extent`**2 pixel writes for about 23 bytes a frame (200 frames
    growing to 7000x7000, 4.6 KB: 30 s and 423 MB peak in plain Pillow). Pillow's own bomb
    check at seek raises only past twice `Image.MAX_IMAGE_PIXELS`.
    """
    if not 1 <= extent <= 0xFFFF or not 1 <= screen <= extent:
        raise ValueError(f"need 1 <= screen <= extent <= 65535, got {screen}, {extent}")
    out = bytearray(b"GIF89a" + struct.pack("<HH", screen, screen) + bytes([0x80, 0, 0]))
    out += bytes([0, 0, 0, 255, 255, 255])
    for i in range(frames):
        at = 0 if i == 0 else extent - 1
        out += b"\x21\xf9\x04\x00\x01\x00\x00\x00"
        out += b"\x2c" + struct.pack("<HHHH", at, at, 1, 1) + b"\x00"
        out += bytes([2, 2, 0x4C, 0x01, 0])
    return bytes(out + b"\x3b")


def apng_lying_frame_count(declared: int, actual: int, side: int = 32) -> bytes:
    """An APNG of `actual` frames (`side` x `side`) whose acTL chunk declares `declared`.

    Attack: Pillow's `n_frames` is the acTL count, not the frames present. Declared high, a
    frames x canvas check refuses a cheap file (or a decoder that trusts it preallocates or
    loops for `declared` frames, then fails at the first missing one); declared low (1), every
    frame after the first is invisible to a decoder that samples `n_frames`, while a browser
    plays them all.
    """
    if actual < 2 or not 1 <= declared < 2**31:
        raise ValueError(f"need actual >= 2 and 1 <= declared < 2**31, got {actual}, {declared}")
    frames = [Image.new("RGB", (side, side), (40 * i % 256, 90, 160)) for i in range(actual)]
    data = bytearray(
        _encode(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=100)
    )
    at = data.index(b"acTL") - 4  # chunk start: length, type, 8 bytes of payload, CRC
    payload = struct.pack(">I", declared) + bytes(data[at + 12 : at + 16])
    data[at : at + 20] = _png_chunk(b"acTL", payload)
    return bytes(data)


def png_claiming_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header claims `width` x `height`: a decompression bomb header.

    Attack: a decoder that allocates from the header (width x height x channels) before reading
    any data asks for gigabytes (100000 x 100000 RGB is 30 GB) from 69 bytes; the data then
    turns out to be missing, so the decode fails only after the allocation.
    """
    data = bytearray(_encode(Image.new("RGB", (1, 1)), "PNG"))
    ihdr = 8 + 8  # signature, then chunk length + type
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13])))
    return bytes(data)


def png_pixel_bomb(width: int, height: int) -> bytes:
    """A real 8-bit greyscale PNG of `width` x `height`, all zero: about 1 KB per MB of pixels.

    Attack: a true decompression bomb (zlib's best ratio is about 1030:1): every byte of the
    `width` x `height` image is really there, so decoding costs the full allocation and
    inflate time (and 3-4 x that again when converted to RGB or RGBA), unlike
    `png_claiming_size` which a decoder can refuse by noticing the missing data.
    """
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    compressor = zlib.compressobj(9)
    row_bytes = width + 1  # a filter byte (0, none) then the pixels: the whole stream is zero
    rows_per_chunk = max(1, (8 << 20) // row_bytes)
    chunk = bytes(row_bytes * rows_per_chunk)
    parts = []
    for start in range(0, height, rows_per_chunk):
        parts.append(compressor.compress(chunk[: row_bytes * min(rows_per_chunk, height - start)]))
    parts.append(compressor.flush())
    return (
        _PNG_SIGNATURE
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", b"".join(parts))
        + _png_chunk(b"IEND", b"")
    )


def sixteen_bit_png(width: int, height: int) -> bytes:
    """A 16-bit greyscale PNG: a horizontal ramp from 0 to 65535 (identical rows, so small).

    Attack: memory in conversion. 2 bytes a pixel decoded; a naive pipeline that converts to
    float64 to rescale holds 8 bytes a pixel (a 50 MP image: 400 MB), and Pillow's
    `convert("RGB")` of mode I;16 clips instead of scaling (almost everything becomes white).
    """
    ramp = np.linspace(0, 65535, width, dtype=np.uint16)
    return _encode(Image.fromarray(np.tile(ramp, (height, 1))), "PNG")


def progressive_jpeg_with_scans(scans: int, side: int = 256) -> bytes:
    """A `side` x `side` progressive JPEG with exactly `scans` start-of-scan (SOS) segments.

    Built from a flat grey progressive JPEG Pillow writes (10 scans), by repeating its last
    scan (an AC refinement of luma: SOS header and a one-symbol EOB run, 12 bytes) before
    EOI. libjpeg warns about the bogus progression (silently, in Pillow) and decodes it.
    Attack: every scan is a pass over every 8x8 block of the image, so decoding costs
    `scans` x (`side` / 8)**2 block visits for 12 bytes a scan, at any draft scale
    (2000 scans: 25 KB and 0.09 s at side 256; 57 KB and 5.1 s at side 2048, in Pillow).
    """
    base = _encode(Image.new("RGB", (side, side), (128, 128, 128)), "JPEG", progressive=True)
    segments = _jpeg_scan_segments(base)
    if scans < len(segments):
        raise ValueError(f"a progressive JPEG from Pillow has {len(segments)} scans already")
    start, end = segments[-1]
    return base[:end] + base[start:end] * (scans - len(segments)) + base[end:]


def _jpeg_scan_segments(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each SOS segment with its entropy-coded data, in a well-formed JPEG."""
    segments = []
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF and data[pos + 1] != _EOI:
        marker = data[pos + 1]
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == _SOS:
            start = pos
            while not (data[end] == 0xFF and data[end + 1] not in (0x00, *range(0xD0, 0xD8))):
                end += 1
            segments.append((start, end))
        pos = end
    return segments


def tiff_with_pages(pages: int, side: int = 1) -> bytes:
    """A little-endian TIFF of `pages` pages of `side` x `side` 8-bit grey, uncompressed, all
    pointing at one shared strip of pixels: 114 bytes a page plus `side`**2 bytes once.

    Attack: a decoder that counts or visits pages walks the whole IFD chain (`n_frames`, or a
    seek to the last page parses every directory before it); one that decodes each page, or
    keeps them all, pays `pages` x `side`**2 for bytes that are in the file once.
    """
    if pages < 1 or not 1 <= side <= 0xFFFF:
        raise ValueError(f"need pages >= 1 and 1 <= side <= 65535, got {pages}, {side}")
    entries = (  # tag, type (3 SHORT, 4 LONG), value; sorted by tag as TIFF requires
        (256, 3, side),  # ImageWidth
        (257, 3, side),  # ImageLength
        (258, 3, 8),  # BitsPerSample
        (259, 3, 1),  # Compression: none
        (262, 3, 1),  # PhotometricInterpretation: black is zero
        (273, 4, 8),  # StripOffsets: the shared strip, right after the header
        (277, 3, 1),  # SamplesPerPixel
        (278, 3, side),  # RowsPerStrip
        (279, 4, side * side),  # StripByteCounts
    )
    pixels = np.linspace(0, 255, side * side, dtype=np.uint8).tobytes()
    ifd_size = 2 + 12 * len(entries) + 4
    first = 8 + len(pixels) + len(pixels) % 2  # IFDs start on a word boundary
    out = bytearray(b"II*\x00" + struct.pack("<I", first) + pixels)
    out += bytes(first - len(out))
    for page in range(pages):
        following = first + (page + 1) * ifd_size if page + 1 < pages else 0
        out += struct.pack("<H", len(entries))
        for tag, kind, value in entries:
            packed = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
            out += struct.pack("<HHI", tag, kind, 1) + packed
        out += struct.pack("<I", following)
    return bytes(out)


def hidden_under_alpha(content: Image.Image) -> bytes:
    """An RGBA PNG whose colour channels are `content` and whose alpha is 0 everywhere.

    Attack: evasion, at no decode cost. A viewer compositing on any background shows nothing
    (a blank image); a thumbnailer or moderation pipeline that drops alpha (`convert("RGB")`)
    shows the content, and one that composites before scoring scores a blank image while a
    later consumer that drops alpha publishes the content.
    """
    rgba = content.convert("RGB").convert("RGBA")
    rgba.putalpha(0)
    return _encode(rgba, "PNG")


def long_strip(length: int, short: int, content: Image.Image, position: float = 1.0) -> bytes:
    """A `length` x `short` PNG strip with `content` (resized to `short` x `short`) placed at
    `position` along its length (0 = the start, 1 = the far end) on a plain light background.

    Attack: evasion. Letterboxed whole, the content is 1/(`length`/`short`) of the width and
    shrinks to a few pixels; a centre crop drops it; tiles that cover the strip only at a few
    fixed places miss content between them. Decoding costs `length` x `short` x 3 bytes.
    """
    strip = Image.new("RGB", (length, short), DEFAULT_BACKGROUND)
    x = round(position * (length - short))
    strip.paste(content.convert("RGB").resize((short, short)), (x, 0))
    return _encode(strip, "PNG")


def many_frame_gif(
    frames: int,
    side: int,
    content_frame_index: int,
    content: Image.Image,
    content_duration_ms: int = 5000,
) -> bytes:
    """A `side` x `side` GIF of `frames` 20 ms frames of plain background, except frame
    `content_frame_index`: `content`, shown for `content_duration_ms`.

    Attack: evasion. A decoder that scores the first frame, or a few frames at fixed indices
    (first, last, evenly spaced), misses content placed between them, though a viewer sees it
    for most of the animation's display time. Each background frame carries a moving dot (so
    Pillow keeps it as a frame instead of merging it with the one before).
    """
    if not 0 <= content_frame_index < frames:
        raise ValueError(f"content frame {content_frame_index} not in 0..{frames - 1}")
    shown = content.convert("RGB").resize((side, side))
    images, durations = [], []
    for i in range(frames):
        if i == content_frame_index:
            images.append(shown)
            durations.append(content_duration_ms)
            continue
        frame = Image.new("RGB", (side, side), DEFAULT_BACKGROUND)
        frame.putpixel((i % side, (i // side) % side), (90, 90, 90))
        images.append(frame)
        durations.append(20)
    return _encode(images[0], "GIF", save_all=True, append_images=images[1:], duration=durations)


def mutate(data: bytes, rng: random.Random, max_edits: int = 8) -> bytes:
    """`data` with 1 to `max_edits` random edits: bit flips, random byte runs, truncation,
    duplicated slices, inserted 0xFF markers. Deterministic for a seeded `rng`; never empty.

    Attack: whatever a decoder's error paths do with bytes no encoder writes (hangs, crashes,
    exceptions of types nobody catches). Used by the fuzz test and the soak benchmark.
    """
    out = bytearray(data or b"\x00")
    for _ in range(rng.randint(1, max(1, max_edits))):
        at = rng.randrange(len(out))
        edit = rng.randrange(5)
        if edit == 0:
            out[at] ^= 1 << rng.randrange(8)
        elif edit == 1:
            run = rng.randint(1, 16)
            out[at : at + run] = rng.randbytes(run)
        elif edit == 2:
            del out[max(1, at) :]
        elif edit == 3:
            piece = bytes(out[at : at + rng.randint(1, 256)])
            where = rng.randrange(len(out) + 1)
            out[where:where] = piece
        else:
            out[at:at] = bytes([0xFF, rng.choice((0xC0, 0xC4, 0xD8, 0xD9, 0xDA, 0xDB, 0xFF))])
    return bytes(out)


def _content(side: int = 160) -> Image.Image:
    """What the hidden-content samples hide: a red star, which the demo policies block."""
    return render_shape("red", "star", side, side)


# One small instance of each attack, sized so the service's default limits (50 MP, 500 M
# animation pixels, 100 JPEG scans, 256 TIFF pages) refuse it or decode it quickly. Each is
# generated once, on first use.
HOSTILE_SAMPLES: dict[str, Callable[[], bytes]] = {
    name: functools.cache(make)
    for name, make in {
        "gif_of_tiny_frames": lambda: gif_of_tiny_frames(frames=20, canvas=6000),
        "gif_growing_canvas": lambda: gif_growing_canvas(frames=2, screen=1, extent=12_000),
        "apng_lying_frame_count": lambda: apng_lying_frame_count(declared=100_000, actual=3),
        "apng_hiding_frames": lambda: apng_lying_frame_count(declared=1, actual=4),
        "png_claiming_size": lambda: png_claiming_size(100_000, 100_000),
        "png_pixel_bomb": lambda: png_pixel_bomb(8000, 8000),
        "sixteen_bit_png": lambda: sixteen_bit_png(2000, 2000),
        "progressive_jpeg_with_scans": lambda: progressive_jpeg_with_scans(2000),
        "tiff_with_pages": lambda: tiff_with_pages(1000),
        "hidden_under_alpha": lambda: hidden_under_alpha(_content()),
        "long_strip": lambda: long_strip(4000, 100, _content(100)),
        "many_frame_gif": lambda: many_frame_gif(100, 64, 50, _content(64)),
        "mutated_jpeg": lambda: mutate(_encode(_content(), "JPEG"), random.Random(0)),
    }.items()
}

# Instances that pass the default pre-decode checks of the first hostile-images step (pixels,
# frames x logical screen, scans, pages) and still cost a plain Pillow decode from about half a
# second to tens of seconds: for soaking a server with decode time budgets (`soak.py --costly`).
COSTLY_SAMPLES: dict[str, Callable[[], bytes]] = {
    name: functools.cache(make)
    for name, make in {
        "costly_gif_growing_canvas": lambda: gif_growing_canvas(200, screen=1, extent=7000),
        "costly_progressive_jpeg": lambda: progressive_jpeg_with_scans(100, side=2048),
        "costly_png_pixel_bomb": lambda: png_pixel_bomb(7000, 7000),
        "costly_sixteen_bit_png": lambda: sixteen_bit_png(7000, 7000),
    }.items()
}

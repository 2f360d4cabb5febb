"""Counting what an image file holds from its raw bytes, without decoding anything.

Some small files cost a decoder far more than their size suggests: a progressive JPEG with
thousands of scans, a TIFF with thousands of pages. These walks read only the container
structure (JPEG segments, TIFF IFD chains), stop as soon as a count passes its limit, and never
loop on a malformed file. What they cannot parse they leave to the decoder, which fails it as
corrupt.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

_SOI = 0xD8
_EOI = 0xD9
_SOS = 0xDA
_TEM = 0x01


def _is_rst(marker: int) -> bool:
    return 0xD0 <= marker <= 0xD7


def count_jpeg_scans(data: bytes, limit: int) -> int:
    """Start-of-scan segments in the first JPEG of `data`, counting no further than limit + 1.

    A baseline JPEG has one scan per colour group, a progressive one usually about ten.
    """
    scans = 0
    pos = 2  # after SOI
    size = len(data)
    while pos + 1 < size and scans <= limit:
        if data[pos] != 0xFF:
            return scans  # not a marker: the decoder will call it corrupt
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
        elif marker in (_SOI, _TEM) or _is_rst(marker):
            pos += 2
        elif marker == _EOI:
            return scans
        else:
            if pos + 4 > size:
                return scans
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
            if marker == _SOS:
                scans += 1
                pos = _end_of_entropy_data(data, pos)
    return scans


# A marker that ends entropy-coded data: 0xFF followed by anything but a stuffed zero, a
# restart marker or another 0xFF (fill). Searched in C: a file of stuffed bytes costs
# milliseconds, not a Python step per byte.
_ENTROPY_END = re.compile(rb"\xff(?=[^\x00\xd0-\xd7\xff])")


def _end_of_entropy_data(data: bytes, pos: int) -> int:
    """The position of the marker that ends the entropy-coded data starting at `pos`."""
    found = _ENTROPY_END.search(data, pos)
    return found.start() if found is not None else len(data)


def count_tiff_pages(data: bytes, limit: int) -> int:
    """Image file directories (pages) in a TIFF or BigTIFF, counting no further than limit + 1.

    Stops at the end of the chain, an offset outside the file, or an IFD seen before (a loop).
    """
    order = {b"II": "little", b"MM": "big"}.get(data[:2])
    if order is None or len(data) < 8:
        return 0
    version = int.from_bytes(data[2:4], order)  # type: ignore[arg-type]
    if version == 42:
        offset_size, count_size, entry_size, first = 4, 2, 12, 4
    elif version == 43:
        offset_size, count_size, entry_size, first = 8, 8, 20, 8
    else:
        return 0

    def number(at: int, width: int) -> int | None:
        if at + width > len(data):
            return None
        return int.from_bytes(data[at : at + width], order)  # type: ignore[arg-type]

    pages = 0
    seen: set[int] = set()
    offset = number(first, offset_size)
    while offset and offset not in seen and pages <= limit:
        seen.add(offset)
        entries = number(offset, count_size)
        if entries is None:
            break
        pages += 1
        offset = number(offset + count_size + entries * entry_size, offset_size)
    return pages


# Animations. Pillow's own frame count is no measure of decoding cost: an APNG's acTL declares
# its count (and can lie), a GIF's count and canvas are found only by a walk in Python that grows
# the canvas as frames extend past the logical screen, and a frame's display time is known only
# after seeking to it, which decodes every earlier frame on the full canvas.

_SHOWN_AS_DEFAULT_BELOW_MS = 20
_DEFAULT_DELAY_MS = 100


@dataclass(frozen=True)
class Timeline:
    """What an animation holds, read without decoding: frame display times and the canvas.

    canvas: the (width, height) frames are composed on, including a GIF's growth: Pillow enlarges
    the image when a frame extends past the logical screen, so this is the size it reaches after
    seeking to the last frame read.
    durations_ms: one per frame, in Pillow's frame order (image.seek(i)), as browsers show them:
    a delay under 20 ms (or none) shows for 100 ms, so a 0-delay frame is not invisible in time.
    largest_frame_pixels: the largest frame's own rectangle, width * height.
    """

    canvas: tuple[int, int]
    durations_ms: tuple[int, ...]
    largest_frame_pixels: int

    @property
    def frames(self) -> int:
        return len(self.durations_ms)


class _Frames:
    """The frames a walk has read so far; `full` once it has read more than the limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.width = self.height = self.largest = 0
        self.durations: list[int] = []

    @property
    def full(self) -> bool:
        return len(self.durations) > self.limit

    def grow(self, width: int, height: int) -> None:
        self.width, self.height = max(self.width, width), max(self.height, height)

    def add(self, delay_ms: float, width: int, height: int) -> None:
        shown = _DEFAULT_DELAY_MS if delay_ms < _SHOWN_AS_DEFAULT_BELOW_MS else round(delay_ms)
        self.durations.append(shown)
        self.largest = max(self.largest, width * height)

    def timeline(self) -> Timeline | None:
        if len(self.durations) < 2:
            return None  # a still image, as Pillow sees it
        return Timeline((self.width, self.height), tuple(self.durations), self.largest)


def read_timeline(data: bytes, image_format: str, max_frames: int) -> Timeline | None:
    """The frames of a GIF, APNG or animated WebP, counting no further than max_frames + 1.

    None for other formats, still images (fewer than two frames) and a header that cannot be
    parsed: the decoder then decides. Past the header, the walk stops at the end of the data, a
    length running past it, or a frame the decoder refuses, and returns the frames read so far:
    Pillow cannot seek past that point (libwebp refuses the whole file), so no decoder shows more.
    At least two frames are read whatever max_frames is, to tell an animation from a still image.
    """
    reader = _READERS.get(image_format.upper())
    frames = _Frames(max(max_frames, 1))
    if reader is None or not reader(data, frames):
        return None
    return frames.timeline()


def _next_gif_block(data: bytes, pos: int) -> int:
    """The first extension, image or trailer byte from `pos` on: each search stops at the nearest
    found so far, so skipping costs a few memchr passes over the bytes skipped, however many."""
    nearest = len(data)
    for block in (b"!", b",", b";"):
        found = data.find(block, pos, nearest)
        if found >= 0:
            nearest = found
    return nearest


def _read_gif(data: bytes, frames: _Frames) -> bool:
    """Walk a GIF as Pillow's GifImagePlugin does, so frame i is what image.seek(i) shows.

    A graphic control extension applies to the next image only. A frame counts once its
    descriptor and LZW code size are read, as Pillow's n_frames counts a truncated file; where
    Pillow would raise (a descriptor or extension cut short) the walk stops too. The cost is a
    few Python steps per block and sub-block, hence one loop with nothing called in it.
    """
    size = len(data)
    if size < 13 or data[:6] not in (b"GIF87a", b"GIF89a"):
        return False
    frames.grow(*struct.unpack_from("<HH", data, 6))
    flags = data[10]
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    delay = 0
    while pos < size:
        block = data[pos]
        if block == 0x21:  # extension: label, then sub-blocks
            if pos + 1 >= size:
                break
            if data[pos + 1] == 0xF9 and pos + 2 < size and data[pos + 2]:  # graphic control
                control = data[pos + 3 : pos + 3 + data[pos + 2]]
                if len(control) < 3 or (control[0] & 1 and len(control) < 4):
                    break  # Pillow fails reading the delay or the transparent index
                delay = int.from_bytes(control[1:3], "little") * 10
            pos += 2
        elif block == 0x2C:  # image descriptor, then LZW code size and sub-blocks
            if pos + 10 > size:
                break
            left, top, width, height, flags = struct.unpack_from("<4HB", data, pos + 1)
            pos += 11 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # local colour table
            if pos > size:
                break  # no LZW code size: Pillow fails this frame
            frames.grow(left + width, top + height)
            frames.add(delay, width, height)
            if frames.full:
                break
            delay = 0
        elif block == 0x3B:  # trailer
            break
        else:  # Pillow skips any other byte; a run of them is searched past, not stepped
            pos += 1
            if pos < size and data[pos] not in (0x21, 0x2C, 0x3B):
                pos = _next_gif_block(data, pos)
            continue
        while pos < size:  # sub-blocks, until one of length 0
            length = data[pos]
            pos += 1 + length
            if not length:
                break
    return True


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _read_png(data: bytes, frames: _Frames) -> bool:
    """Walk an APNG's chunks as Pillow's PngImagePlugin does, so frame i is what seek(i) shows.

    Frames are the fcTL chunks present, but no more than acTL declares: Pillow trusts acTL for
    n_frames and seeks no further. Pillow's rules followed: only an acTL before the image data
    makes an animation (an invalid one is ignored, a second valid one cancels it); image data
    before any fcTL is a default image outside the animation, which Pillow still shows as frame 0
    (it has no delay of its own, so 100 ms here); fcTL chunks before the image data describe one
    frame, the last of them. Sequence numbers must run on and frames lie on the canvas, as Pillow
    checks; a frame whose fcTL meets IEND or another fcTL before any fdAT is not one Pillow can
    seek to (in a truncated file it counts: the data simply ends).
    """
    size = len(data)
    if not data.startswith(_PNG_SIGNATURE) or size < 24 or data[12:16] != b"IHDR":
        return False
    canvas_width, canvas_height = struct.unpack_from(">II", data, 16)
    frames.grow(canvas_width, canvas_height)
    declared: int | None = None  # frames acTL declares
    reachable: int | None = None  # frames Pillow seeks to, known at the first image data
    sequence = 0  # what the next fcTL or fdAT must carry
    control: tuple[float, int, int] | None = None  # an fcTL whose image data has not come yet
    pos = 8
    while pos + 8 <= size:
        length, kind = struct.unpack_from(">I4s", data, pos)
        body, pos = pos + 8, pos + 12 + length  # 4 bytes of CRC after the data
        if control is not None and reachable is not None and kind in (b"IEND", b"fcTL"):
            frames.durations.pop()  # no fdAT before IEND or the next fcTL: Pillow's seek fails
            break
        if body + length > size or kind == b"IEND" or not kind.replace(b"_", b"a").isalnum():
            break
        if kind == b"acTL" and reachable is None and length >= 8:
            count = _be32(data, body)
            if declared is not None:
                declared = None  # Pillow: a second acTL makes it a still image
            elif 0 < count <= 0x80000000:
                declared = count
        elif kind == b"fcTL":
            if length < 26:
                break
            seq, width, height, x, y, num, den = struct.unpack_from(">5I2H", data, body)
            if seq != sequence or x + width > canvas_width or y + height > canvas_height:
                break
            if reachable is not None and len(frames.durations) >= reachable:
                break  # Pillow seeks no further than acTL declares
            sequence += 1
            control = (num / (den or 100) * 1000, width, height)  # as Pillow computes it
            if reachable is not None:
                frames.add(*control)
                if frames.full:
                    break
        elif kind == b"fdAT" or (kind == b"IDAT" and reachable is None):
            if kind == b"fdAT":
                if length < 4 or not sequence or _be32(data, body) != sequence:
                    break  # Pillow: an fdAT must follow an fcTL or fdAT in sequence
                sequence += 1
            if reachable is None:  # the first image data: what frame 0 is
                if declared is None:
                    return False  # a still image
                reachable = declared + (control is None)
                frames.add(*(control or (0, canvas_width, canvas_height)))
            control = None
    return True


def _read_webp(data: bytes, frames: _Frames) -> bool:
    """Walk an animated WebP's chunks (VP8X, ANIM, then ANMF frames) as libwebp's demuxer does.

    Only the first 8 + RIFF size bytes are the file, as libwebp reads it. A frame before ANIM
    makes libwebp refuse the file, so the walk stops there.
    """
    if len(data) < 30 or data[:4] != b"RIFF" or data[8:16] != b"WEBPVP8X" or not data[20] & 2:
        return False  # not an extended WebP with the animation flag
    end = min(len(data), 8 + int.from_bytes(data[4:8], "little"))
    canvas_width, canvas_height = _le24(data, 24) + 1, _le24(data, 27) + 1
    frames.grow(canvas_width, canvas_height)
    animation = False
    pos = 12
    while pos + 8 <= end:
        kind, length = struct.unpack_from("<4sI", data, pos)
        body, pos = pos + 8, pos + 8 + length + (length & 1)  # payloads are padded to even
        if body + length > end:
            break
        if kind == b"ANIM":
            animation = True
        elif kind == b"ANMF":
            if not animation or length < 16:
                break
            # libwebp draws a frame at its own encoded size, whatever the ANMF header says, so
            # a header claiming more than the canvas must not end the walk (frames would hide).
            width = min(_le24(data, body + 6) + 1, canvas_width)
            height = min(_le24(data, body + 9) + 1, canvas_height)
            frames.add(_le24(data, body + 12), width, height)
            if frames.full:
                break
    return True


def _be32(data: bytes, at: int) -> int:
    return int.from_bytes(data[at : at + 4], "big")


def _le24(data: bytes, at: int) -> int:
    return int.from_bytes(data[at : at + 3], "little")


_READERS = {"GIF": _read_gif, "PNG": _read_png, "WEBP": _read_webp}

"""What a JPEG's header says, read from its raw bytes without decoding anything.

The device decode path (serving/device_decode.py) decides from this which files it can decode
exactly as the CPU path (core/views.py, through Pillow) would: frame type, size, components,
colour markers and the orientation Pillow applies. Only the segments before the first
start-of-scan are walked, a bounded number of them, and every length and offset is checked
against the data: the bytes come from clients, this runs in the server process, and it must
never raise or loop on any input. Anything malformed reads as None; the CPU path then decides.

Like core/structure.py it needs neither torch nor Pillow.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field

MAX_SEGMENTS = 512
MAX_FILL_BYTES = 16

_SOI, _EOI, _SOS, _TEM = 0xD8, 0xD9, 0xDA, 0x01
_APP1, _APP2, _APP14 = 0xE1, 0xE2, 0xEE
# SOF0..SOF15 less DHT (C4), JPG (C8) and DAC (CC), which share the range.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_EXIF = b"Exif\x00\x00"
_XMP = b"http://ns.adobe.com/xap/1.0/\x00"
_ICC = b"ICC_PROFILE\x00"
_MPF = b"MPF\x00"
_ADOBE = b"Adobe"
_ORIENTATION_TAG = 0x0112
_TIFF_SHORT = 3
# Bytes per value of the TIFF types Pillow reads; it skips an entry of any other type.
_TIFF_TYPE_SIZES = {
    1: 1,
    2: 1,
    3: 2,
    4: 4,
    5: 8,
    6: 1,
    7: 1,
    8: 2,
    9: 4,
    10: 8,
    11: 4,
    12: 8,
    13: 4,
}
_MAX_IFD_ENTRIES = 1024  # IFD0 holds a few dozen; more is hostile, and costs a Python loop each
_ABSENT = -1  # no orientation tag (tag values are unsigned)
# Pillow reads an XMP orientation with this pattern when the EXIF has none (Image.getexif).
_XMP_ORIENTATION = re.compile(rb'tiff:Orientation(="|>)([0-9])')


@dataclass(frozen=True)
class JpegHeader:
    """A JPEG's frame header and the application segments that change how it is shown.

    orientation: the EXIF (or, failing that, XMP) orientation Pillow applies, 1..8; 1 when
    absent or out of range (Pillow then applies none). orientation_trusted is False when the
    EXIF is malformed or unusual enough that Pillow could read it otherwise (or fail on it).
    """

    frame_marker: int  # the SOFn marker's second byte, 0xC0..0xCF
    precision: int
    width: int
    height: int
    components: int
    component_ids: tuple[int, ...]
    orientation: int = 1
    orientation_trusted: bool = True
    has_icc_profile: bool = False
    adobe_transform: int | None = None
    has_mpf: bool = False  # an MPO (multi-picture) index: Pillow opens the file as MPO


_Frame = tuple[int, int, int, int, tuple[int, ...]]  # marker, precision, height, width, ids


@dataclass
class _Segments:
    """What the walk has collected so far."""

    frame: _Frame | None = None
    exif: list[bytes] = field(default_factory=list)
    xmp: bytes | None = None
    icc: bool = False
    adobe: int | None = None
    mpf: bool = False


def read_jpeg_header(data: bytes) -> JpegHeader | None:
    """The header of the JPEG in `data`, or None if it is not a well-formed JPEG header: no SOI,
    no (or a second) frame header before the first scan, a segment running past the data, a zero
    width or height, or more than MAX_SEGMENTS segments."""
    if not data.startswith(b"\xff\xd8"):
        return None
    found = _walk(data)
    if found is None or found.frame is None:
        return None
    marker, precision, height, width, ids = found.frame
    orientation, trusted = _orientation(b"".join(found.exif), found.xmp)
    return JpegHeader(
        frame_marker=marker,
        precision=precision,
        width=width,
        height=height,
        components=len(ids),
        component_ids=ids,
        orientation=orientation,
        orientation_trusted=trusted,
        has_icc_profile=found.icc,
        adobe_transform=found.adobe,
        has_mpf=found.mpf,
    )


def _walk(data: bytes) -> _Segments | None:
    """Every segment from after SOI to the first SOS; None on anything malformed."""
    found = _Segments()
    pos, size = 2, len(data)
    for _ in range(MAX_SEGMENTS):
        if pos >= size or data[pos] != 0xFF:
            return None
        fill = pos
        while pos + 1 < size and data[pos + 1] == 0xFF:  # fill bytes before a marker
            pos += 1
            if pos - fill > MAX_FILL_BYTES:
                return None  # legal, but only a flood: the CPU path decides
        if pos + 4 > size:
            return None
        marker = data[pos + 1]
        if marker < 0xC0 or marker in (_SOI, _EOI, _TEM) or 0xD0 <= marker <= 0xD7:
            return None  # no image yet: a stray marker, or the end
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        end = pos + 2 + length
        if length < 2 or end > size:
            return None
        if marker == _SOS:
            return found
        if not _read_segment(marker, data[pos + 4 : end], found):
            return None
        pos = end
    return None


def _read_segment(marker: int, body: bytes, found: _Segments) -> bool:
    """Note what one segment says; False if it makes the header malformed."""
    if marker in _SOF_MARKERS:
        if found.frame is not None:
            return False
        found.frame = _frame(marker, body)
        return found.frame is not None
    if marker == _APP1 and body.startswith(_EXIF):
        # Pillow joins every EXIF segment: the first whole, the others without their prefix
        # (joined once, at the end: adding up hundreds of 64 KB segments one by one is not).
        found.exif.append(body if not found.exif else body[len(_EXIF) :])
    elif marker == _APP1 and body.startswith(_XMP):
        found.xmp = body[len(_XMP) :]  # the last one wins, as in Pillow
    elif marker == _APP2 and body.startswith(_ICC):
        found.icc = True
    elif marker == _APP2 and body.startswith(_MPF):
        found.mpf = True
    elif marker == _APP14 and body.startswith(_ADOBE) and len(body) >= 12:
        found.adobe = body[11]
    return True


def _frame(marker: int, body: bytes) -> _Frame | None:
    """(marker, precision, height, width, component ids) from a SOFn body, or None."""
    if len(body) < 6:
        return None
    precision = body[0]
    height = int.from_bytes(body[1:3], "big")
    width = int.from_bytes(body[3:5], "big")
    count = body[5]
    if not width or not height or not count or len(body) < 6 + 3 * count:
        return None
    ids = tuple(body[6 + 3 * i] for i in range(count))
    return marker, precision, height, width, ids


def _orientation(exif: bytes, xmp: bytes | None) -> tuple[int, bool]:
    """(orientation, trusted) as Pillow's getexif() finds it: EXIF IFD0 first, else XMP."""
    tiff = exif
    for _ in range(2):  # Pillow strips the prefix up to twice
        tiff = tiff.removeprefix(_EXIF)
    value = _exif_orientation(tiff) if tiff else _ABSENT
    if value is None:
        return 1, False
    if value == _ABSENT and xmp is not None:
        match = _XMP_ORIENTATION.search(xmp)
        value = int(match[2]) if match else _ABSENT
    return (value if 1 <= value <= 8 else 1), True


def _exif_orientation(tiff: bytes) -> int | None:
    """The orientation tag in IFD0 of a TIFF structure; _ABSENT when there is none, None when
    the structure is not one read here exactly as Pillow reads it: Pillow stops reading IFD0 at
    the first entry whose data lies past the end, losing the tags after it."""
    endian = {b"II*\x00": "<", b"MM\x00*": ">"}.get(tiff[:4])
    if endian is None or len(tiff) < 8:
        return None
    (ifd,) = struct.unpack_from(f"{endian}I", tiff, 4)
    if ifd + 2 > len(tiff):
        return None
    (entries,) = struct.unpack_from(f"{endian}H", tiff, ifd)
    if entries > _MAX_IFD_ENTRIES or ifd + 2 + 12 * entries > len(tiff):
        return None
    orientation = _ABSENT
    for at in range(ifd + 2, ifd + 2 + 12 * entries, 12):
        tag, kind, count, offset = struct.unpack_from(f"{endian}HHII", tiff, at)
        if kind not in _TIFF_TYPE_SIZES:
            return None  # a type this walk does not size (Pillow reads more, in new releases)
        size = count * _TIFF_TYPE_SIZES[kind]
        if size > 4 and offset + size > len(tiff):
            return None
        if tag == _ORIENTATION_TAG and orientation == _ABSENT:
            if kind != _TIFF_SHORT or count != 1:
                return None
            (orientation,) = struct.unpack_from(f"{endian}H", tiff, at + 8)  # the first one wins
    return orientation

"""Counting what an image file holds from its raw bytes, without decoding anything.

Some small files cost a decoder far more than their size suggests: a progressive JPEG with
thousands of scans, a TIFF with thousands of pages. These walks read only the container
structure (JPEG segments, TIFF IFD chains), stop as soon as a count passes its limit, and never
loop on a malformed file. What they cannot parse they leave to the decoder, which fails it as
corrupt.
"""

from __future__ import annotations

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


def _end_of_entropy_data(data: bytes, pos: int) -> int:
    """The position of the marker that ends the entropy-coded data starting at `pos`."""
    size = len(data)
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= size:
            return size
        following = data[pos + 1]
        if following == 0x00 or _is_rst(following):  # a stuffed 0xFF, or a restart marker
            pos += 2
        elif following == 0xFF:
            pos += 1
        else:
            return pos


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

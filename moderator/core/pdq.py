"""PDQ, the perceptual hash of the industry's hash-sharing programmes (Meta's ThreatExchange,
hasher-matcher-actioner), computed with the `pdqhash` package.

A hash is 256 bits written as 64 hex digits the way python-threatexchange writes them: the bits
in the order `pdqhash.compute` returns them, the first one the most significant. Two images
match when their hashes differ in at most a given number of bits (Hamming distance; 31 is the
PDQ authors' recommended threshold).

The hash is computed on the first frame scored as its pixels are stored (not turned by EXIF
orientation, transparency dropped), as python-threatexchange and so hasher-matcher-actioner
compute it, on a copy at most PDQ_MAX_SIDE on its long side, made with a box filter (PDQ's
own downsampling is one); JPEGs are not decoded at a reduced scale below PDQ_MIN_SIDE. pdqhash's
result moves with the input size: on detailed synthetic scenes (2400 x 1800), copies of 640 px
kept a mean of 18 and at most 26 bits of the full-size hash, of 540 px 21 and 32, of 480 px 22
and 36; the full-size hash itself costs 159 ms for a 2048 x 2048 image, the copy a few ms
(BENCHMARKS.md has the cost per image). No torch here: it runs in the decode worker processes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pdqhash
from PIL import Image

PDQ_BITS = 256
PDQ_MAX_SIDE = 640
PDQ_MIN_SIDE = 512  # JPEGs decode at a reduced scale only down to this long side
PDQ_HEX = re.compile(r"[0-9a-f]{64}")
_BIT_WEIGHTS = 1 << np.arange(7, -1, -1, dtype=np.uint8)


@dataclass(frozen=True)
class Pdq:
    hex: str  # 64 lowercase hex digits
    quality: int  # 0-100: below 50 the hash says little (a flat or tiny image)

    def __post_init__(self) -> None:
        quality = self.quality
        if type(quality) is not int or not PDQ_HEX.fullmatch(self.hex) or not 0 <= quality <= 100:
            raise ValueError("a PDQ hash is 64 lowercase hex digits and a quality of 0-100")


def pdq_of(image: Image.Image) -> Pdq:
    """The PDQ hash of an RGB image (a copy at most PDQ_MAX_SIDE on its long side)."""
    width, height = image.size
    scale = PDQ_MAX_SIDE / max(width, height)
    if scale < 1:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = image.resize(size, Image.Resampling.BOX)
    return pdq_of_array(np.asarray(image.convert("RGB"), dtype=np.uint8))


def pdq_of_array(pixels: np.ndarray) -> Pdq:
    """The PDQ hash of uint8 RGB pixels [H, W, 3], as they are (no downscaling)."""
    bits, quality = pdqhash.compute(np.ascontiguousarray(pixels))
    return Pdq(hex_of_bits(np.asarray(bits)), int(quality))


def hex_of_bits(bits: np.ndarray) -> str:
    """256 bits (0/1, first most significant) -> 64 hex digits."""
    packed = (bits.astype(np.uint8).reshape(-1, 8) * _BIT_WEIGHTS).sum(axis=1, dtype=np.uint8)
    return bytes(packed).hex()


def pdq_bytes(hex_digits: str) -> bytes:
    """64 hex digits -> the 32 bytes they spell (ValueError for anything else)."""
    if not PDQ_HEX.fullmatch(hex_digits):
        raise ValueError("not 64 lowercase hex digits")
    return bytes.fromhex(hex_digits)


def hash_rows(hashes: list[bytes]) -> np.ndarray:
    """32-byte hashes as `distances` reads them: uint64 [4, N], each quarter contiguous."""
    joined = np.frombuffer(b"".join(hashes), dtype=np.uint8)
    return np.ascontiguousarray(joined.view(np.uint64).reshape(len(hashes), 4).T)


def distances(rows: np.ndarray, probe: bytes) -> np.ndarray:
    """Hamming distance of `probe` (32 bytes) to each hash of `rows` (hash_rows): uint16 [N],
    3 ms a million (a quarter of the hash at a time, over contiguous memory)."""
    quarters = np.frombuffer(probe, dtype=np.uint64)
    total: np.ndarray = np.bitwise_count(rows[0] ^ quarters[0]).astype(np.uint16)
    for k in (1, 2, 3):
        total += np.bitwise_count(rows[k] ^ quarters[k])
    return total

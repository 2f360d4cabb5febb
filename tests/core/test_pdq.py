"""core/pdq.py: the hex of a PDQ hash, the downscaled copy it is computed on, Hamming distances."""

from __future__ import annotations

from typing import Any

import numpy as np
import pdqhash
import pytest
from PIL import Image

from moderator.core.pdq import (
    PDQ_BITS,
    PDQ_MAX_SIDE,
    Pdq,
    distances,
    hash_rows,
    hex_of_bits,
    pdq_bytes,
    pdq_of,
    pdq_of_array,
)
from tests.helpers import flip_bits, hashes_in, textured_scene


def noise_image(width: int, height: int, seed: int = 4) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def msb_first_hex(bits: np.ndarray) -> str:
    """pdqhash's bits as python-threatexchange writes them (binary_str_to_hex): the first bit
    the most significant."""
    return f"{int(''.join(str(int(b)) for b in bits), 2):064x}"


def test_the_hex_is_pdqhash_bit_vector_first_bit_most_significant() -> None:
    pixels = np.asarray(textured_scene(3, 320, 240))
    bits, quality = pdqhash.compute(pixels)
    found = pdq_of_array(pixels)
    assert found.hex == msb_first_hex(bits)
    assert found.quality == quality
    assert type(found.quality) is int  # pdqhash's numpy integer made a plain int
    assert found.quality >= 50  # a detailed scene: a hash worth matching


@pytest.mark.parametrize("position", [0, 1, 7, 8, 63, 64, 128, 254, 255])
def test_hex_of_bits_puts_bit_i_at_weight_255_minus_i(position: int) -> None:
    bits = np.zeros(PDQ_BITS, dtype=np.int64)
    bits[position] = 1
    assert int(hex_of_bits(bits), 16) == 1 << (PDQ_BITS - 1 - position)
    assert hex_of_bits(bits) == msb_first_hex(bits)


def test_hex_of_bits_of_random_vectors_matches_the_reference() -> None:
    rng = np.random.default_rng(5)
    for _ in range(20):
        bits = rng.integers(0, 2, PDQ_BITS)
        assert hex_of_bits(bits) == msb_first_hex(bits)
    assert hex_of_bits(np.ones(PDQ_BITS, dtype=np.int64)) == "f" * 64


class ShapeSpy:
    """pdqhash.compute as it is, noting the shape of each array it is given."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []
        self.real = pdqhash.compute

    def __call__(self, pixels: np.ndarray) -> Any:
        self.shapes.append(pixels.shape)
        return self.real(pixels)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((1600, 1200), (640, 480)),
        ((1200, 1600), (480, 640)),
        ((2000, 500), (640, 160)),
        ((641, 641), (640, 640)),
        ((5000, 3), (640, 1)),  # a sliver keeps at least one pixel
    ],
)
def test_a_large_image_is_hashed_on_a_copy_at_most_640_on_its_long_side(
    monkeypatch: pytest.MonkeyPatch, size: tuple[int, int], expected: tuple[int, int]
) -> None:
    image = noise_image(*size)
    spy = ShapeSpy()
    monkeypatch.setattr(pdqhash, "compute", spy)
    found = pdq_of(image)
    width, height = expected
    assert spy.shapes == [(height, width, 3)]
    assert max(spy.shapes[0][:2]) == PDQ_MAX_SIDE
    monkeypatch.undo()
    resized = image.resize(expected, Image.Resampling.BOX)  # PDQ's own downsampling is a box
    assert found == pdq_of_array(np.asarray(resized))
    assert found == pdq_of(resized)  # a copy of 640 px is not resized again


def test_an_image_within_the_bound_is_hashed_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    image = textured_scene(6, PDQ_MAX_SIDE, 300)
    spy = ShapeSpy()
    monkeypatch.setattr(pdqhash, "compute", spy)
    found = pdq_of(image)
    assert spy.shapes == [(300, PDQ_MAX_SIDE, 3)]
    assert found == pdq_of_array(np.asarray(image))


def test_pdq_of_converts_to_rgb_first() -> None:
    image = textured_scene(7, 200, 150)
    assert pdq_of(image.convert("RGBA")) == pdq_of(image)
    grey = image.convert("L")
    assert pdq_of(grey) == pdq_of_array(np.asarray(grey.convert("RGB")))


def test_a_downscaled_copy_stays_within_the_default_distance() -> None:
    """What PDQ_MAX_SIDE is for: the same scene at two sizes is a match (distance <= 31)."""
    large = pdq_of(textured_scene(8, 2400, 1800))
    small = pdq_of(textured_scene(8, 2400, 1800).resize((800, 600)))
    rows = hash_rows([pdq_bytes(large.hex)])
    assert int(distances(rows, pdq_bytes(small.hex))[0]) <= 31


def test_distances_count_the_differing_bits_of_each_row() -> None:
    base = pdq_of_array(np.asarray(textured_scene(10, 256, 256))).hex
    flipped = {
        0: base,
        1: flip_bits(base, 0),
        3: flip_bits(base, 255, 128, 7),
        64: flip_bits(base, *range(0, 256, 4)),
        256: flip_bits(base, *range(256)),
    }
    rows = hash_rows([pdq_bytes(h) for h in flipped.values()])
    assert rows.shape == (4, 5)
    assert rows.dtype == np.uint64
    assert distances(rows, pdq_bytes(base)).tolist() == list(flipped)
    # the distance is symmetric: each hash as the probe, the base as the row
    for expected, probe in flipped.items():
        assert distances(hash_rows([pdq_bytes(base)]), pdq_bytes(probe)).tolist() == [expected]


@pytest.mark.parametrize("position", range(0, 256, 17))
def test_each_bit_position_counts_once(position: int) -> None:
    zero = "0" * 64
    rows = hash_rows([pdq_bytes(zero)])
    assert distances(rows, pdq_bytes(flip_bits(zero, position))).tolist() == [1]


def test_hash_rows_of_nothing_is_an_empty_table() -> None:
    rows = hash_rows([])
    assert rows.shape == (4, 0)
    assert distances(rows, bytes(32)).tolist() == []


def test_hash_rows_keeps_the_bytes_a_quarter_of_every_hash_a_row() -> None:
    hashes = [bytes(range(32)), bytes(range(32, 64)), bytes(range(64, 96))]
    rows = hash_rows(hashes)
    assert rows.shape == (4, 3)
    assert rows.flags.c_contiguous  # each quarter of every hash in one run of memory
    assert hashes_in(rows) == hashes
    assert [rows[k].tobytes() for k in range(4)] == [
        b"".join(h[8 * k : 8 * k + 8] for h in hashes) for k in range(4)
    ]


def test_pdq_bytes_spells_the_hex() -> None:
    digits = "0123456789abcdef" * 4
    assert pdq_bytes(digits) == bytes.fromhex(digits)
    assert len(pdq_bytes(digits)) == 32


@pytest.mark.parametrize(
    "digits",
    ["", "0" * 63, "0" * 65, "A" * 64, "g" * 64, " " + "0" * 63, "0" * 63 + "\n", "0x" + "0" * 62],
)
def test_pdq_bytes_refuses_anything_but_64_lowercase_hex_digits(digits: str) -> None:
    with pytest.raises(ValueError, match="64 lowercase hex digits"):
        pdq_bytes(digits)


def test_a_pdq_holds_64_lowercase_hex_digits_and_a_quality() -> None:
    assert Pdq("ab" * 32, 0).quality == 0
    assert Pdq("ab" * 32, 100).hex == "ab" * 32


@pytest.mark.parametrize(
    ("digits", "quality"),
    [
        ("AB" * 32, 50),  # upper case
        ("ab" * 31, 50),  # too short
        ("ab" * 33, 50),  # too long
        ("zz" * 32, 50),  # not hex
        ("ab" * 32 + "\n", 50),  # a newline after it
        ("ab" * 32, -1),
        ("ab" * 32, 101),
    ],
)
def test_a_pdq_refuses_malformed_hex_or_quality(digits: str, quality: int) -> None:
    with pytest.raises(ValueError, match="64 lowercase hex digits"):
        Pdq(digits, quality)


@pytest.mark.parametrize("quality", [50.5, 50.0, True, False, "50", None, np.int64(50)])
def test_a_pdq_refuses_a_quality_that_is_not_an_int(quality: Any) -> None:
    """A decode worker's answer is checked here: wire.py sets the int32 pdq_quality from it."""
    with pytest.raises(ValueError, match="a quality of 0-100"):
        Pdq("ab" * 32, quality)

"""core/hash_index.py: an image's SHA-256 and PDQ matched against every hash list of a set."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import pytest
from PIL import Image

from moderator.core.hash_index import MIN_PDQ_QUALITY, ImageHashes, build_hash_index
from moderator.core.pdq import Pdq, pdq_bytes, pdq_of
from moderator.core.policies import Policy, parse_policy, parse_policy_file
from tests.helpers import encode, flip_bits, hashes_in, textured_scene

BASE = "3c" * 32  # a PDQ hash; others are made from it with bits flipped
PLAIN = "title: T\naction: review\nthreshold: 0.3\ndescriptions: [a knife]\n"


def list_policy(
    directory: Path,
    policy_id: str,
    pdq: Sequence[Sequence[str]] = (),
    sha256: Sequence[Sequence[str]] = (),
    distance: int | None = None,
) -> Policy:
    """A policy of hash lists: each list given as its lines, written beside the policy."""
    text = "title: T\naction: block\n"
    for key, lists in (("hash_lists", pdq), ("sha256_lists", sha256)):
        names = []
        for number, lines in enumerate(lists):
            name = f"{policy_id}-{key}-{number}.csv"
            (directory / name).write_text("".join(f"{line}\n" for line in lines))
            names.append(name)
        if names:
            text += f"{key}: [{', '.join(names)}]\n"
    if distance is not None:
        text += f"pdq_max_distance: {distance}\n"
    path = directory / f"{policy_id}.yaml"
    path.write_text(text)
    return parse_policy_file(path, directory)


def probe(hex_digits: str) -> ImageHashes:
    return ImageHashes(sha256="", pdq=Pdq(hex_digits, 100))


def test_image_hashes_of_bytes_is_their_sha256() -> None:
    data = b"some image bytes"
    hashes = ImageHashes.of_bytes(data, None)
    assert hashes.sha256 == hashlib.sha256(data).hexdigest()
    assert hashes.pdq is None


def test_a_pdq_matches_within_each_policy_s_own_distance(tmp_path: Path) -> None:
    near = list_policy(tmp_path, "near", pdq=[[f"{BASE},n"]], distance=5)
    far = list_policy(tmp_path, "far", pdq=[[f"{BASE},f"]], distance=20)
    exact = list_policy(tmp_path, "exact", pdq=[[f"{BASE},e"]], distance=0)
    index = build_hash_index([near, far, exact])
    assert not index.empty
    assert index.match(probe(BASE)) == {
        0: "near-hash_lists-0.csv:n",
        1: "far-hash_lists-0.csv:f",
        2: "exact-hash_lists-0.csv:e",
    }
    for flipped, expected in [
        (1, {0, 1}),
        (5, {0, 1}),  # at the distance: a match
        (6, {1}),
        (20, {1}),
        (21, set()),
        (256, set()),
    ]:
        found = index.match(probe(flip_bits(BASE, *range(flipped))))
        assert set(found) == expected, flipped


def test_the_default_distance_is_31_bits(tmp_path: Path) -> None:
    index = build_hash_index([list_policy(tmp_path, "p", pdq=[[BASE]])])
    assert index.match(probe(flip_bits(BASE, *range(31)))) == {0: f"p-hash_lists-0.csv:{BASE}"}
    assert index.match(probe(flip_bits(BASE, *range(32)))) == {}


def test_the_closest_entry_names_the_match(tmp_path: Path) -> None:
    lists = [
        [f"{flip_bits(BASE, *range(8))},eight", f"{flip_bits(BASE, 100, 101)},two"],
        [f"{flip_bits(BASE, *range(200, 205))},five", f"{flip_bits(BASE, 7)},one-elsewhere"],
    ]
    policy = list_policy(tmp_path, "p", pdq=lists)
    other = list_policy(tmp_path, "q", pdq=[[f"{flip_bits(BASE, 9, 10, 11)},three"]])
    index = build_hash_index([policy, other])
    assert index.match(probe(BASE)) == {
        0: "p-hash_lists-1.csv:one-elsewhere",
        1: "q-hash_lists-0.csv:three",
    }
    # probed elsewhere, the entries closest to it
    assert index.match(probe(flip_bits(BASE, 100, 101))) == {
        0: "p-hash_lists-0.csv:two",  # 0 bits (one-elsewhere: 3, five: 7, eight: 10)
        1: "q-hash_lists-0.csv:three",  # 5 bits
    }


def test_of_entries_at_the_same_distance_the_first_listed_wins(tmp_path: Path) -> None:
    first, second = flip_bits(BASE, 1, 2), flip_bits(BASE, 3, 4)
    policy = list_policy(tmp_path, "p", pdq=[[f"{second},b"], [f"{first},a", f"{second},c"]])
    assert build_hash_index([policy]).match(probe(BASE)) == {0: "p-hash_lists-0.csv:b"}


def test_a_sha256_match(tmp_path: Path) -> None:
    data = encode(textured_scene(2, 64, 64))
    digest = hashlib.sha256(data).hexdigest()
    listed = list_policy(tmp_path, "listed", sha256=[[f"{digest.upper()},exact-1", BASE]])
    also = list_policy(tmp_path, "also", sha256=[[BASE], [f"{digest},exact-2", f"{digest},x"]])
    other = list_policy(tmp_path, "other", sha256=[[BASE]])
    index = build_hash_index([listed, other, also])
    assert index.match(ImageHashes.of_bytes(data, None)) == {
        0: "listed-sha256_lists-0.csv:exact-1",
        2: "also-sha256_lists-1.csv:exact-2",  # its first entry for those bytes
    }
    assert index.match(ImageHashes.of_bytes(data + b"\0", None)) == {}
    assert index.match(ImageHashes(sha256="", pdq=None)) == {}


def test_a_policy_matched_by_sha256_is_not_reported_again_by_pdq(tmp_path: Path) -> None:
    image = textured_scene(3, 320, 240)
    data = encode(image)
    pdq = pdq_of(image)
    digest = hashlib.sha256(data).hexdigest()
    both = list_policy(tmp_path, "both", pdq=[[f"{pdq.hex},by-pdq"]], sha256=[[f"{digest},by-sha"]])
    pdq_only = list_policy(tmp_path, "pdq_only", pdq=[[f"{pdq.hex},only-pdq"]])
    index = build_hash_index([both, pdq_only])
    assert index.match(ImageHashes.of_bytes(data, pdq)) == {
        0: "both-sha256_lists-0.csv:by-sha",
        1: "pdq_only-hash_lists-0.csv:only-pdq",
    }
    # other bytes of the same picture: PDQ alone
    assert index.match(ImageHashes.of_bytes(data + b"\0", pdq)) == {
        0: "both-hash_lists-0.csv:by-pdq",
        1: "pdq_only-hash_lists-0.csv:only-pdq",
    }


def test_a_resized_copy_of_a_listed_image_matches(tmp_path: Path) -> None:
    original = textured_scene(11, 1200, 900)
    policy = list_policy(tmp_path, "p", pdq=[[f"{pdq_of(original).hex},scene-11"]])
    index = build_hash_index([policy])
    copy = pdq_of(original.resize((500, 375)))
    assert index.match(ImageHashes("", copy)) == {0: "p-hash_lists-0.csv:scene-11"}
    assert index.match(ImageHashes("", pdq_of(textured_scene(12, 1200, 900)))) == {}


def test_policies_without_hashes_make_an_empty_index(tmp_path: Path) -> None:
    plain = parse_policy("plain", PLAIN, "plain.yaml")
    index = build_hash_index([plain, plain])
    assert index.empty
    assert index.pdq_rows.shape == (4, 0)
    assert index.match(probe(BASE)) == {}
    assert index.match(ImageHashes.of_bytes(b"x", Pdq(BASE, 100))) == {}
    assert build_hash_index([]).match(probe(BASE)) == {}


def test_no_hashes_to_match_is_no_match(tmp_path: Path) -> None:
    index = build_hash_index([list_policy(tmp_path, "p", pdq=[[BASE]], sha256=[[BASE]])])
    assert index.match(None) == {}
    assert index.match(ImageHashes(sha256="", pdq=None)) == {}
    assert index.match(ImageHashes(sha256=BASE, pdq=None)) == {0: "p-sha256_lists-0.csv:" + BASE}


def test_positions_follow_the_sequence_with_policies_between(tmp_path: Path) -> None:
    plain = parse_policy("plain", PLAIN, "plain.yaml")
    listed = list_policy(tmp_path, "listed", pdq=[[f"{BASE},x"]], distance=0)
    other = list_policy(tmp_path, "other", pdq=[[f"{flip_bits(BASE, 0)},y", f"{BASE},z"]])
    index = build_hash_index([plain, plain, listed, plain, other])
    assert hashes_in(index.pdq_rows) == [pdq_bytes(h) for h in (BASE, flip_bits(BASE, 0), BASE)]
    assert index.pdq_owner.tolist() == [2, 4, 4]
    assert index.pdq_limit.tolist() == [0, 31, 31]
    assert index.match(probe(BASE)) == {
        2: "listed-hash_lists-0.csv:x",
        4: "other-hash_lists-0.csv:z",
    }
    index = build_hash_index([plain, plain, listed, plain])
    assert index.pdq_owner.tolist() == [2]
    assert index.pdq_limit.tolist() == [0]
    assert index.match(probe(BASE)) == {2: "listed-hash_lists-0.csv:x"}


@pytest.mark.parametrize("entries", [1, 1000])
def test_every_row_is_compared(tmp_path: Path, entries: int) -> None:
    lines = [f"{flip_bits(BASE, *range(100 + i % 50))},far-{i}" for i in range(entries - 1)]
    lines.append(f"{flip_bits(BASE, 255)},last")
    index = build_hash_index([list_policy(tmp_path, "p", pdq=[lines], distance=2)])
    assert len(index.pdq_entries) == entries
    assert index.match(probe(BASE)) == {0: "p-hash_lists-0.csv:last"}


def test_a_pdq_below_the_least_quality_is_not_matched(tmp_path: Path) -> None:
    assert MIN_PDQ_QUALITY == 50
    policy = list_policy(tmp_path, "p", pdq=[[f"{BASE},listed"]], sha256=[[f"{BASE},exact"]])
    index = build_hash_index([policy])
    assert index.match(ImageHashes("", Pdq(BASE, MIN_PDQ_QUALITY))) == {
        0: "p-hash_lists-0.csv:listed"
    }
    assert index.match(ImageHashes("", Pdq(BASE, MIN_PDQ_QUALITY - 1))) == {}
    assert index.match(ImageHashes("", Pdq(BASE, 0))) == {}
    # SHA-256 still matches whatever the PDQ's quality
    assert index.match(ImageHashes(BASE, Pdq(BASE, 0))) == {0: "p-sha256_lists-0.csv:exact"}


def test_a_flat_image_is_matched_by_its_bytes_only(tmp_path: Path) -> None:
    """A flat picture's PDQ says little (its quality is low): listed, it is not matched."""
    flat = Image.new("RGB", (320, 240), (200, 30, 30))
    data = encode(flat)
    pdq = pdq_of(flat)
    assert pdq.quality < MIN_PDQ_QUALITY
    digest = hashlib.sha256(data).hexdigest()
    policy = list_policy(tmp_path, "p", pdq=[[f"{pdq.hex},flat"]], sha256=[[f"{digest},bytes"]])
    index = build_hash_index([policy])
    assert index.match(ImageHashes.of_bytes(data, pdq)) == {0: "p-sha256_lists-0.csv:bytes"}
    assert index.match(ImageHashes.of_bytes(data + b"\0", pdq)) == {}  # other bytes: no match

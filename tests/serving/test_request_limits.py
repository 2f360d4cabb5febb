from __future__ import annotations

import random

import pytest
from moderator_client.v1 import moderator_pb2 as pb

from moderator.errors import InvalidRequest
from moderator.serving.request_limits import (
    MAX_IMAGE_ID_BYTES,
    MAX_POLICY_IDS,
    RequestLimits,
    check_score_shape,
    find_request_id,
    moderate_shape,
)

LIMITS = RequestLimits(max_images=256, max_embeddings=4096, max_views=48)
EMPTY_IMAGE = b"\x0a\x00"  # field 1, length 0: one Image message with nothing in it


def moderate_bytes(**fields: object) -> bytes:
    return pb.ModerateRequest(**fields).SerializeToString()  # type: ignore[arg-type]


def test_the_shape_matches_what_protobuf_parses() -> None:
    rng = random.Random(7)
    for _ in range(200):
        images = [
            pb.Image(id=f"img-{i}", data=rng.randbytes(rng.randint(0, 300)))
            for i in range(rng.randint(0, 20))
        ]
        policy_ids = [f"p{i}" for i in range(rng.randint(0, 5))]
        raw = moderate_bytes(
            images=images, policy_ids=policy_ids, include_embeddings=True, request_id="r-1"
        )
        shape = moderate_shape(raw, LIMITS)
        assert shape.images == len(images)
        assert shape.policy_ids == tuple(policy_ids)
        assert shape.request_id == "r-1"


def test_millions_of_empty_images_are_refused_at_the_first_one_past_the_limit() -> None:
    raw = EMPTY_IMAGE * 5_000_000  # 10 MB that parse into five million messages
    with pytest.raises(InvalidRequest, match="more than 256 images"):
        moderate_shape(raw, LIMITS)


def test_a_flood_of_unknown_fields_is_refused() -> None:
    raw = b"\x78\x00" * 1_000_000  # field 15, varint 0
    with pytest.raises(InvalidRequest, match="the request has more than"):
        moderate_shape(raw, LIMITS)


def test_a_flood_of_fields_inside_one_image_is_refused() -> None:
    inner = b"\x1a\x00" * 50  # field 3 (unknown), empty
    raw = b"\x0a" + bytes([len(inner)]) + inner
    with pytest.raises(InvalidRequest, match="image 0 has more than 8 fields"):
        moderate_shape(raw, LIMITS)


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"images": [pb.Image(id="x" * (MAX_IMAGE_ID_BYTES + 1))]}, "image 0's id is longer"),
        ({"policy_ids": ["p" * 65]}, "a policy id is longer than 64 bytes"),
        ({"policy_ids": ["p"] * (MAX_POLICY_IDS + 1)}, f"more than {MAX_POLICY_IDS} policy ids"),
        ({"request_id": "r" * 129}, "request_id is longer than 128 bytes"),
    ],
)
def test_ids_are_capped(fields: dict[str, object], words: str) -> None:
    with pytest.raises(InvalidRequest, match=words):
        moderate_shape(moderate_bytes(**fields), LIMITS)


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"\x0a\x05ab", "truncated"),
        (b"\x0a", "varint is truncated"),
        (b"\x0a" + b"\xff" * 11, "varint is truncated or too long"),
        (b"\x0b", "wire type 3"),
        (b"\x00\x00", "field number 0"),
        (b"\x12\x02\xff\xfe", "not UTF-8"),
    ],
)
def test_malformed_framing_is_an_invalid_request(raw: bytes, words: str) -> None:
    with pytest.raises(InvalidRequest, match=words):
        moderate_shape(raw, LIMITS)


def test_the_request_id_of_a_refused_request_is_still_found() -> None:
    raw = moderate_bytes(images=[pb.Image()] * 300, request_id="batch-9")
    with pytest.raises(InvalidRequest):
        moderate_shape(raw, LIMITS)
    assert find_request_id(raw, RequestLimits(300, 1, 1)) == "batch-9"
    assert find_request_id(b"\x0b", LIMITS) == ""


def stored(views: int, values: int = 4) -> pb.EmbeddedImage:
    view = pb.Embedding(values=[0.5] * values)
    return pb.EmbeddedImage(id="i", embedding=[0.5] * values, views=[view] * views)


def test_score_requests_are_counted_by_images_and_views() -> None:
    request = pb.ScoreEmbeddingsRequest(images=[stored(3)] * 10, policy_ids=["red"])
    assert check_score_shape(request.SerializeToString(), LIMITS) == 10
    too_many = pb.ScoreEmbeddingsRequest(images=[stored(0)] * 4097)
    with pytest.raises(InvalidRequest, match="more than 4096 embeddings"):
        check_score_shape(too_many.SerializeToString(), LIMITS)
    # one over --max-views is the per-image INVALID_EMBEDDING check's; far more is refused
    assert (
        check_score_shape(
            pb.ScoreEmbeddingsRequest(images=[stored(49)]).SerializeToString(), LIMITS
        )
        == 1
    )
    bomb = pb.ScoreEmbeddingsRequest(images=[pb.EmbeddedImage(views=[pb.Embedding()] * 97)])
    with pytest.raises(InvalidRequest, match="embedded image 0 has more than 96 views"):
        check_score_shape(bomb.SerializeToString(), LIMITS)


def test_score_requests_cap_the_views_of_the_whole_request() -> None:
    request = pb.ScoreEmbeddingsRequest(images=[stored(90, values=0)] * 800)
    with pytest.raises(InvalidRequest, match="more than 65536 views"):
        check_score_shape(request.SerializeToString(), LIMITS)


@pytest.mark.parametrize(
    ("request_", "words"),
    [
        (pb.ScoreEmbeddingsRequest(model="m" * 257), "model is longer than 256 bytes"),
        (
            pb.ScoreEmbeddingsRequest(policy_ids=["p"] * (MAX_POLICY_IDS + 1)),
            f"more than {MAX_POLICY_IDS} policy ids",
        ),
    ],
)
def test_score_request_fields_are_capped(request_: pb.ScoreEmbeddingsRequest, words: str) -> None:
    with pytest.raises(InvalidRequest, match=words):
        check_score_shape(request_.SerializeToString(), LIMITS)


def test_unknown_fields_inside_an_embedded_image_are_capped_apart_from_its_views() -> None:
    inner = b"\x22\x00" * 9  # field 4 (unknown), empty, nine times
    raw = b"\x0a" + bytes([len(inner)]) + inner
    with pytest.raises(InvalidRequest, match="more than 8 fields besides its views"):
        check_score_shape(raw, LIMITS)


def test_unpacked_embedding_values_are_refused() -> None:
    unpacked = b"\x0a\x0a" + (b"\x15" + b"\x00\x00\x80\x3f") * 2  # field 2, wire type 5, twice
    with pytest.raises(InvalidRequest, match="must be packed"):
        check_score_shape(unpacked, LIMITS)


@pytest.mark.parametrize(
    "encoded",
    [
        b"",
        b"\x28\x03",  # detail = 3
        b"\x28\x2a",  # 42: not a Detail, read as protobuf reads it
        b"\x28" + b"\xff" * 9 + b"\x01",  # -1, as ten bytes
        b"\x28\x83\x80\x80\x80\x10",  # 2**32 + 3: protobuf keeps the low 32 bits
        b"\x28\x02\x28\x03",  # repeated: the last one counts
    ],
)
def test_detail_is_read_from_the_framing_as_protobuf_reads_it(encoded: bytes) -> None:
    raw = moderate_bytes(request_id="r") + encoded
    assert moderate_shape(raw, LIMITS).detail == pb.ModerateRequest.FromString(raw).detail

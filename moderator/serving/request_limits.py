"""Sizes checked on a request's raw bytes, before protobuf builds anything from them.

A 128 MiB message of empty images is tens of millions of objects once parsed; its bytes are a
few thousand tag-and-length pairs before the first count passes its limit. The walk reads the
protobuf wire framing (tags and lengths) of the top-level fields and one level into each image,
stops at the first limit passed, and never looks inside image data or embedding values.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from moderator.errors import InvalidRequest

VARINT, FIXED64, LENGTH_DELIMITED, FIXED32 = 0, 1, 2, 5
MAX_VARINT_BYTES = 10

MAX_IMAGE_ID_BYTES = 256
MAX_REQUEST_ID_BYTES = 128
MAX_POLICY_IDS = 4096
MAX_POLICY_ID_BYTES = 64
MAX_MODEL_ID_BYTES = 256
MAX_OTHER_FIELDS_PER_IMAGE = 8
# Room for fields a newer client may send that this server does not know.
MAX_OTHER_FIELDS = 16
# ScoreEmbeddings: views across one request (the values inside a view are plain floats and
# cost no more parsed than on the wire; the view messages themselves do).
MAX_STORED_VIEWS_PER_REQUEST = 65_536


@dataclass(frozen=True)
class RequestLimits:
    max_images: int
    max_embeddings: int
    max_views: int

    @property
    def moderate_fields(self) -> int:
        """The most top-level fields a ModerateRequest within these limits can have."""
        return self.max_images + MAX_POLICY_IDS + MAX_OTHER_FIELDS


@dataclass(frozen=True)
class ModerateShape:
    """What a ModerateRequest will cost, read from its framing."""

    images: int
    policy_ids: tuple[str, ...]
    request_id: str
    detail: int = 0  # the Detail enum's number, as protobuf will read it


def moderate_shape(data: bytes, limits: RequestLimits) -> ModerateShape:
    """Counts, id lengths and policy ids of a serialized ModerateRequest; InvalidRequest
    at the first limit passed."""
    view = memoryview(data)
    images = 0
    policy_ids: list[str] = []
    request_id = ""
    detail = 0
    for number, wire, start, end in _fields(
        view, 0, len(view), limits.moderate_fields, "the request"
    ):
        if number == 1 and wire == LENGTH_DELIMITED:
            images += 1
            if images > limits.max_images:
                raise InvalidRequest(
                    f"request has more than {limits.max_images} images; "
                    "split it (--max-images-per-request)"
                )
            _check_image(view, start, end, images - 1)
        elif number == 2 and wire == LENGTH_DELIMITED:
            if len(policy_ids) == MAX_POLICY_IDS:
                raise InvalidRequest(f"request names more than {MAX_POLICY_IDS} policy ids")
            policy_ids.append(_short_text(view, start, end, MAX_POLICY_ID_BYTES, "a policy id"))
        elif number == 4 and wire == LENGTH_DELIMITED:
            request_id = _short_text(view, start, end, MAX_REQUEST_ID_BYTES, "request_id")
        elif number == 5 and wire == VARINT:  # the last one counts, as for protobuf
            detail = _int32(_varint(view, start, end)[0])
    return ModerateShape(images, tuple(policy_ids), request_id, detail)


def find_request_id(data: bytes, limits: RequestLimits) -> str:
    """The request_id of a ModerateRequest that failed its checks, if its framing reads."""
    view = memoryview(data)
    try:
        for number, wire, start, end in _fields(
            view, 0, len(view), limits.moderate_fields, "the request"
        ):
            if number == 4 and wire == LENGTH_DELIMITED:
                return _short_text(view, start, end, MAX_REQUEST_ID_BYTES, "request_id")
    except InvalidRequest:
        pass
    return ""


def check_score_shape(data: bytes, limits: RequestLimits) -> int:
    """Checks a serialized ScoreEmbeddingsRequest's counts; returns its number of images."""
    view = memoryview(data)
    images = stored_views = policy_ids = 0
    max_fields = limits.max_embeddings + MAX_POLICY_IDS + MAX_OTHER_FIELDS
    for number, wire, start, end in _fields(view, 0, len(view), max_fields, "the request"):
        if number == 1 and wire == LENGTH_DELIMITED:
            images += 1
            if images > limits.max_embeddings:
                raise InvalidRequest(
                    f"request has more than {limits.max_embeddings} embeddings; "
                    "split it (--max-embeddings-per-request)"
                )
            stored_views += _stored_view_count(view, start, end, images - 1, limits.max_views)
            if stored_views > MAX_STORED_VIEWS_PER_REQUEST:
                raise InvalidRequest(
                    f"request carries more than {MAX_STORED_VIEWS_PER_REQUEST} views; split it"
                )
        elif number == 2 and wire == LENGTH_DELIMITED:
            policy_ids += 1
            if policy_ids > MAX_POLICY_IDS:
                raise InvalidRequest(f"request names more than {MAX_POLICY_IDS} policy ids")
            _short_text(view, start, end, MAX_POLICY_ID_BYTES, "a policy id")
        elif number == 3 and wire == LENGTH_DELIMITED:
            _short_text(view, start, end, MAX_MODEL_ID_BYTES, "model")
    return images


def _check_image(view: memoryview, start: int, end: int, position: int) -> None:
    what = f"image {position}"
    for number, wire, field_start, field_end in _fields(view, start, end, 8, what):
        if number == 1 and wire == LENGTH_DELIMITED:
            _short_text(view, field_start, field_end, MAX_IMAGE_ID_BYTES, f"{what}'s id")


def _stored_view_count(
    view: memoryview, start: int, end: int, position: int, max_views: int
) -> int:
    # Moderate returns at most max_views views; one more or so is left to the per-image check
    # (INVALID_EMBEDDING), far more is not a stored result at all.
    limit = 2 * max_views
    what = f"embedded image {position}"
    views = others = 0
    for number, wire, field_start, field_end in _fields(view, start, end, limit + 8, what):
        if number != 3:
            others += 1
            if others > MAX_OTHER_FIELDS_PER_IMAGE:
                raise InvalidRequest(
                    f"{what} has more than {MAX_OTHER_FIELDS_PER_IMAGE} fields besides its views"
                )
        if number == 1 and wire == LENGTH_DELIMITED:
            _short_text(view, field_start, field_end, MAX_IMAGE_ID_BYTES, f"{what}'s id")
        elif number == 2 and wire == FIXED32:
            raise InvalidRequest(f"{what}: embedding values must be packed (the proto3 default)")
        elif number == 3:
            views += 1
            if views > limit:
                raise InvalidRequest(f"{what} has more than {limit} views")
    return views


def _short_text(view: memoryview, start: int, end: int, limit: int, what: str) -> str:
    if end - start > limit:
        raise InvalidRequest(f"{what} is longer than {limit} bytes")
    try:
        return bytes(view[start:end]).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(f"{what} is not UTF-8") from None


def _fields(
    view: memoryview, start: int, end: int, max_fields: int, what: str
) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value start, value end) of each field in view[start:end]."""
    position = start
    count = 0
    while position < end:
        count += 1
        if count > max_fields:
            raise InvalidRequest(f"{what} has more than {max_fields} fields")
        tag, position = _varint(view, position, end)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise InvalidRequest(f"malformed message: field number 0 in {what}")
        if wire == VARINT:
            _, value_end = _varint(view, position, end)
        elif wire == FIXED64:
            value_end = position + 8
        elif wire == FIXED32:
            value_end = position + 4
        elif wire == LENGTH_DELIMITED:
            length, position = _varint(view, position, end)
            value_end = position + length
        else:  # groups (3, 4) and unused wire types: nothing in this API is one
            raise InvalidRequest(f"malformed message: wire type {wire} in {what}")
        if value_end > end:
            raise InvalidRequest(f"malformed message: {what} is truncated")
        yield number, wire, position, value_end
        position = value_end


def _int32(value: int) -> int:
    """A varint as protobuf reads an enum: its low 32 bits, two's complement."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def _varint(view: memoryview, position: int, end: int) -> tuple[int, int]:
    value = shift = 0
    for index in range(position, min(end, position + MAX_VARINT_BYTES)):
        byte = view[index]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, index + 1
        shift += 7
    raise InvalidRequest("malformed message: a varint is truncated or too long")

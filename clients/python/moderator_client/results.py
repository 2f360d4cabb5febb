"""What Moderate answers, as typed values; and the JSON line a result is stored as.

The JSON line is the one `moderator check --json`, `moderator-scan` and `moderator rescore`
read and write: protobuf's JSON mapping of the ImageResult, with the response's policy version,
model and precision beside it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import grpc
from google.protobuf.json_format import MessageToDict

from moderator_client.v1 import moderator_pb2 as pb


def _status_name(code: int) -> str:
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status.name
    return str(code)


def _name(enum: object, value: int, prefix: str) -> str:
    """The value's name without its prefix, lower case; "unknown_N" for a value a newer server
    added (an older client must still read the rest of the answer)."""
    try:
        name: str = enum.Name(value)  # type: ignore[attr-defined]
    except ValueError:
        return f"unknown_{value}"
    return name.removeprefix(prefix).lower()


@dataclass(frozen=True)
class PolicyResult:
    policy_id: str
    score: float
    threshold: float
    violated: bool
    action: str  # "review" or "block"
    mode: str  # "enforce" or "shadow"
    matched_description: str
    policy_version: str
    example_score: float  # best similarity to one of the policy's example images (0: none)
    example_threshold: float
    matched_example: str  # the example image that reached example_threshold
    allowed_by: str  # the allow example that kept the policy from being violated
    matched_hash: str  # "<list>:<id or hash>": the hash list entry that matched

    @classmethod
    def from_proto(cls, result: pb.PolicyResult) -> PolicyResult:
        return cls(
            policy_id=result.policy_id,
            score=result.score,
            threshold=result.threshold,
            violated=result.violated,
            action=_name(pb.Action, result.action, "ACTION_"),
            mode=_name(pb.PolicyMode, result.mode, "POLICY_MODE_"),
            matched_description=result.matched_description,
            policy_version=result.policy_version,
            example_score=result.example_score,
            example_threshold=result.example_threshold,
            matched_example=result.matched_example,
            allowed_by=result.allowed_by,
            matched_hash=result.matched_hash,
        )


@dataclass(frozen=True)
class ImageError:
    code: str  # "corrupt", "too_many_bytes", ... (ImageErrorCode without its prefix)
    message: str


@dataclass(frozen=True)
class ImageResult:
    id: str
    decision: str  # "allow", "review", "block" or "error"
    policies: tuple[PolicyResult, ...]
    error: ImageError | None
    embedding: tuple[float, ...]  # with include_embeddings
    views: tuple[tuple[float, ...], ...]  # with include_embeddings, for multi-view images
    sha256: str  # of the bytes sent ('' for an image that did not decode)
    pdq: str  # PDQ perceptual hash, 64 hex digits ('' for an image that did not decode)
    pdq_quality: int  # 0-100
    proto: pb.ImageResult  # the message itself (format_json writes it)

    @property
    def violations(self) -> tuple[PolicyResult, ...]:
        """The policies the image violates, shadow ones included."""
        return tuple(p for p in self.policies if p.violated)

    @classmethod
    def from_proto(cls, result: pb.ImageResult) -> ImageResult:
        error = None
        if result.decision == pb.DECISION_ERROR:
            code = _name(pb.ImageErrorCode, result.error.code, "IMAGE_ERROR_CODE_")
            error = ImageError(code, result.error.message)
        return cls(
            id=result.id,
            decision=_name(pb.Decision, result.decision, "DECISION_"),
            policies=tuple(PolicyResult.from_proto(p) for p in result.policies),
            error=error,
            embedding=tuple(result.embedding),
            views=tuple(tuple(v.values) for v in result.views),
            sha256=result.sha256,
            pdq=result.pdq,
            pdq_quality=result.pdq_quality,
            proto=result,
        )


@dataclass(frozen=True)
class RequestError:
    """Why one request of a stream failed as a whole (the stream goes on)."""

    code: str  # a gRPC status code's name: "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", ...
    message: str


@dataclass(frozen=True)
class ModerateResult:
    """One response: the images' results in request order, and what decided them."""

    results: tuple[ImageResult, ...]
    policy_version: str
    model: str
    precision: str
    request_id: str
    error: RequestError | None = None  # moderate_stream only

    @classmethod
    def from_proto(cls, response: pb.ModerateResponse) -> ModerateResult:
        error = None
        if response.HasField("error"):
            error = RequestError(_status_name(response.error.code), response.error.message)
        return cls(
            results=tuple(ImageResult.from_proto(r) for r in response.results),
            policy_version=response.policy_version,
            model=response.model,
            precision=response.precision,
            request_id=response.request_id,
            error=error,
        )

    def json_lines(self) -> list[str]:
        return [
            format_json(r.proto, self.policy_version, self.model, self.precision)
            for r in self.results
        ]


def format_json(result: pb.ImageResult, policy_version: str, model: str, precision: str) -> str:
    """One ImageResult as a JSON line (protobuf's JSON mapping) with its response's context:
    the line `moderator rescore` reads back."""
    record = MessageToDict(result, preserving_proto_field_name=True)
    record.update(policy_version=policy_version, model=model, precision=precision)
    return json.dumps(record, sort_keys=True)

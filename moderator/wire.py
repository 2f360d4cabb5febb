"""The protobuf mapping, in one place: domain results to messages and back.

Used by the servicer (responses) and `moderator rescore` (its stored results), so a result
reads the same wherever it is made. The JSON line a result is stored as is the client
package's (moderator_client.format_json).
"""

from __future__ import annotations

from moderator_client.v1 import moderator_pb2 as pb

from moderator.core.outcomes import ImageOutcome, ModerationResult, PolicyOutcome, Report
from moderator.core.policies import Action, Mode, Policy, ReloadStatus
from moderator.core.rescoring import EmbeddedImage, embedded_image
from moderator.core.scoring import Decision
from moderator.errors import ImageErrorCode

DECISIONS = {
    Decision.ALLOW: pb.DECISION_ALLOW,
    Decision.REVIEW: pb.DECISION_REVIEW,
    Decision.BLOCK: pb.DECISION_BLOCK,
    Decision.ERROR: pb.DECISION_ERROR,
}
ACTIONS = {Action.REVIEW: pb.ACTION_REVIEW, Action.BLOCK: pb.ACTION_BLOCK}
MODES = {Mode.ENFORCE: pb.POLICY_MODE_ENFORCE, Mode.SHADOW: pb.POLICY_MODE_SHADOW}
IMAGE_ERROR_CODES = {
    ImageErrorCode.EMPTY: pb.IMAGE_ERROR_CODE_EMPTY,
    ImageErrorCode.TOO_MANY_BYTES: pb.IMAGE_ERROR_CODE_TOO_MANY_BYTES,
    ImageErrorCode.TOO_MANY_PIXELS: pb.IMAGE_ERROR_CODE_TOO_MANY_PIXELS,
    ImageErrorCode.UNSUPPORTED_FORMAT: pb.IMAGE_ERROR_CODE_UNSUPPORTED_FORMAT,
    ImageErrorCode.CORRUPT: pb.IMAGE_ERROR_CODE_CORRUPT,
    ImageErrorCode.INVALID_EMBEDDING: pb.IMAGE_ERROR_CODE_INVALID_EMBEDDING,
    ImageErrorCode.TOO_COMPLEX: pb.IMAGE_ERROR_CODE_TOO_COMPLEX,
}


REPORTS: dict[int, Report] = {
    pb.DETAIL_UNSPECIFIED: Report.ALL_POLICIES,
    pb.DETAIL_ALL_POLICIES: Report.ALL_POLICIES,
    pb.DETAIL_VIOLATIONS: Report.VIOLATIONS,
    pb.DETAIL_DECISION: Report.DECISION,
}


def moderate_response(result: ModerationResult) -> pb.ModerateResponse:
    return pb.ModerateResponse(
        results=[image_result(outcome) for outcome in result.results],
        policy_version=result.policy_version,
        model=result.model_id,
        precision=result.precision,
    )


def image_result(outcome: ImageOutcome) -> pb.ImageResult:
    result = pb.ImageResult(
        id=outcome.id,
        decision=DECISIONS[outcome.decision],
        policies=[policy_result(p) for p in outcome.policies],
        embedding=outcome.embedding,
        views=[pb.Embedding(values=view) for view in outcome.views],
    )
    if outcome.hashes is not None:
        result.sha256 = outcome.hashes.sha256
        if outcome.hashes.pdq is not None:
            result.pdq = outcome.hashes.pdq.hex
            result.pdq_quality = outcome.hashes.pdq.quality
    if outcome.error is not None:
        result.error.code = IMAGE_ERROR_CODES[outcome.error.code]
        result.error.message = outcome.error.message
    return result


def policy_result(outcome: PolicyOutcome) -> pb.PolicyResult:
    policy = outcome.policy
    return pb.PolicyResult(
        policy_id=policy.id,
        score=outcome.score,
        threshold=policy.threshold,
        violated=outcome.violated,
        action=ACTIONS[policy.action],
        mode=MODES[policy.mode],
        matched_description=outcome.matched_description,
        policy_version=policy.version,
        example_score=outcome.example_score,
        example_threshold=policy.known.example_threshold if policy.known.examples else 0.0,
        matched_example=outcome.matched_example,
        allowed_by=outcome.allowed_by,
        matched_hash=outcome.matched_hash,
    )


def embedded(image: pb.EmbeddedImage) -> EmbeddedImage:
    """A ScoreEmbeddings image as the domain's stored image (values converted later)."""
    views = [view.values for view in image.views]
    return embedded_image(
        image.id,
        image.embedding,
        views,
        sha256=image.sha256,
        pdq=image.pdq,
        pdq_quality=image.pdq_quality,
    )


def policy_info(policy: Policy) -> pb.PolicyInfo:
    return pb.PolicyInfo(
        id=policy.id,
        title=policy.title,
        action=ACTIONS[policy.action],
        mode=MODES[policy.mode],
        threshold=policy.threshold,
        description_count=len(policy.descriptions),
        benign_count=len(policy.benign),
        version=policy.version,
        example_count=len(policy.known.examples),
        allow_example_count=len(policy.known.allow_examples),
        hash_count=policy.known.hash_count,
    )


def reload_status(status: ReloadStatus) -> pb.ReloadStatus:
    return pb.ReloadStatus(ok=status.ok, message=status.message, unix_time=int(status.unix_time))

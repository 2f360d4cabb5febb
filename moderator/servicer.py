"""gRPC edge: proto <-> domain, and domain errors -> status codes, in one place."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias, TypeVar

import grpc

from moderator.engine import ImageInput, ModerationEngine, ReloadStatus
from moderator.errors import (
    DeadlineExceeded,
    Disabled,
    ImageErrorCode,
    InvalidRequest,
    ModeratorError,
    NotReady,
    Overloaded,
)
from moderator.metrics import Metrics
from moderator.outcomes import ImageOutcome, ModerationResult, PolicyOutcome
from moderator.policies import Action, Mode, Policy
from moderator.rescoring import EmbeddedImage, embedded_image
from moderator.scoring import Decision
from moderator.v1 import moderator_pb2 as pb
from moderator.v1 import moderator_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
_Response = TypeVar("_Response")

# Requests of one stream moderated concurrently; responses still come back in order.
STREAM_WINDOW = 4

STATUS_FOR_ERROR: dict[type[ModeratorError], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    NotReady: grpc.StatusCode.UNAVAILABLE,
    Disabled: grpc.StatusCode.FAILED_PRECONDITION,
}
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
}


def status_for(error: BaseException) -> grpc.StatusCode:
    for kind, code in STATUS_FOR_ERROR.items():
        if isinstance(error, kind):
            return code
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.INTERNAL


class ModeratorServicer(pb_grpc.ModeratorServicer):
    def __init__(self, engine: ModerationEngine, metrics: Metrics) -> None:
        self._engine = engine
        self._metrics = metrics

    async def Moderate(  # noqa: N802 (gRPC method name)
        self, request: pb.ModerateRequest, context: Context
    ) -> pb.ModerateResponse:
        return await self._unary("Moderate", context, lambda: self._moderate(request, context))

    async def ModerateStream(  # noqa: N802
        self,
        request_iterator: AsyncIterator[pb.ModerateRequest],
        context: Context,
    ) -> AsyncIterator[pb.ModerateResponse]:
        started = time.perf_counter()
        pending: collections.deque[asyncio.Task[pb.ModerateResponse]] = collections.deque()
        try:
            async for request in request_iterator:
                pending.append(asyncio.ensure_future(self._moderate(request, context)))
                while pending and (len(pending) >= STREAM_WINDOW or pending[0].done()):
                    yield await pending.popleft()
            while pending:
                yield await pending.popleft()
        except BaseException as exc:
            for task in pending:
                task.cancel()
            await self._fail("ModerateStream", started, exc, context)
            raise
        self._observe("ModerateStream", started, grpc.StatusCode.OK)

    async def ListPolicies(  # noqa: N802
        self, request: pb.ListPoliciesRequest, context: Context
    ) -> pb.ListPoliciesResponse:
        return await self._unary("ListPolicies", context, self._list_policies)

    async def ReloadPolicies(  # noqa: N802
        self, request: pb.ReloadPoliciesRequest, context: Context
    ) -> pb.ReloadPoliciesResponse:
        return await self._unary("ReloadPolicies", context, self._reload_policies)

    async def ScoreEmbeddings(  # noqa: N802
        self, request: pb.ScoreEmbeddingsRequest, context: Context
    ) -> pb.ModerateResponse:
        return await self._unary("ScoreEmbeddings", context, lambda: self._score(request))

    async def _unary(
        self, method: str, context: Context, handle: Callable[[], Awaitable[_Response]]
    ) -> _Response:
        """Time and count one unary RPC; map a domain error to its status."""
        started = time.perf_counter()
        try:
            response = await handle()
        except BaseException as exc:
            await self._fail(method, started, exc, context)
            raise
        self._observe(method, started, grpc.StatusCode.OK)
        return response

    async def _list_policies(self) -> pb.ListPoliciesResponse:
        policy_set = self._engine.policies
        return pb.ListPoliciesResponse(
            policies=[policy_info(p) for p in policy_set.policies],
            policy_version=policy_set.version,
            last_reload=reload_status(self._engine.last_reload),
        )

    async def _reload_policies(self) -> pb.ReloadPoliciesResponse:
        status = await self._engine.reload()
        return pb.ReloadPoliciesResponse(
            status=reload_status(status), policy_version=self._engine.policies.version
        )

    async def _moderate(self, request: pb.ModerateRequest, context: Context) -> pb.ModerateResponse:
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        result = await self._engine.moderate(
            [ImageInput(id=image.id, data=image.data) for image in request.images],
            policy_ids=list(request.policy_ids),
            include_embeddings=request.include_embeddings,
            deadline=deadline,
        )
        return moderate_response(result)

    async def _score(self, request: pb.ScoreEmbeddingsRequest) -> pb.ModerateResponse:
        result = await self._engine.score_embeddings(
            [embedded(image) for image in request.images],
            policy_ids=list(request.policy_ids),
            model_id=request.model,
        )
        # thousands of results: build the message off the event loop
        return await asyncio.to_thread(moderate_response, result)

    async def _fail(
        self, method: str, started: float, exc: BaseException, context: Context
    ) -> None:
        """Record the failure; turn a domain error into its status (this raises)."""
        if isinstance(exc, grpc.aio.AbortError):
            return
        code = status_for(exc)
        self._observe(method, started, code)
        if code is grpc.StatusCode.CANCELLED:
            return
        if code is grpc.StatusCode.INTERNAL:
            log.exception("%s failed", method, exc_info=exc)
            await context.abort(code, "internal error; see the server log")
        await context.abort(code, str(exc))

    def _observe(self, method: str, started: float, code: grpc.StatusCode) -> None:
        self._metrics.requests.labels(method=method, code=code.name).inc()
        self._metrics.request_duration.labels(method=method).observe(time.perf_counter() - started)


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
    if outcome.error is not None:
        result.error.code = IMAGE_ERROR_CODES[outcome.error.code]
        result.error.message = outcome.error.message
    return result


def embedded(image: pb.EmbeddedImage) -> EmbeddedImage:
    return embedded_image(image.id, image.embedding, [view.values for view in image.views])


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
    )


def reload_status(status: ReloadStatus) -> pb.ReloadStatus:
    return pb.ReloadStatus(ok=status.ok, message=status.message, unix_time=int(status.unix_time))


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
    )

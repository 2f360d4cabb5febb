"""gRPC edge: requests to engine calls, and domain errors to status codes, in one place.

The message mapping itself is moderator.wire."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias, TypeVar

import grpc

from moderator.errors import (
    DeadlineExceeded,
    Disabled,
    InvalidRequest,
    ModeratorError,
    NotReady,
    Overloaded,
)
from moderator.serving.engine import ImageInput, ModerationEngine
from moderator.serving.metrics import Metrics
from moderator.v1 import moderator_pb2 as pb
from moderator.v1 import moderator_pb2_grpc as pb_grpc
from moderator.wire import embedded, moderate_response, policy_info, reload_status

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

"""gRPC edge: requests to engine calls, and domain errors to status codes, in one place.

The message mapping itself is moderator.wire."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator
from typing import Any, TypeAlias, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message
from moderator_client.v1 import moderator_pb2 as pb

from moderator.core.outcomes import Report
from moderator.errors import DeadlineExceeded, InvalidRequest, NotReady, Overloaded
from moderator.serving.auth import CALLER, STILL_ALLOWED, audit
from moderator.serving.calls import AccessDenied, CallRecorder
from moderator.serving.engine import ImageInput, ModerationEngine
from moderator.serving.metrics import Metrics
from moderator.serving.request_limits import (
    RequestLimits,
    check_score_shape,
    find_request_id,
    moderate_shape,
)
from moderator.serving.stream import answer_in_order
from moderator.wire import REPORTS, embedded, moderate_response, policy_info, reload_status

log = logging.getLogger(__name__)

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
_Response = TypeVar("_Response")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Moderator"].full_name
ALL_METHODS = frozenset(m.name for m in pb.DESCRIPTOR.services_by_name["Moderator"].methods)
# Served only on --admin-port when there is one.
ADMIN_PORT_METHODS = frozenset({"ReloadPolicies", "ScoreEmbeddings"})
# Requests of one stream moderated concurrently; responses still come back in order.
STREAM_WINDOW = 4
# The method label of each request inside a ModerateStream, in moderator_requests_total.
STREAM_REQUEST = "ModerateStream/request"
_Message = TypeVar("_Message", bound=Message)


def parse(kind: type[_Message], raw: bytes) -> _Message:
    try:
        return kind.FromString(raw)
    except DecodeError as exc:
        raise InvalidRequest(f"malformed {kind.__name__}: {exc}") from None


def report_of(detail: int) -> Report:
    """What a request's pb.Detail asks each result to list; a value this server does not know
    is refused (rather than answered with more or less than was asked)."""
    report = REPORTS.get(detail)
    if report is None:
        raise InvalidRequest(f"detail {detail} is not a Detail (see the API)")
    return report


def deadline_of(context: Context) -> float | None:
    """The call's deadline in time.monotonic() seconds."""
    remaining = context.time_remaining()
    return time.monotonic() + remaining if remaining is not None else None


class ModeratorServicer:
    """The Moderator service. Moderate, ModerateStream and ScoreEmbeddings take the request's
    raw bytes: their sizes are checked on the wire framing (serving/request_limits.py) and
    room is admitted before protobuf builds anything from them."""

    def __init__(
        self,
        engine: ModerationEngine,
        metrics: Metrics,
        limits: RequestLimits,
        *,
        max_calls: int,
        stream_idle_seconds: float,
    ) -> None:
        self._engine = engine
        self._metrics = metrics
        self._limits = limits
        self._max_calls = max_calls
        self._calls = 0  # Moderator calls running (health and reflection do not count)
        self._stream_idle_seconds = stream_idle_seconds
        self._stopping = asyncio.Event()
        self._tracing = engine.tracing
        self._recorder = CallRecorder(metrics, engine.tracing)

    def stop_accepting(self) -> None:
        """The end of the drain: new calls get UNAVAILABLE (not accepted), and open streams
        read no further request, answer their pending ones and end with UNAVAILABLE (send
        the rest elsewhere). Calls already accepted go on."""
        self._stopping.set()

    def handler(self, methods: Collection[str]) -> grpc.GenericRpcHandler:  # type: ignore[type-arg]
        """Handlers of `methods` (the others answer UNIMPLEMENTED on this port). A request
        deserializer of None passes the bytes."""
        moderate_out = pb.ModerateResponse.SerializeToString
        handlers = {
            "Moderate": grpc.unary_unary_rpc_method_handler(
                self.Moderate, response_serializer=moderate_out
            ),
            "ModerateStream": grpc.stream_stream_rpc_method_handler(
                self.ModerateStream, response_serializer=moderate_out
            ),
            "ScoreEmbeddings": grpc.unary_unary_rpc_method_handler(
                self.ScoreEmbeddings, response_serializer=moderate_out
            ),
            # their requests have no fields: the bytes are never parsed
            "ListPolicies": grpc.unary_unary_rpc_method_handler(
                self.ListPolicies,
                response_serializer=pb.ListPoliciesResponse.SerializeToString,
            ),
            "ReloadPolicies": grpc.unary_unary_rpc_method_handler(
                self.ReloadPolicies,
                response_serializer=pb.ReloadPoliciesResponse.SerializeToString,
            ),
        }
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME, {name: h for name, h in handlers.items() if name in methods}
        )

    async def Moderate(  # noqa: N802 (gRPC method name)
        self, request: bytes, context: Context
    ) -> pb.ModerateResponse:
        return await self._unary(
            "Moderate", context, lambda: self._moderate(request, context, wait=False), request
        )

    async def ModerateStream(  # noqa: N802
        self,
        request_iterator: AsyncIterator[bytes],
        context: Context,
    ) -> None:
        """Answers are written with context.write under a time limit: a client that stops
        reading (HTTP/2 flow control holds the write) cannot keep its call slot forever."""
        method = "ModerateStream"
        started = time.perf_counter()
        with self._tracing.span(f"{SERVICE_NAME}/{method}"):
            try:
                with self._call_slot():
                    answers = answer_in_order(
                        request_iterator,
                        lambda raw: self._stream_request(raw, context),
                        STREAM_WINDOW,
                        self._stream_idle_seconds,
                        self._stopping,
                    )
                    async for response in answers:
                        await self._write(context, response)
            except (grpc.aio.AbortError, asyncio.CancelledError):
                self._recorder.observe(method, started, grpc.StatusCode.CANCELLED)
                raise
            except BaseException as exc:
                code, details = self._recorder.failure(method, started, exc)
            else:
                self._recorder.observe(method, started, grpc.StatusCode.OK)
                return
            context.set_code(code)
            context.set_details(details)

    async def _write(self, context: Context, response: pb.ModerateResponse) -> None:
        write = asyncio.ensure_future(context.write(response))
        try:
            done, _ = await asyncio.wait({write}, timeout=self._stream_idle_seconds)
        finally:
            if not write.done():
                write.cancel()
        if write not in done:
            raise DeadlineExceeded(
                f"the client read no answer for {self._stream_idle_seconds:g} s: stream closed "
                "(--stream-idle-seconds)"
            )
        write.result()

    async def ListPolicies(  # noqa: N802
        self, request: bytes, context: Context
    ) -> pb.ListPoliciesResponse:
        return await self._unary("ListPolicies", context, self._list_policies)

    async def ReloadPolicies(  # noqa: N802
        self, request: bytes, context: Context
    ) -> pb.ReloadPoliciesResponse:
        return await self._unary("ReloadPolicies", context, self._reload_policies, audited=True)

    async def ScoreEmbeddings(  # noqa: N802
        self, request: bytes, context: Context
    ) -> pb.ModerateResponse:
        return await self._unary("ScoreEmbeddings", context, lambda: self._score(request))

    async def _unary(
        self,
        method: str,
        context: Context,
        handle: Callable[[], Awaitable[_Response]],
        raw: bytes = b"",
        *,
        audited: bool = False,
    ) -> _Response:
        """Time and count one unary RPC; map a domain error to its status. `raw`: a moderation
        request's bytes, for its request_id in a failure's log line. `audited`: an admin
        call, written to the audit log whatever its outcome."""
        started = time.perf_counter()
        with self._tracing.span(f"{SERVICE_NAME}/{method}"):
            before = self._policy_version() if audited else ""
            try:
                with self._call_slot():
                    response = await handle()
            except (grpc.aio.AbortError, asyncio.CancelledError):
                self._recorder.observe(method, started, grpc.StatusCode.CANCELLED)
                if audited:
                    self._audit(method, "CANCELLED", before)
                raise
            except BaseException as exc:
                request_id = find_request_id(raw, self._limits) if raw else ""
                code, details = self._recorder.failure(method, started, exc, request_id)
                if audited:
                    self._audit(method, code.name, before)
            else:
                self._recorder.observe(method, started, grpc.StatusCode.OK, response)
                if audited:
                    self._audit(method, "OK", before, response)
                return response
            # A status set, not raised (context.abort): an exception's traceback would hold the
            # frames holding the request's bytes in a reference cycle until the next full garbage
            # collection, 80 MiB per refused request.
            context.set_code(code)
            context.set_details(details)
            return None  # type: ignore[return-value]

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

    def _policy_version(self) -> str:
        return self._engine.policies.version if self._engine.ready else ""

    def _audit(self, method: str, result: str, before: str, response: object = None) -> None:
        if isinstance(response, pb.ReloadPoliciesResponse) and not response.status.ok:
            result = "INVALID_POLICIES"  # the call worked; the directory did not load
        audit(CALLER.get(), method, result, before=before, after=self._policy_version())

    async def _moderate(self, raw: bytes, context: Context, *, wait: bool) -> pb.ModerateResponse:
        """Check the request's shape, hold room for it, then parse and moderate it. `wait`:
        wait for room (streams) instead of refusing at once."""
        self._engine.check_ready()
        shape = moderate_shape(raw, self._limits)
        self._engine.check_policy_ids(shape.policy_ids)
        report = report_of(shape.detail)  # refused before any room is taken
        deadline = deadline_of(context)
        # The whole message counts: protobuf keeps fields this server does not know, too.
        async with self._engine.admitted(
            shape.images, len(raw), wait=wait, deadline=deadline
        ) as ticket:
            request = parse(pb.ModerateRequest, raw)
            result = await self._engine.moderate(
                [ImageInput(id=image.id, data=image.data) for image in request.images],
                policy_ids=shape.policy_ids,
                include_embeddings=request.include_embeddings,
                deadline=deadline,
                ticket=ticket,
                report=report,
            )
        response = moderate_response(result)
        response.request_id = shape.request_id
        return response

    async def _stream_request(self, raw: bytes, context: Context) -> pb.ModerateResponse:
        """One request of a stream: a domain error becomes that request's response."""
        started = time.perf_counter()
        with self._tracing.span(f"{SERVICE_NAME}/{STREAM_REQUEST}"):
            try:
                self._check_still_allowed()
                response = await self._moderate(raw, context, wait=True)
            except Exception as exc:  # this request's failure, not the stream's
                request_id = find_request_id(raw, self._limits)
                code, details = self._recorder.failure(STREAM_REQUEST, started, exc, request_id)
                return pb.ModerateResponse(
                    request_id=request_id,
                    error=pb.RequestError(code=code.value[0], message=details),
                )
            self._recorder.observe(STREAM_REQUEST, started, grpc.StatusCode.OK, response)
            return response

    def _check_still_allowed(self) -> None:
        """A stream's caller is judged again for each request: a token removed from the
        file stops working on streams already open too."""
        judge = STILL_ALLOWED.get()
        verdict = judge() if judge is not None else None
        if verdict is not None and verdict.code is not None:
            raise AccessDenied(verdict.message, verdict.code)

    async def _score(self, raw: bytes) -> pb.ModerateResponse:
        self._engine.check_ready()
        with self._engine.rescorer.slot():  # Disabled first when --max-rescore-requests 0
            # up to 0.1 s of Python for the largest requests: off the event loop
            await asyncio.to_thread(check_score_shape, raw, self._limits)
            request = parse(pb.ScoreEmbeddingsRequest, raw)
            result = await self._engine.score_embeddings(
                [embedded(image) for image in request.images],
                policy_ids=list(request.policy_ids),
                model_id=request.model,
                report=report_of(request.detail),
                slot_taken=True,
            )
        # thousands of results: build the message off the event loop
        return await asyncio.to_thread(moderate_response, result)

    @contextlib.contextmanager
    def _call_slot(self) -> Iterator[None]:
        """One of --max-concurrent-rpcs, for the length of a call."""
        if self._stopping.is_set():
            raise NotReady("the server is shutting down: call another replica")
        if self._calls >= self._max_calls:
            self._metrics.rejected_requests.labels(reason="overload").inc()
            raise Overloaded(
                f"{self._calls} calls running, the limit (--max-concurrent-rpcs): "
                "retry with backoff"
            )
        self._calls += 1
        try:
            yield
        finally:
            self._calls -= 1

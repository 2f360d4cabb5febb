"""What happened to a call: its status code, its metrics, its log line and its span.

Domain errors map to gRPC status codes here, in one table; every RPC (and every request of a
stream) is counted and timed, and, when on, logged on `moderator.requests` and annotated on its
trace span, with the same fields.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import grpc
from moderator_client.v1 import moderator_pb2 as pb

from moderator.errors import (
    DeadlineExceeded,
    Disabled,
    InvalidRequest,
    ModelFailed,
    ModeratorError,
    NotReady,
    Overloaded,
)
from moderator.logs import REQUEST_LOGGER
from moderator.serving.auth import CALLER
from moderator.serving.metrics import Metrics
from moderator.serving.tracing import Tracing

log = logging.getLogger(__name__)
request_log = logging.getLogger(REQUEST_LOGGER)

MAX_DETAILS_CHARS = 2000
STATUS_FOR_ERROR: dict[type[ModeratorError], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    ModelFailed: grpc.StatusCode.UNAVAILABLE,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    NotReady: grpc.StatusCode.UNAVAILABLE,
    Disabled: grpc.StatusCode.FAILED_PRECONDITION,
}


class AccessDenied(ModeratorError):
    """A stream request whose caller lost its token or role since the stream opened."""

    def __init__(self, message: str, code: grpc.StatusCode) -> None:
        super().__init__(message)
        self.code = code


def status_for(error: BaseException) -> grpc.StatusCode:
    if isinstance(error, AccessDenied):
        return error.code
    for kind, code in STATUS_FOR_ERROR.items():
        if isinstance(error, kind):
            return code
    if isinstance(error, asyncio.CancelledError | GeneratorExit):  # the caller went away
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.INTERNAL


def clipped(details: str) -> str:
    """Error details short enough for a trailer: gRPC refuses metadata over 8-16 KB (the client
    would see RESOURCE_EXHAUSTED instead of the real status) and percent-encodes every byte
    outside printable ASCII, so the text is made ASCII first (escapes), then cut."""
    details = details.encode("ascii", "backslashreplace").decode("ascii")
    if len(details) <= MAX_DETAILS_CHARS:
        return details
    tail = f" ... ({len(details)} characters)"
    return details[: MAX_DETAILS_CHARS - len(tail)] + tail


def response_fields(response: object) -> dict[str, Any]:
    """What a log line or span says about an answer: images, policy version, request id."""
    if isinstance(response, pb.ModerateResponse):
        fields: dict[str, Any] = {
            "images": len(response.results),
            "policy_version": response.policy_version,
        }
        if response.request_id:
            fields["request_id"] = response.request_id
        return fields
    version = getattr(response, "policy_version", "")
    return {"policy_version": version} if version else {}


class CallRecorder:
    def __init__(self, metrics: Metrics, tracing: Tracing) -> None:
        self._metrics = metrics
        self._tracing = tracing

    def failure(
        self, method: str, started: float, exc: BaseException, request_id: str = ""
    ) -> tuple[grpc.StatusCode, str]:
        """Record a failed call; its status and details (a domain error's own message)."""
        code = status_for(exc)
        if code is grpc.StatusCode.INTERNAL:
            log.error("%s failed for %s", method, CALLER.get(), exc_info=exc)
            details = "internal error; see the server log"
        else:
            details = clipped(str(exc))
        self.observe(method, started, code, error=details, request_id=request_id)
        return code, details

    def observe(
        self,
        method: str,
        started: float,
        code: grpc.StatusCode,
        response: object = None,
        *,
        error: str = "",
        request_id: str = "",
    ) -> None:
        seconds = time.perf_counter() - started
        caller = CALLER.get()
        self._metrics.requests.labels(method=method, code=code.name, caller=caller).inc()
        self._metrics.request_duration.labels(method=method).observe(seconds)
        logged = request_log.isEnabledFor(logging.INFO)
        if not (logged or self._tracing.enabled):
            return
        fields = {
            "method": method,
            "code": code.name,
            "caller": caller,
            "duration_ms": round(seconds * 1000, 3),
            **response_fields(response),
        }
        if request_id:
            fields["request_id"] = request_id
        if error:
            fields["error"] = error
        self._tracing.annotate(fields, failed=code is not grpc.StatusCode.OK)
        if logged:
            request_log.info("%s %s", method, code.name, extra={"fields": fields})

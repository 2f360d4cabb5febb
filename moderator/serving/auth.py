"""Authentication and authorization of every call, in one interceptor.

With `--auth-tokens FILE`, a Moderator call must carry `authorization: Bearer <token>`
metadata whose SHA-256 is in the file, for a caller holding the method's role
(serving/access.py): no or an unknown token is UNAUTHENTICATED, a missing role
PERMISSION_DENIED. Health and reflection stay open (probes carry no credentials). The caller's
name travels with the call (CALLER) into logs and the `caller` label of
moderator_requests_total. The file is re-read on change and on SIGHUP; a broken file keeps the
previous one.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import grpc

from moderator.core.policy_files import read_policy_bytes
from moderator.errors import ConfigError, PolicyError
from moderator.logs import REQUEST_LOGGER
from moderator.serving.access import (
    ANONYMOUS,
    METHOD_ROLES,
    UNAUTHENTICATED,
    AccessFile,
    Caller,
    load_access_file,
)
from moderator.serving.metrics import Metrics

log = logging.getLogger(__name__)
audit_log = logging.getLogger("moderator.audit")
request_log = logging.getLogger(REQUEST_LOGGER)
audit_log.setLevel(logging.INFO)  # the audit trail does not follow --log-level
REFUSAL_LOG_SECONDS = 10.0  # one warning per method, caller and code this often, at most

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("caller", default=ANONYMOUS)
STILL_ALLOWED: contextvars.ContextVar[Callable[[], Verdict] | None] = contextvars.ContextVar(
    "still_allowed", default=None
)
BEARER = "bearer "
ADMIN_METHODS = frozenset({"ReloadPolicies"})


@dataclass(frozen=True)
class Verdict:
    caller: str
    code: grpc.StatusCode | None = None  # None: allowed
    message: str = ""


class AccessControl:
    """The token file in force (None: no authentication) and its reloads."""

    def __init__(self, path: Path | None, metrics: Metrics) -> None:
        self.path = path
        self._metrics = metrics
        self.current: AccessFile | None = None
        self._seen = ""
        self._lock = threading.Lock()  # the watcher thread and SIGHUP may both reload
        if path is not None:
            try:
                self.current = load_access_file(path)
            except PolicyError as exc:  # a broken file stops the start
                raise ConfigError(f"--auth-tokens {path}: {exc}") from exc
            self._seen = self.fingerprint()
            self._export(self.current)

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def fingerprint(self) -> str:
        assert self.path is not None
        try:
            return hashlib.sha256(read_policy_bytes(self.path, None)).hexdigest()
        except PolicyError as exc:
            return "; ".join(exc.problems)

    def reload_if_changed(self) -> None:
        if self.enabled and self.fingerprint() != self._seen:
            self.reload()

    def reload(self) -> None:
        """Read the file again; a broken one keeps the previous file in force."""
        if self.path is None:
            return
        with self._lock:
            self._reload(self.path)

    def _reload(self, path: Path) -> None:
        self._seen = self.fingerprint()
        try:
            loaded = load_access_file(path)
        except PolicyError as exc:
            self._metrics.auth_reloads.labels(result="error").inc()
            log.error("token file %s not reloaded, the previous one stays: %s", self.path, exc)
            return
        previous, self.current = self.current, loaded
        self._metrics.auth_reloads.labels(result="success").inc()
        if previous is not None:
            self._metrics.auth_file_info.remove(previous.version)
        self._export(loaded)
        log.info("token file %s loaded: %d callers", self.path, len(loaded.names))

    def _export(self, loaded: AccessFile) -> None:
        self._metrics.auth_file_info.labels(version=loaded.version).set(1)

    def judge(
        self,
        method: str,
        metadata: Iterable[tuple[str, Any]] | None,
        peer: PeerNames | None = None,
    ) -> Verdict:
        """The verdict on one call: its bearer token first, else (mutual TLS) the names of
        its client certificate (`peer`: "CN=..." and the SANs) against the subject rules."""
        if self.current is None:
            return Verdict(ANONYMOUS)
        role = METHOD_ROLES.get(method)
        presented, caller = self._caller(metadata)
        if not presented:  # a token, when sent, decides alone
            caller = self._subject(peer or PeerNames())
        if caller is None:
            return Verdict(
                UNAUTHENTICATED,
                grpc.StatusCode.UNAUTHENTICATED,
                "send 'authorization: Bearer <token>' metadata with a token this server knows",
            )
        if role is None or not caller.may(role):
            needed = role.value if role else "an unknown"
            return Verdict(
                caller.name,
                grpc.StatusCode.PERMISSION_DENIED,
                f"caller '{caller.name}' lacks the {needed} role that {method} needs",
            )
        return Verdict(caller.name)

    def _subject(self, peer: PeerNames) -> Caller | None:
        """`CN=<name>` rules match the certificate's common name only, others its SANs only
        (a SAN reading "CN=admin" is not a common name)."""
        assert self.current is not None
        for match, caller in self.current.subjects:
            if match.startswith("CN="):
                if match[3:] in peer.common_names:
                    return caller
            elif match in peer.sans:
                return caller
        return None

    def _caller(self, metadata: Iterable[tuple[str, Any]] | None) -> tuple[bool, Caller | None]:
        """(whether authorization metadata was sent, the caller its bearer token names)."""
        assert self.current is not None
        for key, value in metadata or ():
            if key == "authorization":
                if isinstance(value, str) and value[: len(BEARER)].lower() == BEARER:
                    return True, self.current.caller_for_token(value[len(BEARER) :].strip())
                return True, None
        return False, None


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(self, access: AccessControl, service: str, metrics: Metrics) -> None:
        self._access = access
        self._service = service
        self._metrics = metrics
        self._logged: dict[tuple[str, str, grpc.StatusCode], float] = {}

    # gRPC passes None on for a method no handler serves: the stubs do not say so
    async def intercept_service(  # type: ignore[override]
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        service, _, method = handler_call_details.method.lstrip("/").rpartition("/")
        if handler is None and service == self._service and method in ADMIN_METHODS:
            audit(CALLER.get(), method, "UNIMPLEMENTED")  # on the public port of an admin split
        if handler is None or service != self._service or not self._access.enabled:
            return handler  # health and reflection are open; without a token file, everything
        return self._guarded(handler, method)

    def verdict(self, method: str, context: Context) -> Verdict:
        """Judged in the call itself: the client certificate is only known there."""
        metadata: Any = context.invocation_metadata()  # grpc.aio.Metadata: (key, value) pairs
        verdict = self._access.judge(method, metadata, peer_names(context))
        if verdict.code is not None:
            self._metrics.requests.labels(
                method=method, code=verdict.code.name, caller=verdict.caller
            ).inc()
            self._log_refusal(method, verdict)
            if request_log.isEnabledFor(logging.INFO):
                fields = {"method": method, "code": verdict.code.name, "caller": verdict.caller}
                request_log.info("%s %s", method, verdict.code.name, extra={"fields": fields})
            if method in ADMIN_METHODS:
                audit(verdict.caller, method, verdict.code.name)
        return verdict

    def _log_refusal(self, method: str, verdict: Verdict) -> None:
        assert verdict.code is not None
        key = (method, verdict.caller, verdict.code)
        now = time.monotonic()
        if now - self._logged.get(key, -REFUSAL_LOG_SECONDS) >= REFUSAL_LOG_SECONDS:
            self._logged[key] = now
            log.warning("%s refused for %s: %s", method, verdict.caller, verdict.code.name)

    def _guarded(self, handler: Handler, method: str) -> Handler:
        """The same handler, run as its caller, or refusing with the verdict's status."""
        # the aio server's behaviours are coroutine functions; grpc's stubs type the sync ones
        unary: Any = handler.unary_unary
        streaming: Any = handler.stream_stream

        async def unary_call(request: Any, context: Context) -> Any:
            verdict = self.verdict(method, context)
            if verdict.code is not None:
                return _refuse(context, verdict)
            CALLER.set(verdict.caller)  # this call's own task and context
            return await unary(request, context)

        async def stream_call(requests: Any, context: Context) -> Any:
            verdict = self.verdict(method, context)
            if verdict.code is not None:
                return _refuse(context, verdict)
            CALLER.set(verdict.caller)
            # a stream outlives token file edits: each of its requests is judged again
            STILL_ALLOWED.set(lambda: self.verdict(method, context))
            return await streaming(requests, context)

        if unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                unary_call, handler.request_deserializer, handler.response_serializer
            )
        assert streaming is not None  # the Moderator service has no other kinds
        return grpc.stream_stream_rpc_method_handler(
            stream_call, handler.request_deserializer, handler.response_serializer
        )


@dataclass(frozen=True)
class PeerNames:
    """A mutual-TLS client certificate's common names and subject alternative names."""

    common_names: tuple[str, ...] = ()
    sans: tuple[str, ...] = ()


def peer_names(context: Context) -> PeerNames:
    auth = context.auth_context() or {}

    def values(key: str) -> tuple[str, ...]:
        return tuple(value.decode(errors="replace") for value in auth.get(key, []))

    return PeerNames(values("x509_common_name"), values("x509_subject_alternative_name"))


def _refuse(context: Context, verdict: Verdict) -> None:
    assert verdict.code is not None
    context.set_code(verdict.code)
    context.set_details(verdict.message)


def audit(caller: str, method: str, result: str, **details: object) -> None:
    """One line per admin call on the `moderator.audit` logger, its facts as fields."""
    fields = {"caller": caller, "method": method, "result": result, **details}
    audit_log.info("admin call %s by %s: %s", method, caller, result, extra={"fields": fields})

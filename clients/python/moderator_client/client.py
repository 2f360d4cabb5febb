"""ModeratorClient (blocking) and AsyncModeratorClient (asyncio): the Moderator service from
Python with grpcio and protobuf alone.

Both open one channel to `target` ("host:port", or "dns:///name:port" for a name that resolves
to several replicas: calls are spread over them round-robin) and keep it: make one client and
reuse it. Calls are retried the gRPC way (a service-config retry policy: exponential backoff
with jitter, within the call's deadline) when the server answers UNAVAILABLE (restarting,
draining) or RESOURCE_EXHAUSTED (its queue is full); other errors raise grpc.RpcError at once.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from moderator_client.results import ImageResult, ModerateResult
from moderator_client.v1 import moderator_pb2 as pb
from moderator_client.v1 import moderator_pb2_grpc as pb_grpc

SERVICE = "moderator.v1.Moderator"
DEFAULT_TIMEOUT = 60.0
DEFAULT_ATTEMPTS = 5  # gRPC's own ceiling
RETRYABLE = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
# gRPC retries only a request it still holds: up to this much of one (above the server's default
# message limit, 81 MiB), and all calls together up to the channel's buffer.
RETRY_BUFFER_BYTES = 96 * 1024 * 1024
DETAILS = {
    "all": pb.DETAIL_ALL_POLICIES,
    "violations": pb.DETAIL_VIOLATIONS,
    "decision": pb.DETAIL_DECISION,
}

ImageLike = bytes | str | os.PathLike[str] | tuple[str, bytes]
Credential = bytes | str | os.PathLike[str]  # PEM bytes, or a file holding them


def service_config(max_attempts: int = DEFAULT_ATTEMPTS) -> str:
    """Round-robin over every address the target resolves to; retries with backoff (none with
    max_attempts 1), throttled when most calls fail so a fleet of clients does not multiply an
    overload."""
    config: dict[str, Any] = {"loadBalancingConfig": [{"round_robin": {}}]}
    if max_attempts > 1:
        retry = {
            "maxAttempts": max_attempts,
            "initialBackoff": "0.2s",
            "maxBackoff": "5s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": list(RETRYABLE),
        }
        config["methodConfig"] = [{"name": [{"service": SERVICE}], "retryPolicy": retry}]
        config["retryThrottling"] = {"maxTokens": 10, "tokenRatio": 0.1}
    return json.dumps(config)


def channel_options(max_attempts: int = DEFAULT_ATTEMPTS) -> list[tuple[str, Any]]:
    if not 1 <= max_attempts <= DEFAULT_ATTEMPTS:
        raise ValueError(f"max_attempts must be 1 (no retries) to {DEFAULT_ATTEMPTS} (gRPC's most)")
    return [
        ("grpc.service_config", service_config(max_attempts)),
        ("grpc.enable_retries", int(max_attempts > 1)),
        ("grpc.per_rpc_retry_buffer_size", RETRY_BUFFER_BYTES),
        ("grpc.retry_buffer_size", 4 * RETRY_BUFFER_BYTES),
        # Dead connections are found by pings, no more often than the server allows (10 s).
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]


def credentials(
    tls_ca: Credential | None, tls_cert: Credential | None, tls_key: Credential | None
) -> grpc.ChannelCredentials | None:
    """TLS credentials when any of the three is given (cert and key go together), else None."""
    if tls_ca is None and tls_cert is None and tls_key is None:
        return None
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("tls_cert and tls_key go together (a client certificate)")
    return grpc.ssl_channel_credentials(
        root_certificates=_pem(tls_ca), private_key=_pem(tls_key), certificate_chain=_pem(tls_cert)
    )


def _pem(value: Credential | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


def bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries `token` (none without one)."""
    if not token:
        return ()
    token = token.strip()
    if not token.isascii() or not token.isprintable():
        raise ValueError("the token is not printable ASCII: was the wrong file given?")
    return (("authorization", f"Bearer {token}"),)


def image_message(image: ImageLike, index: int) -> pb.Image:
    """bytes (id: its position), (id, bytes), or a file path (id: the path as given)."""
    if isinstance(image, tuple):
        image_id, data = image
        return pb.Image(id=image_id, data=data)
    if isinstance(image, bytes | bytearray | memoryview):
        return pb.Image(id=str(index), data=bytes(image))
    return pb.Image(id=os.fspath(image), data=Path(image).read_bytes())


def detail_value(detail: str) -> pb.Detail:
    if detail not in DETAILS:
        raise ValueError(f"detail must be one of {', '.join(DETAILS)}, not {detail!r}")
    return DETAILS[detail]


def image_messages(images: Iterable[ImageLike]) -> list[pb.Image]:
    if isinstance(images, str | bytes | bytearray | memoryview | os.PathLike):
        raise TypeError("images is a list of images: [path] or [data], not one image")
    return [image_message(image, i) for i, image in enumerate(images)]


def moderate_request(
    images: Iterable[ImageLike],
    policy_ids: Sequence[str] = (),
    detail: str = "all",
    include_embeddings: bool = False,
    request_id: str = "",
) -> pb.ModerateRequest:
    return pb.ModerateRequest(
        images=image_messages(images),
        policy_ids=list(policy_ids),
        include_embeddings=include_embeddings,
        request_id=request_id,
        detail=detail_value(detail),
    )


def embeddings_request(
    images: Iterable[ImageResult | pb.EmbeddedImage],
    policy_ids: Sequence[str] = (),
    model: str = "",
    detail: str = "all",
) -> pb.ScoreEmbeddingsRequest:
    """Stored embeddings (results of moderate(..., include_embeddings=True)) to rescore."""
    embedded = [
        image
        if isinstance(image, pb.EmbeddedImage)
        else pb.EmbeddedImage(
            id=image.id,
            embedding=image.embedding,
            views=[pb.Embedding(values=v) for v in image.views],
            sha256=image.sha256,
            pdq=image.pdq,
            pdq_quality=image.pdq_quality,
        )
        for image in images
    ]
    return pb.ScoreEmbeddingsRequest(
        images=embedded, policy_ids=list(policy_ids), model=model, detail=detail_value(detail)
    )


class _Failure:
    """An error met while making a stream's requests: the stream ends cleanly there (gRPC would
    otherwise report it as an unknown error), and it is raised once the answers are read."""

    def __init__(self) -> None:
        self.error: Exception | None = None

    def guard(self, requests: Iterator[pb.ModerateRequest]) -> Iterator[pb.ModerateRequest]:
        try:
            yield from requests
        except Exception as exc:
            self.error = exc

    def raise_it(self) -> None:
        if self.error is not None:
            raise self.error


class _Client:
    """What both clients hold: one channel to `target` (opened with `_grpc`, grpc or grpc.aio),
    its stub, the call metadata and the default deadline."""

    _grpc: Any = grpc

    def __init__(
        self,
        target: str,
        *,
        tls_ca: Credential | None = None,
        tls_cert: Credential | None = None,
        tls_key: Credential | None = None,
        token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_attempts: int = DEFAULT_ATTEMPTS,
    ) -> None:
        tls = credentials(tls_ca, tls_cert, tls_key)
        options = channel_options(max_attempts)
        self._channel = (
            self._grpc.secure_channel(target, tls, options)
            if tls is not None
            else self._grpc.insecure_channel(target, options)
        )
        self._stub = pb_grpc.ModeratorStub(self._channel)
        self._metadata = bearer(token)
        self.timeout = timeout

    def _deadline(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout


class ModeratorClient(_Client):
    """A blocking client; also a context manager (closes its channel)."""

    def moderate(
        self,
        images: Iterable[ImageLike],
        policy_ids: Sequence[str] = (),
        *,
        detail: str = "all",
        include_embeddings: bool = False,
        request_id: str = "",
        timeout: float | None = None,
    ) -> ModerateResult:
        """One request: every image's result, in order (a bad image gets decision "error")."""
        request = moderate_request(images, policy_ids, detail, include_embeddings, request_id)
        response = self._stub.Moderate(
            request, timeout=self._deadline(timeout), metadata=self._metadata
        )
        return ModerateResult.from_proto(response)

    def moderate_stream(
        self,
        batches: Iterable[Iterable[ImageLike]],
        policy_ids: Sequence[str] = (),
        *,
        detail: str = "all",
        include_embeddings: bool = False,
        timeout: float | None = None,
    ) -> Iterator[ModerateResult]:
        """One request per batch on one stream, one result per batch in order; a batch that
        fails alone has its `error` set and the stream goes on. `timeout` covers the whole
        stream (none by default). A batch that cannot be made (a file that cannot be read)
        ends the stream after the batches before it, and its error is raised."""
        detail_value(detail)
        failed = _Failure()
        requests = failed.guard(
            moderate_request(batch, policy_ids, detail, include_embeddings) for batch in batches
        )
        responses = self._stub.ModerateStream(requests, timeout=timeout, metadata=self._metadata)
        try:
            for response in responses:
                yield ModerateResult.from_proto(response)
        except grpc.RpcError:
            failed.raise_it()
            raise
        failed.raise_it()

    def list_policies(self, timeout: float | None = None) -> pb.ListPoliciesResponse:
        response: pb.ListPoliciesResponse = self._stub.ListPolicies(
            pb.ListPoliciesRequest(), timeout=self._deadline(timeout), metadata=self._metadata
        )
        return response

    def reload_policies(self, timeout: float | None = None) -> pb.ReloadPoliciesResponse:
        response: pb.ReloadPoliciesResponse = self._stub.ReloadPolicies(
            pb.ReloadPoliciesRequest(), timeout=self._deadline(timeout), metadata=self._metadata
        )
        return response

    def score_embeddings(
        self,
        images: Iterable[ImageResult | pb.EmbeddedImage],
        policy_ids: Sequence[str] = (),
        *,
        model: str = "",
        detail: str = "all",
        timeout: float | None = None,
    ) -> ModerateResult:
        """What the current policies decide for stored embeddings (no images sent)."""
        request = embeddings_request(images, policy_ids, model, detail)
        response = self._stub.ScoreEmbeddings(
            request, timeout=self._deadline(timeout), metadata=self._metadata
        )
        return ModerateResult.from_proto(response)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ModeratorClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class AsyncModeratorClient(_Client):
    """The asyncio twin of ModeratorClient (grpc.aio); `async with` closes its channel."""

    _grpc = grpc.aio

    async def moderate(
        self,
        images: Iterable[ImageLike],
        policy_ids: Sequence[str] = (),
        *,
        detail: str = "all",
        include_embeddings: bool = False,
        request_id: str = "",
        timeout: float | None = None,
    ) -> ModerateResult:
        request = moderate_request(images, policy_ids, detail, include_embeddings, request_id)
        response = await self._stub.Moderate(
            request, timeout=self._deadline(timeout), metadata=self._metadata
        )
        return ModerateResult.from_proto(response)

    async def moderate_stream(
        self,
        batches: AsyncIterable[Iterable[ImageLike]] | Iterable[Iterable[ImageLike]],
        policy_ids: Sequence[str] = (),
        *,
        detail: str = "all",
        include_embeddings: bool = False,
        timeout: float | None = None,
    ) -> AsyncIterator[ModerateResult]:
        detail_value(detail)
        failed = _Failure()

        async def requests() -> AsyncIterator[pb.ModerateRequest]:
            try:
                if isinstance(batches, AsyncIterable):
                    async for batch in batches:
                        yield moderate_request(batch, policy_ids, detail, include_embeddings)
                else:
                    for batch in batches:
                        yield moderate_request(batch, policy_ids, detail, include_embeddings)
            except Exception as exc:
                failed.error = exc

        call = self._stub.ModerateStream(requests(), timeout=timeout, metadata=self._metadata)
        try:
            async for response in call:
                yield ModerateResult.from_proto(response)
        except (grpc.RpcError, asyncio.CancelledError):
            failed.raise_it()
            raise
        failed.raise_it()

    async def list_policies(self, timeout: float | None = None) -> pb.ListPoliciesResponse:
        response: pb.ListPoliciesResponse = await self._stub.ListPolicies(
            pb.ListPoliciesRequest(), timeout=self._deadline(timeout), metadata=self._metadata
        )
        return response

    async def reload_policies(self, timeout: float | None = None) -> pb.ReloadPoliciesResponse:
        response: pb.ReloadPoliciesResponse = await self._stub.ReloadPolicies(
            pb.ReloadPoliciesRequest(), timeout=self._deadline(timeout), metadata=self._metadata
        )
        return response

    async def score_embeddings(
        self,
        images: Iterable[ImageResult | pb.EmbeddedImage],
        policy_ids: Sequence[str] = (),
        *,
        model: str = "",
        detail: str = "all",
        timeout: float | None = None,
    ) -> ModerateResult:
        request = embeddings_request(images, policy_ids, model, detail)
        response = await self._stub.ScoreEmbeddings(
            request, timeout=self._deadline(timeout), metadata=self._metadata
        )
        return ModerateResult.from_proto(response)

    async def close(self) -> None:
        await self._channel.close(None)

    async def __aenter__(self) -> AsyncModeratorClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

"""OpenTelemetry spans: one per RPC (and per request of a stream), with children for each
image's decode, queue wait, forward pass and scoring.

Off unless --otlp-endpoint is set (or a tracer provider is injected): `Tracing(None)` hands out
no spans, and OpenTelemetry is not even imported. The batch stages run on the model worker's
thread for many requests at once, so their spans are recorded after the fact, with the times
the worker took, under the span of the request that held the image: the worker only queues
the times (about a microsecond an image) and a thread of this module makes the spans (tens of
microseconds an image), so tracing does not slow the forward passes.

Every call is traced unless a sampler is chosen the OpenTelemetry way, e.g.
OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=0.01.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from moderator.errors import ConfigError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger(__name__)

INSTRUMENTATION = "moderator.serving"
SERVICE = "moderator"
NO_SPAN = contextlib.nullcontext()


@dataclass(frozen=True)
class BatchTimes:
    """One forward pass as the model worker saw it, in time.time_ns()."""

    started_ns: int
    encoded_ns: int
    scored_ns: int
    views: int
    images: int


class Tracing:
    def __init__(self, provider: TracerProvider | None) -> None:
        self._provider = provider
        self._tracer = provider.get_tracer(INSTRUMENTATION) if provider is not None else None
        # stage spans to record, made on the recorder thread; None stops it
        self._pending: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._recorder: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def span(self, name: str, **attributes: Any) -> contextlib.AbstractContextManager[Any]:
        """A span, current for the block (so spans started inside are its children); a shared
        no-op context when tracing is off. An exception leaving the block marks it failed."""
        if self._tracer is None:
            return NO_SPAN
        return self._tracer.start_as_current_span(name, attributes=attributes)

    def annotate(self, fields: dict[str, Any], *, failed: bool) -> None:
        """Set `fields` on the current span (a call's outcome); mark it failed."""
        if self._tracer is None:
            return
        from opentelemetry import trace

        span = trace.get_current_span()
        span.set_attributes(fields)
        if failed:
            span.set_status(trace.Status(trace.StatusCode.ERROR, str(fields.get("code", ""))))

    def batch_recorder(self) -> Callable[[BatchTimes], None] | None:
        """For an image about to be queued: a callback for the model worker that records the
        image's queue wait, forward pass and scoring under the current span. None when
        tracing is off or no span is current."""
        if self._tracer is None:
            return None
        from opentelemetry import context, trace

        parent = context.get_current()
        if not trace.get_current_span(parent).get_span_context().is_valid:
            return None
        tracer = self._tracer
        queued_ns = time.time_ns()
        self._start_recorder()

        def record_stages(times: BatchTimes) -> None:
            batch = {"batch.views": times.views, "batch.images": times.images}
            for name, start, end in (
                ("queue_wait", queued_ns, times.started_ns),
                ("forward", times.started_ns, times.encoded_ns),
                ("scoring", times.encoded_ns, times.scored_ns),
            ):
                stage = tracer.start_span(name, parent, attributes=batch, start_time=start)
                stage.end(end_time=max(start, end))

        return lambda times: self._pending.put(lambda: record_stages(times))

    def _start_recorder(self) -> None:
        with self._lock:
            if self._recorder is None:
                self._recorder = threading.Thread(
                    target=self._record, name="moderator-span-recorder", daemon=True
                )
                self._recorder.start()

    def _record(self) -> None:
        while (task := self._pending.get()) is not None:
            try:
                task()
            except Exception:  # a span that cannot be made must not stop the others
                log.exception("recording trace spans failed")

    def shutdown(self, timeout: float) -> None:
        """Send the spans still buffered, then stop; an unreachable collector gets `timeout`
        seconds (the exporter's own retries run on in a daemon thread, not past exit)."""
        if self._provider is None:
            return
        started = time.monotonic()
        if self._recorder is not None:
            self._pending.put(None)
            self._recorder.join(timeout)
        stopping = threading.Thread(target=self._provider.shutdown, daemon=True)
        stopping.start()
        stopping.join(max(0.0, timeout - (time.monotonic() - started)))
        if stopping.is_alive():
            log.warning("tracing: spans still buffered after %.1f s were dropped", timeout)


def otlp_tracing(endpoint: str) -> Tracing:
    """Spans batched and sent to an OTLP/gRPC collector at `endpoint`; Tracing(None) for ""."""
    if not endpoint:
        return Tracing(None)
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise ConfigError(
            f"--otlp-endpoint needs OpenTelemetry: pip install 'moderator[tracing]' ({exc})"
        ) from exc
    provider = TracerProvider(resource=Resource.create({"service.name": SERVICE}))
    exporter = OTLPSpanExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    log.info("tracing: spans go to %s", endpoint)
    return Tracing(provider)

"""What operators read: JSON log lines from a real server process, and trace spans per RPC with
the stages of each image under them."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from moderator_client.v1 import moderator_pb2 as pb
from moderator_client.v1 import moderator_pb2_grpc as pb_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from moderator.config import BatchConfig
from moderator.core.clip import ClipModel
from moderator.serving.tracing import Tracing
from tests.helpers import (
    RunningService,
    demo_config,
    shape_png,
    start_demo_server_process,
    start_service,
    wait_until,
)

RPC = "moderator.v1.Moderator/"
STAGES = ("queue_wait", "forward", "scoring")


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture(scope="module")
def service(
    demo_clip: ClipModel, spans: InMemorySpanExporter, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningService]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    config = demo_config(tmp_path_factory.mktemp("traced"), BatchConfig(max_wait_ms=0))
    yield from start_service(config, lambda _: demo_clip, Tracing(provider))


def children(of: ReadableSpan, among: Sequence[ReadableSpan]) -> list[ReadableSpan]:
    assert of.context is not None
    return [s for s in among if s.parent is not None and s.parent.span_id == of.context.span_id]


def named(name: str, among: Sequence[ReadableSpan]) -> list[ReadableSpan]:
    return [s for s in among if s.name == name]


def test_a_moderate_call_is_one_span_with_each_images_stages_under_it(
    service: RunningService, spans: InMemorySpanExporter
) -> None:
    spans.clear()
    request = pb.ModerateRequest(
        request_id="req-7",
        images=[
            pb.Image(id="good", data=shape_png("red", "circle")),
            pb.Image(id="broken", data=b"\x89PNG not really"),
        ],
    )
    with grpc.insecure_channel(service.address) as channel:
        response = pb_grpc.ModeratorStub(channel).Moderate(request, timeout=60)
    # the stage spans are made on the recorder thread, moments after the answer
    wait_until(lambda: bool(named("scoring", spans.get_finished_spans())))
    finished = spans.get_finished_spans()
    [rpc] = named(RPC + "Moderate", finished)
    assert rpc.attributes is not None
    assert rpc.attributes["images"] == 2
    assert rpc.attributes["request_id"] == "req-7"
    assert rpc.attributes["policy_version"] == response.policy_version
    assert rpc.attributes["code"] == "OK"
    assert rpc.attributes["caller"] == "anonymous"
    under = children(rpc, finished)
    decodes = named("decode", under)
    assert len(decodes) == 2
    assert sorted(d.status.status_code.name for d in decodes) == ["ERROR", "UNSET"]
    for stage in STAGES:  # only the image that decoded reached the model
        [span] = named(stage, under)
        assert span.attributes is not None
        images = span.attributes["batch.images"]
        assert isinstance(images, int)
        assert images >= 1
    [wait] = named("queue_wait", under)
    [forward] = named("forward", under)
    [scoring] = named("scoring", under)
    assert wait.end_time is not None
    assert forward.start_time is not None
    assert wait.end_time == forward.start_time
    assert forward.end_time == scoring.start_time
    assert rpc.start_time is not None
    assert rpc.end_time is not None
    assert rpc.start_time <= wait.start_time  # type: ignore[operator]
    assert scoring.end_time <= rpc.end_time  # type: ignore[operator]


def test_a_refused_call_is_a_failed_span(
    service: RunningService, spans: InMemorySpanExporter
) -> None:
    spans.clear()
    request = pb.ModerateRequest(
        policy_ids=["no-such-policy"], images=[pb.Image(id="x", data=b"1")]
    )
    with grpc.insecure_channel(service.address) as channel, pytest.raises(grpc.RpcError):
        pb_grpc.ModeratorStub(channel).Moderate(request, timeout=60)
    [rpc] = named(RPC + "Moderate", spans.get_finished_spans())
    assert rpc.status.status_code is StatusCode.ERROR
    assert rpc.attributes is not None
    assert rpc.attributes["code"] == "INVALID_ARGUMENT"
    assert "no-such-policy" in str(rpc.attributes["error"])


def test_each_request_of_a_stream_is_a_span_under_the_streams(
    service: RunningService, spans: InMemorySpanExporter
) -> None:
    spans.clear()
    requests = [
        pb.ModerateRequest(request_id=f"r{i}", images=[pb.Image(id="a", data=shape_png("blue", s))])
        for i, s in enumerate(("square", "circle"))
    ]
    with grpc.insecure_channel(service.address) as channel:
        answers = list(pb_grpc.ModeratorStub(channel).ModerateStream(iter(requests), timeout=60))
    assert [a.request_id for a in answers] == ["r0", "r1"]
    wait_until(lambda: len(named("scoring", spans.get_finished_spans())) == 2)
    finished = spans.get_finished_spans()
    [stream] = named(RPC + "ModerateStream", finished)
    per_request = named(RPC + "ModerateStream/request", children(stream, finished))
    assert sorted(str(s.attributes["request_id"]) for s in per_request if s.attributes) == [
        "r0",
        "r1",
    ]
    for span in per_request:
        assert [s.name for s in children(span, finished)].count("forward") == 1


def test_json_logs_are_one_object_per_line_with_the_request_fields() -> None:
    log: list[str] = []
    process, port = start_demo_server_process(
        "--log-format", "json", "--log-requests", "on", log=log
    )
    try:
        request = pb.ModerateRequest(
            request_id="upload-1", images=[pb.Image(id="a", data=shape_png("red", "circle"))]
        )
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.ModeratorStub(channel)
            answer = stub.Moderate(request, timeout=60)
            with pytest.raises(grpc.RpcError):
                stub.Moderate(
                    pb.ModerateRequest(request_id="bad-1", policy_ids=["nope"]), timeout=60
                )
    finally:
        process.terminate()
        assert process.wait(timeout=60) == 0
    wait_until(lambda: any('"stopped"' in line for line in log))
    lines = [json.loads(line) for line in log]
    for line in lines:
        assert {"time", "level", "logger", "message"} <= line.keys()
    requests = [line for line in lines if line["logger"] == "moderator.requests"]
    done, refused = requests
    assert done["method"] == "Moderate"
    assert done["code"] == "OK"
    assert (done["images"], done["request_id"]) == (1, "upload-1")
    assert done["policy_version"] == answer.policy_version
    assert done["caller"] == "anonymous"
    assert done["duration_ms"] > 0
    assert refused["code"] == "INVALID_ARGUMENT"
    assert refused["request_id"] == "bad-1"  # failures are where correlation matters
    assert "nope" in refused["error"]


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OpenTelemetry collector's trace endpoint that keeps what it is sent."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str]] = []  # (service.name, span name)

    def Export(  # noqa: N802 (the gRPC method's name)
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: object
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            service = resource.get("service.name", "")
            for scope in resource_spans.scope_spans:
                self.spans.extend((service, span.name) for span in scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


def test_otlp_endpoint_sends_the_spans_to_a_collector(demo_clip: ClipModel, tmp_path: Path) -> None:
    collector = Collector()
    server = grpc.server(ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        config = demo_config(tmp_path)
        config = replace(config, server=replace(config.server, otlp_endpoint=endpoint))
        for running in start_service(config, lambda _: demo_clip):
            request = pb.ModerateRequest(images=[pb.Image(id="a", data=shape_png("red", "circle"))])
            with grpc.insecure_channel(running.address) as channel:
                pb_grpc.ModeratorStub(channel).Moderate(request, timeout=60)
        # stopping the service flushed its spans
        assert ("moderator", RPC + "Moderate") in collector.spans
        assert {name for _, name in collector.spans} >= {"decode", *STAGES}
    finally:
        server.stop(None)


def test_tracing_is_not_even_imported_when_off() -> None:
    code = (
        "import sys; from moderator.serving.server import Service; "
        "from moderator.config import Config; Service(Config()); "
        "print(any(m.startswith('opentelemetry') for m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"

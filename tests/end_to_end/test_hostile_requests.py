"""Hostile requests over gRPC: bombs and oversized counts refused before parsing, admission in
images, views and bytes, concurrent RPCs and streams bounded, streams that survive a bad
request."""

from __future__ import annotations

import io
import os
import queue
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from moderator_client.v1 import moderator_pb2 as pb
from moderator_client.v1 import moderator_pb2_grpc as pb_grpc
from PIL import Image

from moderator.config import MIB, BatchConfig, ImageConfig, ServerConfig
from moderator.core.clip import ClipModel
from tests.helpers import (
    GatedModel,
    RunningService,
    demo_config,
    own_connection,
    process_rss_bytes,
    shape_png,
    start_service,
    wait_until,
)

MODERATE = "/moderator.v1.Moderator/Moderate"
MODERATE_STREAM = "/moderator.v1.Moderator/ModerateStream"
EMPTY_IMAGE = b"\x0a\x00"  # one empty Image message on the wire
# Far below the gigabytes these requests cost before they were checked on the wire.
FLAT_BYTES = 300 * MIB
IMAGES_PER_REQUEST = 4
STRIP_VIEWS = 4  # a 6:1 strip: the whole image and three 2:1 tiles
STREAM_IDLE_SECONDS = 4.0


def raw_moderate(channel: grpc.Channel) -> grpc.UnaryUnaryMultiCallable:  # type: ignore[type-arg]
    return channel.unary_unary(
        MODERATE, request_serializer=None, response_deserializer=pb.ModerateResponse.FromString
    )


def failure(call: object, *args: object, **kwargs: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)  # type: ignore[operator]
    return info.value


def request(*images: bytes, request_id: str = "", policy_ids: tuple[str, ...] = ()) -> bytes:
    return pb.ModerateRequest(
        images=[pb.Image(id=str(i), data=data) for i, data in enumerate(images)],
        request_id=request_id,
        policy_ids=policy_ids,
    ).SerializeToString()


def noise_png(side: int) -> bytes:
    """A PNG that does not compress: about 3 bytes per pixel."""
    data = random.Random(side).randbytes(side * side * 3)
    out = io.BytesIO()
    Image.frombytes("RGB", (side, side), data).save(out, "PNG", compress_level=0)
    return out.getvalue()


def in_flight(service: RunningService, resource: str) -> float:
    metric = service.service.metrics.admission_in_flight.labels(resource=resource)
    return float(metric._value.get())


@pytest.fixture(scope="module")
def gated(demo_clip: ClipModel) -> GatedModel:
    return GatedModel(demo_clip)


@pytest.fixture(scope="module")
def small(gated: GatedModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    """A service with small limits and a model the tests can hold."""
    config = demo_config(
        tmp_path_factory.mktemp("small"),
        BatchConfig(
            max_wait_ms=0,
            max_queue_images=8,
            max_queue_views=16,
            max_queue_bytes=3 * MIB,
            max_request_views=8,
        ),
        ServerConfig(
            host="127.0.0.1",
            port=0,
            metrics_port=-1,
            max_images_per_request=IMAGES_PER_REQUEST,
            max_message_bytes=2 * MIB,
            max_concurrent_rpcs=4,
            max_streams_per_connection=2,
            stream_idle_seconds=STREAM_IDLE_SECONDS,
            drain_seconds=0,
            shutdown_grace_seconds=5,
        ),
        images=ImageConfig(max_views=8),
    )
    yield from start_service(config, gated.load)


@pytest.fixture
def closed_gate(gated: GatedModel) -> Iterator[GatedModel]:
    gated.entered.clear()
    gated.gate.clear()
    try:
        yield gated
    finally:
        gated.gate.set()


def test_a_gzip_bomb_is_refused_before_it_is_inflated(demo_service: RunningService) -> None:
    bomb = EMPTY_IMAGE * (40 * MIB)  # 80 MiB that gzip to about 80 KB
    before = process_rss_bytes(os.getpid())
    with grpc.insecure_channel(demo_service.address) as channel:
        error = failure(raw_moderate(channel), bomb, timeout=60, compression=grpc.Compression.Gzip)
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "gzip" in str(error.details())
    assert process_rss_bytes(os.getpid()) - before < FLAT_BYTES


def test_millions_of_empty_images_are_refused_without_parsing(
    demo_service: RunningService,
) -> None:
    flood = EMPTY_IMAGE * (40 * MIB)  # forty million images
    before = process_rss_bytes(os.getpid())
    with grpc.insecure_channel(demo_service.address) as channel:
        error = failure(raw_moderate(channel), flood, timeout=60)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "more than 256 images" in str(error.details())
        ok = raw_moderate(channel)(request(shape_png("red", "circle")), timeout=60)
    assert process_rss_bytes(os.getpid()) - before < FLAT_BYTES
    assert ok.results[0].decision == pb.DECISION_BLOCK


def test_a_message_over_the_size_limit_is_refused(small: RunningService) -> None:
    with grpc.insecure_channel(small.address) as channel:
        error = failure(raw_moderate(channel), request(b"x" * (2 * MIB)), timeout=30)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_request_needing_more_model_views_than_allowed_is_refused(
    small: RunningService,
) -> None:
    strip = shape_png("red", "circle", width=480, height=80)
    with grpc.insecure_channel(small.address) as channel:
        call = raw_moderate(channel)
        assert len(call(request(strip), timeout=60).results) == 1
        error = failure(call, request(strip, strip, strip), timeout=60)  # 12 views > 8
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "more than 8 model views" in str(error.details())
    wait_until(lambda: [in_flight(small, r) for r in ("images", "views", "bytes")] == [0, 0, 0])


def test_bytes_in_flight_are_bounded(small: RunningService, closed_gate: GatedModel) -> None:
    big = noise_png(620)  # about 1.1 MiB: two fit in the 3 MiB budget, a third does not
    assert MIB < len(big) < 2 * MIB - 1024
    channels = [own_connection(small.address) for _ in range(3)]
    try:
        raw = request(big)
        held = [raw_moderate(c).future(raw, timeout=60) for c in channels[:2]]
        assert closed_gate.entered.wait(30)
        wait_until(lambda: in_flight(small, "bytes") == 2 * len(raw))
        error = failure(raw_moderate(channels[2]), raw, timeout=30)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "bytes in flight" in str(error.details())
        closed_gate.gate.set()
        assert all(len(f.result().results) == 1 for f in held)
    finally:
        for channel in channels:
            channel.close()


def test_concurrent_rpcs_are_bounded(small: RunningService, closed_gate: GatedModel) -> None:
    red = request(shape_png("red", "circle"))
    # one channel per call: a channel's own calls are bounded by --max-streams-per-connection
    channels = [own_connection(small.address) for _ in range(5)]
    try:
        held = [raw_moderate(c).future(red, timeout=60) for c in channels[:4]]
        wait_until(lambda: in_flight(small, "images") == 4)
        error = failure(raw_moderate(channels[4]), red, timeout=30)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        closed_gate.gate.set()
        assert all(f.result().results[0].decision == pb.DECISION_BLOCK for f in held)
    finally:
        for channel in channels:
            channel.close()


def stream_call(channel: grpc.Channel) -> grpc.StreamStreamMultiCallable:  # type: ignore[type-arg]
    return channel.stream_stream(
        MODERATE_STREAM,
        request_serializer=None,
        response_deserializer=pb.ModerateResponse.FromString,
    )


def test_a_stream_survives_bad_requests_and_answers_every_one_in_order(
    small: RunningService,
) -> None:
    red, blue = shape_png("red", "circle"), shape_png("blue", "square")
    requests = [
        request(red, request_id="good-1"),
        request(red, request_id="unknown-policy", policy_ids=("no-such-policy",)),
        request(*[blue] * (IMAGES_PER_REQUEST + 1), request_id="too-many"),
        b"\x0a\x05ab",  # truncated framing
        request(red, blue, request_id="good-2"),
    ]
    with grpc.insecure_channel(small.address) as channel:
        responses = list(stream_call(channel)(iter(requests), timeout=60))
    assert [r.request_id for r in responses] == [
        "good-1",
        "unknown-policy",
        "too-many",
        "",
        "good-2",
    ]
    codes = [r.error.code for r in responses]
    invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert codes == [0, invalid, invalid, invalid, 0]
    assert "no-such-policy" in responses[1].error.message
    assert "more than 4 images" in responses[2].error.message
    assert "truncated" in responses[3].error.message
    assert [r.decision for r in responses[4].results] == [pb.DECISION_BLOCK, pb.DECISION_ALLOW]
    assert not responses[1].results


def test_a_stream_waits_for_room_instead_of_failing(small: RunningService) -> None:
    # Each request holds 4 of the 8 queue images and the stream runs 4 at once: half wait.
    red = shape_png("red", "circle")
    requests = [request(*[red] * IMAGES_PER_REQUEST, request_id=str(i)) for i in range(8)]
    with grpc.insecure_channel(small.address) as channel:
        responses = list(stream_call(channel)(iter(requests), timeout=120))
    assert [r.request_id for r in responses] == [str(i) for i in range(8)]
    assert all(not r.HasField("error") for r in responses)
    assert all(len(r.results) == IMAGES_PER_REQUEST for r in responses)


def test_streams_per_connection_are_bounded(small: RunningService) -> None:
    inputs: list[queue.Queue[bytes | None]] = [queue.Queue(), queue.Queue()]
    with grpc.insecure_channel(small.address) as channel:
        call = stream_call(channel)
        opened = [call(feed(source), timeout=60) for source in inputs]
        for source, stream in zip(inputs, opened, strict=True):
            source.put(request(shape_png("red", "circle")))
            assert next(iter(stream)).results[0].decision == pb.DECISION_BLOCK  # both streams open
        error = failure(raw_moderate(channel), request(shape_png("red", "circle")), timeout=1.5)
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # queued by the client
        with own_connection(small.address) as other:
            answer = pb_grpc.ModeratorStub(other).ListPolicies(pb.ListPoliciesRequest(), timeout=30)
            assert answer.policies
        for source in inputs:
            source.put(None)
        for stream in opened:
            assert list(stream) == []


def feed(source: queue.Queue[bytes | None]) -> Iterator[bytes]:
    while (item := source.get()) is not None:
        yield item


def test_a_cancelled_stream_leaves_no_work_behind(
    small: RunningService, closed_gate: GatedModel
) -> None:
    source: queue.Queue[bytes | None] = queue.Queue()
    red = request(shape_png("red", "circle"))
    with own_connection(small.address) as channel:
        stream = stream_call(channel)(feed(source), timeout=120)
        for _ in range(10):
            source.put(red)
        assert closed_gate.entered.wait(30)
        wait_until(lambda: in_flight(small, "images") == 4)  # the stream's window
        stream.cancel()  # type: ignore[no-untyped-call]
        source.put(None)
        # every request is gone; only the pixels in the model still hold their view
        # every request is gone and none started after the cancel; only the window's pixels
        # already with the model (one view each) hold their views until they leave it
        wait_until(lambda: in_flight(small, "images") == 0)
        time.sleep(0.5)
        assert in_flight(small, "images") == 0
        assert 1 <= in_flight(small, "views") <= 4
    closed_gate.gate.set()
    wait_until(lambda: [in_flight(small, r) for r in ("images", "views", "bytes")] == [0, 0, 0])


def test_a_cancelled_request_keeps_its_views_until_its_pixels_leave_the_queue(
    small: RunningService, closed_gate: GatedModel
) -> None:
    strip = shape_png("red", "circle", width=480, height=80)
    batcher = small.service.engine._batcher
    assert batcher is not None
    with own_connection(small.address) as channel:
        call = raw_moderate(channel)
        first = call.future(request(strip), timeout=60)
        assert closed_gate.entered.wait(30)  # the model is busy with the first
        for _ in range(5):  # cancel and send again: the pixels stay queued each time
            pending = call.future(request(strip, strip), timeout=60)
            wait_until(lambda: batcher.queued_images() >= 1)
            pending.cancel()  # type: ignore[no-untyped-call]
            # the budget still counts every view waiting for the model
            assert in_flight(small, "views") >= STRIP_VIEWS + batcher._queued_views
        closed_gate.gate.set()
        assert len(first.result().results) == 1
    wait_until(lambda: in_flight(small, "views") == 0)


def test_health_answers_when_every_call_slot_is_taken(small: RunningService) -> None:
    sources: list[queue.Queue[bytes | None]] = [queue.Queue() for _ in range(4)]
    channels = [own_connection(small.address) for _ in range(4)]
    try:
        streams = [
            stream_call(c)(feed(s), timeout=60) for c, s in zip(channels, sources, strict=True)
        ]
        for source, stream in zip(sources, streams, strict=True):
            source.put(request(shape_png("red", "circle")))
            next(iter(stream))  # open and answered: each holds a call slot
        with own_connection(small.address) as other:
            error = failure(raw_moderate(other), request(shape_png("red", "circle")), timeout=30)
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-concurrent-rpcs" in str(error.details())
            check = health_pb2_grpc.HealthStub(other).Check
            status = check(health_pb2.HealthCheckRequest(), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        for source in sources:
            source.put(None)
    finally:
        for channel in channels:
            channel.close()


def test_a_stream_that_sends_nothing_is_closed(small: RunningService) -> None:
    source: queue.Queue[bytes | None] = queue.Queue()
    with own_connection(small.address) as channel:
        stream = stream_call(channel)(feed(source), timeout=60)
        source.put(request(shape_png("red", "circle")))
        assert next(iter(stream)).results
        with pytest.raises(grpc.RpcError) as info:
            next(iter(stream))  # nothing more is sent
        source.put(None)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "--stream-idle-seconds" in str(info.value.details())


def test_long_error_details_are_clipped_not_turned_into_another_status(
    small: RunningService,
) -> None:
    unknown = tuple(f"no-such-policy-{i:04d}-" + "x" * 40 for i in range(300))
    with grpc.insecure_channel(small.address) as channel:
        raw = request(shape_png("red", "circle"), policy_ids=unknown)
        error = failure(raw_moderate(channel), raw, timeout=30)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no-such-policy-0000" in str(error.details())
    assert len(str(error.details())) <= 2000
    # 4-byte characters go out percent-encoded, 12 bytes each: clipped as escapes instead
    emoji = tuple(f"{i:03d}" + "\N{GRINNING FACE}" * 15 for i in range(200))
    with grpc.insecure_channel(small.address) as channel:
        raw = request(shape_png("red", "circle"), policy_ids=emoji)
        error = failure(raw_moderate(channel), raw, timeout=30)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "\\U0001f600" in str(error.details())


def test_fields_the_server_does_not_know_still_count_as_bytes(
    small: RunningService, closed_gate: GatedModel
) -> None:
    image = pb.Image(id="0", data=shape_png("red", "circle")).SerializeToString()
    padded = image + b"\x1a" + encode_varint(MIB) + b"\0" * MIB  # field 3, unknown to Image
    raw = b"\x0a" + encode_varint(len(padded)) + padded
    with own_connection(small.address) as channel:
        pending = raw_moderate(channel).future(raw, timeout=60)
        assert closed_gate.entered.wait(30)
        wait_until(lambda: in_flight(small, "bytes") == len(raw))
        closed_gate.gate.set()
        assert pending.result().results[0].decision == pb.DECISION_BLOCK


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def test_a_client_that_never_reads_its_answers_gives_its_call_slot_back(
    demo_clip: ClipModel, tmp_path: Path
) -> None:
    config = demo_config(
        tmp_path,
        server=ServerConfig(
            host="127.0.0.1",
            port=0,
            metrics_port=-1,
            drain_seconds=0,
            shutdown_grace_seconds=2,
            stream_idle_seconds=1.0,
            max_concurrent_rpcs=1,
        ),
    )
    running = start_service(config, lambda _config: demo_clip)
    service = next(running)
    red = shape_png("red", "circle", 64, 64)
    # big answers (embeddings, long ids) fill HTTP/2 flow control quickly
    big = pb.ModerateRequest(
        images=[pb.Image(id=f"{i:04d}" * 20, data=red) for i in range(16)],
        include_embeddings=True,
    )
    stop_sending = threading.Event()

    def requests() -> Iterator[pb.ModerateRequest]:
        for _ in range(12):
            yield big
        stop_sending.wait(60)  # keeps its side open and sends nothing more

    options = [("grpc.http2.bdp_probe", 0), ("grpc.use_local_subchannel_pool", 1)]
    slow = grpc.insecure_channel(service.address, options=options)
    stream = pb_grpc.ModeratorStub(slow).ModerateStream(requests())  # never read
    try:
        registry = service.service.registry
        answered = {"method": "ModerateStream/request", "code": "OK", "caller": "anonymous"}
        wait_until(
            lambda: (registry.get_sample_value("moderator_requests_total", answered) or 0) > 0
        )
        wait_until(lambda: service.service.servicer._calls == 0)  # the write timed out
        with own_connection(service.address) as other:
            answer = raw_moderate(other)(request(red), timeout=30)
        assert answer.results[0].decision == pb.DECISION_BLOCK
    finally:
        stop_sending.set()
        stream.cancel()
        slow.close()
        for _ in running:
            pass

"""SIGTERM under load: health goes NOT_SERVING at once, requests keep being accepted for
--drain-seconds, then the server stops accepting and finishes everything it accepted."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from moderator_client.v1 import moderator_pb2 as pb
from moderator_client.v1 import moderator_pb2_grpc as pb_grpc

from moderator.config import ServerConfig
from tests.helpers import (
    demo_config,
    own_connection,
    shape_png,
    start_demo_server_process,
    start_service,
)

DRAIN_SECONDS = 2.0
CLIENTS = 4
IMAGES = 8
# Calls that start this close to the end of the drain may meet the closed door.
EDGE_SECONDS = 0.5


@dataclass(frozen=True)
class Call:
    started: float
    code: grpc.StatusCode


def load(address: str, calls: list[Call], stop: threading.Event) -> None:
    request = pb.ModerateRequest(
        images=[pb.Image(id=str(i), data=shape_png("red", "circle")) for i in range(IMAGES)]
    )
    with own_connection(address) as channel:
        stub = pb_grpc.ModeratorStub(channel)
        while not stop.is_set():
            started = time.monotonic()
            try:
                response = stub.Moderate(request, timeout=60)
                assert len(response.results) == IMAGES
                code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                code = exc.code()
                time.sleep(0.05)
            calls.append(Call(started, code))


def health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        return int(check(health_pb2.HealthCheckRequest(), timeout=5).status)


def test_sigterm_under_load_loses_no_accepted_request(tmp_path: Path) -> None:
    process, port = start_demo_server_process(
        "--cache-dir",
        str(tmp_path / "cache"),
        "--drain-seconds",
        str(DRAIN_SECONDS),
        "--shutdown-grace-seconds",
        "30",
    )
    address = f"127.0.0.1:{port}"
    calls: list[Call] = []
    stop = threading.Event()
    clients = [threading.Thread(target=load, args=(address, calls, stop)) for _ in range(CLIENTS)]
    try:
        for client in clients:
            client.start()
        time.sleep(1.5)
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert health(address) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert process.wait(timeout=60) == 0
    finally:
        stop.set()
        for client in clients:
            client.join(60)
        if process.poll() is None:
            process.kill()
    accepted_window = signalled + DRAIN_SECONDS - EDGE_SECONDS
    # A call that reaches the door as gRPC closes it may be CANCELLED by gRPC itself; either
    # way it was never accepted.
    closed = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
    late = {c.code for c in calls if c.started >= accepted_window}
    assert late <= closed | {grpc.StatusCode.OK}, late
    during_drain = [c for c in calls if signalled < c.started < accepted_window]
    assert during_drain, "no request was sent during the drain"
    assert all(c.code == grpc.StatusCode.OK for c in calls if c.started < accepted_window)
    assert any(c.code == grpc.StatusCode.UNAVAILABLE for c in calls)  # the door did close


def test_a_draining_server_ends_open_streams_instead_of_waiting_out_the_grace(
    tmp_path: Path,
) -> None:
    config = demo_config(
        tmp_path,
        server=ServerConfig(
            host="127.0.0.1", port=0, metrics_port=-1, drain_seconds=0, shutdown_grace_seconds=60
        ),
    )
    running = start_service(config)
    service = next(running)
    stopped = threading.Event()
    answers: list[pb.ModerateResponse] = []

    def requests() -> Iterator[pb.ModerateRequest]:  # a client that would go on forever
        while True:
            yield pb.ModerateRequest(images=[pb.Image(id="r", data=shape_png("red", "circle"))])
            while len(answers) < 1:
                time.sleep(0.01)

    with grpc.insecure_channel(service.address) as channel:
        stream = pb_grpc.ModeratorStub(channel).ModerateStream(requests(), timeout=120)
        answers.append(next(stream))
        threading.Thread(target=stop, args=(running, stopped)).start()
        with pytest.raises(grpc.RpcError) as info:
            answers.extend(stream)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in str(info.value.details())
        assert stopped.wait(30)  # well inside the 60 s grace
    assert all(len(a.results) == 1 for a in answers)


def stop(running: Iterator[object], stopped: threading.Event) -> None:
    """Finish start_service's generator: its cleanup stops the service."""
    for _ in running:
        pass
    stopped.set()

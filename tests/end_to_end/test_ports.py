"""The admin port, the metrics endpoint's address and TLS, and connection ageing."""

from __future__ import annotations

import queue
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from moderator_client.v1 import moderator_pb2 as pb
from moderator_client.v1 import moderator_pb2_grpc as pb_grpc

from tests.helpers import (
    RunningService,
    code_of,
    demo_config,
    make_certificates,
    shape_png,
    start_service,
)


@pytest.fixture(scope="module")
def two_ports(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningService, Path]]:
    base = tmp_path_factory.mktemp("ports")
    certs = make_certificates(base / "certs")
    config = demo_config(base / "service")
    server = replace(
        config.server,
        admin_port=0,
        admin_host="127.0.0.1",
        metrics_host="127.0.0.1",
        metrics_tls_cert=certs.server_cert,
        metrics_tls_key=certs.server_key,
        max_connection_age_seconds=1.0,
        max_connection_age_grace_seconds=1.0,
    )
    for running in start_service(replace(config, server=server)):
        yield running, certs.ca


def test_admin_methods_are_served_only_on_the_admin_port(
    two_ports: tuple[RunningService, Path],
) -> None:
    running, _ = two_ports
    admin_address = f"127.0.0.1:{running.service.admin_port}"
    red = pb.ModerateRequest(images=[pb.Image(id="red", data=shape_png("red", "circle"))])
    with (
        grpc.insecure_channel(running.address) as public,
        grpc.insecure_channel(admin_address) as admin,
    ):
        public_stub, admin_stub = pb_grpc.ModeratorStub(public), pb_grpc.ModeratorStub(admin)
        for stub, allowed in ((public_stub, False), (admin_stub, True)):
            expected = grpc.StatusCode.OK if allowed else grpc.StatusCode.UNIMPLEMENTED
            assert code_of(stub.ReloadPolicies, pb.ReloadPoliciesRequest(), timeout=30) == expected
            assert (
                code_of(stub.ScoreEmbeddings, pb.ScoreEmbeddingsRequest(), timeout=30) == expected
            )
        assert code_of(public_stub.Moderate, red, timeout=30) == grpc.StatusCode.OK
        assert code_of(admin_stub.Moderate, red, timeout=30) == grpc.StatusCode.UNIMPLEMENTED


def test_metrics_are_served_over_tls_on_their_own_address(
    two_ports: tuple[RunningService, Path],
) -> None:
    running, ca = two_ports
    url = f"https://127.0.0.1:{running.service.metrics_port}/metrics"
    context = ssl.create_default_context(cafile=str(ca))
    with urllib.request.urlopen(url, context=context, timeout=10) as response:
        assert b"moderator_requests_total" in response.read()
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(url.replace("https", "http"), timeout=10).read()


def test_connections_are_aged_out_and_clients_carry_on(
    two_ports: tuple[RunningService, Path],
) -> None:
    running, _ = two_ports
    sent: queue.Queue[pb.ModerateRequest | None] = queue.Queue()

    def requests() -> Iterator[pb.ModerateRequest]:
        while (item := sent.get()) is not None:
            yield item

    with grpc.insecure_channel(running.address) as channel:
        stub = pb_grpc.ModeratorStub(channel)
        stream = stub.ModerateStream(requests(), timeout=60)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            next(iter(stream))  # nothing sent: ends when the connection's age and grace are up
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 30  # not the 60 s deadline
        sent.put(None)
        for _ in range(3):  # unary calls go on over new connections
            assert stub.ListPolicies(pb.ListPoliciesRequest(), timeout=30).policies
            time.sleep(1.0)

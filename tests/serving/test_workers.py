"""The supervisor's parts: each worker's configuration, the held ports, the merged metrics."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.openmetrics import parser as openmetrics_parser
from prometheus_client.parser import text_string_to_metric_families

from moderator.config import Config, DecodeConfig, ModelConfig, ServerConfig
from moderator.errors import ConfigError
from moderator.serving.metrics import SupervisorMetrics, WorkersCollector
from moderator.serving.metrics_endpoint import start_metrics_endpoint
from moderator.serving.ports import hold_port
from moderator.serving.workers import worker_config


def config_with(workers: int, **server: Any) -> Config:
    return Config(server=ServerConfig(workers=workers, **server))


def test_each_worker_gets_its_share_of_the_cpus_where_threads_were_left_to_the_cpus() -> None:
    config = worker_config(config_with(4), cpus=16)
    assert (config.model.threads, config.decode.workers) == (4, 4)
    assert config.server.workers == 1
    assert config.server.reuse_port
    odd = worker_config(config_with(3), cpus=2)
    assert (odd.model.threads, odd.decode.workers) == (1, 1)


def test_threads_set_by_hand_are_kept() -> None:
    config = replace_parts(config_with(2), threads=6, decode_workers=3)
    shared = worker_config(config, cpus=16)
    assert (shared.model.threads, shared.decode.workers) == (6, 3)


def replace_parts(config: Config, *, threads: int, decode_workers: int) -> Config:
    return Config(
        server=config.server,
        model=ModelConfig(threads=threads),
        decode=DecodeConfig(workers=decode_workers),
    )


def test_worker_metrics_are_plain_http_on_localhost_and_off_when_metrics_are_off(
    tmp_path: Path,
) -> None:
    tls = {"metrics_tls_cert": tmp_path / "c.pem", "metrics_tls_key": tmp_path / "k.pem"}
    served = worker_config(config_with(2, metrics_host="0.0.0.0", **tls), cpus=2).server
    assert (served.metrics_host, served.metrics_port) == ("127.0.0.1", 0)
    assert served.metrics_tls_cert is None
    assert served.metrics_tls_key is None
    off = worker_config(config_with(2, metrics_port=-1), cpus=2).server
    assert off.metrics_port == -1


def test_workers_must_be_between_1_and_64() -> None:
    for bad in (0, 65):
        with pytest.raises(ConfigError, match="--workers"):
            ServerConfig(workers=bad)


@pytest.fixture
def held() -> Iterator[list[socket.socket]]:
    sockets = hold_port("127.0.0.1", 0)
    yield sockets
    for sock in sockets:
        sock.close()


def test_a_held_port_can_be_shared_by_workers_and_by_nobody_else(
    held: list[socket.socket],
) -> None:
    port = held[0].getsockname()[1]
    worker = grpc.server(None, options=[("grpc.so_reuseport", 1)])  # type: ignore[arg-type]
    assert worker.add_insecure_port(f"127.0.0.1:{port}") == port
    stranger = grpc.server(None, options=[("grpc.so_reuseport", 0)])  # type: ignore[arg-type]
    with pytest.raises(RuntimeError):
        stranger.add_insecure_port(f"127.0.0.1:{port}")
    worker.stop(None)
    with pytest.raises(ConfigError, match="cannot listen"):  # a second supervisor
        hold_port("127.0.0.1", port)


def test_every_address_of_the_host_is_held() -> None:
    addresses = {info[4][0] for info in socket.getaddrinfo("localhost", 0, type=socket.SOCK_STREAM)}
    sockets = hold_port("localhost", 0)
    try:
        assert {sock.getsockname()[0] for sock in sockets} == addresses
        assert len({sock.getsockname()[1] for sock in sockets}) == 1  # one port for all
    finally:
        for sock in sockets:
            sock.close()


def test_a_port_in_use_stops_the_start_with_its_address() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
            hold_port("127.0.0.1", port)


class FakeWorker:
    """A worker's metrics endpoint with a counter and a histogram."""

    def __init__(self, images: int) -> None:
        self.registry = CollectorRegistry()
        Counter("moderator_images", "Images.", ["decision"], registry=self.registry).labels(
            decision="allow"
        ).inc(images)
        Histogram("moderator_decode_seconds", "Decode.", registry=self.registry).observe(0.01)
        server = start_metrics_endpoint(
            self.registry, ServerConfig(metrics_port=0, host="127.0.0.1")
        )
        assert server is not None
        self.server = server
        self.port = int(self.server.server_port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_workers_metrics_are_merged_with_a_worker_label() -> None:
    workers = [FakeWorker(3), FakeWorker(5)]
    try:
        registry = CollectorRegistry()
        SupervisorMetrics(registry)
        endpoints = [("0", workers[0].port), ("1", workers[1].port)]
        registry.register(WorkersCollector(lambda: endpoints))
        families = {
            f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())
        }
    finally:
        for worker in workers:
            worker.close()
    images = {
        s.labels["worker"]: s.value
        for s in families["moderator_images"].samples
        if s.name.endswith("_total")
    }
    assert images == {"0": 3.0, "1": 5.0}
    buckets = [
        s for s in families["moderator_decode_seconds"].samples if s.name.endswith("_bucket")
    ]
    assert {s.labels["worker"] for s in buckets} == {"0", "1"}
    assert families["moderator_decode_seconds"].type == "histogram"


def test_a_worker_that_does_not_answer_is_counted_and_the_others_still_reported() -> None:
    alive = FakeWorker(2)
    with socket.socket() as gone:
        gone.bind(("127.0.0.1", 0))  # bound, never listening: connection refused
        endpoints = [("0", alive.port), ("1", gone.getsockname()[1])]
        registry = CollectorRegistry()
        SupervisorMetrics(registry)
        registry.register(WorkersCollector(lambda: endpoints))
        try:
            text = generate_latest(registry).decode()
        finally:
            alive.close()
    assert 'moderator_images_total{decision="allow",worker="0"} 2.0' in text
    assert 'worker="1"' not in text
    assert "moderator_worker_scrape_failures_total 1.0" in text


def test_a_stuck_worker_costs_its_own_series_not_the_scrape() -> None:
    alive = FakeWorker(4)
    with socket.socket() as stuck:
        stuck.bind(("127.0.0.1", 0))
        stuck.listen()  # connections queue, nothing ever answers
        endpoints = [("0", alive.port), ("1", stuck.getsockname()[1])]
        registry = CollectorRegistry()
        registry.register(WorkersCollector(lambda: endpoints, timeout=0.5))
        started = time.monotonic()
        try:
            text = generate_latest(registry).decode()
        finally:
            alive.close()
    assert time.monotonic() - started < 2
    assert 'moderator_images_total{decision="allow",worker="0"} 4.0' in text
    assert "moderator_worker_scrape_failures_total 1.0" in text


def test_the_merged_metrics_are_valid_openmetrics() -> None:
    workers = [FakeWorker(1), FakeWorker(2)]
    try:
        registry = CollectorRegistry()
        endpoints = [(str(i), w.port) for i, w in enumerate(workers)]
        registry.register(WorkersCollector(lambda: endpoints))
        text = openmetrics.generate_latest(registry).decode()  # type: ignore[no-untyped-call]
    finally:
        for worker in workers:
            worker.close()
    parse = openmetrics_parser.text_string_to_metric_families
    names = {family.name for family in parse(text)}  # type: ignore[no-untyped-call]
    assert "moderator_images" in names
    assert not any(name.endswith("_created") for name in names)

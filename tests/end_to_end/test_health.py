"""Health tells the truth over gRPC: a model that fails or hangs takes the service out of
rotation, and it comes back once the model works again."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from moderator_client.v1 import moderator_pb2 as pb
from moderator_client.v1 import moderator_pb2_grpc as pb_grpc

from moderator.config import BatchConfig
from moderator.core.clip import ClipModel
from tests.helpers import (
    GatedModel,
    RunningService,
    demo_config,
    shape_png,
    start_service,
    wait_until,
)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def gated(demo_clip: ClipModel) -> GatedModel:
    return GatedModel(demo_clip)


@pytest.fixture(scope="module")
def service(
    gated: GatedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningService]:
    config = demo_config(
        tmp_path_factory.mktemp("health"),
        BatchConfig(max_wait_ms=0, max_failed_batches=2, stuck_batch_seconds=0.5),
    )
    yield from start_service(config, gated.load)


def status(channel: grpc.Channel) -> int:
    request = health_pb2.HealthCheckRequest(service="moderator.v1.Moderator")
    return int(health_pb2_grpc.HealthStub(channel).Check(request, timeout=10).status)


def problem(service: RunningService, reason: str) -> float:
    return float(service.service.metrics.health_problem.labels(reason=reason)._value.get())


def red_request() -> pb.ModerateRequest:
    return pb.ModerateRequest(images=[pb.Image(id="red", data=shape_png("red", "circle"))])


def test_failing_batches_take_health_down_and_a_working_model_brings_it_back(
    service: RunningService, gated: GatedModel
) -> None:
    with grpc.insecure_channel(service.address) as channel:
        stub = pb_grpc.ModeratorStub(channel)
        assert status(channel) == SERVING
        gated.failing = True
        try:
            for _ in range(2):
                with pytest.raises(grpc.RpcError) as info:
                    stub.Moderate(red_request(), timeout=30)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # retry elsewhere
                assert "the model failed" in str(info.value.details())
            wait_until(lambda: status(channel) == NOT_SERVING)
            assert problem(service, "failed_batches") == 1
        finally:
            gated.failing = False
        wait_until(lambda: status(channel) == SERVING)  # a probe found the model working
        assert problem(service, "failed_batches") == 0
        assert stub.Moderate(red_request(), timeout=30).results[0].decision == pb.DECISION_BLOCK


def test_a_stuck_forward_pass_takes_health_down_until_it_finishes(
    service: RunningService, gated: GatedModel
) -> None:
    with grpc.insecure_channel(service.address) as channel:
        stub = pb_grpc.ModeratorStub(channel)
        gated.gate.clear()
        try:
            pending = stub.Moderate.future(red_request(), timeout=60)
            wait_until(lambda: status(channel) == NOT_SERVING)
            assert problem(service, "stuck_batch") == 1
        finally:
            gated.gate.set()
        assert pending.result().results[0].decision == pb.DECISION_BLOCK
        wait_until(lambda: status(channel) == SERVING)
        assert problem(service, "stuck_batch") == 0


def test_a_model_failure_fails_one_stream_request_and_the_stream_goes_on(
    service: RunningService, gated: GatedModel
) -> None:
    sent: list[pb.ModerateRequest] = []

    def requests() -> Iterator[pb.ModerateRequest]:
        for request_id in ("before", "broken", "after"):
            gated.failing = request_id == "broken"
            request = red_request()
            request.request_id = request_id
            sent.append(request)
            yield request
            wait_until(lambda: len(answers) == len(sent))

    answers: list[pb.ModerateResponse] = []
    with grpc.insecure_channel(service.address) as channel:
        try:
            for answer in pb_grpc.ModeratorStub(channel).ModerateStream(requests(), timeout=60):
                answers.append(answer)
        finally:
            gated.failing = False
    assert [a.request_id for a in answers] == ["before", "broken", "after"]
    assert answers[1].error.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert [len(a.results) for a in answers] == [1, 0, 1]

"""End to end: the real server on a free port, the demo model, called over gRPC."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from moderator_client.v1 import moderator_pb2 as pb
from moderator_client.v1 import moderator_pb2_grpc as pb_grpc
from PIL import Image
from prometheus_client import CollectorRegistry

from moderator.config import ModelConfig
from moderator.core.clip import ClipModel
from moderator.serving.server import Service
from tests.helpers import RunningService, demo_config, encode, shape_png

MIB = 1024 * 1024
# The service runs bf16 where the CPU has it: rounding then depends a little on which images
# share a batch (measured up to 3e-4 on the demo model); in fp32 the difference is ~1e-6.
BATCH_SCORE_TOLERANCE = 2e-3


@pytest.fixture(scope="module")
def channel(demo_service: RunningService) -> Iterator[grpc.Channel]:
    options = [("grpc.max_send_message_length", 128 * MIB)]
    with grpc.insecure_channel(demo_service.address, options=options) as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.ModeratorStub:
    return pb_grpc.ModeratorStub(channel)


def moderate_one(stub: pb_grpc.ModeratorStub, data: bytes, **kwargs: object) -> pb.ImageResult:
    request = pb.ModerateRequest(images=[pb.Image(id="img", data=data)], **kwargs)  # type: ignore[arg-type]
    response = stub.Moderate(request, timeout=60)
    assert len(response.results) == 1
    result: pb.ImageResult = response.results[0]
    return result


def violated(result: pb.ImageResult) -> set[str]:
    return {p.policy_id for p in result.policies if p.violated}


def scrape(service: RunningService) -> str:
    url = f"http://127.0.0.1:{service.service.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


@pytest.mark.parametrize(
    ("colour", "shape", "decision", "policies"),
    [
        ("red", "circle", pb.DECISION_BLOCK, {"red"}),
        ("blue", "square", pb.DECISION_ALLOW, set()),
        ("yellow", "star", pb.DECISION_REVIEW, {"stars"}),
        ("red", "star", pb.DECISION_BLOCK, {"red", "stars"}),  # BLOCK beats REVIEW
        ("green", "square", pb.DECISION_ALLOW, {"green_squares"}),  # shadow never decides
    ],
)
def test_demo_policies_decide(
    stub: pb_grpc.ModeratorStub, colour: str, shape: str, decision: int, policies: set[str]
) -> None:
    result = moderate_one(stub, shape_png(colour, shape))
    assert result.decision == decision
    assert violated(result) == policies


def test_policy_results_explain_the_decision(stub: pb_grpc.ModeratorStub) -> None:
    result = moderate_one(stub, shape_png("red", "star"))
    by_id = {p.policy_id: p for p in result.policies}
    assert set(by_id) == {"red", "stars", "green_squares"}
    red = by_id["red"]
    assert red.score >= red.threshold
    assert red.action == pb.ACTION_BLOCK
    assert red.mode == pb.POLICY_MODE_ENFORCE
    assert red.matched_description == "a red star"
    assert by_id["green_squares"].mode == pb.POLICY_MODE_SHADOW
    assert not by_id["green_squares"].violated
    assert len(red.policy_version) == 12


def test_a_corrupt_image_fails_alone(stub: pb_grpc.ModeratorStub) -> None:
    images = [
        pb.Image(id="good-1", data=shape_png("red", "circle")),
        pb.Image(id="corrupt", data=shape_png("red", "circle")[:-200]),
        pb.Image(id="empty", data=b""),
        pb.Image(id="good-2", data=shape_png("blue", "square")),
    ]
    response = stub.Moderate(pb.ModerateRequest(images=images), timeout=60)
    assert [r.id for r in response.results] == ["good-1", "corrupt", "empty", "good-2"]
    decisions = [r.decision for r in response.results]
    assert decisions == [pb.DECISION_BLOCK, pb.DECISION_ERROR, pb.DECISION_ERROR, pb.DECISION_ALLOW]
    assert response.results[1].error.code == pb.IMAGE_ERROR_CODE_CORRUPT
    assert response.results[2].error.code == pb.IMAGE_ERROR_CODE_EMPTY
    assert response.results[1].error.message


def test_responses_name_model_and_policy_version(
    stub: pb_grpc.ModeratorStub, demo_service: RunningService
) -> None:
    response = stub.Moderate(pb.ModerateRequest(images=[]), timeout=60)
    listed = stub.ListPolicies(pb.ListPoliciesRequest(), timeout=60)
    assert response.policy_version == listed.policy_version
    assert response.policy_version == demo_service.service.engine.policies.version
    assert response.model == "moderator-shapes-demo/moderator-shapes-demo.pt"


def test_list_policies(stub: pb_grpc.ModeratorStub) -> None:
    listed = stub.ListPolicies(pb.ListPoliciesRequest(), timeout=60)
    by_id = {p.id: p for p in listed.policies}
    assert set(by_id) == {"red", "stars", "green_squares"}
    assert by_id["red"].action == pb.ACTION_BLOCK
    assert by_id["stars"].action == pb.ACTION_REVIEW
    assert by_id["green_squares"].mode == pb.POLICY_MODE_SHADOW
    assert by_id["red"].description_count == 4
    assert listed.last_reload.ok
    assert listed.last_reload.unix_time > 0


def test_unknown_policy_is_invalid_argument(stub: pb_grpc.ModeratorStub) -> None:
    request = pb.ModerateRequest(images=[pb.Image(id="a", data=b"x")], policy_ids=["nope"])
    with pytest.raises(grpc.RpcError) as info:
        stub.Moderate(request, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "nope" in str(info.value.details())


def test_detail_chooses_which_policy_results_come_back(stub: pb_grpc.ModeratorStub) -> None:
    red_star = shape_png("red", "star")
    full = moderate_one(stub, red_star)
    assert len(full.policies) == 3  # every demo policy, the shadow one included
    assert moderate_one(stub, red_star, detail=pb.DETAIL_ALL_POLICIES) == full
    violations = moderate_one(stub, red_star, detail=pb.DETAIL_VIOLATIONS)
    assert list(violations.policies) == [p for p in full.policies if p.violated]
    assert violated(violations) == {"red", "stars"}
    decision = moderate_one(stub, red_star, detail=pb.DETAIL_DECISION)
    assert (decision.decision, len(decision.policies)) == (full.decision, 0)
    broken = moderate_one(stub, b"not an image", detail=pb.DETAIL_DECISION)
    assert broken.error.code == pb.IMAGE_ERROR_CODE_UNSUPPORTED_FORMAT  # never left out


def test_an_unknown_detail_is_refused_before_any_work(stub: pb_grpc.ModeratorStub) -> None:
    request = pb.ModerateRequest(images=[pb.Image(id="a", data=shape_png("red", "star"))])
    request.detail = 42  # type: ignore[assignment]  # what a newer client could send
    with pytest.raises(grpc.RpcError) as info:
        stub.Moderate(request, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "detail 42" in str(info.value.details())


def test_an_unknown_detail_is_refused_even_when_the_server_is_full(
    demo_service: RunningService, stub: pb_grpc.ModeratorStub
) -> None:
    """Refused on its framing, before admission: INVALID_ARGUMENT, not RESOURCE_EXHAUSTED."""
    work = demo_service.service.engine.budgets.work
    full = {"images": work.limits["images"]}

    async def on_the_loop(change: Callable[[dict[str, int]], None]) -> None:
        change(full)

    demo_service.call(on_the_loop(work.add))  # every image slot taken
    try:
        request = pb.ModerateRequest(images=[pb.Image(id="a", data=shape_png("red", "star"))])
        request.detail = 42  # type: ignore[assignment]
        with pytest.raises(grpc.RpcError) as info:
            stub.Moderate(request, timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        demo_service.call(on_the_loop(work.release))


def test_embeddings_on_request(stub: pb_grpc.ModeratorStub) -> None:
    result = moderate_one(stub, shape_png("red", "circle"), include_embeddings=True)
    vector = np.array(result.embedding)
    assert vector.shape == (64,)
    assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-4


def test_sixty_four_one_megabyte_images_fit_in_one_request(stub: pb_grpc.ModeratorStub) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (600, 600, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise))
    assert len(data) > MIB
    request = pb.ModerateRequest(images=[pb.Image(id=str(i), data=data) for i in range(64)])
    assert request.ByteSize() > 64 * MIB
    response = stub.Moderate(request, timeout=120)
    assert len(response.results) == 64
    assert all(r.decision != pb.DECISION_ERROR for r in response.results)


def test_stream_answers_each_request_in_order(stub: pb_grpc.ModeratorStub) -> None:
    shapes = [("red", "circle"), ("blue", "square"), ("yellow", "star")] * 3
    requests = [
        pb.ModerateRequest(images=[pb.Image(id=f"{i}", data=shape_png(c, s))])
        for i, (c, s) in enumerate(shapes)
    ]
    responses = list(stub.ModerateStream(iter(requests), timeout=60))
    assert [r.results[0].id for r in responses] == [str(i) for i in range(len(shapes))]
    expected = [pb.DECISION_BLOCK, pb.DECISION_ALLOW, pb.DECISION_REVIEW] * 3
    assert [r.results[0].decision for r in responses] == expected


def test_concurrent_clients_get_the_same_results_as_one_by_one(stub: pb_grpc.ModeratorStub) -> None:
    shapes = [(c, s) for c in ("red", "blue", "purple") for s in ("circle", "square", "star")]
    images = [shape_png(c, s) for c, s in shapes]
    alone = [moderate_one(stub, data) for data in images]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda data: moderate_one(stub, data), images * 2))
    for single, concurrent in zip(alone * 2, together, strict=True):
        assert concurrent.decision == single.decision
        for a, b in zip(single.policies, concurrent.policies, strict=True):
            assert b.score == pytest.approx(a.score, abs=BATCH_SCORE_TOLERANCE)


def test_health_and_reflection(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "moderator.v1.Moderator"):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    answer = next(iter(reflection.ServerReflectionInfo(iter([request]), timeout=10)))
    names = {s.name for s in answer.list_services_response.service}
    assert {"moderator.v1.Moderator", "grpc.health.v1.Health"} <= names


def test_metrics_are_exposed_and_move(
    stub: pb_grpc.ModeratorStub, demo_service: RunningService
) -> None:
    before = scrape(demo_service)
    moderate_one(stub, shape_png("red", "circle"))
    moderate_one(stub, b"garbage")
    after = scrape(demo_service)
    for name, increase in [
        ('moderator_images_total{decision="block"}', 1),
        ('moderator_images_total{decision="error"}', 1),
        ('moderator_image_errors_total{code="unsupported_format"}', 1),
        ('moderator_policy_violations_total{mode="enforce",policy="red"}', 1),
        ('moderator_requests_total{caller="anonymous",code="OK",method="Moderate"}', 2),
        ('moderator_request_duration_seconds_count{method="Moderate"}', 2),
        ("moderator_batch_images_count", 1),
        ("moderator_inference_duration_seconds_count", 1),
        ("moderator_queue_wait_seconds_count", 1),
    ]:
        assert sample(after, name) >= sample(before, name) + increase, name
    assert sample(after, 'moderator_policies_loaded{mode="enforce"}') == 2
    assert sample(after, 'moderator_policies_loaded{mode="shadow"}') == 1
    assert 'moderator_model_info{device="cpu",model="moderator-shapes-demo"' in after


def test_health_is_not_serving_until_the_model_is_loaded(
    demo_clip: ClipModel, tmp_path: Path
) -> None:
    release = threading.Event()

    def slow_load(_: ModelConfig) -> ClipModel:
        assert release.wait(60)
        return demo_clip

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    service = Service(demo_config(tmp_path), CollectorRegistry(), load_model=slow_load)
    started = asyncio.run_coroutine_threadsafe(service.start(), loop)
    try:
        status = wait_for_port_then(lambda: service.port, lambda: health_status(service.port))
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        release.set()
        started.result(60)
        assert health_status(service.port) == health_pb2.HealthCheckResponse.SERVING
    finally:
        release.set()
        asyncio.run_coroutine_threadsafe(service.stop(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def health_status(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        request = health_pb2.HealthCheckRequest(service="moderator.v1.Moderator")
        stub = health_pb2_grpc.HealthStub(channel)
        return int(stub.Check(request, timeout=10, wait_for_ready=True).status)


def wait_for_port_then(port: Callable[[], int], then: Callable[[], int]) -> int:
    deadline = time.monotonic() + 60
    while not port():
        assert time.monotonic() < deadline, "server never bound its port"
        time.sleep(0.01)
    return then()

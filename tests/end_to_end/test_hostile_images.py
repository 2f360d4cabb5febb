"""Hostile images against a real server over gRPC: each gets its own result within the decode
budget, hidden content is caught, ordinary traffic keeps flowing, and memory comes back."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from moderator_client.v1 import moderator_pb2 as pb
from moderator_client.v1 import moderator_pb2_grpc as pb_grpc
from PIL import Image

from moderator.config import DecodeConfig
from moderator.demo.hostile import (
    HOSTILE_SAMPLES,
    gif_of_tiny_frames,
    hidden_under_alpha,
    long_strip,
    many_frame_gif,
    mutate,
)
from moderator.demo.shapes import render_shape
from tests.helpers import (
    RunningService,
    demo_config,
    encode,
    process_rss_bytes,
    shape_png,
    start_service,
)

TIMEOUT_MS = 400
# Passes every check made before decoding (13 frames x 36 MP is under 500 M frame pixels) yet
# costs Pillow about a second to compose: only the time budget stops it.
SLOW_GIF = gif_of_tiny_frames(frames=13, canvas=6000)
TOO_COMPLEX = pb.IMAGE_ERROR_CODE_TOO_COMPLEX


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    config = demo_config(
        tmp_path_factory.mktemp("hostile"),
        decode=DecodeConfig(workers=2, timeout_ms=TIMEOUT_MS, memory_mb=1024),
    )
    yield from start_service(config)


@pytest.fixture(scope="module")
def stub(service: RunningService) -> Iterator[pb_grpc.ModeratorStub]:
    options = [("grpc.max_send_message_length", 64 * 1024 * 1024)]
    with grpc.insecure_channel(service.address, options=options) as channel:
        yield pb_grpc.ModeratorStub(channel)


def moderate(stub: pb_grpc.ModeratorStub, images: dict[str, bytes]) -> list[pb.ImageResult]:
    request = pb.ModerateRequest(images=[pb.Image(id=k, data=v) for k, v in images.items()])
    return list(stub.Moderate(request, timeout=60).results)


def red_star(side: int = 160) -> Image.Image:
    return render_shape("red", "star", side, side)


def workers_rss(service: RunningService) -> int:
    return sum(process_rss_bytes(pid) for pid in service.service.engine.decode_worker_pids)


class OrdinaryTraffic:
    """A caller sending ordinary images back to back, recording every outcome."""

    def __init__(self, stub: pb_grpc.ModeratorStub) -> None:
        self.stub = stub
        self.outcomes: list[tuple[int, float]] = []  # (decision of the red circle, seconds)
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> OrdinaryTraffic:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def _run(self) -> None:
        images = {"red": shape_png("red", "circle"), "blue": shape_png("blue", "square")}
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                results = moderate(self.stub, images)
                self.outcomes.append((results[0].decision, time.monotonic() - started))
            except grpc.RpcError as exc:
                self.failures.append(str(exc.code()))


def test_every_hostile_image_gets_its_own_result_while_ordinary_requests_succeed(
    service: RunningService, stub: pb_grpc.ModeratorStub
) -> None:
    moderate(stub, {"warm": shape_png("green", "circle")})
    rss_before = workers_rss(service)
    samples = {name: make() for name, make in HOSTILE_SAMPLES.items()}
    samples["slow_gif"] = SLOW_GIF
    with OrdinaryTraffic(stub) as ordinary:
        for name, data in samples.items():
            (result,) = moderate(stub, {name: data})
            assert result.id == name
            assert result.decision in (
                pb.DECISION_ALLOW,
                pb.DECISION_REVIEW,
                pb.DECISION_BLOCK,
                pb.DECISION_ERROR,
            )
            if result.decision == pb.DECISION_ERROR:
                assert result.error.code != pb.IMAGE_ERROR_CODE_UNSPECIFIED
        (slow,) = moderate(stub, {"slow": SLOW_GIF})
        time.sleep(0.3)
    assert slow.error.code == TOO_COMPLEX
    assert f"{TIMEOUT_MS} ms budget" in slow.error.message
    assert ordinary.failures == []
    assert len(ordinary.outcomes) >= 3
    assert all(decision == pb.DECISION_BLOCK for decision, _ in ordinary.outcomes)
    restarts = service.service.registry.get_sample_value(
        "moderator_decode_worker_restarts_total", {"reason": "timeout"}
    )
    assert restarts is not None
    assert restarts >= 2
    assert len(service.service.engine.decode_worker_pids) == 2
    assert workers_rss(service) < rss_before + 150 * 1024 * 1024  # bombs' memory came back


def test_each_decode_cost_attack_is_refused_as_too_complex(stub: pb_grpc.ModeratorStub) -> None:
    names = ("gif_of_tiny_frames", "progressive_jpeg_with_scans", "tiff_with_pages")
    results = moderate(stub, {name: HOSTILE_SAMPLES[name]() for name in names})
    assert [r.error.code for r in results] == [TOO_COMPLEX] * 3


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("hidden under alpha", hidden_under_alpha(red_star())),
        ("far end of a long strip", long_strip(1600, 100, red_star(100))),
        ("one long frame of 100", many_frame_gif(100, 64, 57, red_star(64))),
    ],
)
def test_content_hidden_where_the_old_pipeline_did_not_look_is_caught(
    stub: pb_grpc.ModeratorStub, name: str, data: bytes
) -> None:
    (result,) = moderate(stub, {name: data})
    assert result.decision == pb.DECISION_BLOCK, name
    assert "red" in {p.policy_id for p in result.policies if p.violated}


def test_fuzzed_images_each_get_a_result(stub: pb_grpc.ModeratorStub) -> None:
    """A few thousand mutations of valid files in five formats, seeded: every input gets a
    per-image result; no request fails, nothing crashes or hangs."""
    rng = random.Random(20261123)
    content = render_shape("red", "triangle", 48, 48)
    seeds = [
        encode(content, "JPEG", quality=80),
        encode(content, "JPEG", progressive=True),
        encode(content.convert("RGBA"), "PNG"),
        encode(content, "GIF", save_all=True, append_images=[content.rotate(90)], duration=50),
        encode(content, "WEBP", save_all=True, append_images=[content.rotate(90)], duration=50),
        encode(content, "TIFF", compression="tiff_lzw"),
    ]
    cases = [mutate(rng.choice(seeds), rng) for _ in range(3000)]
    outcomes: dict[str, int] = {}
    for start in range(0, len(cases), 100):
        batch = {f"case-{start + i}": data for i, data in enumerate(cases[start : start + 100])}
        results = moderate(stub, batch)
        assert [r.id for r in results] == list(batch)
        for result in results:
            key = pb.ImageErrorCode.Name(result.error.code) if result.error.code else "decided"
            outcomes[key] = outcomes.get(key, 0) + 1
    assert sum(outcomes.values()) == len(cases)
    assert outcomes.get("decided", 0) > 100  # the mutations left many images readable
    assert outcomes.get("IMAGE_ERROR_CODE_CORRUPT", 0) > 100  # and broke many others

"""The client package (clients/python): what it imports, how it retries, and its calls against
the real demo server."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from moderator_client import AsyncModeratorClient, ImageResult, ModeratorClient
from moderator_client.v1 import moderator_pb2 as pb

from moderator.config import REPO_ROOT
from tests.helpers import Flaky, RunningService, shape_png

CLIENT = REPO_ROOT / "clients" / "python"


def test_the_client_imports_neither_torch_nor_pillow_nor_the_server() -> None:
    probe = (
        "import sys, moderator_client, moderator_client.client, moderator_client.results\n"
        "heavy = [m for m in ('torch', 'PIL', 'numpy', 'moderator') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], check=False, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def test_the_client_distribution_depends_on_grpcio_and_protobuf_only() -> None:
    project = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]
    assert project["name"] == "moderator-client"
    names = {d.split(">")[0].split("=")[0].split("<")[0].strip() for d in project["dependencies"]}
    assert names == {"grpcio", "protobuf"}


@pytest.fixture
def flaky(request: pytest.FixtureRequest) -> Iterator[Flaky]:
    code, failures = request.param
    server = Flaky(code, failures)
    yield server
    server.server.stop(None)


@pytest.mark.parametrize(
    "flaky",
    [(grpc.StatusCode.RESOURCE_EXHAUSTED, 2), (grpc.StatusCode.UNAVAILABLE, 4)],
    indirect=True,
)
def test_overload_and_unavailability_are_retried_with_backoff(flaky: Flaky) -> None:
    with ModeratorClient(f"127.0.0.1:{flaky.port}") as client:
        answer = client.moderate([b"x", ("named", b"y")])
    assert [(r.id, r.decision) for r in answer.results] == [("0", "allow"), ("named", "allow")]
    assert flaky.calls == flaky.failures + 1


@pytest.mark.parametrize("flaky", [(grpc.StatusCode.RESOURCE_EXHAUSTED, 99)], indirect=True)
def test_retries_stop_at_the_attempt_limit_and_within_the_deadline(flaky: Flaky) -> None:
    client = ModeratorClient(f"127.0.0.1:{flaky.port}", max_attempts=3)
    with client, pytest.raises(grpc.RpcError) as raised:
        client.moderate([b"x"])
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert flaky.calls == 3
    client = ModeratorClient(f"127.0.0.1:{flaky.port}")
    with client, pytest.raises(grpc.RpcError) as raised:
        client.moderate([b"x"], timeout=0.3)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


@pytest.mark.parametrize("flaky", [(grpc.StatusCode.INVALID_ARGUMENT, 1)], indirect=True)
def test_a_request_the_server_refuses_is_not_retried(flaky: Flaky) -> None:
    client = ModeratorClient(f"127.0.0.1:{flaky.port}")
    with client, pytest.raises(grpc.RpcError) as raised:
        client.moderate([b"x"])
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert flaky.calls == 1


def test_images_as_paths_bytes_and_named_bytes_against_the_demo_server(
    demo_service: RunningService, tmp_path: Path
) -> None:
    path = tmp_path / "red-circle.png"
    path.write_bytes(shape_png("red", "circle"))
    with ModeratorClient(demo_service.address) as client:
        answer = client.moderate([path, shape_png("blue", "square"), ("broken", b"nope")])
        decided = client.moderate([path], detail="decision")
        policies = client.list_policies()
    first, second, broken = answer.results
    assert (first.id, first.decision) == (str(path), "block")
    assert "red" in {p.policy_id for p in first.violations}
    assert (second.id, second.decision) == ("1", "allow")
    assert broken.decision == "error"
    assert broken.error is not None
    assert broken.error.code == "unsupported_format"
    assert answer.policy_version == policies.policy_version
    assert decided.results[0].decision == "block"
    assert decided.results[0].policies == ()
    with pytest.raises(ValueError, match="detail must be one of"):
        ModeratorClient(demo_service.address).moderate([path], detail="everything")


def test_stored_embeddings_rescore_to_the_same_scores(demo_service: RunningService) -> None:
    with ModeratorClient(demo_service.address) as client:
        stored = client.moderate([shape_png("red", "star")], include_embeddings=True)
        again = client.score_embeddings(stored.results, model=stored.model)
    assert [p.score for p in again.results[0].policies] == pytest.approx(
        [p.score for p in stored.results[0].policies], abs=1e-5
    )


def test_the_async_client_moderates_and_streams(demo_service: RunningService) -> None:
    async def calls() -> tuple[list[str], list[list[str]]]:
        async with AsyncModeratorClient(demo_service.address) as client:
            one = await client.moderate([shape_png("red", "circle")])
            batches = [[shape_png("red", "circle")], [shape_png("blue", "square")] * 2]
            streamed = [
                [r.decision for r in answer.results]
                async for answer in client.moderate_stream(batches)
            ]
        return [r.decision for r in one.results], streamed

    single, streamed = asyncio.run(calls())
    assert single == ["block"]
    assert streamed == [["block"], ["allow", "allow"]]


def test_values_a_newer_server_added_are_read_not_fatal() -> None:
    newer = pb.ImageResult(
        id="a",
        decision=pb.DECISION_ERROR,
        error=pb.ImageError(code=42, message="new"),  # type: ignore[arg-type]
        policies=[pb.PolicyResult(policy_id="p", action=7, mode=9)],  # type: ignore[arg-type]
    )
    result = ImageResult.from_proto(newer)
    assert result.error is not None
    assert result.error.code == "unknown_42"
    assert (result.policies[0].action, result.policies[0].mode) == ("unknown_7", "unknown_9")
    unknown = pb.ImageResult(decision=11)  # type: ignore[arg-type]
    assert ImageResult.from_proto(unknown).decision == "unknown_11"


def test_a_batch_that_cannot_be_made_ends_the_stream_with_its_own_error(
    demo_service: RunningService, tmp_path: Path
) -> None:
    good = tmp_path / "red.png"
    good.write_bytes(shape_png("red", "circle"))
    batches = [[good], [tmp_path / "missing.png"], [good]]
    seen: list[str] = []

    def read_stream() -> None:
        with ModeratorClient(demo_service.address) as client:
            for answer in client.moderate_stream(batches):
                seen.extend(r.decision for r in answer.results)

    with pytest.raises(FileNotFoundError):
        read_stream()
    assert seen == ["block"]

    async def stream() -> None:
        async with AsyncModeratorClient(demo_service.address) as client:
            async for answer in client.moderate_stream(batches):
                seen.extend(r.decision for r in answer.results)

    seen.clear()
    with pytest.raises(FileNotFoundError):
        asyncio.run(stream())
    assert seen == ["block"]


@pytest.mark.parametrize("flaky", [(grpc.StatusCode.UNAVAILABLE, 1)], indirect=True)
def test_one_attempt_means_no_retries_and_the_range_is_checked(flaky: Flaky) -> None:
    client = ModeratorClient(f"127.0.0.1:{flaky.port}", max_attempts=1)
    with client, pytest.raises(grpc.RpcError):
        client.moderate([b"x"])
    assert flaky.calls == 1
    for bad in (0, 6):
        with pytest.raises(ValueError, match="max_attempts must be 1"):
            ModeratorClient(f"127.0.0.1:{flaky.port}", max_attempts=bad)
    with pytest.raises(TypeError, match="a list of images"):
        ModeratorClient(f"127.0.0.1:{flaky.port}").moderate("cat.jpg")


def test_the_generated_code_check_finds_any_file_it_did_not_generate() -> None:
    stray = CLIENT / "moderator_client" / "v1" / "stray.py"
    check = [sys.executable, str(REPO_ROOT / "tools" / "gen_proto.py"), "--check"]
    assert subprocess.run(check, capture_output=True, check=False).returncode == 0
    stray.write_text("# not generated\n")
    try:
        done = subprocess.run(check, capture_output=True, text=True, check=False)
    finally:
        stray.unlink()
    assert done.returncode == 1
    assert "stray.py" in done.stdout

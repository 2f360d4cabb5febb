"""End to end: policy reloads on a running server, over gRPC, under load."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from moderator.v1 import moderator_pb2 as pb
from moderator.v1 import moderator_pb2_grpc as pb_grpc
from tests.helpers import (
    RunningService,
    copy_demo_policies,
    demo_config,
    edit,
    shape_png,
    start_service,
)

POLL_SECONDS = 0.1
WAIT_SECONDS = 60.0


@pytest.fixture
def service(tmp_path: Path) -> Iterator[RunningService]:
    policies = copy_demo_policies(tmp_path / "policies")
    config = replace(demo_config(tmp_path), policies_dir=policies, policy_poll_seconds=0)
    yield from start_service(config)


@pytest.fixture
def stub(service: RunningService) -> Iterator[pb_grpc.ModeratorStub]:
    with grpc.insecure_channel(service.address) as channel:
        yield pb_grpc.ModeratorStub(channel)


def policies_dir(service: RunningService) -> Path:
    return service.service.config.policies_dir


def test_reload_rpc_reports_success_and_failure(
    service: RunningService, stub: pb_grpc.ModeratorStub
) -> None:
    before = stub.ListPolicies(pb.ListPoliciesRequest(), timeout=10).policy_version
    edit(policies_dir(service) / "stars.yaml", "threshold: 0.74", "threshold: 0.8")
    reloaded = stub.ReloadPolicies(pb.ReloadPoliciesRequest(), timeout=60)
    assert reloaded.status.ok
    assert reloaded.policy_version != before
    listed = stub.ListPolicies(pb.ListPoliciesRequest(), timeout=10)
    assert listed.policy_version == reloaded.policy_version
    assert {p.id: p.threshold for p in listed.policies}["stars"] == pytest.approx(0.8)

    (policies_dir(service) / "broken.yaml").write_text("title: [unclosed\n")
    failed = stub.ReloadPolicies(pb.ReloadPoliciesRequest(), timeout=60)
    assert not failed.status.ok
    assert "broken.yaml" in failed.status.message
    assert failed.policy_version == reloaded.policy_version  # the old set keeps serving
    listed = stub.ListPolicies(pb.ListPoliciesRequest(), timeout=10)
    assert not listed.last_reload.ok
    assert "broken.yaml" in listed.last_reload.message
    result = stub.Moderate(
        pb.ModerateRequest(images=[pb.Image(id="r", data=shape_png("red", "circle"))]), timeout=60
    )
    assert result.results[0].decision == pb.DECISION_BLOCK
    assert result.policy_version == reloaded.policy_version


def test_reloads_under_concurrent_load_fail_no_request(
    service: RunningService, stub: pb_grpc.ModeratorStub
) -> None:
    stars = policies_dir(service) / "stars.yaml"
    versions = {stub.ListPolicies(pb.ListPoliciesRequest(), timeout=10).policy_version}
    request = pb.ModerateRequest(
        images=[pb.Image(id=str(i), data=shape_png("yellow", "star")) for i in range(3)]
    )
    seen: list[str] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                response = stub.Moderate(request, timeout=60)
                assert [r.decision for r in response.results] == [pb.DECISION_REVIEW] * 3
                seen.append(response.policy_version)
            except BaseException as exc:  # collected, asserted empty below
                failures.append(exc)

    clients = [threading.Thread(target=client) for _ in range(4)]
    for thread in clients:
        thread.start()
    try:
        current = "0.74"
        for threshold in ("0.75", "0.76", "0.77", "0.78"):
            edit(stars, f"threshold: {current}", f"threshold: {threshold}")
            current = threshold
            status = stub.ReloadPolicies(pb.ReloadPoliciesRequest(), timeout=60).status
            assert status.ok, status.message
            versions.add(stub.ListPolicies(pb.ListPoliciesRequest(), timeout=10).policy_version)
    finally:
        stop.set()
        for thread in clients:
            thread.join(WAIT_SECONDS)
    assert failures == []
    assert len(seen) > 0
    assert set(seen) <= versions
    assert len(versions) == 5


def test_the_watcher_picks_up_edits(tmp_path: Path) -> None:
    policies = copy_demo_policies(tmp_path / "policies")
    config = replace(demo_config(tmp_path), policies_dir=policies, policy_poll_seconds=POLL_SECONDS)
    for running in start_service(config):
        with grpc.insecure_channel(running.address) as channel:
            stub = pb_grpc.ModeratorStub(channel)
            before = stub.ListPolicies(pb.ListPoliciesRequest(), timeout=10).policy_version
            edit(policies / "red.yaml", "threshold: 0.71", "threshold: 0.72")
            deadline = time.monotonic() + WAIT_SECONDS
            while stub.ListPolicies(pb.ListPoliciesRequest(), timeout=10).policy_version == before:
                assert time.monotonic() < deadline, "the edit was never picked up"
                time.sleep(POLL_SECONDS)
            listed = stub.ListPolicies(pb.ListPoliciesRequest(), timeout=10)
            assert {p.id: p.threshold for p in listed.policies}["red"] == pytest.approx(0.72)
            assert listed.last_reload.ok

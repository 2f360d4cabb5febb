"""Policy reloads: the single-flight reloader alone, then on a running server over gRPC."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from moderator_client.v1 import moderator_pb2 as pb
from moderator_client.v1 import moderator_pb2_grpc as pb_grpc
from prometheus_client import CollectorRegistry

from moderator.core.policies import PolicySet, ReloadStatus, load_policy_dir
from moderator.errors import NotReady
from moderator.serving.metrics import Metrics
from moderator.serving.reload import PolicyReloader
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


class RecordingInstaller:
    """Stands in for the engine: records each set it is asked to install and can hold an
    install until released, so a test can line up callers behind a reload in progress."""

    def __init__(self, running: PolicySet | None) -> None:
        self.running = running
        self.installed: list[str] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def current(self) -> PolicySet:
        if self.running is None:
            raise NotReady("not loaded")
        return self.running

    def install(self, policy_set: PolicySet) -> ReloadStatus:
        self.entered.set()
        assert self.release.wait(30)
        self.installed.append(policy_set.version)
        self.running = policy_set
        return ReloadStatus(ok=True, message=f"loaded {policy_set.version}", unix_time=time.time())


def reloader_for(policies: Path, installer: RecordingInstaller) -> PolicyReloader:
    metrics = Metrics(CollectorRegistry())
    return PolicyReloader(policies, installer.current, installer.install, metrics)


def edited_with_install_held(tmp_path: Path) -> tuple[Path, RecordingInstaller, PolicyReloader]:
    """A loaded policy copy with one edit waiting, and an installer that holds the next install
    until `installer.release` is set."""
    policies = copy_demo_policies(tmp_path / "policies")
    installer = RecordingInstaller(load_policy_dir(policies))
    reloader = reloader_for(policies, installer)
    edit(policies / "stars.yaml", "threshold: 0.74", "threshold: 0.8")
    installer.release.clear()
    return policies, installer, reloader


async def wait_for(event: threading.Event) -> None:
    assert await asyncio.to_thread(event.wait, 30)


def test_concurrent_reloads_share_the_one_in_progress(tmp_path: Path) -> None:
    _policies, installer, reloader = edited_with_install_held(tmp_path)

    async def scenario() -> list[ReloadStatus]:
        first = asyncio.ensure_future(reloader.reload())
        await wait_for(installer.entered)
        others = [asyncio.ensure_future(reloader.reload()) for _ in range(5)]
        await asyncio.sleep(0.05)
        installer.release.set()
        return await asyncio.gather(first, *others)

    statuses = asyncio.run(scenario())
    assert len(installer.installed) == 1
    assert all(status is statuses[0] for status in statuses)
    assert statuses[0].ok
    assert reloader.last is statuses[0]


def test_a_caller_behind_a_stale_reload_gets_a_fresh_one(tmp_path: Path) -> None:
    """An edit made after the running reload read the directory is not reported as loaded."""
    policies, installer, reloader = edited_with_install_held(tmp_path)

    async def scenario() -> tuple[ReloadStatus, ReloadStatus]:
        first = asyncio.ensure_future(reloader.reload())
        await wait_for(installer.entered)
        edit(policies / "stars.yaml", "threshold: 0.8", "threshold: 0.9")
        second = asyncio.ensure_future(reloader.reload())
        await asyncio.sleep(0.05)
        installer.release.set()
        return await first, await second

    first, second = asyncio.run(scenario())
    final = load_policy_dir(policies).version
    assert len(installer.installed) == 2
    assert installer.installed[-1] == final
    assert first.message != second.message
    assert second.message == f"loaded {final}"


def test_callers_on_other_event_loops_share_a_reload_and_a_cancelled_one_stops_nothing(
    tmp_path: Path,
) -> None:
    _policies, installer, reloader = edited_with_install_held(tmp_path)

    async def first_caller_gives_up() -> None:
        task = asyncio.ensure_future(reloader.reload())
        await wait_for(installer.entered)
        task.cancel()

    asyncio.run(first_caller_gives_up())  # its event loop is closed, the reload goes on
    results: list[ReloadStatus] = []
    other_loop = threading.Thread(target=lambda: results.append(asyncio.run(reloader.reload())))
    other_loop.start()
    time.sleep(0.05)
    installer.release.set()
    other_loop.join(30)
    assert len(installer.installed) == 1
    assert results == [reloader.last]
    assert results[0].ok


def add_hostile_files(policies: Path) -> None:
    """A FIFO, a link to /dev/zero, a number too long to read, a billion laughs and a name in
    capitals: each used to hang, crash or be skipped silently."""
    os.mkfifo(policies / "pipe.yaml")
    os.symlink("/dev/zero", policies / "zero.yaml")
    stars = (policies / "stars.yaml").read_text()
    (policies / "huge.yaml").write_text(
        stars.replace("threshold: 0.74", "threshold: " + "1" * 5000)
    )
    laughs = "a: &a [lol, lol]\n" + "".join(
        f"{b}: &{b} [*{a}, *{a}, *{a}, *{a}, *{a}]\n"
        for a, b in zip("abcdefgh", "bcdefghi", strict=True)
    )
    (policies / "laughs.yaml").write_text(laughs)
    (policies / "Stars.YAML").write_text(stars)


HOSTILE_PROBLEMS = (
    "Stars.YAML: policy files must end in .yaml or .yml (lower case)",
    "pipe.yaml: is a FIFO, not a regular file",
    "zero.yaml: links outside the policy directory (to /dev/zero)",
    "huge.yaml:8:12: key 'threshold': a number longer than 64 characters cannot be read",
    "laughs.yaml:1:4: YAML anchors (&a) are not allowed",
)


def remove_hostile_files(policies: Path) -> None:
    for name in ("pipe.yaml", "zero.yaml", "huge.yaml", "laughs.yaml", "Stars.YAML"):
        (policies / name).unlink()


def test_a_hostile_directory_is_a_recorded_and_counted_failure(tmp_path: Path) -> None:
    policies = copy_demo_policies(tmp_path / "policies")
    installer = RecordingInstaller(load_policy_dir(policies))
    metrics = Metrics(CollectorRegistry())
    reloader = PolicyReloader(policies, installer.current, installer.install, metrics)
    add_hostile_files(policies)
    status = asyncio.run(asyncio.wait_for(reloader.reload(), WAIT_SECONDS))
    assert not status.ok
    assert status.message.startswith("reload failed, still serving version ")
    for problem in HOSTILE_PROBLEMS:
        assert problem in status.message
    assert len(status.message) < 2000
    assert reloader.last is status
    assert installer.installed == []
    assert metrics.policy_reloads.labels(result="error")._value.get() == 1
    assert metrics.policy_last_reload_success._value.get() == 0
    remove_hostile_files(policies)
    assert asyncio.run(reloader.reload()).ok
    assert metrics.policy_last_reload_success._value.get() == 1  # the running set is current


def test_an_unexpected_error_while_loading_is_a_recorded_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """load_policy_dir reports every problem as a PolicyError; should anything else ever
    escape it, the reload still fails like any other instead of raising to the caller."""
    policies = copy_demo_policies(tmp_path / "policies")
    installer = RecordingInstaller(load_policy_dir(policies))
    metrics = Metrics(CollectorRegistry())
    reloader = PolicyReloader(policies, installer.current, installer.install, metrics)

    def broken(directory: Path) -> PolicySet:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr("moderator.serving.reload.load_policy_dir", broken)
    status = asyncio.run(reloader.reload())
    assert not status.ok
    assert status.message.endswith(
        f"{policies}: cannot be loaded: RecursionError: maximum recursion depth exceeded"
    )
    assert reloader.last is status
    assert metrics.policy_reloads.labels(result="error")._value.get() == 1


def test_a_reload_before_the_first_load_is_not_ready(tmp_path: Path) -> None:
    policies = copy_demo_policies(tmp_path / "policies")
    reloader = reloader_for(policies, RecordingInstaller(None))
    with pytest.raises(NotReady):
        asyncio.run(reloader.reload())


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


def test_reload_rpc_reports_hostile_files_and_keeps_serving(
    service: RunningService, stub: pb_grpc.ModeratorStub
) -> None:
    before = stub.ListPolicies(pb.ListPoliciesRequest(), timeout=10).policy_version
    add_hostile_files(policies_dir(service))
    failed = stub.ReloadPolicies(pb.ReloadPoliciesRequest(), timeout=60)
    assert not failed.status.ok
    for problem in HOSTILE_PROBLEMS:
        assert problem in failed.status.message
    assert failed.policy_version == before
    listed = stub.ListPolicies(pb.ListPoliciesRequest(), timeout=10)
    assert listed.last_reload == failed.status
    result = stub.Moderate(
        pb.ModerateRequest(images=[pb.Image(id="r", data=shape_png("red", "circle"))]), timeout=60
    )
    assert result.results[0].decision == pb.DECISION_BLOCK
    assert result.policy_version == before
    remove_hostile_files(policies_dir(service))
    fixed = stub.ReloadPolicies(pb.ReloadPoliciesRequest(), timeout=60)
    assert fixed.status.ok, fixed.status.message
    assert fixed.policy_version == before


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

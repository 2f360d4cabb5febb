"""Tokens and roles over gRPC: every Moderator call needs a known token with the method's role;
health stays open; the token file is re-read without a restart; admin calls are audited."""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from moderator_client.v1 import moderator_pb2 as pb
from moderator_client.v1 import moderator_pb2_grpc as pb_grpc

from moderator.logs import REQUEST_LOGGER, fields_of
from moderator.serving.access import token_digest
from tests.helpers import (
    RunningService,
    code_of,
    demo_config,
    shape_png,
    start_service,
    wait_until,
)

TOKENS = {"mod": "token-mod", "res": "token-res", "adm": "token-adm"}
ROLES = {"mod": ["moderate"], "res": ["rescore"], "adm": ["moderate", "rescore", "admin"]}


def token_file(callers: dict[str, list[str]], tokens: dict[str, str] = TOKENS) -> str:
    entries = "".join(
        f'  - name: {name}\n    sha256: "{token_digest(tokens[name])}"\n    roles: {roles}\n'
        for name, roles in callers.items()
    )
    return "tokens:\n" + entries


@pytest.fixture(scope="module")
def tokens_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "tokens.yaml"
    path.write_text(token_file(ROLES))
    return path


@pytest.fixture(scope="module")
def service(
    tokens_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningService]:
    config = demo_config(tmp_path_factory.mktemp("auth-service"))
    config = replace(
        config,
        policy_poll_seconds=0.2,
        server=replace(config.server, auth_tokens=tokens_path, reflection=False),
    )
    yield from start_service(config)


def as_caller(name: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {TOKENS[name]}"),) if name else ()


def calls(stub: pb_grpc.ModeratorStub) -> dict[str, Callable[[Any], object]]:
    red = pb.ModerateRequest(images=[pb.Image(id="red", data=shape_png("red", "circle"))])
    return {
        "Moderate": lambda md: stub.Moderate(red, metadata=md, timeout=30),
        "ModerateStream": lambda md: list(
            stub.ModerateStream(iter([red]), metadata=md, timeout=30)
        ),
        "ListPolicies": lambda md: stub.ListPolicies(pb.ListPoliciesRequest(), metadata=md),
        "ScoreEmbeddings": lambda md: stub.ScoreEmbeddings(
            pb.ScoreEmbeddingsRequest(), metadata=md, timeout=30
        ),
        "ReloadPolicies": lambda md: stub.ReloadPolicies(
            pb.ReloadPoliciesRequest(), metadata=md, timeout=60
        ),
    }


ALLOWED = {
    "mod": {"Moderate", "ModerateStream", "ListPolicies"},
    "res": {"ScoreEmbeddings"},
    "adm": {"Moderate", "ModerateStream", "ListPolicies", "ScoreEmbeddings", "ReloadPolicies"},
}


def test_each_role_calls_exactly_its_methods(service: RunningService) -> None:
    with grpc.insecure_channel(service.address) as channel:
        methods = calls(pb_grpc.ModeratorStub(channel))
        for caller, allowed in ALLOWED.items():
            for method, call in methods.items():
                expected = (
                    grpc.StatusCode.OK if method in allowed else grpc.StatusCode.PERMISSION_DENIED
                )
                assert code_of(call, as_caller(caller)) == expected, (caller, method)
    registry = service.service.registry
    labels = {"method": "Moderate", "code": "OK", "caller": "mod"}
    assert registry.get_sample_value("moderator_requests_total", labels) == 1


@pytest.mark.parametrize(
    "metadata",
    [(), (("authorization", "Bearer wrong"),), (("authorization", "Basic token-mod"),)],
)
def test_no_or_an_unknown_token_is_unauthenticated(
    service: RunningService, metadata: tuple[tuple[str, str], ...]
) -> None:
    with grpc.insecure_channel(service.address) as channel:
        for call in calls(pb_grpc.ModeratorStub(channel)).values():
            assert code_of(call, metadata) == grpc.StatusCode.UNAUTHENTICATED


def test_health_is_open_and_reflection_can_be_turned_off(service: RunningService) -> None:
    with grpc.insecure_channel(service.address) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        assert check(health_pb2.HealthCheckRequest(), timeout=10).status == (
            health_pb2.HealthCheckResponse.SERVING
        )
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as info:
            list(reflect(iter([request]), timeout=10))
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_admin_calls_are_audited(service: RunningService, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="moderator.audit")
    with grpc.insecure_channel(service.address) as channel:
        stub = pb_grpc.ModeratorStub(channel)
        stub.ReloadPolicies(pb.ReloadPoliciesRequest(), metadata=as_caller("adm"), timeout=60)
        with pytest.raises(grpc.RpcError):
            stub.ReloadPolicies(pb.ReloadPoliciesRequest(), metadata=as_caller("mod"))
    lines = [fields_of(r) for r in caplog.records if r.name == "moderator.audit"]
    assert [(line["caller"], line["result"]) for line in lines] == [
        ("adm", "OK"),
        ("mod", "PERMISSION_DENIED"),
    ]
    assert lines[0]["before"] == lines[0]["after"]
    assert lines[0]["method"] == "ReloadPolicies"


def test_refused_calls_are_in_the_request_log(
    service: RunningService, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    with grpc.insecure_channel(service.address) as channel, pytest.raises(grpc.RpcError):
        pb_grpc.ModeratorStub(channel).ListPolicies(pb.ListPoliciesRequest(), timeout=10)
    lines = [fields_of(r) for r in caplog.records if r.name == REQUEST_LOGGER]
    assert {"method": "ListPolicies", "code": "UNAUTHENTICATED"}.items() <= lines[-1].items()


def test_a_token_file_edit_takes_effect_without_a_restart_and_a_broken_one_is_ignored(
    service: RunningService, tokens_path: Path
) -> None:
    with grpc.insecure_channel(service.address) as channel:
        moderate = calls(pb_grpc.ModeratorStub(channel))["Moderate"]
        assert code_of(moderate, as_caller("res")) == grpc.StatusCode.PERMISSION_DENIED
        try:
            tokens_path.write_text(token_file({**ROLES, "res": ["rescore", "moderate"]}))
            wait_until(lambda: code_of(moderate, as_caller("res")) == grpc.StatusCode.OK)
            errors = reload_errors(service)
            tokens_path.write_text("tokens: [{name: broken")
            wait_until(lambda: reload_errors(service) == errors + 1)
            assert code_of(moderate, as_caller("res")) == grpc.StatusCode.OK  # still in force
        finally:
            tokens_path.write_text(token_file(ROLES))
        wait_until(lambda: code_of(moderate, as_caller("res")) != grpc.StatusCode.OK)


def reload_errors(service: RunningService) -> float:
    labels = {"result": "error"}
    return service.service.registry.get_sample_value("moderator_auth_reloads_total", labels) or 0


def test_an_open_stream_stops_working_when_its_token_is_removed(
    service: RunningService, tokens_path: Path
) -> None:
    sent: queue.Queue[pb.ModerateRequest | None] = queue.Queue()

    def requests() -> Iterator[pb.ModerateRequest]:
        while (item := sent.get()) is not None:
            yield item

    red = pb.ModerateRequest(images=[pb.Image(id="red", data=shape_png("red", "circle"))])
    with grpc.insecure_channel(service.address) as channel:
        stub = pb_grpc.ModeratorStub(channel)
        stream = stub.ModerateStream(requests(), metadata=as_caller("mod"), timeout=60)
        answers = iter(stream)
        sent.put(red)
        assert next(answers).results
        moderate = calls(stub)["Moderate"]
        try:
            tokens_path.write_text(token_file({"res": ROLES["res"], "adm": ROLES["adm"]}))
            wait_until(lambda: code_of(moderate, as_caller("mod")) != grpc.StatusCode.OK)
            sent.put(red)
            refused = next(answers)
            assert refused.error.code == grpc.StatusCode.UNAUTHENTICATED.value[0]
            assert not refused.results
        finally:
            sent.put(None)
            tokens_path.write_text(token_file(ROLES))
        wait_until(lambda: code_of(moderate, as_caller("mod")) == grpc.StatusCode.OK)


def test_a_refused_call_is_refused_before_its_bytes_are_read(service: RunningService) -> None:
    with grpc.insecure_channel(service.address) as channel:
        reload = channel.unary_unary(
            "/moderator.v1.Moderator/ReloadPolicies",
            request_serializer=None,
            response_deserializer=None,
        )
        with pytest.raises(grpc.RpcError) as info:
            reload(b"\xff\xff\xff", timeout=10)  # not a valid message
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED

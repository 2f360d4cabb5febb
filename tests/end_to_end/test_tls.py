"""TLS and mutual TLS over a real server with certificates made here: plaintext and
certificate-less clients are refused, client certificate subjects map to roles, and a rotated
server certificate is served to new connections while open ones go on."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from moderator_client.v1 import moderator_pb2 as pb
from moderator_client.v1 import moderator_pb2_grpc as pb_grpc

from moderator.serving.access import token_digest
from tests.helpers import (
    Certificates,
    RunningService,
    code_of,
    demo_config,
    make_certificates,
    shape_png,
    start_service,
)

TOKENS = f"""
tokens:
  - name: admin
    sha256: "{token_digest("admin-token")}"
    roles: [moderate, rescore, admin]
subjects:
  - match: "CN=reviewer-tools"
    roles: [moderate, rescore]
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningService, Path]]:
    base = tmp_path_factory.mktemp("tls")
    certs = make_certificates(base / "first")
    live = base / "live"  # what the server reads; the rotation test replaces these files
    live.mkdir()
    for source in (certs.server_cert, certs.server_key, certs.ca):
        shutil.copy(source, live / source.name)
    tokens = base / "tokens.yaml"
    tokens.write_text(TOKENS)
    config = demo_config(base / "service")
    server = replace(
        config.server,
        auth_tokens=tokens,
        tls_cert=live / "server.pem",
        tls_key=live / "server.key",
        tls_client_ca=live / "ca.pem",
    )
    for running in start_service(replace(config, server=server)):
        yield running, base


def channel(running: RunningService, certs: Certificates, client: bool = True) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=certs.ca.read_bytes(),
        private_key=certs.client_key.read_bytes() if client else None,
        certificate_chain=certs.client_cert.read_bytes() if client else None,
    )
    options = [("grpc.use_local_subchannel_pool", 1)]
    return grpc.secure_channel(running.address, credentials, options=options)


def first_certs(base: Path) -> Certificates:
    first = base / "first"
    return Certificates(
        *(first / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key"))
    )


def red() -> pb.ModerateRequest:
    return pb.ModerateRequest(images=[pb.Image(id="red", data=shape_png("red", "circle"))])


def served_ok(stub: pb_grpc.ModeratorStub) -> bool:
    request = pb.ListPoliciesRequest()
    return code_of(lambda: stub.ListPolicies(request, timeout=5)) == grpc.StatusCode.OK


def test_plaintext_and_clients_without_a_certificate_are_refused(
    served: tuple[RunningService, Path],
) -> None:
    running, base = served
    with grpc.insecure_channel(running.address) as plain:
        stub = pb_grpc.ModeratorStub(plain)
        assert code_of(lambda: stub.ListPolicies(pb.ListPoliciesRequest(), timeout=5)) == (
            grpc.StatusCode.UNAVAILABLE
        )
    with channel(running, first_certs(base), client=False) as anonymous:
        stub = pb_grpc.ModeratorStub(anonymous)
        assert code_of(lambda: stub.ListPolicies(pb.ListPoliciesRequest(), timeout=5)) == (
            grpc.StatusCode.UNAVAILABLE
        )


def test_a_client_certificate_subject_gets_its_roles_and_a_token_still_works(
    served: tuple[RunningService, Path],
) -> None:
    running, base = served
    with channel(running, first_certs(base)) as secure:
        stub = pb_grpc.ModeratorStub(secure)
        response = stub.Moderate(red(), timeout=30)  # CN=reviewer-tools: moderate
        assert response.results[0].decision == pb.DECISION_BLOCK
        reload = pb.ReloadPoliciesRequest()
        assert code_of(lambda: stub.ReloadPolicies(reload, timeout=30)) == (
            grpc.StatusCode.PERMISSION_DENIED
        )
        admin = (("authorization", "Bearer admin-token"),)
        assert stub.ReloadPolicies(reload, metadata=admin, timeout=60).status.ok
    labels = {"method": "Moderate", "code": "OK", "caller": "CN_reviewer-tools"}
    assert running.service.registry.get_sample_value("moderator_requests_total", labels) == 1


def test_a_rotated_certificate_is_served_to_new_connections(
    served: tuple[RunningService, Path],
) -> None:
    running, base = served
    old = first_certs(base)
    with channel(running, old) as open_before:
        stub = pb_grpc.ModeratorStub(open_before)
        assert stub.ListPolicies(pb.ListPoliciesRequest(), timeout=10).policies
        new = make_certificates(base / "second")
        live = base / "live"
        for source in (new.server_cert, new.server_key, new.ca):
            staged = live / f".{source.name}.new"
            shutil.copy(source, staged)
            staged.replace(live / source.name)  # atomic, as a secret mount update is
        deadline = time.monotonic() + 30
        while True:
            with channel(running, new) as fresh:
                if served_ok(pb_grpc.ModeratorStub(fresh)):
                    break
            assert time.monotonic() < deadline, "the new certificate was never served"
            time.sleep(0.2)
        with channel(running, old) as stale:
            call = pb_grpc.ModeratorStub(stale).ListPolicies
            assert code_of(lambda: call(pb.ListPoliciesRequest(), timeout=5)) == (
                grpc.StatusCode.UNAVAILABLE
            )
        # the connection made before the rotation goes on
        assert stub.ListPolicies(pb.ListPoliciesRequest(), timeout=10).policies

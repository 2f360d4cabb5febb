from __future__ import annotations

import logging
from pathlib import Path

import grpc
import pytest
from moderator_client.v1 import moderator_pb2 as pb
from prometheus_client import CollectorRegistry

from moderator.errors import PolicyError
from moderator.serving.access import METHOD_ROLES, Role, load_access_file, token_digest
from moderator.serving.auth import AccessControl, PeerNames, audit_log
from moderator.serving.metrics import Metrics


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tokens.yaml"
    path.write_text(text)
    return path


def test_a_token_file_maps_token_digests_to_callers_and_roles(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
tokens:
  - name: upload-pipeline
    sha256: {token_digest("secret-1")}
    roles: [moderate]
  - name: trust-and-safety-admin
    sha256: {token_digest("secret-2")}
    roles: [moderate, rescore, admin]
subjects:
  - match: "CN=reviewer-tools"
    roles: [moderate, rescore]
""",
    )
    access = load_access_file(path)
    upload = access.caller_for_token("secret-1")
    assert upload is not None
    assert (upload.name, upload.roles) == ("upload-pipeline", frozenset({Role.MODERATE}))
    admin = access.caller_for_token("secret-2")
    assert admin is not None
    assert admin.may(Role.ADMIN)
    assert access.caller_for_token("secret-3") is None
    assert access.caller_for_token(token_digest("secret-1")) is None  # the digest is no token
    assert access.subjects[0][0] == "CN=reviewer-tools"
    assert access.names == ("trust-and-safety-admin", "upload-pipeline")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("tokens: [{name: a, sha256: abc, roles: [moderate]}]", "64 lower-case hex"),
        (f"tokens: [{{name: a, sha256: '{'0' * 64}', roles: [root]}}]", "'roles' must be"),
        (f"tokens: [{{name: 'a b', sha256: '{'0' * 64}', roles: [admin]}}]", "'name' must be"),
        (f"tokens: [{{name: a, sha256: '{'0' * 64}', roles: [admin], token: x}}]", "unknown keys"),
        (
            f"tokens: [{{name: a, sha256: '{'0' * 64}', roles: [admin]}},"
            f" {{name: b, sha256: '{'0' * 64}', roles: [admin]}}]",
            "the same sha256 as 'a'",
        ),
        ("users: []", "must be a mapping with 'tokens'"),
        ("tokens: &x [] \nsubjects: *x", "anchors"),
        ("subjects: [{roles: [moderate]}]", "'match' must name"),
    ],
)
def test_every_problem_in_a_token_file_is_named(tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(PolicyError, match=words):
        load_access_file(write(tmp_path, text))


def test_every_moderator_method_has_a_role() -> None:
    service = pb.DESCRIPTOR.services_by_name["Moderator"]
    assert set(METHOD_ROLES) == {method.name for method in service.methods}


@pytest.mark.parametrize("name", ["anonymous", "unauthenticated"])
def test_the_names_the_server_uses_itself_are_refused(tmp_path: Path, name: str) -> None:
    text = f"tokens: [{{name: {name}, sha256: '{'0' * 64}', roles: [moderate]}}]"
    with pytest.raises(PolicyError, match="a name the server uses itself"):
        load_access_file(write(tmp_path, text))


def test_the_audit_trail_does_not_follow_the_log_level() -> None:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        assert audit_log.isEnabledFor(logging.INFO)
    finally:
        root.setLevel(level)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("subjects: [{match: _unauthenticated, roles: [admin]}]", "uses itself"),
        ("subjects: [{match: 'CN=x', name: 'bad name!', roles: [admin]}]", "'name' must be"),
        (
            f"tokens: [{{name: CN_x, sha256: '{'0' * 64}', roles: [moderate]}}]\n"
            "subjects: [{match: 'CN=x', roles: [admin]}]",
            "is a token's",
        ),
    ],
)
def test_subject_caller_names_are_checked_like_token_names(
    tmp_path: Path, text: str, words: str
) -> None:
    with pytest.raises(PolicyError, match=words):
        load_access_file(write(tmp_path, text))


def test_a_cn_rule_matches_common_names_only_and_a_sent_token_decides_alone(
    tmp_path: Path,
) -> None:
    path = write(
        tmp_path,
        f"tokens: [{{name: t, sha256: '{token_digest('good')}', roles: [moderate]}}]\n"
        "subjects: [{match: 'CN=reviewer-tools', roles: [moderate, admin]}]\n",
    )
    access = AccessControl(path, Metrics(CollectorRegistry()))
    by_cn = PeerNames(common_names=("reviewer-tools",))
    by_san = PeerNames(common_names=("intern",), sans=("CN=reviewer-tools",))
    assert access.judge("ReloadPolicies", [], by_cn).code is None
    assert access.judge("ReloadPolicies", [], by_san).code == grpc.StatusCode.UNAUTHENTICATED
    unknown = [("authorization", "Bearer wrong")]
    assert access.judge("Moderate", unknown, by_cn).code == grpc.StatusCode.UNAUTHENTICATED
    good = [("authorization", "Bearer good")]
    assert access.judge("ReloadPolicies", good, by_cn).code == grpc.StatusCode.PERMISSION_DENIED

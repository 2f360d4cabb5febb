from __future__ import annotations

from pathlib import Path

import pytest

from moderator.errors import PolicyError
from moderator.serving.access import Role, load_access_file, token_digest


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

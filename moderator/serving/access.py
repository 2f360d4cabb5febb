"""Who may call what: the token file, callers and roles. Knows nothing of gRPC.

The file (`--auth-tokens`) names each caller, the SHA-256 of its bearer token (the token itself
is never stored) and its roles; with mutual TLS, certificate subjects map to roles too. Read
with the same care as policy files: size-capped, no aliases, every problem named.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moderator.config import SHA256_HEX
from moderator.core.policy_files import (
    compose_policy_yaml,
    construct_policy_value,
    read_policy_text,
)
from moderator.errors import PolicyError

CALLER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_ENTRIES = 1000
ANONYMOUS = "anonymous"  # the caller label when no token file is configured
UNAUTHENTICATED = "unauthenticated"  # the caller label of calls without a known token
RESERVED_NAMES = (ANONYMOUS, UNAUTHENTICATED)


class Role(enum.Enum):
    MODERATE = "moderate"  # Moderate, ModerateStream, ListPolicies
    RESCORE = "rescore"  # ScoreEmbeddings
    ADMIN = "admin"  # ReloadPolicies


# Every method of the Moderator service and the role it needs.
METHOD_ROLES: dict[str, Role] = {
    "Moderate": Role.MODERATE,
    "ModerateStream": Role.MODERATE,
    "ListPolicies": Role.MODERATE,
    "ScoreEmbeddings": Role.RESCORE,
    "ReloadPolicies": Role.ADMIN,
}


@dataclass(frozen=True)
class Caller:
    name: str
    roles: frozenset[Role]

    def may(self, role: Role) -> bool:
        return role in self.roles


@dataclass(frozen=True)
class AccessFile:
    """A validated token file: callers by token digest, and certificate subject rules."""

    by_digest: dict[str, Caller] = field(default_factory=dict)
    subjects: tuple[tuple[str, Caller], ...] = ()
    version: str = ""

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(sorted({c.name for c in self.by_digest.values()}))

    def caller_for_token(self, token: str) -> Caller | None:
        digest = token_digest(token)
        for known, caller in self.by_digest.items():
            if hmac.compare_digest(known, digest):  # no early exit on a partial match
                return caller
        return None


def token_digest(token: str) -> str:
    """What the token file stores for a token (`moderator token` prints it for a new one)."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def load_access_file(path: Path) -> AccessFile:
    """Read and validate the token file; PolicyError listing every problem."""
    text = read_policy_text(path, None)
    node = compose_policy_yaml(text, path.name)
    document = None if node is None else construct_policy_value(node, path.name, "(the file)")
    problems: list[str] = []
    access = _parse(document, path.name, problems)
    if problems:
        raise PolicyError(problems)
    return AccessFile(
        access.by_digest, access.subjects, hashlib.sha256(text.encode()).hexdigest()[:12]
    )


def _parse(document: Any, source: str, problems: list[str]) -> AccessFile:
    if not isinstance(document, dict) or not set(document) <= {"tokens", "subjects"}:
        problems.append(f"{source}: must be a mapping with 'tokens' and/or 'subjects'")
        return AccessFile()
    by_digest: dict[str, Caller] = {}
    for i, entry in enumerate(_entries(document, "tokens", source, problems)):
        where = f"{source}: tokens[{i}]"
        caller = _caller(entry, where, {"name", "sha256", "roles"}, problems)
        digest = entry.get("sha256") if isinstance(entry, dict) else None
        if not isinstance(digest, str) or not SHA256_HEX.fullmatch(digest):
            problems.append(f"{where}: 'sha256' must be 64 lower-case hex digits, quoted")
        elif digest in by_digest:
            problems.append(f"{where}: the same sha256 as '{by_digest[digest].name}'")
        elif caller is not None:
            by_digest[digest] = caller
    subjects: list[tuple[str, Caller]] = []
    for i, entry in enumerate(_entries(document, "subjects", source, problems)):
        where = f"{source}: subjects[{i}]"
        match = entry.get("match") if isinstance(entry, dict) else None
        if not isinstance(match, str) or not match.strip():
            problems.append(f"{where}: 'match' must name a certificate subject CN or a SAN")
            continue
        caller = _caller(entry, where, {"match", "roles", "name"}, problems)
        token_names = {c.name for c in by_digest.values()}
        if caller is not None and caller.name in token_names:
            problems.append(f"{where}: caller name '{caller.name}' is a token's: give it a 'name'")
        elif caller is not None:
            subjects.append((match, caller))
    return AccessFile(by_digest, tuple(subjects))


def _entries(document: dict[str, Any], key: str, source: str, problems: list[str]) -> list[Any]:
    entries = document.get(key) or []
    if not isinstance(entries, list):
        problems.append(f"{source}: '{key}' must be a list")
        return []
    if len(entries) > MAX_ENTRIES:
        problems.append(f"{source}: '{key}' has more than {MAX_ENTRIES} entries")
        return []
    return entries


def _caller(entry: Any, where: str, keys: set[str], problems: list[str]) -> Caller | None:
    if not isinstance(entry, dict):
        problems.append(f"{where}: must be a mapping")
        return None
    unknown = set(entry) - keys
    if unknown:
        problems.append(f"{where}: unknown keys {sorted(unknown)}")
    name = entry.get("name")
    if name is None and "match" in entry:
        # a subject without a name is called by its match, made safe for a metric label
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", str(entry["match"]))[:64].strip("_") or "subject"
    if not isinstance(name, str) or not CALLER_NAME.match(name):
        problems.append(
            f"{where}: 'name' must be 1-64 letters, digits, '_', '.' or '-' (it is a metric label)"
        )
        return None
    if name in RESERVED_NAMES:
        problems.append(f"{where}: '{name}' is a name the server uses itself; choose another")
        return None
    roles = entry.get("roles")
    known = {role.value for role in Role}
    if not isinstance(roles, list) or not roles or not set(map(str, roles)) <= known:
        problems.append(f"{where}: 'roles' must be a non-empty list of {sorted(known)}")
        return None
    return Caller(name, frozenset(Role(r) for r in roles))

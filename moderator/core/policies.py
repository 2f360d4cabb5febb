"""Policies: YAML files written by trust-and-safety teams, validated into a PolicySet.

One file per policy; the file name (without .yaml/.yml) is the policy id. Every problem is
reported with its file, key and line, and all problems of a directory are reported at once.
Reading the files (which entries are policies, size and type limits, YAML without anchors or
deep nesting) is policy_files.py; this module gives the parsed values their meaning.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from moderator.core import policy_files
from moderator.core.known_content import (
    KNOWN_CONTENT_KEYS,
    NO_KNOWN_CONTENT,
    KnownContent,
    Location,
    read_known_content,
)
from moderator.core.policy_files import (
    compose_policy_yaml,
    described,
    read_policy_text,
    scan_policy_dir,
    shown_name,
)
from moderator.core.policy_values import DEFAULT_TEMPLATES, PolicyReader, key_lines
from moderator.errors import PolicyError

__all__ = ["DEFAULT_TEMPLATES"]

POLICY_ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
MAX_PROBLEMS_PER_FILE = 20  # a file of 100k unknown keys must not make a 20 MB message
MAX_PROBLEMS_PER_DIRECTORY = 100  # nor a directory of 100k stray files
REQUIRED_KEYS = ("title", "action")
# A policy's text rule; required unless it has examples or hash lists instead.
TEXT_RULE_KEYS = ("threshold", "descriptions")
_SIGNAL_KEYS = frozenset({"descriptions", "examples", "hash_lists", "sha256_lists"})
POLICY_SUFFIXES = policy_files.POLICY_SUFFIXES  # the tools find policy files by it
_MAP_TAG = "tag:yaml.org,2002:map"
KNOWN_KEYS = KNOWN_CONTENT_KEYS | frozenset(
    {"title", "description", "action", "mode", "threshold", "descriptions", "benign", "templates"}
)


class Action(enum.Enum):
    REVIEW = "review"
    BLOCK = "block"


class Mode(enum.Enum):
    ENFORCE = "enforce"
    SHADOW = "shadow"
    DISABLED = "disabled"


@dataclass(frozen=True)
class Policy:
    id: str
    title: str
    description: str
    action: Action
    mode: Mode
    threshold: float
    descriptions: tuple[str, ...]
    benign: tuple[str, ...]
    templates: tuple[str, ...]
    version: str
    known: KnownContent = NO_KNOWN_CONTENT  # example images and hash lists

    def prompts(self, texts: Iterable[str]) -> list[list[str]]:
        """Each text expanded through every template."""
        return [[template.format(text) for template in self.templates] for text in texts]


@dataclass(frozen=True)
class PolicySet:
    """The active policies (enforce and shadow), in id order, and the set's version."""

    policies: tuple[Policy, ...]
    version: str
    disabled: tuple[str, ...] = ()

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(p.id for p in self.policies)

    def index_of(self, policy_id: str) -> int:
        return self.ids.index(policy_id)


@dataclass(frozen=True)
class ReloadStatus:
    """How the last attempt to load a policy set went; `message` names file and key on failure."""

    ok: bool
    message: str
    unix_time: float


def load_policy_dir(directory: Path) -> PolicySet:
    """Load and validate every policy file in `directory`.

    Raises PolicyError listing every problem found, not just the first, and nothing else:
    whatever a file holds (or whatever it is), its failure is a problem naming it.
    """
    if not directory.is_dir():
        raise PolicyError([f"{directory}: policy directory does not exist"])
    try:
        entries = scan_policy_dir(directory)
    except OSError as exc:
        raise PolicyError([f"{directory}: cannot list the policy directory: {exc}"]) from exc
    problems = [entry.problem for entry in entries if entry.problem]
    files = [entry.path for entry in entries if not entry.problem]
    if not files and not problems:
        raise PolicyError([f"{directory}: no policy files (*.yaml or *.yml)"])
    policies, file_problems = _parse_files(files, directory)
    problems += file_problems
    if problems:
        raise PolicyError(_capped(problems, str(directory), MAX_PROBLEMS_PER_DIRECTORY))
    policy_set = build_policy_set(policies)
    if not policy_set.policies:
        raise PolicyError([f"{directory}: no active policies (every policy is disabled)"])
    return policy_set


def _parse_files(files: Iterable[Path], directory: Path) -> tuple[list[Policy], list[str]]:
    problems: list[str] = []
    sources: dict[str, Path] = {}
    policies: list[Policy] = []
    for path in files:
        try:
            policy = parse_policy_file(path, directory)
        except PolicyError as exc:
            problems.extend(exc.problems)
            continue
        except Exception as exc:  # a safety net: no file may fail the load any other way
            problems.append(f"{shown_name(path)}: cannot be loaded: {described(exc)}")
            continue
        if policy.id in sources:
            problems.append(
                f"{shown_name(path)}: duplicate policy id '{policy.id}' "
                f"(also {shown_name(sources[policy.id])})"
            )
            continue
        sources[policy.id] = path
        policies.append(policy)
    return policies, problems


def build_policy_set(policies: Iterable[Policy]) -> PolicySet:
    ordered = sorted(policies, key=lambda p: p.id)
    active = tuple(p for p in ordered if p.mode is not Mode.DISABLED)
    disabled = tuple(p.id for p in ordered if p.mode is Mode.DISABLED)
    return PolicySet(policies=active, version=set_version(active), disabled=disabled)


def set_version(policies: Iterable[Policy]) -> str:
    digest = hashlib.sha256()
    for policy in policies:
        digest.update(f"{policy.id}={policy.version};".encode())
    return digest.hexdigest()[:16]


def parse_policy_file(path: Path, directory: Path | None = None) -> Policy:
    """Read and validate one policy file, which must resolve inside `directory` when one is
    given (a file named on its own may be a link to anywhere). Raises PolicyError naming it."""
    policy_id = path.stem
    if not POLICY_ID_PATTERN.fullmatch(policy_id):
        raise PolicyError(
            [
                f"{shown_name(path)}: file name must be a policy id: lowercase letters, digits, "
                "'_' or '-', at most 64 characters"
            ]
        )
    text = read_policy_text(path, directory)
    root = os.path.realpath(directory if directory is not None else path.parent)
    location = Location(path.parent, root)
    return parse_policy(policy_id, text, source=shown_name(path), location=location)


def parse_policy(
    policy_id: str, text: str, source: str, location: Location | None = None
) -> Policy:
    """Validate one policy document. Raises PolicyError naming `source`, key and line.

    `location`: where the files it names (examples, hash lists) are; a policy without one
    cannot name files."""
    node = compose_policy_yaml(text, source)
    if not isinstance(node, yaml.MappingNode) or node.tag != _MAP_TAG:
        raise PolicyError([f"{source}: a policy must be a YAML mapping of keys to values"])
    reader = PolicyReader(source, key_lines(node), KNOWN_KEYS)
    data = reader.values(node)
    for duplicate in reader.duplicate_keys(node):
        reader.problem(duplicate, "key appears more than once")
    for i, key in enumerate(sorted(set(reader.lines) - KNOWN_KEYS)):
        listed = f" (known keys: {', '.join(sorted(KNOWN_KEYS))})" if i == 0 else ""
        reader.problem(key, f"unknown key{listed}")
    text_rule = "descriptions" in reader.lines or not _SIGNAL_KEYS & reader.lines.keys()
    for key in (*REQUIRED_KEYS, *(TEXT_RULE_KEYS if text_rule else ())):
        if key not in reader.lines:
            reader.problems.append(f"{source}: missing required key '{key}'")
    title = reader.string(data, "title", required=True)
    description = reader.string(data, "description", required=False)
    action = reader.choice(data, "action", Action, default=None)
    mode = reader.choice(data, "mode", Mode, default=Mode.ENFORCE)
    threshold = reader.threshold(data) if text_rule else 0.0
    if not text_rule and "threshold" in reader.lines:
        reader.problem("threshold", "applies to descriptions, and this policy has none")
    descriptions = reader.texts(data, "descriptions", required=True)
    benign = reader.texts(data, "benign", required=False)
    templates = reader.templates(data)
    known = read_known_content(data, location, reader.problem)
    if reader.problems or action is None or mode is None or threshold is None:
        problems = _capped(reader.problems, source, MAX_PROBLEMS_PER_FILE)
        raise PolicyError(problems or [f"{source}: invalid policy"])
    content: dict[str, Any] = {
        "id": policy_id,
        "title": title,
        "action": action.value,
        "mode": mode.value,
        "threshold": threshold,
        "descriptions": descriptions,
        "benign": benign,
        "templates": templates,
    }
    if known.versioned() != NO_KNOWN_CONTENT.versioned():  # else the version stays as it was
        content["known"] = known.versioned()
    version = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:12]
    return Policy(
        id=policy_id,
        title=title,
        description=description,
        action=action,
        mode=mode,
        threshold=threshold,
        descriptions=descriptions,
        benign=benign,
        templates=templates,
        version=version,
        known=known,
    )


def _capped(problems: list[str], source: str, limit: int) -> list[str]:
    if len(problems) <= limit:
        return problems
    return [*problems[:limit], f"{source}: {len(problems) - limit} more problems not shown"]

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
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from moderator.core import policy_files
from moderator.core.policy_files import (
    clipped,
    compose_policy_yaml,
    construct_policy_value,
    described,
    read_policy_text,
    scan_policy_dir,
    shown_name,
)
from moderator.errors import PolicyError

# Prompt ensembling as in CLIP: each description is embedded through every template and averaged.
DEFAULT_TEMPLATES: tuple[str, ...] = ("{}", "a photo of {}.", "a picture of {}.")
POLICY_ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
MAX_TEXTS_PER_POLICY = 256
MAX_TEXT_CHARS = 500
MAX_TEMPLATES = 32
MAX_PROBLEMS_PER_FILE = 20  # a file of 100k unknown keys must not make a 20 MB message
MAX_PROBLEMS_PER_DIRECTORY = 100  # nor a directory of 100k stray files
MAX_SHOWN_CHARS = 80  # of a key or value quoted in a problem
REQUIRED_KEYS = ("title", "action", "threshold", "descriptions")
_E = TypeVar("_E", bound=enum.Enum)
POLICY_SUFFIXES = policy_files.POLICY_SUFFIXES  # the tools find policy files by it
_MAP_TAG = "tag:yaml.org,2002:map"
KNOWN_KEYS = frozenset(
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
    return parse_policy(policy_id, text, source=shown_name(path))


def parse_policy(policy_id: str, text: str, source: str) -> Policy:
    """Validate one policy document. Raises PolicyError naming `source`, key and line."""
    node = compose_policy_yaml(text, source)
    if not isinstance(node, yaml.MappingNode) or node.tag != _MAP_TAG:
        raise PolicyError([f"{source}: a policy must be a YAML mapping of keys to values"])
    reader = _Reader(source, _key_lines(node))
    data = reader.values(node)
    for duplicate in reader.duplicate_keys(node):
        reader.problem(duplicate, "key appears more than once")
    for key in sorted(set(reader.lines) - KNOWN_KEYS):
        reader.problem(key, f"unknown key (known keys: {', '.join(sorted(KNOWN_KEYS))})")
    for key in REQUIRED_KEYS:
        if key not in reader.lines:
            reader.problems.append(f"{source}: missing required key '{key}'")
    title = reader.string(data, "title", required=True)
    description = reader.string(data, "description", required=False)
    action = reader.choice(data, "action", Action, default=None)
    mode = reader.choice(data, "mode", Mode, default=Mode.ENFORCE)
    threshold = reader.threshold(data)
    descriptions = reader.texts(data, "descriptions", required=True)
    benign = reader.texts(data, "benign", required=False)
    templates = reader.templates(data)
    if reader.problems or action is None or mode is None or threshold is None:
        problems = _capped(reader.problems, source, MAX_PROBLEMS_PER_FILE)
        raise PolicyError(problems or [f"{source}: invalid policy"])
    content = {
        "id": policy_id,
        "title": title,
        "action": action.value,
        "mode": mode.value,
        "threshold": threshold,
        "descriptions": descriptions,
        "benign": benign,
        "templates": templates,
    }
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
    )


def _capped(problems: list[str], source: str, limit: int) -> list[str]:
    if len(problems) <= limit:
        return problems
    return [*problems[:limit], f"{source}: {len(problems) - limit} more problems not shown"]


def _shown(value: object) -> str:
    """A value as a problem quotes it: its repr, cut short."""
    try:
        text = repr(value)
    except Exception:  # a repr that cannot be made (an int too long to print, ...)
        text = f"<{type(value).__name__}>"
    return clipped(text, MAX_SHOWN_CHARS)


def _key_lines(node: yaml.MappingNode) -> dict[str, int]:
    lines: dict[str, int] = {}
    for key_node, _ in node.value:
        if isinstance(key_node, yaml.ScalarNode):
            lines.setdefault(str(key_node.value), key_node.start_mark.line + 1)
    return lines


class _Reader:
    """Reads typed values out of a parsed policy, collecting every problem on the way."""

    def __init__(self, source: str, lines: dict[str, int]) -> None:
        self.source = source
        self.lines = lines
        self.problems: list[str] = []

    def problem(self, key: str, message: str) -> None:
        line = self.lines.get(key)
        where = f"{self.source}:{line}" if line else self.source
        self.problems.append(f"{where}: key '{clipped(key, MAX_SHOWN_CHARS)}': {message}")

    def values(self, node: yaml.MappingNode) -> dict[str, Any]:
        """The value of each known key (the first, if repeated), built one key at a time."""
        data: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                mark = key_node.start_mark
                where = f"{self.source}:{mark.line + 1}:{mark.column + 1}"
                self.problems.append(f"{where}: keys must be plain names, not lists or mappings")
                continue
            key = str(key_node.value)
            if key not in KNOWN_KEYS or key in data:
                continue
            try:
                data[key] = construct_policy_value(value_node, self.source, key)
            except PolicyError as exc:
                self.problems.extend(exc.problems)
        return data

    def duplicate_keys(self, node: yaml.MappingNode) -> list[str]:
        seen: set[str] = set()
        duplicates = []
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            key = str(key_node.value)
            if key in seen:
                duplicates.append(key)
            seen.add(key)
        return duplicates

    def string(self, data: dict[str, Any], key: str, required: bool) -> str:
        value = data.get(key)
        if value is None:
            return ""
        if not isinstance(value, str) or (required and not value.strip()):
            self.problem(key, "must be a non-empty string")
            return ""
        return value.strip()

    def choice(
        self, data: dict[str, Any], key: str, kind: type[_E], default: _E | None
    ) -> _E | None:
        if key not in data:
            return default
        value = data[key]
        allowed = [member.value for member in kind]
        if value not in allowed:
            self.problem(key, f"must be one of {' | '.join(allowed)}, got {_shown(value)}")
            return None
        return kind(value)

    def threshold(self, data: dict[str, Any]) -> float | None:
        if "threshold" not in data:
            return None
        value = data["threshold"]
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            self.problem("threshold", f"must be a number, got {_shown(value)}")
            return None
        if not -2.0 <= value <= 2.0:
            self.problem(
                "threshold", f"must be between -2 and 2 (a cosine score), got {_shown(value)}"
            )
            return None
        return float(value)

    def texts(self, data: dict[str, Any], key: str, required: bool) -> tuple[str, ...]:
        if key not in data:
            return ()
        value = data[key]
        if not isinstance(value, list) or (required and not value):
            self.problem(key, "must be a non-empty list of strings")
            return ()
        if len(value) > MAX_TEXTS_PER_POLICY:
            self.problem(
                key, f"has {len(value)} entries, at most {MAX_TEXTS_PER_POLICY} are allowed"
            )
            return ()
        texts: list[str] = []
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item.strip():
                self.problem(key, f"entry {i + 1} must be a non-empty string, got {_shown(item)}")
            elif len(item) > MAX_TEXT_CHARS:
                self.problem(key, f"entry {i + 1} is longer than {MAX_TEXT_CHARS} characters")
            else:
                texts.append(" ".join(item.split()))
        return tuple(texts)

    def templates(self, data: dict[str, Any]) -> tuple[str, ...]:
        value = data.get("templates", "default")
        if value == "default":
            return DEFAULT_TEMPLATES
        if not isinstance(value, list) or not value:
            self.problem(
                "templates", "must be 'default' or a non-empty list of strings with one {}"
            )
            return ()
        if len(value) > MAX_TEMPLATES:
            self.problem("templates", f"at most {MAX_TEMPLATES} templates are allowed")
            return ()
        templates: list[str] = []
        for i, item in enumerate(value):
            if not isinstance(item, str) or item.count("{}") != 1 or _has_other_braces(item):
                self.problem(
                    "templates", f"entry {i + 1} must contain exactly one {{}}, got {_shown(item)}"
                )
            else:
                templates.append(item)
        return tuple(templates)


def _has_other_braces(template: str) -> bool:
    return "{" in template.replace("{}", "") or "}" in template.replace("{}", "")

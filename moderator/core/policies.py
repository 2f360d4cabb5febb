"""Policies: YAML files written by trust-and-safety teams, validated into a PolicySet.

One file per policy; the file name (without .yaml/.yml) is the policy id. Every problem is
reported with its file, key and line, and all problems of a directory are reported at once.
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

from moderator.errors import PolicyError

# Prompt ensembling as in CLIP: each description is embedded through every template and averaged.
DEFAULT_TEMPLATES: tuple[str, ...] = ("{}", "a photo of {}.", "a picture of {}.")
POLICY_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
POLICY_SUFFIXES = (".yaml", ".yml")
MAX_TEXTS_PER_POLICY = 256
MAX_TEXT_CHARS = 500
MAX_TEMPLATES = 32
REQUIRED_KEYS = ("title", "action", "threshold", "descriptions")
_E = TypeVar("_E", bound=enum.Enum)
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

    Raises PolicyError listing every problem found, not just the first.
    """
    if not directory.is_dir():
        raise PolicyError([f"{directory}: policy directory does not exist"])
    files = policy_files(directory)
    if not files:
        raise PolicyError([f"{directory}: no policy files (*.yaml or *.yml)"])
    problems: list[str] = []
    policies: dict[str, Policy] = {}
    sources: dict[str, Path] = {}
    for path in files:
        try:
            policy = parse_policy_file(path)
        except PolicyError as exc:
            problems.extend(exc.problems)
            continue
        if policy.id in policies:
            problems.append(
                f"{path.name}: duplicate policy id '{policy.id}' (also {sources[policy.id].name})"
            )
            continue
        policies[policy.id] = policy
        sources[policy.id] = path
    if problems:
        raise PolicyError(problems)
    policy_set = build_policy_set(policies.values())
    if not policy_set.policies:
        raise PolicyError([f"{directory}: no active policies (every policy is disabled)"])
    return policy_set


def policy_files(directory: Path) -> list[Path]:
    """The policy files of `directory`, in name order (hidden files are not policies)."""
    return sorted(
        p for p in directory.iterdir() if p.suffix in POLICY_SUFFIXES and not p.name.startswith(".")
    )


def directory_fingerprint(directory: Path) -> str:
    """A hash of every policy file's name and bytes; '' when the directory cannot be read.

    It follows content, not mtimes, so it works the same on a local directory, a network mount
    and a Kubernetes ConfigMap (where an update swaps the `..data` link).
    """
    digest = hashlib.sha256()
    try:
        for path in policy_files(directory):
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    except OSError:
        return ""
    return digest.hexdigest()


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


def parse_policy_file(path: Path) -> Policy:
    policy_id = path.stem
    if not POLICY_ID_PATTERN.match(policy_id):
        raise PolicyError(
            [
                f"{path.name}: file name must be a policy id: lowercase letters, digits, "
                "'_' or '-', at most 64 characters"
            ]
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError([f"{path.name}: cannot read: {exc}"]) from exc
    return parse_policy(policy_id, text, source=path.name)


def parse_policy(policy_id: str, text: str, source: str) -> Policy:
    """Validate one policy document. Raises PolicyError naming `source`, key and line."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyError([f"{source}: not valid YAML: {exc}".replace("\n", " ")]) from exc
    if not isinstance(data, dict) or not isinstance(node, yaml.MappingNode):
        raise PolicyError([f"{source}: a policy must be a YAML mapping of keys to values"])
    reader = _Reader(source, _key_lines(node))
    for duplicate in reader.duplicate_keys(node):
        reader.problem(duplicate, "key appears more than once")
    for key in sorted(set(map(str, data)) - KNOWN_KEYS):
        reader.problem(key, f"unknown key (known keys: {', '.join(sorted(KNOWN_KEYS))})")
    for key in REQUIRED_KEYS:
        if key not in data:
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
        raise PolicyError(reader.problems or [f"{source}: invalid policy"])
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


def _key_lines(node: yaml.MappingNode) -> dict[str, int]:
    lines: dict[str, int] = {}
    for key_node, _ in node.value:
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
        self.problems.append(f"{where}: key '{key}': {message}")

    def duplicate_keys(self, node: yaml.MappingNode) -> list[str]:
        seen: set[str] = set()
        duplicates = []
        for key_node, _ in node.value:
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
            self.problem(key, f"must be one of {' | '.join(allowed)}, got {value!r}")
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
            self.problem("threshold", f"must be a number, got {value!r}")
            return None
        if not -2.0 <= value <= 2.0:
            self.problem("threshold", f"must be between -2 and 2 (a cosine score), got {value}")
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
                self.problem(key, f"entry {i + 1} must be a non-empty string, got {item!r}")
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
                    "templates", f"entry {i + 1} must contain exactly one {{}}, got {item!r}"
                )
            else:
                templates.append(item)
        return tuple(templates)


def _has_other_braces(template: str) -> bool:
    return "{" in template.replace("{}", "") or "}" in template.replace("{}", "")

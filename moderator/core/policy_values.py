"""Typed values out of a parsed policy document, every problem collected with its key and line
(policies.py gives them their meaning)."""

from __future__ import annotations

import enum
import math
from typing import Any, TypeVar

import yaml

from moderator.core.policy_files import clipped, construct_policy_value
from moderator.errors import PolicyError

# Prompt ensembling as in CLIP: each description is embedded through every template and averaged.
DEFAULT_TEMPLATES: tuple[str, ...] = ("{}", "a photo of {}.", "a picture of {}.")
MAX_TEXTS_PER_POLICY = 256
MAX_TEXT_CHARS = 500
MAX_TEMPLATES = 32
MAX_SHOWN_CHARS = 80  # of a key or value quoted in a problem
_E = TypeVar("_E", bound=enum.Enum)


def shown(value: object) -> str:
    """A value as a problem quotes it: its repr, cut short."""
    try:
        text = repr(value)
    except Exception:  # a repr that cannot be made (an int too long to print, ...)
        text = f"<{type(value).__name__}>"
    return clipped(text, MAX_SHOWN_CHARS)


def key_lines(node: yaml.MappingNode) -> dict[str, int]:
    lines: dict[str, int] = {}
    for key_node, _ in node.value:
        if isinstance(key_node, yaml.ScalarNode):
            lines.setdefault(str(key_node.value), key_node.start_mark.line + 1)
    return lines


class PolicyReader:
    """Reads typed values out of a parsed policy, collecting every problem on the way."""

    def __init__(self, source: str, lines: dict[str, int], known_keys: frozenset[str]) -> None:
        self.source = source
        self.lines = lines
        self.known_keys = known_keys
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
            if key not in self.known_keys or key in data:
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
            self.problem(key, f"must be one of {' | '.join(allowed)}, got {shown(value)}")
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
            self.problem("threshold", f"must be a number, got {shown(value)}")
            return None
        if not -2.0 <= value <= 2.0:
            self.problem(
                "threshold", f"must be between -2 and 2 (a cosine score), got {shown(value)}"
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
                self.problem(key, f"entry {i + 1} must be a non-empty string, got {shown(item)}")
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
                    "templates", f"entry {i + 1} must contain exactly one {{}}, got {shown(item)}"
                )
            else:
                templates.append(item)
        return tuple(templates)


def _has_other_braces(template: str) -> bool:
    return "{" in template.replace("{}", "") or "}" in template.replace("{}", "")

"""Editing thresholds in policy files: only the value changes, every other byte stays."""

from __future__ import annotations

from pathlib import Path

import yaml

from moderator.core.policies import POLICY_SUFFIXES, parse_policy
from moderator.errors import PolicyError
from moderator.tools.files import replaced_atomically, write_target


def policy_file(directory: Path, policy_id: str) -> Path:
    """The file that defines `policy_id` in `directory`."""
    for suffix in POLICY_SUFFIXES:
        path = directory / f"{policy_id}{suffix}"
        if path.is_file():
            return path
    raise PolicyError([f"{directory}: no file for policy '{policy_id}'"])


def format_threshold(value: float) -> str:
    """A threshold as YAML reads it back as a number: fixed-point, never an exponent."""
    text = f"{value:.9f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def write_thresholds(directory: Path, thresholds: dict[str, float]) -> dict[str, Path]:
    """Set policies' threshold values in their files; every other byte (comments, key order,
    quoting, line endings) stays as written.

    Every updated file is validated before any is replaced, so a failure changes nothing.
    Each file is then replaced atomically; a server watching the directory may reload between
    two of them. Returns each policy's file.
    """
    updates: dict[str, tuple[Path, str]] = {}
    for policy_id, threshold in sorted(thresholds.items()):
        path = write_target(policy_file(directory, policy_id))  # a safe link's target
        with path.open(encoding="utf-8", newline="") as handle:
            text = handle.read()
        updated = _with_threshold(text, threshold, path.name)
        parse_policy(policy_id, updated, source=path.name)
        updates[policy_id] = (path, updated)
    for path, updated in updates.values():
        with replaced_atomically(path) as out:
            out.write(updated)
    return {policy_id: path for policy_id, (path, _) in updates.items()}


def _with_threshold(text: str, threshold: float, source: str) -> str:
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    values = [v for k, v in node.value if k.value == "threshold"] if node else []
    if len(values) != 1:
        raise PolicyError([f"{source}: expected one 'threshold' key to update"])
    start, end = values[0].start_mark.index, values[0].end_mark.index
    return f"{text[:start]}{format_threshold(threshold)}{text[end:]}"

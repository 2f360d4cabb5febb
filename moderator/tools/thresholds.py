"""Editing thresholds in policy files: only the value changes, every other byte stays."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from moderator.core.known_content import Location
from moderator.core.policies import POLICY_SUFFIXES, parse_policy
from moderator.errors import PolicyError
from moderator.tools.files import replaced_atomically, write_target

WRITABLE_KEYS = ("threshold", "example_threshold")


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


def write_thresholds(
    directory: Path, thresholds: dict[tuple[str, str], float]
) -> dict[tuple[str, str], Path]:
    """Set policies' threshold values in their files, keyed by (policy id, key): `threshold`
    or `example_threshold` (added at the end when the file leaves it at its default). Every
    other byte (comments, key order, quoting, line endings) stays as written.

    Every updated file is validated before any is replaced, so a failure changes nothing.
    Each file is then replaced atomically; a server watching the directory may reload between
    two of them. Returns each change's file.
    """
    root = os.path.realpath(directory)
    texts: dict[str, tuple[Path, str]] = {}
    for (policy_id, key), threshold in sorted(thresholds.items()):
        if policy_id not in texts:
            path = write_target(policy_file(directory, policy_id))  # a safe link's target
            with path.open(encoding="utf-8", newline="") as handle:
                texts[policy_id] = (path, handle.read())
        path, text = texts[policy_id]
        texts[policy_id] = (path, _with_value(text, key, threshold, path.name))
    for policy_id, (path, updated) in texts.items():
        parse_policy(policy_id, updated, path.name, Location(path.parent, root))
    for path, updated in texts.values():
        with replaced_atomically(path) as out:
            out.write(updated)
    return {(pid, key): texts[pid][0] for pid, key in thresholds}


def _with_value(text: str, key: str, threshold: float, source: str) -> str:
    if key not in WRITABLE_KEYS:
        raise PolicyError([f"{source}: '{key}' is not a threshold"])
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    values = [v for k, v in node.value if k.value == key] if node else []
    if not values and key != "threshold":
        indented = node is None or bool(node.start_mark.column)
        block = isinstance(node, yaml.MappingNode) and not node.flow_style
        if not block or indented or "\n..." in text:  # appended, the key would not parse
            raise PolicyError(
                [
                    f"{source}: cannot add '{key}' to a file laid out like this one; add "
                    f"'{key}: {format_threshold(threshold)}' to it by hand"
                ]
            )
        newline = "\r\n" if "\r\n" in text else "\n"
        ending = "" if not text or text.endswith(("\n", "\r")) else newline
        return f"{text}{ending}{key}: {format_threshold(threshold)}{newline}"
    if len(values) != 1:
        raise PolicyError([f"{source}: expected one '{key}' key to update"])
    start, end = values[0].start_mark.index, values[0].end_mark.index
    return f"{text[:start]}{format_threshold(threshold)}{text[end:]}"

"""Known content in a policy: example images and hash lists, as policy files name them.

```yaml
examples: [examples/weapons/]      # files or folders, relative to the policy file
example_threshold: 0.90            # cosine similarity between image embeddings
allow_examples: [allow/weapons/]   # known false positives
allow_threshold: 0.95
hash_lists: [lists/known-bad.csv]  # PDQ: 64 hex digits a line, an optional id after a comma
pdq_max_distance: 31               # Hamming distance
sha256_lists: [lists/exact.csv]    # SHA-256 of the file's bytes, same layout
```

Every file must lie inside the policy directory (links are resolved first) and be a regular
file; a folder contributes its image files (by suffix, not recursing). Counts, sizes and the
bytes read per policy are bounded, and every problem names the file and line. An example is
kept as its name and content digest: core/embeddings.py reads it again to embed it (or finds its
embedding cached) and refuses it if its digest changed in between.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moderator.core.pdq import PDQ_BITS, hash_rows
from moderator.core.policy_files import clipped, read_referenced_bytes
from moderator.errors import PolicyError

KNOWN_CONTENT_KEYS = frozenset(
    {
        "examples",
        "example_threshold",
        "allow_examples",
        "allow_threshold",
        "hash_lists",
        "pdq_max_distance",
        "sha256_lists",
    }
)
DEFAULT_EXAMPLE_THRESHOLD = 0.90
DEFAULT_ALLOW_THRESHOLD = 0.95
DEFAULT_PDQ_MAX_DISTANCE = 31  # the PDQ authors' recommended match threshold
MAX_EXAMPLES_PER_KEY = 256
MAX_EXAMPLE_BYTES = 20 * 1024 * 1024
MAX_EXAMPLE_BYTES_PER_POLICY = 256 * 1024 * 1024
MAX_LISTS_PER_KEY = 16
MAX_HASH_LIST_BYTES = 64 * 1024 * 1024
MAX_HASH_ENTRIES_PER_POLICY = 1_000_000
MAX_ENTRY_ID_CHARS = 128
MAX_LIST_PROBLEMS = 10
MAX_LIST_LINES = 2_000_000  # comments and blank lines included
# Control, format and separator characters: an id from an outside party reaches terminals
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff]")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
_HEX_DIGITS = frozenset("0123456789abcdef")
_FILE_KEYS = frozenset({"examples", "allow_examples", "hash_lists", "sha256_lists"})
# A setting, and the keys it needs one of: alone it would be silently without effect.
_NEEDS = {
    "example_threshold": frozenset({"examples"}),
    "allow_threshold": frozenset({"allow_examples"}),
    "allow_examples": frozenset({"descriptions", "examples"}),
    "pdq_max_distance": frozenset({"hash_lists"}),
}

Problem = Callable[[str, str], None]  # (key, message)


@dataclass(frozen=True)
class ExampleImage:
    name: str  # its path relative to the policy directory, as results name it
    path: str  # resolved
    sha256: str  # of its bytes when the policy was read


@dataclass(frozen=True, eq=False)  # compared by identity: holds arrays
class HashList:
    """One list file: its hashes (PDQ: rows for core.pdq.distances; SHA-256: hex) and each
    entry's name as results report it (`<list>:<id>`, or `<list>:<hash>` without an id)."""

    name: str
    digest: str  # SHA-256 of the file's bytes
    rows: np.ndarray  # PDQ: core.pdq.hash_rows, uint64 [4, N]; SHA-256: empty
    hexes: tuple[str, ...]
    entries: tuple[str, ...]


@dataclass(frozen=True)
class KnownContent:
    examples: tuple[ExampleImage, ...] = ()
    example_threshold: float = DEFAULT_EXAMPLE_THRESHOLD
    allow_examples: tuple[ExampleImage, ...] = ()
    allow_threshold: float = DEFAULT_ALLOW_THRESHOLD
    hash_lists: tuple[HashList, ...] = ()
    pdq_max_distance: int = DEFAULT_PDQ_MAX_DISTANCE
    sha256_lists: tuple[HashList, ...] = ()

    def versioned(self) -> dict[str, Any]:
        """What of it a policy's version covers: every file by content, every threshold."""
        return {
            "examples": [(e.name, e.sha256) for e in self.examples],
            "example_threshold": self.example_threshold,
            "allow_examples": [(e.name, e.sha256) for e in self.allow_examples],
            "allow_threshold": self.allow_threshold,
            "hash_lists": [(h.name, h.digest) for h in self.hash_lists],
            "pdq_max_distance": self.pdq_max_distance,
            "sha256_lists": [(h.name, h.digest) for h in self.sha256_lists],
        }

    @property
    def hash_count(self) -> int:
        return sum(len(h.entries) for h in (*self.hash_lists, *self.sha256_lists))


NO_KNOWN_CONTENT = KnownContent()


@dataclass(frozen=True)
class Location:
    """Where a policy's files are: `base` its folder, `root` the policy directory (real)."""

    base: Path
    root: str


def read_known_content(
    data: dict[str, Any], location: Location | None, problem: Problem
) -> KnownContent:
    """The known-content keys of a parsed policy; each problem goes to `problem(key, text)`."""
    if location is None:
        for key in sorted(_FILE_KEYS & data.keys()):
            problem(key, "names files: only a policy read from a file can have it")
    for setting, needs in _NEEDS.items():
        if setting in data and not needs & data.keys():
            problem(setting, f"applies to {' or '.join(sorted(needs))}, and this policy has none")
    budget = [MAX_EXAMPLE_BYTES_PER_POLICY]
    examples = _examples(data, "examples", location, problem, budget)
    allow = _examples(data, "allow_examples", location, problem, budget)
    entries = [MAX_HASH_ENTRIES_PER_POLICY]
    return KnownContent(
        examples=examples,
        example_threshold=_similarity(
            data, "example_threshold", DEFAULT_EXAMPLE_THRESHOLD, problem
        ),
        allow_examples=allow,
        allow_threshold=_similarity(data, "allow_threshold", DEFAULT_ALLOW_THRESHOLD, problem),
        hash_lists=_lists(data, "hash_lists", location, problem, entries),
        pdq_max_distance=_distance(data, problem),
        sha256_lists=_lists(data, "sha256_lists", location, problem, entries),
    )


def _similarity(data: dict[str, Any], key: str, default: float, problem: Problem) -> float:
    if key not in data:
        return default
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        problem(key, f"must be a number, got {clipped(repr(value), 80)}")
        return default
    if not -1.0 <= value <= 1.0:
        problem(key, f"must be between -1 and 1 (a cosine similarity), got {value}")
        return default
    return float(value)


def _distance(data: dict[str, Any], problem: Problem) -> int:
    value = data.get("pdq_max_distance", DEFAULT_PDQ_MAX_DISTANCE)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= PDQ_BITS:
        problem("pdq_max_distance", f"must be a whole number of bits, 0 to {PDQ_BITS}")
        return DEFAULT_PDQ_MAX_DISTANCE
    return value


def _names(data: dict[str, Any], key: str, most: int, problem: Problem) -> list[str]:
    if key not in data:
        return []
    value = data[key]
    if not isinstance(value, list) or not value:
        problem(key, "must be a non-empty list of file or folder names")
        return []
    if len(value) > most:
        problem(key, f"has {len(value)} entries, at most {most} are allowed")
        return []
    names = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip() or "\0" in item:
            problem(key, f"entry {i + 1} must be a file or folder name")
        else:
            names.append(item.strip())
    return names


def _examples(
    data: dict[str, Any],
    key: str,
    location: Location | None,
    problem: Problem,
    budget: list[int],
) -> tuple[ExampleImage, ...]:
    if location is None:
        return ()
    found: dict[str, ExampleImage] = {}
    for entry in _names(data, key, MAX_EXAMPLES_PER_KEY, problem):
        try:
            paths = _expand(location, entry)
        except PolicyError as exc:
            problem(key, "; ".join(exc.problems))
            continue
        for path in paths:
            name = _shown_as(path, location)
            if name in found:
                continue
            if len(found) >= MAX_EXAMPLES_PER_KEY:
                problem(key, f"names more than {MAX_EXAMPLES_PER_KEY} images")
                return tuple(found.values())
            try:
                data_bytes = read_referenced_bytes(
                    path, location.root, name, MAX_EXAMPLE_BYTES, "an example image"
                )
            except PolicyError as exc:
                problem(key, "; ".join(exc.problems))
                continue
            budget[0] -= len(data_bytes)
            if budget[0] < 0:
                problem(key, f"the examples add up to over {MAX_EXAMPLE_BYTES_PER_POLICY} bytes")
                return tuple(found.values())
            digest = hashlib.sha256(data_bytes).hexdigest()
            found[name] = ExampleImage(name, os.path.realpath(path), digest)
    return tuple(found.values())


def _expand(location: Location, entry: str) -> list[Path]:
    """The files an entry names: itself, or a folder's image files in name order."""
    _refuse_hidden(entry)
    path = location.base / entry
    real = os.path.realpath(path)
    if os.path.commonpath([location.root, real]) != location.root:
        raise PolicyError([f"{clipped(entry, 200)}: lies outside the policy directory"])
    if not os.path.isdir(real):
        if not os.path.lexists(path):
            raise PolicyError([f"{clipped(entry, 200)}: no such file or folder"])
        return [path]
    try:
        with os.scandir(real) as listing:
            files = [
                path / item.name
                for item in listing
                if not item.name.startswith(".")
                and Path(item.name).suffix.lower() in IMAGE_SUFFIXES
                and not item.is_dir()
            ]
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise PolicyError([f"{clipped(entry, 200)}: cannot list the folder: {reason}"]) from exc
    if not files:
        raise PolicyError([f"{clipped(entry, 200)}: folder holds no image files"])
    return sorted(files, key=lambda p: p.name)


def _refuse_hidden(entry: str) -> None:
    """Hidden files and folders are not watched for changes (a ConfigMap's `..data` is one)."""
    if any(part.startswith(".") and part not in (".", "..") for part in Path(entry).parts):
        raise PolicyError([f"{clipped(entry, 200)}: a hidden file or folder; rename it"])


def _shown_as(path: Path, location: Location) -> str:
    """A file's name in results: its path from the policy file's folder as written, not as
    resolved (a ConfigMap update moves every file to a new `..<timestamp>` folder)."""
    return clipped(os.path.normpath(os.path.relpath(path, location.base)), 300)


def _lists(
    data: dict[str, Any],
    key: str,
    location: Location | None,
    problem: Problem,
    entries_left: list[int],
) -> tuple[HashList, ...]:
    if location is None:
        return ()
    lists = []
    for entry in _names(data, key, MAX_LISTS_PER_KEY, problem):
        path = location.base / entry
        name = _shown_as(path, location)
        try:
            _refuse_hidden(entry)
            text = read_referenced_bytes(
                path, location.root, name, MAX_HASH_LIST_BYTES, "a hash list"
            )
            hash_list = parse_hash_list(name, text, pdq=key == "hash_lists")
        except PolicyError as exc:
            problem(key, "; ".join(exc.problems))
            continue
        entries_left[0] -= len(hash_list.entries)
        if entries_left[0] < 0:
            problem(key, f"the lists add up to over {MAX_HASH_ENTRIES_PER_POLICY} entries")
            break
        lists.append(hash_list)
    return tuple(lists)


def parse_hash_list(name: str, data: bytes, *, pdq: bool) -> HashList:
    """A list file: one hash a line (64 hex digits, any case), optionally a comma and an id;
    blank lines and lines starting with # skipped. Raises PolicyError naming lines."""
    problems: list[str] = []
    hexes: list[str] = []
    entries: list[str] = []
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark (Excel, Notepad) is no hash
    except UnicodeDecodeError as exc:
        offset = exc.start + (3 if data.startswith(codecs.BOM_UTF8) else 0)  # in the file
        raise PolicyError([f"{name}: not UTF-8 text (offset {offset})"]) from exc
    for number, raw in enumerate(io.StringIO(text, newline=None), start=1):  # lazily, \n only
        if number > MAX_LIST_LINES:
            problems.append(f"{name}: over {MAX_LIST_LINES} lines")
            break
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        digits, _, entry_id = line.partition(",")
        digits, entry_id = digits.strip().lower(), entry_id.strip()
        if len(digits) != 64 or not set(digits) <= _HEX_DIGITS:
            shown = clipped(digits, 80)
            problems.append(f"{name}:{number}: a hash must be 64 hex digits, got {shown!r}")
        elif len(entry_id) > MAX_ENTRY_ID_CHARS:
            problems.append(f"{name}:{number}: an id is at most {MAX_ENTRY_ID_CHARS} characters")
        elif _UNPRINTABLE.search(entry_id):
            problems.append(f"{name}:{number}: an id must not hold control characters")
        else:
            hexes.append(digits)
            entries.append(f"{name}:{entry_id or digits}")
        if len(problems) > MAX_LIST_PROBLEMS:
            problems[MAX_LIST_PROBLEMS:] = [f"{name}: more problems not shown"]
            break
        if len(hexes) > MAX_HASH_ENTRIES_PER_POLICY:
            problems.append(f"{name}: over {MAX_HASH_ENTRIES_PER_POLICY} entries")
            break
    if problems:
        raise PolicyError(problems)
    if not hexes:
        raise PolicyError([f"{name}: holds no hashes"])
    rows = hash_rows([bytes.fromhex(h) for h in hexes]) if pdq else np.zeros((4, 0), np.uint64)
    digest = hashlib.sha256(data).hexdigest()
    return HashList(name, digest, rows, tuple(hexes), tuple(entries))

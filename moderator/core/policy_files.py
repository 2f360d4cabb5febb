"""Reading policy files safely: which entries of a directory are policies, their bytes, their YAML.

Every non-hidden entry of the directory that is not a subdirectory (or a link to a directory
inside it, as a ConfigMap item with a nested `path:` makes) must be a policy file: a regular
file (or a link to one inside the directory, as a Kubernetes ConfigMap mount makes) whose name
ends in `.yaml` or `.yml`; subdirectories are never read into. Anything else is a problem
naming the entry, never an exception, a hang or an unbounded read: a FIFO is opened without
blocking, a device is never opened, and no file is read past MAX_POLICY_FILE_BYTES.

The YAML is composed with anchors and aliases refused and nesting capped before any node is
built, so no document expands or recurses deeply; every value that cannot be built is a
problem at its line. policies.py gives the nodes their meaning.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from moderator.errors import PolicyError

POLICY_SUFFIXES = (".yaml", ".yml")
MAX_POLICY_FILE_BYTES = 1 << 20  # 1 MiB: 256 descriptions of 500 characters fit in any script
MAX_NESTING_DEPTH = 16  # levels of lists and mappings; a policy needs 2
MAX_WATCHED_FILES = 100_000  # in the subfolders, where examples and hash lists are
MAX_WATCHED_DEPTH = 16  # folders below a subfolder (os.walk recurses: 1,000 levels crashed it)
MAX_NUMBER_CHARS = 64  # a threshold needs a dozen; int() of thousands of digits fails or crawls
_NUMBER_TAGS = frozenset({"tag:yaml.org,2002:int", "tag:yaml.org,2002:float"})
_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NONBLOCK", 0)  # a FIFO swapped in after the check must not hang the open
    | getattr(os, "O_NOFOLLOW", 0)  # the path is resolved: no link may appear at its end
    | getattr(os, "O_CLOEXEC", 0)
)


@dataclass(frozen=True)
class PolicyEntry:
    """One entry of a policy directory; `problem` says why it cannot be a policy ('' if none)."""

    path: Path
    problem: str = ""


def shown_name(path: Path) -> str:
    """The entry's name as problems show it: valid UTF-8, undecodable bytes escaped."""
    return path.name.encode("utf-8", "backslashreplace").decode("utf-8")


def scan_policy_dir(directory: Path) -> list[PolicyEntry]:
    """Every entry of `directory` that should be a policy file, in name order.

    Hidden entries (`.git`, a ConfigMap's `..data`), subdirectories and links to directories
    inside `directory` (a ConfigMap's `extra -> ..data/extra`) are skipped, never read into;
    other links are checked, not skipped. Raises OSError only when the directory itself cannot
    be listed.
    """
    root = os.path.realpath(directory)
    entries: list[PolicyEntry] = []
    with os.scandir(directory) as listing:
        for item in listing:
            if item.name.startswith(".") or _is_subdirectory(item, root):
                continue
            path = Path(item.path)
            entries.append(PolicyEntry(path, _entry_problem(path, root)))
    return sorted(entries, key=lambda entry: entry.path.name)


def _is_subdirectory(item: os.DirEntry[str], root: str) -> bool:
    """A directory, or a link that resolves to one inside `root` (the real path of the policy
    directory). A link to a directory outside, a dangling link or a loop is not: it is then
    checked, and reported, as an entry."""
    try:
        if not item.is_symlink():
            return item.is_dir(follow_symlinks=False)
        real = os.path.realpath(item.path)
        return _inside(root, real) and stat.S_ISDIR(os.stat(real).st_mode)  # stat: never opens
    except (OSError, ValueError):
        return False


def _inside(root: str, real: str) -> bool:
    """Whether the resolved path `real` is `root` or lies under it."""
    return os.path.commonpath([root, real]) == root


def _entry_problem(path: Path, root: str) -> str:
    try:
        problem = _target_problem(path, root)[1]
    except OSError as exc:
        return f"{shown_name(path)}: cannot read: {_reason(exc)}"
    if problem:
        return problem
    if not path.name.endswith(POLICY_SUFFIXES):
        return (
            f"{shown_name(path)}: policy files must end in .yaml or .yml (lower case); "
            "rename it, or move it out of the policy directory"
        )
    return ""


def _target_problem(path: Path, root: str | None) -> tuple[str, str]:
    """(the resolved path, why it is not a policy file or ''); raises OSError. With a `root`,
    the path must resolve inside it."""
    real = os.path.realpath(path)
    if root is not None and not _inside(root, real):
        return real, (
            f"{shown_name(path)}: links outside the policy directory (to {clipped(real, 200)}); "
            "only files inside it are read"
        )
    kind = _kind(os.stat(real).st_mode)  # stat, not open: a device is never opened
    if kind:
        verb = "links to" if path.is_symlink() else "is"
        return real, f"{shown_name(path)}: {verb} {kind}, not a regular file"
    return real, ""


def _kind(mode: int) -> str:
    """'' for a regular file, else what it is."""
    if stat.S_ISREG(mode):
        return ""
    kinds = {
        stat.S_ISDIR: "a directory",
        stat.S_ISFIFO: "a FIFO",
        stat.S_ISSOCK: "a socket",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
    }
    return next((name for test, name in kinds.items() if test(mode)), "a special file")


def read_policy_bytes(path: Path, directory: Path | None) -> bytes:
    """The bytes of the policy file at `path`, which must resolve inside `directory` (when
    one is given: a file named on its own may link anywhere).

    Raises PolicyError (naming the file) for anything but a regular file of at most
    MAX_POLICY_FILE_BYTES; never blocks and never reads more than that limit plus one byte.
    """
    try:
        root = None if directory is None else os.path.realpath(directory)
        real, problem = _target_problem(path, root)
        if problem:
            raise PolicyError([problem])
        return _read_capped(real, shown_name(path), MAX_POLICY_FILE_BYTES, "a policy file")
    except OSError as exc:
        raise PolicyError([f"{shown_name(path)}: cannot read: {_reason(exc)}"]) from exc


def read_referenced_bytes(path: Path, root: str, name: str, limit: int, what: str) -> bytes:
    """The bytes of a file a policy names (an example image, a hash list), which must resolve
    inside `root` (the policy directory's real path) and be a regular file of at most `limit`
    bytes. Raises PolicyError naming it as `name`; never blocks, never reads past the limit."""
    try:
        real = os.path.realpath(path)
        if not _inside(root, real):
            raise PolicyError([f"{name}: lies outside the policy directory, not read"])
        return _read_capped(real, name, limit, what)
    except OSError as exc:
        raise PolicyError([f"{name}: cannot read: {_reason(exc)}"]) from exc


def _read_capped(real: str, name: str, limit: int, what: str) -> bytes:
    too_large = f"{name}: larger than {limit} bytes ({limit / 1048576:g} MiB), the limit for {what}"
    fd = os.open(real, _OPEN_FLAGS)
    try:
        status = os.fstat(fd)  # what was opened, whatever the path pointed to when checked
        kind = _kind(status.st_mode)
        if kind:
            raise PolicyError([f"{name}: is {kind}, not a regular file"])
        if status.st_size > limit:
            raise PolicyError([too_large])
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:  # it grew since fstat
            raise PolicyError([too_large])
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_policy_text(path: Path, directory: Path | None) -> str:
    """The policy file as text; raises PolicyError for unreadable files and non-UTF-8 bytes."""
    data = read_policy_bytes(path, directory)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError(
            [
                f"{shown_name(path)}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                f"{exc.start}); save it as UTF-8"
            ]
        ) from exc


def directory_fingerprint(directory: Path) -> str:
    """A hash of every policy file's name and bytes; '' when the directory cannot be listed.

    It follows content, not mtimes, so it works the same on a local directory, a network mount
    and a Kubernetes ConfigMap (where an update swaps the `..data` link). The files in the
    subfolders (example images, hash lists: large, and many) count by their status instead. An
    entry that is not a readable policy file counts by its problem and its status, so fixing it
    changes the hash. It never raises for an entry, never blocks on one, and reads no file past
    the size limit.
    """
    try:
        entries = scan_policy_dir(directory)
    except OSError:
        return ""
    digest = hashlib.sha256()
    for entry in entries:
        digest.update(os.fsencode(entry.path.name) + b"\0")
        digest.update(hashlib.sha256(_fingerprinted(entry, directory)).digest())
    digest.update(_subfolder_status(directory))
    return digest.hexdigest()


def _subfolder_status(directory: Path) -> bytes:
    """Name, size, mtime and inode of the files in the subfolders, where policies keep their
    example images and hash lists: found without opening them, at most MAX_WATCHED_FILES."""
    root = os.path.realpath(directory)
    parts: list[object] = []
    try:
        tops = sorted(os.scandir(directory), key=lambda item: item.name)
    except OSError:
        return b""
    for top in tops:
        if top.name.startswith(".") or not _is_subdirectory(top, root):
            continue
        for folder, folders, files in os.walk(top.path):
            deep = folder.count(os.sep) - top.path.count(os.sep) >= MAX_WATCHED_DEPTH
            folders[:] = [] if deep else sorted(n for n in folders if not n.startswith("."))
            for name in sorted(files):
                path = os.path.join(folder, name)
                try:
                    status = os.stat(path)  # stat, not open: a FIFO never blocks here
                    parts.append((path, status.st_size, status.st_mtime_ns, status.st_ino))
                except OSError as exc:
                    parts.append((path, exc.errno))
                if len(parts) >= MAX_WATCHED_FILES:
                    return repr(parts).encode("utf-8", "backslashreplace")
    return repr(parts).encode("utf-8", "backslashreplace")


def _fingerprinted(entry: PolicyEntry, directory: Path) -> bytes:
    problem = entry.problem
    if not problem:
        try:
            return b"file\0" + read_policy_bytes(entry.path, directory)
        except PolicyError as exc:
            problem = "; ".join(exc.problems)
    return b"problem\0" + problem.encode("utf-8", "backslashreplace") + _status(entry.path)


def _status(path: Path) -> bytes:
    """What a bad entry is now (kind, size, mtime, inode, link target), found without opening."""
    parts: list[object] = []
    for follow in (False, True):
        try:
            status = os.stat(path, follow_symlinks=follow)
            parts += [status.st_mode, status.st_size, status.st_mtime_ns, status.st_ino]
        except OSError as exc:
            parts.append(exc.errno)
    try:
        parts.append(os.readlink(path))
    except OSError:
        parts.append(None)
    return repr(parts).encode("utf-8", "backslashreplace")


class _Refused(yaml.MarkedYAMLError):
    """YAML that is valid but not allowed in a policy, or a value that cannot be built."""

    def __init__(self, problem: str, mark: Any) -> None:  # the C and Python marks alike
        super().__init__(problem=problem, problem_mark=mark)


class _PolicyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses anchors, aliases and deep nesting while composing, before any
    node is built, refuses overlong numbers, and turns any value that cannot be constructed
    into an error at its line."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]  # untyped in the stubs
        if isinstance(event, yaml.AliasEvent):
            message = f"YAML aliases (*{clipped(str(event.anchor), 40)}) are not allowed"
            raise _Refused(f"{message}: write the value out", event.start_mark)
        if getattr(event, "anchor", None) is not None:
            message = f"YAML anchors (&{clipped(str(event.anchor), 40)}) are not allowed"
            raise _Refused(f"{message}: write the value out where it is used", event.start_mark)
        if not isinstance(event, yaml.CollectionStartEvent):
            return super().compose_node(parent, index)
        if self._depth >= MAX_NESTING_DEPTH:
            message = f"nested deeper than {MAX_NESTING_DEPTH} levels of lists and mappings"
            raise _Refused(message, event.start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        if node.tag in _NUMBER_TAGS and len(node.value) > MAX_NUMBER_CHARS:
            message = f"a number longer than {MAX_NUMBER_CHARS} characters cannot be read"
            raise _Refused(message, node.start_mark)
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except Exception as exc:  # int digit limits, impossible dates, out of memory, ...
            raise _Refused(f"cannot be read: {described(exc)}", node.start_mark) from exc


def compose_policy_yaml(text: str, source: str) -> yaml.Node | None:
    """The node tree of one YAML document (None if empty); raises PolicyError naming `source`
    and line:column for invalid YAML, anchors, aliases and nesting past MAX_NESTING_DEPTH."""
    try:
        return _composed(text)
    except _Refused as exc:
        raise PolicyError([f"{source}{_at(exc.problem_mark)}: {exc.problem}"]) from exc
    except yaml.MarkedYAMLError as exc:
        reason = ", ".join(filter(None, (exc.context, exc.problem)))
        where = _at(exc.problem_mark or exc.context_mark)
        raise PolicyError([f"{source}{where}: not valid YAML: {clipped(reason)}"]) from exc
    except yaml.YAMLError as exc:  # a character YAML does not allow, for one
        reason = clipped(" ".join(str(exc).split()))
        raise PolicyError([f"{source}: not valid YAML: {reason}"]) from exc


def _composed(text: str) -> yaml.Node | None:
    loader = _PolicyLoader(text)  # raises ReaderError for characters YAML does not allow
    try:
        return loader.get_single_node()
    finally:
        loader.dispose()


def construct_policy_value(node: yaml.Node, source: str, key: str) -> Any:
    """The Python value of the node under `key`; raises PolicyError naming `source`, the key
    and the line:column of the part that cannot be built (a number too long, a bad date)."""
    loader = _PolicyLoader("")
    try:
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        where = _at(exc.problem_mark or node.start_mark)
        reason = exc.problem if isinstance(exc, _Refused) else f"cannot be read: {exc.problem}"
        raise PolicyError([f"{source}{where}: key '{clipped(key, 80)}': {reason}"]) from exc
    except Exception as exc:  # a safety net: nothing but PolicyError leaves here
        reason = f"cannot be read: {described(exc)}"
        where = _at(node.start_mark)
        raise PolicyError([f"{source}{where}: key '{clipped(key, 80)}': {reason}"]) from exc
    finally:
        loader.dispose()


def described(exc: BaseException) -> str:
    """An exception as a problem shows it: its type and text, cut short."""
    try:
        return clipped(f"{type(exc).__name__}: {exc}")
    except Exception:  # an exception whose text cannot be made
        return type(exc).__name__


def clipped(text: str, limit: int = 300) -> str:
    """`text` cut to `limit` characters, as valid UTF-8 (undecodable bytes escaped)."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _at(mark: yaml.Mark | None) -> str:
    return f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__

"""Writing the files the tools produce: through links only where that is safe, and replacing a
file so readers see the old content or the new one, never a part."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from moderator.errors import ConfigError

MAX_LINK_HOPS = 40


def write_target(path: Path) -> Path:
    """The file writing `path` should replace: `path` with its links resolved component by
    component as the kernel resolves them, each link followed only if the caller (or root)
    owns it and its directory is not a shared sticky one (/tmp). Replacing a link's target
    resolved by hand bypasses the kernel's protection of such links: another user could
    plant /tmp/out.jsonl -> ~/.bashrc (or /tmp/dir -> ~) and have a file of ours replaced.
    What is not a regular file once resolved (/dev/stdout, a pipe) is opened as named."""
    parts = list(Path(os.getcwd(), path).parts)
    resolved, hops = Path(parts.pop(0)), 0
    while parts:
        part = parts.pop(0)
        if part in (".", ""):
            continue
        if part == "..":
            resolved = resolved.parent
            continue
        candidate = resolved / part
        try:
            info = os.lstat(candidate)
        except OSError:  # not there (yet): what follows is created or fails as named
            resolved = candidate
            continue
        if not stat.S_ISLNK(info.st_mode):
            resolved = candidate
            continue
        hops += 1
        if hops > MAX_LINK_HOPS:
            raise ConfigError(f"{path}: more than {MAX_LINK_HOPS} links, refused")
        _refuse_unsafe_link(candidate, info)
        target = Path(os.readlink(candidate))
        if target.is_absolute():
            resolved = Path(target.anchor)
        parts = list(target.parts[1:] if target.is_absolute() else target.parts) + parts
    return resolved if _regular_or_absent(path) else Path(path)


def _regular_or_absent(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return True


def _refuse_unsafe_link(link: Path, info: os.stat_result) -> None:
    """Root's links are the system's (/dev/stdout, a ConfigMap's ..data): trusted like root
    itself, except in a shared sticky directory, where no link is followed."""
    if info.st_uid not in (os.geteuid(), 0):
        raise ConfigError(
            f"{link} is a link owned by another user (uid {info.st_uid}): not followed; "
            "write to its target path instead"
        )
    folder = os.stat(link.parent)
    shared = folder.st_mode & stat.S_ISVTX and folder.st_mode & stat.S_IWOTH
    if shared:
        raise ConfigError(
            f"{link} is a link in a shared sticky directory ({link.parent}): not followed; "
            "write to its target path instead"
        )


@contextlib.contextmanager
def written_on_success(path: Path) -> Iterator[TextIO]:
    """A file to write `path` through (links followed only where safe: write_target): a
    regular file appears only if the block completes; anything else (/dev/stdout, a pipe) is
    written directly."""
    target = write_target(path)
    if target.exists() and not target.is_file():
        with target.open("w", encoding="utf-8") as out:
            yield out
        return
    with replaced_atomically(target) as out:
        yield out


@contextlib.contextmanager
def replaced_atomically(path: Path) -> Iterator[TextIO]:
    """A text file to write `path` through: a temporary file beside it, fsynced and renamed
    over `path` only if the block completes (and removed if it does not). Newlines are written
    as given; an existing file's permissions are kept, a new one gets the umask's."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise

"""Watches the policy directory and asks for a reload when its content changes.

Polling the content (not inotify, not mtimes) works the same on a local directory, a network
mount and a Kubernetes ConfigMap mount, where an update swaps the `..data` symlink and every
policy file changes at once, possibly keeping its mtime.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from moderator.policies import POLICY_SUFFIXES

log = logging.getLogger(__name__)


def fingerprint(directory: Path) -> str:
    """A hash of every policy file's name and bytes; '' when the directory cannot be read."""
    digest = hashlib.sha256()
    try:
        paths = sorted(
            p
            for p in directory.iterdir()
            if p.suffix in POLICY_SUFFIXES and not p.name.startswith(".")
        )
        for path in paths:
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    except OSError:
        return ""
    return digest.hexdigest()


class PolicyWatcher:
    """Calls `reload` whenever the directory's fingerprint differs from the last one seen."""

    def __init__(
        self, directory: Path, interval: float, reload: Callable[[], Awaitable[object]]
    ) -> None:
        self.directory = directory
        self.interval = interval
        self._reload = reload
        self._seen = fingerprint(directory)

    async def check(self) -> bool:
        """Reload if the content changed since the last check. True if it reloaded."""
        current = await asyncio.to_thread(fingerprint, self.directory)
        if current == self._seen:
            return False
        self._seen = current
        log.info("policy directory %s changed: reloading", self.directory)
        await self._reload()
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check()
            except Exception:  # a watcher that dies silently is worse than a noisy one
                log.exception("policy watcher check failed")

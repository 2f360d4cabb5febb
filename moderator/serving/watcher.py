"""Watches the policy directory and asks for a reload when its content changes.

Polling the content (not inotify, not mtimes) works the same on a local directory, a network
mount and a Kubernetes ConfigMap mount, where an update swaps the `..data` symlink and every
policy file changes at once, possibly keeping its mtime.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from moderator.core.policy_files import directory_fingerprint

log = logging.getLogger(__name__)


class PolicyWatcher:
    """Calls `reload` whenever the directory's fingerprint differs from the last one seen.

    A reload that fails validation still counts as seen (it is reported, and retried when the
    directory changes again: the fix); a reload that raises is retried at the next check."""

    def __init__(
        self, directory: Path, interval: float, reload: Callable[[], Awaitable[object]]
    ) -> None:
        self.directory = directory
        self.interval = interval
        self._reload = reload
        self._seen = directory_fingerprint(directory)

    async def check(self) -> bool:
        """Reload if the content changed since the last check. True if it reloaded."""
        current = await asyncio.to_thread(directory_fingerprint, self.directory)
        if current == self._seen:
            return False
        previous, self._seen = self._seen, current
        log.info("policy directory %s changed: reloading", self.directory)
        try:
            await self._reload()
        except BaseException:
            self._seen = previous  # nothing was recorded: try again at the next check
            raise
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check()
            except Exception:  # a watcher that dies silently is worse than a noisy one
                log.exception("policy watcher check failed")

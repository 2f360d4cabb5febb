"""Policy reloads: validate the directory, swap in the new set, keep the old one on failure.

Reloads are single-flight. A caller that arrives while a reload runs waits for it and gets
its result, unless the directory changed after that reload read it: then the caller waits for
one more reload (shared with every other such caller), so no edit is ever reported as loaded
when it was not. The RPC, SIGHUP and the watcher all come here.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

from moderator.core.policies import PolicySet, ReloadStatus, load_policy_dir
from moderator.core.policy_files import described, directory_fingerprint
from moderator.errors import PolicyError
from moderator.serving.metrics import Metrics

log = logging.getLogger(__name__)

# (status, fingerprint of the directory as that reload found it); a thread-safe future, so
# callers on any event loop (or none) can share one reload
_Flight = Future[tuple[ReloadStatus, str]]


class PolicyReloader:
    def __init__(
        self,
        directory: Path,
        current: Callable[[], PolicySet],
        install: Callable[[PolicySet], ReloadStatus],
        metrics: Metrics,
    ) -> None:
        """`current` returns the running set (raising NotReady before the first load);
        `install` embeds a validated set and swaps it in (blocking)."""
        self.directory = directory
        self._current = current
        self._install = install
        self._metrics = metrics
        self._lock = threading.Lock()  # one reload at a time, whoever asks
        self._flights = threading.Lock()  # guards _flight
        self._flight: _Flight | None = None
        self.last = ReloadStatus(ok=False, message="not loaded yet", unix_time=0.0)

    async def reload(self) -> ReloadStatus:
        """Reload off the event loop, sharing a reload already in progress (see module doc).

        A caller that gives up (cancelled) leaves the reload running for the others."""
        flight = self._in_progress()
        if flight is not None:
            status, seen = await asyncio.shield(asyncio.wrap_future(flight))
            if await asyncio.to_thread(directory_fingerprint, self.directory) == seen:
                return status
        # A reload that started after this call sees every edit made before it.
        return (await asyncio.shield(asyncio.wrap_future(self._joined_or_started())))[0]

    def _in_progress(self) -> _Flight | None:
        with self._flights:
            flight = self._flight
        return None if flight is None or flight.done() else flight

    def _joined_or_started(self) -> _Flight:
        with self._flights:
            if self._flight is None or self._flight.done():
                self._flight = Future()
                threading.Thread(
                    target=self._fly, args=(self._flight,), name="policy-reload", daemon=True
                ).start()
            return self._flight

    def _fly(self, flight: _Flight) -> None:
        try:
            flight.set_result(self.reload_blocking())
        except BaseException as exc:  # NotReady, or anything else: every waiter gets it
            flight.set_exception(exc)

    def reload_blocking(self) -> tuple[ReloadStatus, str]:
        """One reload, now: (its status, the directory's fingerprint before it was read).

        Requests in flight finish on the set they started with. A directory that fails
        validation, or a set that cannot be embedded, leaves the running set in place; the
        failure is returned, kept in `last`, logged and counted. Only NotReady (nothing is
        running yet) is raised.
        """
        with self._lock:
            running = self._current()
            seen = directory_fingerprint(self.directory)
            try:
                policy_set = load_policy_dir(self.directory)
            except PolicyError as exc:
                return self._failed(running, exc), seen
            except Exception as exc:  # load_policy_dir reports problems only; if not, still fail
                log.exception("loading the policy directory failed unexpectedly")
                error = PolicyError([f"{self.directory}: cannot be loaded: {described(exc)}"])
                return self._failed(running, error), seen
            if policy_set.version == running.version:
                message = f"policies unchanged (version {policy_set.version})"
                self._metrics.policy_last_reload_success.set(1)
                self.last = ReloadStatus(ok=True, message=message, unix_time=time.time())
                return self.last, seen
            try:
                self.last = self._install(policy_set)
            except PolicyError as exc:  # an example image that cannot be used
                return self._failed(running, exc), seen
            except Exception as exc:  # encoding failed (out of memory, ...): keep serving
                log.exception("embedding the new policy set failed")
                error = PolicyError([f"embedding the policies failed: {exc}"])
                return self._failed(running, error), seen
            return self.last, seen

    def _failed(self, running: PolicySet, error: PolicyError) -> ReloadStatus:
        message = f"reload failed, still serving version {running.version}: " + "; ".join(
            error.problems
        )
        log.error(message)
        self._metrics.policy_reloads.labels(result="error").inc()
        self._metrics.policy_last_reload_success.set(0)
        self.last = ReloadStatus(ok=False, message=message, unix_time=time.time())
        return self.last

"""Health that tells the truth: SERVING only while the service accepts work and its model works.

The monitor polls the model worker: after `max_failed_batches` forward passes failed in a row
(a broken device, out of memory), or while one forward pass has run longer than
`stuck_batch_seconds`, health goes NOT_SERVING and `moderator_health_problem{reason}` says why.
A service that reports NOT_SERVING gets no traffic to prove itself with, so while batches are
failing the monitor sends a probe (one blank image) now and then; health comes back as soon as
a batch succeeds again.

The health service name `liveness` answers a narrower question for a liveness probe: is the
model worker stuck or failing? It is SERVING while loading and draining (a restart would not
help there) and NOT_SERVING only while a worker problem holds, so an orchestrator restarts a
process whose device hangs or broke, and only that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from moderator.config import BatchConfig
from moderator.serving.metrics import Metrics

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
FAILED_BATCHES = "failed_batches"
STUCK_BATCH = "stuck_batch"
PROBLEMS = (FAILED_BATCHES, STUCK_BATCH)
LIVENESS_SERVICE = "liveness"
CHECK_SECONDS = 1.0
PROBE_SECONDS = 5.0


@dataclass(frozen=True)
class WorkerState:
    """What the model worker reports: forward passes failed in a row, and since when (in
    time.monotonic() seconds) the current one has run, if one is running."""

    failed_in_a_row: int
    running_since: float | None


class HealthMonitor:
    def __init__(
        self,
        health: HealthServicer,
        services: tuple[str, ...],
        *,
        worker_state: Callable[[], WorkerState],
        probe: Callable[[], Awaitable[object]],
        config: BatchConfig,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._health = health
        self._services = services
        self._worker_state = worker_state
        self._probe = probe
        self._config = config
        self._metrics = metrics
        self._clock = clock
        self._accepting = False
        self._problems: frozenset[str] = frozenset()
        self._last_probe = 0.0
        self._reported: int | None = None
        self._reported_liveness: int | None = None
        self._served_before = False
        for reason in PROBLEMS:
            metrics.health_problem.labels(reason=reason).set(0)
        metrics.healthy.set(0)

    @property
    def problems(self) -> frozenset[str]:
        return self._problems

    async def accepting(self, accepting: bool) -> None:
        """The service's own state: loaded and not draining."""
        self._accepting = accepting
        await self._report()

    async def check(self) -> None:
        """Look at the worker once; report a change; probe a failing model."""
        self._problems = self._current_problems()
        for reason in PROBLEMS:
            self._metrics.health_problem.labels(reason=reason).set(int(reason in self._problems))
        await self._report()
        if FAILED_BATCHES in self._problems and self._accepting:
            await self._maybe_probe()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(CHECK_SECONDS)
            try:
                await self.check()
            except Exception:
                log.exception("health check failed")

    def _current_problems(self) -> frozenset[str]:
        state = self._worker_state()
        problems = set()
        if state.failed_in_a_row >= self._config.max_failed_batches:
            problems.add(FAILED_BATCHES)
        if (
            state.running_since is not None
            and self._clock() - state.running_since > self._config.stuck_batch_seconds
        ):
            problems.add(STUCK_BATCH)
        return frozenset(problems)

    async def _maybe_probe(self) -> None:
        now = self._clock()
        if now - self._last_probe < PROBE_SECONDS:
            return
        self._last_probe = now
        # the worker counts the outcome; a hung one is the stuck check's to report
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._probe(), self._config.stuck_batch_seconds)

    async def _report(self) -> None:
        await self._report_liveness()
        healthy = self._accepting and not self._problems
        status = SERVING if healthy else NOT_SERVING
        self._metrics.healthy.set(int(healthy))
        if status == self._reported:
            return
        if self._accepting and self._problems:
            log.error("health NOT_SERVING: %s", ", ".join(sorted(self._problems)))
        elif self._accepting and self._served_before and self._reported == NOT_SERVING:
            log.info("health SERVING again")
        self._reported = status
        self._served_before = self._served_before or healthy
        for name in self._services:
            await self._health.set(name, status)

    async def _report_liveness(self) -> None:
        status = NOT_SERVING if self._problems else SERVING
        if status != self._reported_liveness:
            self._reported_liveness = status
            await self._health.set(LIVENESS_SERVICE, status)

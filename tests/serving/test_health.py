from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer
from prometheus_client import CollectorRegistry

from moderator.config import BatchConfig
from moderator.serving.health import (
    FAILED_BATCHES,
    LIVENESS_SERVICE,
    NOT_SERVING,
    PROBE_SECONDS,
    SERVING,
    STUCK_BATCH,
    HealthMonitor,
    WorkerState,
)
from moderator.serving.metrics import Metrics


class Fixture:
    def __init__(
        self,
        config: BatchConfig | None = None,
        probe: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.state = WorkerState(0, None)
        self.now = 100.0
        self.probes = 0
        self.health = HealthServicer()
        self.metrics = Metrics(CollectorRegistry())
        self.monitor = HealthMonitor(
            self.health,
            ("",),
            worker_state=lambda: self.state,
            probe=probe or self.probe,
            config=config or BatchConfig(max_failed_batches=3, stuck_batch_seconds=10),
            metrics=self.metrics,
            clock=lambda: self.now,
        )

    async def probe(self) -> None:
        self.probes += 1
        raise RuntimeError("still broken")

    async def status(self, service: str = "") -> int:
        request = health_pb2.HealthCheckRequest(service=service)
        response = await self.health.Check(request, None)
        return int(response.status)

    def problem(self, reason: str) -> float:
        return float(self.metrics.health_problem.labels(reason=reason)._value.get())


def test_failed_batches_and_a_stuck_batch_turn_health_off_until_they_clear() -> None:
    async def scenario() -> None:
        f = Fixture()
        await f.monitor.accepting(True)
        assert await f.status() == SERVING
        f.state = WorkerState(2, None)
        await f.monitor.check()
        assert await f.status() == SERVING  # two in a row: not yet
        f.state = WorkerState(3, None)
        await f.monitor.check()
        assert await f.status() == NOT_SERVING
        assert f.problem(FAILED_BATCHES) == 1
        assert f.metrics.healthy._value.get() == 0
        assert f.probes == 1  # no traffic comes to a NOT_SERVING pod: the monitor probes
        await f.monitor.check()
        assert f.probes == 1  # not again before PROBE_SECONDS
        f.now += PROBE_SECONDS
        await f.monitor.check()
        assert f.probes == 2
        f.state = WorkerState(0, f.now - 11)  # the probe's batch succeeded; a new one hangs
        await f.monitor.check()
        assert (f.problem(FAILED_BATCHES), f.problem(STUCK_BATCH)) == (0, 1)
        assert await f.status() == NOT_SERVING
        f.state = WorkerState(0, None)
        await f.monitor.check()
        assert await f.status() == SERVING
        assert f.metrics.healthy._value.get() == 1

    asyncio.run(scenario())


def test_a_draining_service_stays_not_serving_whatever_the_worker_says() -> None:
    async def scenario() -> None:
        f = Fixture()
        await f.monitor.accepting(True)
        await f.monitor.accepting(False)
        await f.monitor.check()
        assert await f.status() == NOT_SERVING
        f.state = WorkerState(5, None)
        await f.monitor.check()
        assert f.probes == 0  # nothing to prove while draining

    asyncio.run(scenario())


def test_a_probe_that_hangs_does_not_stop_the_checks() -> None:
    async def scenario() -> None:
        hung = asyncio.Event()

        async def hang() -> None:
            hung.set()
            await asyncio.sleep(3600)

        f = Fixture(BatchConfig(max_failed_batches=1, stuck_batch_seconds=0.1), hang)
        await f.monitor.accepting(True)
        f.state = WorkerState(1, None)
        await asyncio.wait_for(f.monitor.check(), 5)  # gives up on the probe after 0.1 s
        assert hung.is_set()
        assert await f.status() == NOT_SERVING

    asyncio.run(scenario())


def test_liveness_fails_only_while_the_worker_is_stuck_or_failing() -> None:
    async def scenario() -> None:
        f = Fixture()
        await f.monitor.accepting(False)  # loading: not ready, but alive
        assert await f.status() == NOT_SERVING
        assert await f.status(LIVENESS_SERVICE) == SERVING
        await f.monitor.accepting(True)
        f.state = WorkerState(0, running_since=f.now)
        f.now += 11
        await f.monitor.check()
        assert await f.status(LIVENESS_SERVICE) == NOT_SERVING
        f.state = WorkerState(3, None)
        await f.monitor.check()
        assert await f.status(LIVENESS_SERVICE) == NOT_SERVING
        f.state = WorkerState(0, None)
        await f.monitor.check()
        assert await f.status(LIVENESS_SERVICE) == SERVING
        await f.monitor.accepting(False)  # draining: not ready, still alive
        await f.monitor.check()
        assert await f.status() == NOT_SERVING
        assert await f.status(LIVENESS_SERVICE) == SERVING

    asyncio.run(scenario())

"""Admission: what work in flight holds (images, model views, bytes), bounded per resource.

A request states its cost before it queues. `try_admit` refuses at once (Overloaded, gRPC
RESOURCE_EXHAUSTED) when the cost does not fit; `admit` waits for room instead (streams, and
decoded images waiting for model views), oldest first: a waiter is granted only when every
older waiter has been, so a burst of large requests cannot starve an earlier small one.
Used from the event loop thread only.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field

from moderator.config import BatchConfig
from moderator.errors import DeadlineExceeded, InvalidRequest, Overloaded
from moderator.serving.metrics import Metrics

Cost = Mapping[str, int]


@dataclass
class Ticket:
    """An admitted request: when it arrived (its place in line) and the model views it has
    needed so far."""

    arrival: float = field(default_factory=time.monotonic)
    views: int = 0


@dataclass(order=True)
class _Waiter:
    priority: float
    sequence: int
    cost: Cost = field(compare=False)
    granted: asyncio.Future[None] = field(compare=False)


class Admission:
    """Budgets of named resources (`limits`: resource -> most in flight)."""

    def __init__(self, limits: Mapping[str, int], metrics: Metrics) -> None:
        self.limits = dict(limits)
        self._metrics = metrics
        self._held = dict.fromkeys(limits, 0)
        self._waiters: list[_Waiter] = []
        self._sequence = itertools.count()
        for resource, limit in self.limits.items():
            metrics.admission_limit.labels(resource=resource).set(limit)
            metrics.admission_in_flight.labels(resource=resource).set(0)

    def held(self, resource: str) -> int:
        return self._held[resource]

    def try_admit(self, cost: Cost) -> None:
        """Hold `cost` now, or raise Overloaded without holding anything."""
        self._check_possible(cost)
        if self._waiters or not self._fits(cost):
            self._metrics.rejected_requests.labels(reason="overload").inc()
            raise Overloaded(f"{self._describe_full(cost)}: retry with backoff")
        self._take(cost)

    async def admit(
        self, cost: Cost, priority: float | None = None, deadline: float | None = None
    ) -> None:
        """Hold `cost`, waiting for room behind every waiter with a lower `priority` (default:
        now, so first come first served). `deadline` is time.monotonic() seconds."""
        self._check_possible(cost)
        if not self._waiters and self._fits(cost):
            self._take(cost)
            return
        waiter = _Waiter(
            time.monotonic() if priority is None else priority,
            next(self._sequence),
            cost,
            asyncio.get_running_loop().create_future(),
        )
        heapq.heappush(self._waiters, waiter)
        self._grant()  # it may be older than every waiter and fit now
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            # asyncio.wait, not wait_for: wait_for (3.11) can swallow a cancellation that
            # lands just as the room is granted
            await asyncio.wait({waiter.granted}, timeout=timeout)
        except BaseException:
            if not waiter.granted.done():
                self._metrics.rejected_requests.labels(reason="cancelled").inc()
            self._give_up(waiter)
            raise
        if not waiter.granted.done():
            self._give_up(waiter)
            self._metrics.rejected_requests.labels(reason="deadline").inc()
            raise DeadlineExceeded("deadline passed while waiting for room")

    def _give_up(self, waiter: _Waiter) -> None:
        if waiter.granted.done() and not waiter.granted.cancelled():
            self.release(waiter.cost)  # granted just as the caller gave up
        else:
            waiter.granted.cancel()
        self._grant()

    def add(self, cost: Cost) -> None:
        """Hold `cost` even past the limits: work already done (a decoded image's other views)
        that must not be thrown away. The overshoot is bounded by the caller."""
        self._take(cost)

    def release(self, cost: Cost) -> None:
        for resource, amount in cost.items():
            self._held[resource] -= amount
            self._metrics.admission_in_flight.labels(resource=resource).set(self._held[resource])
        self._grant()

    def _grant(self) -> None:
        while self._waiters:
            head = self._waiters[0]
            if head.granted.done():  # gave up
                heapq.heappop(self._waiters)
                continue
            if not self._fits(head.cost):
                return
            heapq.heappop(self._waiters)
            self._take(head.cost)
            head.granted.set_result(None)

    def _check_possible(self, cost: Cost) -> None:
        for resource, amount in cost.items():
            if amount > self.limits[resource]:
                self._metrics.rejected_requests.labels(reason="request_limit").inc()
                raise Overloaded(
                    f"the request needs {amount} {resource}; no more than "
                    f"{self.limits[resource]} are ever admitted at once: split it"
                )

    def _fits(self, cost: Cost) -> bool:
        return all(self._held[r] + amount <= self.limits[r] for r, amount in cost.items())

    def _take(self, cost: Cost) -> None:
        for resource, amount in cost.items():
            self._held[resource] += amount
            self._metrics.admission_in_flight.labels(resource=resource).set(self._held[resource])

    def _describe_full(self, cost: Cost) -> str:
        for resource, amount in cost.items():
            if self._held[resource] + amount > self.limits[resource]:
                return (
                    f"{self._held[resource]} {resource} in flight; {amount} more would pass "
                    f"the limit of {self.limits[resource]}"
                )
        return f"{len(self._waiters)} requests are already waiting for room"


class Budgets:
    """The service's budgets as requests and their images use them: a request's images and
    bytes, each image's model views, and ScoreEmbeddings slots."""

    def __init__(self, config: BatchConfig, max_rescore_requests: int, metrics: Metrics) -> None:
        self.work = Admission(
            {
                "images": config.max_queue_images,
                "views": config.max_queue_views,
                "bytes": config.max_queue_bytes,
            },
            metrics,
        )
        self.rescore = Admission({"rescore_requests": max_rescore_requests}, metrics)
        self._max_request_views = config.max_request_views
        self._metrics = metrics
        # views the model worker has let go of, released on the loop in one call per batch
        self._freed_views = 0
        self._freeing_scheduled = False
        self._freed_lock = threading.Lock()

    @contextlib.asynccontextmanager
    async def request(
        self, images: int, message_bytes: int, *, wait: bool, deadline: float | None
    ) -> AsyncIterator[Ticket]:
        """Hold a request's images and bytes for the block: refused at once (Overloaded)
        when they do not fit, or with `wait`, waited for in arrival order until `deadline`."""
        cost = {"images": images, "bytes": message_bytes}
        ticket = Ticket()
        if wait:
            await self.work.admit(cost, ticket.arrival, deadline)
        else:
            self.work.try_admit(cost)
        try:
            yield ticket
        finally:
            self.work.release(cost)

    @contextlib.contextmanager
    def rescore_slot(self) -> Iterator[None]:
        cost = {"rescore_requests": 1}
        self.rescore.try_admit(cost)
        try:
            yield
        finally:
            self.rescore.release(cost)

    async def view_before_decoding(self, ticket: Ticket, deadline: float | None) -> None:
        """Room for one view before an image is decoded; its others come after (`more_views`),
        so decoded pixels stay within the budget plus one image per decode worker."""
        await self.work.admit({"views": 1}, ticket.arrival, deadline)

    def more_views(self, ticket: Ticket, views: int) -> None:
        """A decoded image's `views` (one already held): InvalidRequest when its request
        now needs more than --max-request-views."""
        self.work.add({"views": views - 1})
        ticket.views += views
        if ticket.views > self._max_request_views:
            self._metrics.rejected_requests.labels(reason="request_limit").inc()
            raise InvalidRequest(
                f"the request needs more than {self._max_request_views} model views "
                "(animations and long images take several): send fewer images per request "
                "(--max-request-views)"
            )

    def release_views(self, views: int) -> None:
        self.work.release({"views": views})

    def views_released_later(self, views: int) -> Callable[[], None]:
        """A callback for another thread (the model worker): release `views` on this loop.
        The views of a whole batch go back in one loop callback, not one wake-up per image."""
        loop = asyncio.get_running_loop()

        def release() -> None:
            with self._freed_lock:
                self._freed_views += views
                if self._freeing_scheduled:
                    return
                self._freeing_scheduled = True
            try:
                loop.call_soon_threadsafe(self._release_freed_views)
            except RuntimeError:  # the loop closed (shutdown): nothing is waiting for views
                with self._freed_lock:
                    self._freed_views, self._freeing_scheduled = 0, False

        return release

    def _release_freed_views(self) -> None:
        with self._freed_lock:
            views, self._freed_views = self._freed_views, 0
            self._freeing_scheduled = False
        self.release_views(views)

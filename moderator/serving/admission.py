"""Admission: what requests in flight will cost, and a fast refusal when more would pass a limit."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from moderator.errors import Overloaded
from moderator.serving.metrics import Metrics


class Admission:
    """Counts units in flight (images, requests) against `limit`; thread-safe.

    A request that would pass the limit is refused at once with Overloaded (gRPC
    RESOURCE_EXHAUSTED) and counted as rejected for overload; it never waits in a queue.
    """

    def __init__(self, limit: int, unit: str, metrics: Metrics) -> None:
        self.limit = limit
        self.unit = unit
        self._metrics = metrics
        self._lock = threading.Lock()
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @contextlib.contextmanager
    def admitted(self, count: int = 1) -> Iterator[None]:
        """Hold `count` units for the block; raises Overloaded if they do not fit."""
        self._admit(count)
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= count

    def _admit(self, count: int) -> None:
        with self._lock:
            if self._in_flight + count > self.limit:
                self._metrics.rejected_requests.labels(reason="overload").inc()
                raise Overloaded(
                    f"{self._in_flight} {self.unit} in flight; {count} more would pass the "
                    f"limit of {self.limit}: retry with backoff"
                )
            self._in_flight += count

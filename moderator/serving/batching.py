"""The dynamic batcher and the model worker thread that owns the device.

Callers submit one image (its views) at a time and get a concurrent Future back. The worker
takes the first waiting image, then keeps collecting until the batch holds `max_batch_size`
views, or `max_wait_ms` has passed since that first image arrived, or no other image is on its
way (so an idle server adds no wait to a lone request), and runs one forward pass
and one scoring matmul for all of them. Images whose deadline passed or whose caller gave up
are dropped before the forward pass.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from moderator.config import BatchConfig
from moderator.core.embeddings import PolicyIndex
from moderator.core.scoring import ScoredImage, score_views, scored_images
from moderator.errors import DeadlineExceeded, ModelFailed, NotReady
from moderator.serving.health import WorkerState
from moderator.serving.metrics import Metrics
from moderator.serving.tracing import BatchTimes

log = logging.getLogger(__name__)

EncodeImages = Callable[[torch.Tensor], torch.Tensor]
# Even a stop in a hurry gives an idle worker this long to notice and exit.
MIN_STOP_SECONDS = 0.5


@dataclass
class WorkItem:
    pixels: torch.Tensor  # uint8 [V, 3, S, S]
    index: PolicyIndex
    deadline: float | None  # time.monotonic() seconds
    enqueued: float = field(default_factory=time.monotonic)
    future: Future[ScoredImage] = field(default_factory=Future)
    on_done: Callable[[], None] | None = None  # called once the item has left the worker
    on_timed: Callable[[BatchTimes], None] | None = None  # its forward pass's times (tracing)

    @property
    def views(self) -> int:
        return int(self.pixels.shape[0])


class Batcher:
    """Coalesces images from concurrent requests into forward passes on one worker thread."""

    def __init__(
        self,
        encode_images: EncodeImages,
        config: BatchConfig,
        metrics: Metrics,
        expected: Callable[[], int] = lambda: 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`expected` counts images on their way to the queue (being decoded): a batch waits
        for more only while some are; a lone request on an idle server runs at once."""
        self._encode_images = encode_images
        self._expected = expected
        self._config = config
        self._metrics = metrics
        self._clock = clock
        self._queue: collections.deque[WorkItem] = collections.deque()
        self._cond = threading.Condition()
        self._queued_views = 0
        self._failed_in_a_row = 0
        self._running_since: float | None = None
        self._running = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with self._cond:
            if self._running:
                return
            self._running = True
        self._thread = threading.Thread(target=self._run, name="model-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is queued, then stop the worker. A worker still busy after `timeout`
        seconds (a hung device) is left behind and what is still queued fails."""
        with self._cond:
            self._running = False
            self._cond.notify_all()
        if self._thread is None:
            return
        self._thread.join(None if timeout is None else max(timeout, MIN_STOP_SECONDS))
        if self._thread.is_alive():
            if self._running_since is not None:
                log.error("the model worker is stuck in a forward pass; stopping without it")
            with self._cond:
                abandoned = list(self._queue)
                self._queue.clear()
            for item in abandoned:
                _done(item)
                if item.future.set_running_or_notify_cancel():
                    item.future.set_exception(NotReady("the model worker is stuck"))
        self._thread = None

    def submit(
        self,
        pixels: torch.Tensor,
        index: PolicyIndex,
        deadline: float | None,
        on_done: Callable[[], None] | None = None,
        on_timed: Callable[[BatchTimes], None] | None = None,
    ) -> Future[ScoredImage]:
        """Queue one image's views; `on_done` is called from the worker thread once the
        image has left it (scored, failed or dropped), `on_timed` with the times of the
        forward pass that scored it."""
        item = WorkItem(
            pixels=pixels,
            index=index,
            deadline=deadline,
            enqueued=self._clock(),
            on_done=on_done,
            on_timed=on_timed,
        )
        with self._cond:
            if not self._running:
                raise NotReady("the model worker is not running")
            self._queue.append(item)
            self._queued_views += item.views
            self._metrics.queue_images.inc()
            self._cond.notify()
        return item.future

    def notify(self) -> None:
        """Wake the worker to re-check `expected` (an image left the pipeline without a submit)."""
        with self._cond:
            self._cond.notify_all()

    def state(self) -> WorkerState:
        return WorkerState(self._failed_in_a_row, self._running_since)

    def queued_images(self) -> int:
        with self._cond:
            return len(self._queue)

    def _run(self) -> None:
        while True:
            batch = self.next_batch()
            if batch is None:
                return
            self.run_batch(batch)

    def next_batch(self) -> list[WorkItem] | None:
        """Block for the next batch to run; None once stopped and drained."""
        max_views = self._config.max_batch_size
        with self._cond:
            while not self._queue:
                if not self._running:
                    return None
                self._cond.wait()
            first_arrival = self._queue[0].enqueued
            close_at = first_arrival + self._config.max_wait_ms / 1000.0
            while self._running and self._queued_views < max_views and self._expected() > 0:
                remaining = close_at - self._clock()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return self._take(max_views)

    def _take(self, max_views: int) -> list[WorkItem]:
        batch: list[WorkItem] = []
        views = 0
        while self._queue:
            item = self._queue[0]
            if batch and views + item.views > max_views:
                break
            self._queue.popleft()
            self._queued_views -= item.views
            self._metrics.queue_images.dec()
            batch.append(item)
            views += item.views
        return batch

    def run_batch(self, batch: list[WorkItem]) -> None:
        try:
            self._run_live(self._drop_dead(batch))
        finally:
            for item in batch:
                _done(item)

    def _run_live(self, live: list[WorkItem]) -> None:
        if not live:
            return
        started = self._clock()
        started_ns = time.time_ns()
        for item in live:
            self._metrics.queue_wait.observe(max(0.0, started - item.enqueued))
        self._running_since = started
        try:
            results, encoded_ns = self._forward(live)
        except Exception as exc:  # the model failed: fail these images, keep serving
            self._failed_in_a_row += 1
            log.exception("forward pass failed for a batch of %d images", len(live))
            failed = ModelFailed(f"the model failed on this batch ({type(exc).__name__}): retry")
            for item in live:
                _done(item)
                item.future.set_exception(failed)
            return
        finally:
            self._running_since = None
        self._failed_in_a_row = 0
        self._metrics.inference_duration.observe(self._clock() - started)
        views = sum(item.views for item in live)
        self._metrics.batch_images.observe(views)
        times = BatchTimes(started_ns, encoded_ns, time.time_ns(), views, len(live))
        for item, result in zip(live, results, strict=True):
            _report_times(item, times)
            _done(item)  # before the caller can see its result (and, in tests, close its loop)
            item.future.set_result(result)

    def _drop_dead(self, batch: list[WorkItem]) -> list[WorkItem]:
        now = self._clock()
        live = []
        for item in batch:
            if not item.future.set_running_or_notify_cancel():
                self._metrics.rejected_requests.labels(reason="cancelled").inc()
            elif item.deadline is not None and item.deadline <= now:
                self._metrics.rejected_requests.labels(reason="deadline").inc()
                _done(item)
                item.future.set_exception(DeadlineExceeded("deadline passed while queued"))
            else:
                live.append(item)
        return live

    def _forward(self, items: list[WorkItem]) -> tuple[list[ScoredImage], int]:
        """The items' scores, and when (time.time_ns()) the encoder returned."""
        pixels = torch.cat([item.pixels for item in items])
        embeddings = self._encode_images(pixels)
        encoded_ns = time.time_ns()
        results: dict[int, ScoredImage] = {}
        # Items normally share one policy index; during a policy reload a batch can hold two,
        # and each image is scored against the set its request started with.
        groups = _group_by_index(items)
        for index, positions in groups.items():
            group = embeddings
            if len(groups) > 1:
                group = embeddings[_rows_of(items, positions).to(embeddings.device)]
            scores, matched = score_views(group, index)
            scored = scored_images(
                group.cpu(),
                scores.cpu(),
                matched.cpu(),
                [items[i].views for i in positions],
                index.thresholds,
            )
            results.update(zip(positions, scored, strict=True))
        return [results[i] for i in range(len(items))], encoded_ns


def _done(item: WorkItem) -> None:
    """The item's completion callback, once: items are done before their futures resolve."""
    on_done, item.on_done = item.on_done, None
    if on_done is not None:
        try:
            on_done()
        except Exception:  # a caller's callback must not stop the worker
            log.exception("a work item's completion callback failed")


def _report_times(item: WorkItem, times: BatchTimes) -> None:
    if item.on_timed is not None:
        try:
            item.on_timed(times)
        except Exception:  # tracing must not fail an image
            log.exception("recording a batch's times failed")


def _rows_of(items: list[WorkItem], positions: list[int]) -> torch.Tensor:
    """The rows of the batch's views that belong to the items at `positions`, in order."""
    starts = []
    offset = 0
    for item in items:
        starts.append(offset)
        offset += item.views
    return torch.cat([torch.arange(starts[i], starts[i] + items[i].views) for i in positions])


def _group_by_index(items: list[WorkItem]) -> dict[PolicyIndex, list[int]]:
    groups: dict[PolicyIndex, list[int]] = {}
    for position, item in enumerate(items):
        groups.setdefault(item.index, []).append(position)
    return groups

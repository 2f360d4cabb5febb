"""The dynamic batcher and the model pipeline that owns the device.

Callers submit one image (its views) at a time and get a concurrent Future back. A batch goes
through three stages, each on a thread of its own so that they overlap:

- stage ("model-batcher"): collect a batch, drop the images whose caller gave up or whose
  deadline passed, and put its pixels where the device reads them (on CUDA: pinned memory, and
  a copy on a stream of its own);
- forward ("model-worker"): the image encoder, on the device, and nothing else (every other
  step on the thread that waits for the device would wait for the GIL too);
- finish ("model-results"): score the batch against the policies (one matmul, on the device),
  wait for the results to be back on the host, build every image's result and resolve the
  futures.

While the device runs batch N, batch N+1 is staged and batch N-1 finished, so the device waits
for the host only where the host is the slower side: a batch every max(stage, forward, finish)
instead of every stage + forward + finish. A config whose `pipelined` is off (or auto, which
the engine settles by device: BatchConfig.pipelined_on) runs the three in series on one thread.

A batch closes as soon as it holds `max_batch_size` views. Short of that, it keeps filling while
the device is busy (it could not run sooner anyway); once the device is idle it closes when
`max_wait_ms` has passed since its first image arrived, or when no other image is on its way
(so an idle server adds no wait to a lone request).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import torch

from moderator.config import BatchConfig
from moderator.core.clip import gather_views
from moderator.core.embeddings import PolicyIndex
from moderator.core.hash_index import ImageHashes
from moderator.core.scoring import ScoredImage, scored_images
from moderator.errors import DeadlineExceeded, ModelFailed, NotReady
from moderator.serving.batch import (
    END,
    Batch,
    WorkItem,
    done,
    fail,
    report_times,
    score_batch,
)
from moderator.serving.health import WorkerState
from moderator.serving.metrics import Metrics
from moderator.serving.tracing import BatchTimes

log = logging.getLogger(__name__)

EncodeImages = Callable[[Any], torch.Tensor]  # staged pixels -> embeddings [B, E]
StageImages = Callable[[Sequence[torch.Tensor]], Any]  # each image's views -> staged pixels
# Even a stop in a hurry gives an idle worker this long to notice and exit.
MIN_STOP_SECONDS = 0.5
# Batches whose forward pass has started and whose results are not read back yet: one running
# and one queued behind it on the device (which launches asynchronously on a GPU).
MAX_ON_DEVICE = 2


class Batcher:
    """Coalesces images from concurrent requests into forward passes on the model device."""

    def __init__(
        self,
        encode_images: EncodeImages,
        config: BatchConfig,
        metrics: Metrics,
        expected: Callable[[], int] = lambda: 1,
        *,
        clock: Callable[[], float] = time.monotonic,
        stage_images: StageImages | None = None,
    ) -> None:
        """`expected` counts images on their way to the queue (being decoded): a batch waits
        for more only while some are; a lone request on an idle server runs at once."""
        self._encode_images = encode_images
        self._stage_images = stage_images or gather_views
        self._expected = expected
        self._config = config
        self._metrics = metrics
        self._clock = clock
        self._queue: collections.deque[WorkItem] = collections.deque()
        self._lock = threading.Lock()
        # one condition per waiting stage, so a submit wakes the batcher and no one else
        self._to_batcher = threading.Condition(self._lock)
        self._to_forward = threading.Condition(self._lock)
        self._to_finisher = threading.Condition(self._lock)
        self._queued_views = 0
        self._staged: Batch | None = None  # staged, waiting for the device
        self._forwarded: collections.deque[Batch | None] = collections.deque()  # None: stop
        self._on_device: list[Batch] = []  # from its forward pass until its results are read
        self._failed_in_a_row = 0
        self._running = False
        self._abandoned = False
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        if any(thread.is_alive() for thread in self._threads):
            # its threads may still take work: a new pipeline beside them would share state
            raise NotReady("the model worker of the last run is still stuck in a forward pass")
        with self._lock:
            if self._running:
                return
            self._running = True
            self._abandoned = False
            self._staged = None
            self._forwarded.clear()
            self._on_device.clear()
        stages = [("model-worker", self._serial_loop)]
        if self._config.pipelined:
            stages = [
                ("model-batcher", self._stage_loop),
                ("model-worker", self._forward_loop),
                ("model-results", self._finish_loop),
            ]
        self._threads = [
            threading.Thread(target=target, name=name, daemon=True) for name, target in stages
        ]
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is queued, then stop the pipeline. A forward pass still running after
        `timeout` seconds (a hung device) is left behind, and what is still queued fails."""
        with self._lock:
            self._running = False
            self._wake_all()
        wait_until = None if timeout is None else time.monotonic() + max(timeout, MIN_STOP_SECONDS)
        for thread in self._threads:
            thread.join(None if wait_until is None else max(0.0, wait_until - time.monotonic()))
        if any(thread.is_alive() for thread in self._threads):
            self._abandon()  # the threads stay listed: start() refuses while they live

    def _abandon(self) -> None:
        with self._lock:
            if self._on_device:
                log.error("the model worker is stuck in a forward pass; stopping without it")
            self._abandoned = True
            abandoned = list(self._queue)
            self._queue.clear()
            if self._staged is not None:
                abandoned += self._staged.items
                self._staged = None
            self._wake_all()
        fail(abandoned, NotReady("the model worker is stuck"))

    def submit(
        self,
        pixels: torch.Tensor,
        index: PolicyIndex,
        deadline: float | None,
        *,
        on_done: Callable[[], None] | None = None,
        on_timed: Callable[[BatchTimes], None] | None = None,
        hashes: ImageHashes | None = None,
    ) -> Future[ScoredImage]:
        """Queue one image's views (and hashes, matched against the index's lists); `on_done`
        is called from a pipeline thread once the image has left it (scored, failed or
        dropped), `on_timed` with the times of the forward pass that scored it."""
        enqueued = self._clock()
        item = WorkItem(
            pixels, index, deadline, enqueued, on_done=on_done, on_timed=on_timed, hashes=hashes
        )
        with self._lock:
            if not self._running:
                raise NotReady("the model worker is not running")
            self._queue.append(item)
            self._queued_views += item.views
            self._metrics.queue_images.inc()
            self._to_batcher.notify()
        return item.future

    def notify(self) -> None:
        """Wake the batcher to re-check `expected` (an image left the pipeline without a submit)."""
        with self._lock:
            self._to_batcher.notify()

    def state(self) -> WorkerState:
        with self._lock:
            running_since = self._on_device[0].started if self._on_device else None
        return WorkerState(self._failed_in_a_row, running_since)

    def queued_images(self) -> int:
        with self._lock:
            return len(self._queue)

    # -- the stages --------------------------------------------------------------------------

    def _serial_loop(self) -> None:
        while (batch := self._next_staged(lambda: False)) is not None:
            if batch.items and self._forward(batch):
                self._finish(batch)

    def _stage_loop(self) -> None:
        while True:
            with self._lock:
                while self._staged is not None and not self._gone():
                    self._to_batcher.wait()  # the device has not taken the last one yet
            batch = self._next_staged(self._device_busy)
            with self._lock:
                if self._gone():
                    stranded = batch.items if batch is not None else []
                    break
                if batch is None or batch.items:
                    self._staged = batch or END
                    self._to_forward.notify()
            if batch is None:
                return
        fail(stranded, NotReady("the model worker is stuck"))

    def _wake_all(self) -> None:
        for condition in (self._to_batcher, self._to_forward, self._to_finisher):
            condition.notify_all()

    def _gone(self) -> bool:
        """The pipeline was abandoned (a stop gave up on a stuck forward pass)."""
        return self._abandoned

    def _forward_loop(self) -> None:
        while True:
            with self._lock:
                while not self._gone() and (
                    self._staged is None or len(self._on_device) >= MAX_ON_DEVICE
                ):
                    self._to_forward.wait()
                batch, self._staged = self._staged, None
                self._to_batcher.notify()
            if batch is None:  # abandoned
                return
            if batch is END:
                self._hand_on(None)
                return
            if self._forward(batch):
                self._hand_on(batch)

    def _hand_on(self, batch: Batch | None) -> None:
        with self._lock:
            finish_here = self._abandoned  # the finishing thread is gone: a stuck pass returned
            if not finish_here:
                self._forwarded.append(batch)
                self._to_finisher.notify()
        if finish_here and batch is not None:
            self._finish(batch)

    def _finish_loop(self) -> None:
        while True:
            with self._lock:
                while not self._forwarded and not self._abandoned:
                    self._to_finisher.wait()
                if self._abandoned and not self._forwarded:
                    return
                batch = self._forwarded.popleft()
            if batch is None:
                return
            self._finish(batch)

    def _device_busy(self) -> bool:
        return bool(self._on_device)

    def _next_staged(self, device_busy: Callable[[], bool]) -> Batch | None:
        """The next batch, its dead images dropped and its pixels staged (no items when every
        image was dropped); None once stopped and drained."""
        items = self._next_batch(device_busy)
        if items is None:
            return None
        live = self._drop_dead(items)
        if not live:
            return Batch(items=[], pixels=None)
        now = self._clock()
        for item in live:
            self._metrics.queue_wait.observe(max(0.0, now - item.enqueued))
        try:
            pixels = self._stage_images([item.pixels for item in live])
        except Exception as exc:
            self._fail_batch(live, exc)
            return Batch(items=[], pixels=None)
        return Batch(items=live, pixels=pixels)

    def _next_batch(self, device_busy: Callable[[], bool]) -> list[WorkItem] | None:
        """Block for the next batch's images (see the module docstring for when a batch
        closes); None once stopped and drained."""
        max_views = self._config.max_batch_size
        with self._lock:
            while not self._queue:
                if not self._running or self._abandoned:
                    return None
                self._to_batcher.wait()
            close_at = self._queue[0].enqueued + self._config.max_wait_ms / 1000.0
            while self._running and self._queued_views < max_views:
                if device_busy():
                    self._to_batcher.wait()
                    continue
                remaining = close_at - self._clock()
                if remaining <= 0 or self._expected() <= 0:
                    break
                self._to_batcher.wait(remaining)
            if self._abandoned:
                return None
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

    def _drop_dead(self, batch: list[WorkItem]) -> list[WorkItem]:
        now = self._clock()
        live = []
        for item in batch:
            if not item.future.set_running_or_notify_cancel():
                self._metrics.rejected_requests.labels(reason="cancelled").inc()
                done(item)
            elif item.deadline is not None and item.deadline <= now:
                self._metrics.rejected_requests.labels(reason="deadline").inc()
                done(item)
                item.future.set_exception(DeadlineExceeded("deadline passed while queued"))
            else:
                live.append(item)
        return live

    def _forward(self, batch: Batch) -> bool:
        """Run the batch's forward pass; False when the model failed (its images have
        failed). Only the encoder runs here: every other step of the thread that waits for the
        device competes for the GIL with the rest of the process."""
        with self._lock:
            batch.started = self._clock()
            self._on_device.append(batch)
        batch.started_ns = time.time_ns()
        try:
            batch.embeddings = self._encode_images(batch.pixels)
            batch.encoded_ns = time.time_ns()
        except Exception as exc:  # the model failed: fail these images, keep serving
            self._left_device(batch)
            self._fail_batch(batch.items, exc)
            return False
        return True

    def _finish(self, batch: Batch) -> None:
        """Score the batch, read its results back, then resolve its images' futures."""
        try:
            try:
                read = [
                    (index, positions, host.wait()) for index, positions, host in score_batch(batch)
                ]
            finally:
                self._left_device(batch)
            results: dict[int, ScoredImage] = {}
            for index, positions, (embeddings, scores, matched) in read:
                items = [batch.items[i] for i in positions]
                counts, hashes = [i.views for i in items], [i.hashes for i in items]
                scored = scored_images(embeddings, scores, matched, counts, index, hashes=hashes)
                results.update(zip(positions, scored, strict=True))
        except Exception as exc:  # a device error surfaces when its results are read
            self._fail_batch(batch.items, exc)
            return
        with self._lock:
            self._failed_in_a_row = 0
        self._metrics.inference_duration.observe(batch.read_back - batch.started)
        self._metrics.batch_images.observe(batch.views)
        times = BatchTimes(
            batch.started_ns, batch.encoded_ns, time.time_ns(), batch.views, len(batch.items)
        )
        for position, item in enumerate(batch.items):
            report_times(item, times)
            done(item)  # before the caller can see its result (and, in tests, close its loop)
            item.future.set_result(results[position])

    def _left_device(self, batch: Batch) -> None:
        batch.read_back = self._clock()
        with self._lock:
            self._on_device.remove(batch)
            if self._on_device:
                # The next one (launched asynchronously on a GPU) queued behind this one:
                # its pass, for health and the duration metric, starts now.
                after = self._on_device[0]
                after.started = max(after.started, batch.read_back)
            self._to_batcher.notify()  # a batch waiting for an idle device may close now
            self._to_forward.notify()

    def _fail_batch(self, items: list[WorkItem], exc: Exception) -> None:
        with self._lock:
            self._failed_in_a_row += 1
        log.error("forward pass failed for a batch of %d images", len(items), exc_info=exc)
        fail(items, ModelFailed(f"the model failed on this batch ({type(exc).__name__}): retry"))

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence

import pytest
import torch
from prometheus_client import CollectorRegistry

from moderator.config import BatchConfig
from moderator.core.clip import OnHost
from moderator.core.embeddings import PolicyIndex
from moderator.errors import DeadlineExceeded, ModelFailed, NotReady
from moderator.serving.batching import Batcher
from moderator.serving.metrics import Metrics
from tests.helpers import DIM, make_index, policy_doc, wait_until

WAIT = 30.0  # generous bound on futures; no test asserts on time


class GatedEncoder:
    """Embeds a view as [its first pixel value, 0, ...]; blocks while the gate is closed."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Semaphore(0)
        self.batches: list[list[int]] = []

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        self.entered.release()
        assert self.gate.wait(WAIT)
        self.batches.append(pixels[:, 0, 0, 0].tolist())
        embeddings = torch.zeros(pixels.shape[0], DIM)
        embeddings[:, 0] = pixels[:, 0, 0, 0].float()
        return embeddings

    def hold(self) -> None:
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()


def views(tag: int, count: int = 1) -> torch.Tensor:
    return torch.full((count, 3, 4, 4), tag, dtype=torch.uint8)


# Every test runs on the three-thread pipeline and on the serial worker.
PIPELINED = {"pipelined": True}


@pytest.fixture(autouse=True, params=["pipelined", "serial"])
def pipeline_mode(request: pytest.FixtureRequest) -> None:
    PIPELINED["pipelined"] = request.param == "pipelined"


def batch_config(**values: float) -> BatchConfig:
    return BatchConfig(pipelined=PIPELINED["pipelined"], **values)  # type: ignore[arg-type]


@pytest.fixture
def index() -> PolicyIndex:
    return make_index(("p", policy_doc("block", ["x"])))


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


@pytest.fixture
def encoder() -> GatedEncoder:
    return GatedEncoder()


def running(
    encoder: GatedEncoder,
    metrics: Metrics,
    expected: Callable[[], int] = lambda: 1,
    **config: float,
) -> Iterator[Batcher]:
    batcher = Batcher(encoder, batch_config(**config), metrics, expected)
    batcher.start()
    yield batcher
    encoder.release()
    batcher.stop()


def block_worker(batcher: Batcher, encoder: GatedEncoder, index: PolicyIndex) -> None:
    """Occupy the worker with one batch that waits at the gate."""
    encoder.hold()
    batcher.submit(views(250), index, deadline=None)
    assert encoder.entered.acquire(timeout=WAIT)


def test_concurrent_images_are_coalesced_into_one_full_batch(
    encoder: GatedEncoder, metrics: Metrics, index: PolicyIndex
) -> None:
    for batcher in running(encoder, metrics, max_batch_size=4, max_wait_ms=60_000):
        futures = [batcher.submit(views(tag), index, deadline=None) for tag in (1, 2, 3, 4)]
        results = [f.result(WAIT) for f in futures]
        # max_wait is a minute: the batch closed because it was full, not on time
        assert encoder.batches == [[1, 2, 3, 4]]
        assert [int(r.embeddings[0, 0]) for r in results] == [1, 2, 3, 4]
        assert metrics.batch_images._sum.get() == 4


def test_a_lone_image_runs_once_max_wait_has_passed(
    encoder: GatedEncoder, metrics: Metrics, index: PolicyIndex
) -> None:
    for batcher in running(encoder, metrics, max_batch_size=32, max_wait_ms=20):
        result = batcher.submit(views(7), index, deadline=None).result(WAIT)
        assert int(result.embeddings[0, 0]) == 7
        assert encoder.batches == [[7]]


def test_a_lone_image_runs_at_once_when_nothing_else_is_on_its_way(
    encoder: GatedEncoder, metrics: Metrics, index: PolicyIndex
) -> None:
    nothing = lambda: 0  # noqa: E731
    for batcher in running(encoder, metrics, nothing, max_batch_size=32, max_wait_ms=600_000):
        # with a ten-minute max_wait, only "nothing expected" can close this batch in time
        assert (
            int(batcher.submit(views(3), index, deadline=None).result(WAIT).embeddings[0, 0]) == 3
        )


def test_a_batch_waits_for_images_still_being_decoded(
    encoder: GatedEncoder, metrics: Metrics, index: PolicyIndex
) -> None:
    decoding = [1]
    for batcher in running(
        encoder, metrics, lambda: decoding[0], max_batch_size=32, max_wait_ms=600_000
    ):
        first = batcher.submit(views(1), index, deadline=None)
        second = batcher.submit(views(2), index, deadline=None)
        assert not first.done()
        decoding[0] = 0
        batcher.notify()
        assert int(first.result(WAIT).embeddings[0, 0]) == 1
        assert int(second.result(WAIT).embeddings[0, 0]) == 2
        assert encoder.batches == [[1, 2]]


def test_queued_images_are_split_into_batches_in_arrival_order(
    encoder: GatedEncoder, metrics: Metrics, index: PolicyIndex
) -> None:
    for batcher in running(encoder, metrics, max_batch_size=4, max_wait_ms=0):
        block_worker(batcher, encoder, index)
        futures = [batcher.submit(views(tag), index, deadline=None) for tag in range(1, 11)]
        encoder.release()
        results = [f.result(WAIT) for f in futures]
        assert [int(r.embeddings[0, 0]) for r in results] == list(range(1, 11))
        assert encoder.batches == [[250], [1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]


def test_an_image_with_several_views_stays_together(
    encoder: GatedEncoder, metrics: Metrics, index: PolicyIndex
) -> None:
    for batcher in running(encoder, metrics, max_batch_size=4, max_wait_ms=0):
        block_worker(batcher, encoder, index)
        first = batcher.submit(views(1, count=3), index, deadline=None)
        second = batcher.submit(views(2, count=3), index, deadline=None)
        encoder.release()
        assert first.result(WAIT).embeddings.shape[0] == 3
        assert len(first.result(WAIT).scores) == 1
        assert second.result(WAIT).embeddings[:, 0].tolist() == [2, 2, 2]
        assert encoder.batches[1:] == [[1, 1, 1], [2, 2, 2]]


def test_expired_images_never_reach_the_model(
    encoder: GatedEncoder, metrics: Metrics, index: PolicyIndex
) -> None:
    for batcher in running(encoder, metrics, max_batch_size=8, max_wait_ms=0):
        block_worker(batcher, encoder, index)
        expired = batcher.submit(views(1), index, deadline=time.monotonic() - 1)
        alive = batcher.submit(views(2), index, deadline=time.monotonic() + 3600)
        encoder.release()
        with pytest.raises(DeadlineExceeded):
            expired.result(WAIT)
        assert int(alive.result(WAIT).embeddings[0, 0]) == 2
        assert encoder.batches[1:] == [[2]]
        assert metrics.rejected_requests.labels(reason="deadline")._value.get() == 1


def test_cancelled_images_never_reach_the_model(
    encoder: GatedEncoder, metrics: Metrics, index: PolicyIndex
) -> None:
    for batcher in running(encoder, metrics, max_batch_size=8, max_wait_ms=0):
        block_worker(batcher, encoder, index)
        cancelled = batcher.submit(views(1), index, deadline=None)
        kept = batcher.submit(views(2), index, deadline=None)
        assert cancelled.cancel()
        encoder.release()
        assert int(kept.result(WAIT).embeddings[0, 0]) == 2
        assert encoder.batches[1:] == [[2]]
        assert metrics.rejected_requests.labels(reason="cancelled")._value.get() == 1


def test_each_image_is_scored_against_its_own_policy_set(
    encoder: GatedEncoder, metrics: Metrics, index: PolicyIndex
) -> None:
    bigger = make_index(("p", policy_doc("block", ["x"])), ("q", policy_doc("review", ["y"])))
    for batcher in running(encoder, metrics, max_batch_size=8, max_wait_ms=0):
        block_worker(batcher, encoder, index)
        old = batcher.submit(views(1), index, deadline=None)
        new = batcher.submit(views(2), bigger, deadline=None)
        encoder.release()
        assert len(old.result(WAIT).scores) == 1
        assert len(new.result(WAIT).scores) == 2
        assert encoder.batches[1:] == [[1, 2]]  # still one forward pass


def test_a_failing_forward_pass_fails_only_its_batch(metrics: Metrics, index: PolicyIndex) -> None:
    calls = []

    def flaky(pixels: torch.Tensor) -> torch.Tensor:
        calls.append(pixels.shape[0])
        if len(calls) == 1:
            raise RuntimeError("device fell over")
        return torch.ones(pixels.shape[0], DIM)

    batcher = Batcher(flaky, batch_config(max_batch_size=8, max_wait_ms=0), metrics)
    batcher.start()
    try:
        with pytest.raises(ModelFailed, match=r"the model failed on this batch \(RuntimeError\)"):
            batcher.submit(views(1), index, deadline=None).result(WAIT)
        assert len(batcher.submit(views(2), index, deadline=None).result(WAIT).scores) == 1
    finally:
        batcher.stop()


def test_stop_drains_the_queue_then_refuses(
    encoder: GatedEncoder, metrics: Metrics, index: PolicyIndex
) -> None:
    batcher = Batcher(encoder, batch_config(max_batch_size=2, max_wait_ms=0), metrics)
    batcher.start()
    block_worker(batcher, encoder, index)
    queued = [batcher.submit(views(tag), index, deadline=None) for tag in (1, 2, 3)]
    stopper = threading.Thread(target=batcher.stop)
    stopper.start()
    encoder.release()
    stopper.join(WAIT)
    assert [int(f.result(0).embeddings[0, 0]) for f in queued] == [1, 2, 3]
    with pytest.raises(NotReady):
        batcher.submit(views(4), index, deadline=None)
    assert metrics.queue_images._value.get() == 0


def test_every_image_reports_leaving_the_worker_scored_dropped_or_failed(
    encoder: GatedEncoder, metrics: Metrics, index: PolicyIndex
) -> None:
    left: list[int] = []
    for batcher in running(encoder, metrics, max_batch_size=1, max_wait_ms=0):
        block_worker(batcher, encoder, index)
        scored = batcher.submit(views(1), index, None, on_done=lambda: left.append(1))
        cancelled = batcher.submit(views(2), index, None, on_done=lambda: left.append(2))
        late = batcher.submit(views(3), index, time.monotonic(), on_done=lambda: left.append(3))
        assert cancelled.cancel()
        assert left == []  # a cancelled image's pixels are still queued: not gone yet
        encoder.release()
        scored.result(WAIT)
        with pytest.raises(DeadlineExceeded):
            late.result(WAIT)
        deadline = time.monotonic() + WAIT
        while len(left) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sorted(left) == [1, 2, 3]


def test_an_image_has_left_the_worker_before_its_result_is_seen(
    encoder: GatedEncoder, metrics: Metrics, index: PolicyIndex
) -> None:
    """A caller may end (its event loop with it) as soon as its result resolves: its views
    must have been handed back by then, scored, failed or dropped."""
    left: list[int] = []
    seen: list[tuple[int, bool]] = []
    for batcher in running(encoder, metrics, max_batch_size=1, max_wait_ms=0):
        block_worker(batcher, encoder, index)
        scored = batcher.submit(views(1), index, None, on_done=lambda: left.append(1))
        late = batcher.submit(views(3), index, time.monotonic(), on_done=lambda: left.append(3))

        def note_when_resolved(tag: int) -> Callable[[object], None]:
            return lambda _: seen.append((tag, tag in left))

        scored.add_done_callback(note_when_resolved(1))
        late.add_done_callback(note_when_resolved(3))
        encoder.release()
        scored.result(WAIT)
        with pytest.raises(DeadlineExceeded):
            late.result(WAIT)
    assert sorted(seen) == [(1, True), (3, True)]


def test_stopping_leaves_a_stuck_worker_behind_and_fails_what_is_queued(
    encoder: GatedEncoder, metrics: Metrics, index: PolicyIndex
) -> None:
    batcher = Batcher(encoder, batch_config(max_batch_size=1, max_wait_ms=0), metrics)
    batcher.start()
    left: list[int] = []
    (worker,) = [t for t in batcher._threads if t.name == "model-worker"]
    try:
        block_worker(batcher, encoder, index)  # the forward pass hangs
        queued = batcher.submit(views(1), index, None, on_done=lambda: left.append(1))
        batcher.stop(timeout=0.2)
        with pytest.raises(NotReady, match="stuck"):
            queued.result(WAIT)
        assert left == [1]
        assert worker.is_alive()
        with pytest.raises(NotReady, match="still stuck"):
            batcher.start()  # a second pipeline beside the stuck one would share its state
    finally:
        encoder.release()
        worker.join(WAIT)  # not left running into interpreter exit
    for thread in batcher._threads:
        thread.join(WAIT)
    batcher.start()  # the stuck pass has returned: a clean start
    try:
        assert int(batcher.submit(views(5), index, None).result(WAIT).embeddings[0, 0]) == 5
        assert batcher.state().running_since is None
    finally:
        batcher.stop()


def test_a_hurried_stop_of_an_idle_worker_is_not_reported_stuck(
    encoder: GatedEncoder, metrics: Metrics, index: PolicyIndex, caplog: pytest.LogCaptureFixture
) -> None:
    batcher = Batcher(encoder, batch_config(max_batch_size=1, max_wait_ms=0), metrics)
    batcher.start()
    batcher.submit(views(1), index, None).result(WAIT)
    batcher.stop(timeout=0.0)
    assert "stuck" not in caplog.text


def test_the_next_full_batch_is_staged_while_the_device_runs(
    encoder: GatedEncoder, metrics: Metrics, index: PolicyIndex
) -> None:
    if not PIPELINED["pipelined"]:
        pytest.skip("the serial worker stages a batch only once the device is free")
    staged: list[list[int]] = []

    def stage(views: Sequence[torch.Tensor]) -> torch.Tensor:
        staged.append([int(v[0, 0, 0, 0]) for v in views])
        return torch.cat(list(views))

    batcher = Batcher(encoder, batch_config(max_batch_size=2, max_wait_ms=0), metrics)
    batcher._stage_images = stage
    batcher.start()
    try:
        block_worker(batcher, encoder, index)
        futures = [batcher.submit(views(tag), index, deadline=None) for tag in (1, 2, 3)]
        wait_until(lambda: staged == [[250], [1, 2]])  # full: staged while 250 runs
        time.sleep(0.05)
        assert staged == [[250], [1, 2]]  # 3 alone is not full: it waits for an idle device
        encoder.release()
        assert [int(f.result(WAIT).embeddings[0, 0]) for f in futures] == [1, 2, 3]
        assert staged == [[250], [1, 2], [3]]
    finally:
        encoder.release()
        batcher.stop()


def test_a_batch_is_finished_while_the_next_one_runs(
    encoder: GatedEncoder, metrics: Metrics, index: PolicyIndex
) -> None:
    if not PIPELINED["pipelined"]:
        pytest.skip("the serial worker finishes a batch before the next forward pass")
    finishing = threading.Event()

    def slow_to_finish() -> None:
        assert finishing.wait(WAIT)

    for batcher in running(encoder, metrics, max_batch_size=1, max_wait_ms=0):
        first = batcher.submit(views(1), index, None, on_done=slow_to_finish)
        second = batcher.submit(views(2), index, deadline=None)
        wait_until(lambda: encoder.batches == [[1], [2]])  # 2 ran while 1 was being finished
        assert not first.done()
        finishing.set()
        assert int(first.result(WAIT).embeddings[0, 0]) == 1
        assert int(second.result(WAIT).embeddings[0, 0]) == 2


def test_a_model_failure_found_when_reading_results_back_fails_only_its_batch(
    metrics: Metrics, index: PolicyIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU an asynchronous kernel's error surfaces at the sync, in the finishing stage."""
    reads = []

    def failing_once(self: OnHost) -> tuple[torch.Tensor, ...]:
        reads.append(1)
        if len(reads) == 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return self.tensors

    monkeypatch.setattr(OnHost, "wait", failing_once)
    config = batch_config(max_batch_size=1, max_wait_ms=0)
    batcher = Batcher(lambda p: torch.ones(p.shape[0], DIM), config, metrics)
    batcher.start()
    try:
        with pytest.raises(ModelFailed, match="RuntimeError"):
            batcher.submit(views(1), index, deadline=None).result(WAIT)
        assert batcher.state().failed_in_a_row == 1
        assert batcher.state().running_since is None
        assert len(batcher.submit(views(2), index, deadline=None).result(WAIT).scores) == 1
        assert batcher.state().failed_in_a_row == 0
    finally:
        batcher.stop()

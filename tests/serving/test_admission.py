from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import CollectorRegistry

from moderator.errors import DeadlineExceeded, Overloaded
from moderator.serving.admission import Admission
from moderator.serving.metrics import Metrics


def rejections(metrics: Metrics, reason: str) -> float:
    return float(metrics.rejected_requests.labels(reason=reason)._value.get())


def in_flight(metrics: Metrics, resource: str) -> float:
    return float(metrics.admission_in_flight.labels(resource=resource)._value.get())


def budget(images: int = 5, views: int = 100) -> tuple[Admission, Metrics]:
    metrics = Metrics(CollectorRegistry())
    return Admission({"images": images, "views": views}, metrics), metrics


def test_admits_up_to_the_limit_and_refuses_past_it_holding_nothing() -> None:
    admission, metrics = budget(images=5)
    admission.try_admit({"images": 3, "views": 10})
    admission.try_admit({"images": 2})
    assert in_flight(metrics, "images") == 5
    with pytest.raises(Overloaded, match="5 images in flight; 1 more would pass the limit of 5"):
        admission.try_admit({"images": 1, "views": 1})
    assert (admission.held("images"), admission.held("views")) == (5, 10)
    assert rejections(metrics, "overload") == 1
    admission.release({"images": 3, "views": 10})
    admission.try_admit({"images": 3})
    assert in_flight(metrics, "images") == 5


def test_every_resource_must_fit() -> None:
    admission, _ = budget(images=5, views=4)
    admission.try_admit({"views": 4})
    with pytest.raises(Overloaded, match="4 views in flight"):
        admission.try_admit({"images": 1, "views": 1})
    assert admission.held("images") == 0


def test_a_request_larger_than_the_limit_is_refused_even_when_idle() -> None:
    admission, metrics = budget(images=2)
    with pytest.raises(Overloaded, match="needs 3 images; no more than 2"):
        admission.try_admit({"images": 3})
    assert admission.held("images") == 0
    assert rejections(metrics, "request_limit") == 1


def test_waiters_are_granted_oldest_first_and_a_younger_one_never_jumps_the_line() -> None:
    async def scenario() -> list[str]:
        admission, _ = budget(images=4)
        admission.try_admit({"images": 4})
        granted: list[str] = []

        async def wait(name: str, images: int, priority: float) -> None:
            await admission.admit({"images": images}, priority)
            granted.append(name)

        # "young" calls first but arrived later; "old" needs more room than "small"
        tasks = [
            asyncio.ensure_future(wait("young", 1, priority=2.0)),
            asyncio.ensure_future(wait("old", 3, priority=1.0)),
            asyncio.ensure_future(wait("small", 1, priority=3.0)),
        ]
        await asyncio.sleep(0.01)
        admission.release({"images": 2})  # room for young and small, not yet for old
        await asyncio.sleep(0.01)
        assert granted == []
        with pytest.raises(Overloaded, match="already waiting"):
            admission.try_admit({"images": 1})  # no jumping the line from outside either
        admission.release({"images": 2})
        await asyncio.wait_for(asyncio.gather(tasks[0], tasks[1]), 1)
        assert not tasks[2].done()  # 4 of 4 held: old's 3 and young's 1
        admission.release({"images": 1})
        await asyncio.wait_for(tasks[2], 1)
        return granted

    assert asyncio.run(scenario()) == ["old", "young", "small"]


def test_a_waiter_past_its_deadline_holds_nothing_and_lets_the_next_in() -> None:
    async def scenario() -> None:
        admission, metrics = budget(images=2)
        admission.try_admit({"images": 2})
        late = asyncio.ensure_future(
            admission.admit({"images": 2}, priority=1.0, deadline=time.monotonic() + 0.05)
        )
        next_one = asyncio.ensure_future(admission.admit({"images": 1}, priority=2.0))
        with pytest.raises(DeadlineExceeded):
            await late
        assert rejections(metrics, "deadline") == 1
        admission.release({"images": 1})
        await asyncio.wait_for(next_one, 1)
        assert admission.held("images") == 2

    asyncio.run(scenario())


def test_a_cancelled_waiter_holds_nothing() -> None:
    async def scenario() -> None:
        admission, _ = budget(images=1)
        admission.try_admit({"images": 1})
        waiting = asyncio.ensure_future(admission.admit({"images": 1}))
        await asyncio.sleep(0.01)
        waiting.cancel()
        await asyncio.sleep(0)
        admission.release({"images": 1})
        assert admission.held("images") == 0
        admission.try_admit({"images": 1})

    asyncio.run(scenario())


def test_added_work_can_pass_the_limit_and_blocks_waiters_until_released() -> None:
    async def scenario() -> None:
        admission, _ = budget(views=4)
        admission.try_admit({"views": 1})
        admission.add({"views": 10})  # a decoded animation's other views
        waiting = asyncio.ensure_future(admission.admit({"views": 1}))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        admission.release({"views": 11})
        await asyncio.wait_for(waiting, 1)
        assert admission.held("views") == 1

    asyncio.run(scenario())


def test_an_older_waiter_that_fits_is_granted_at_once_past_younger_waiters() -> None:
    async def scenario() -> None:
        admission, _ = budget(images=4, views=4)
        admission.try_admit({"images": 4})
        young = asyncio.ensure_future(admission.admit({"images": 2}, priority=5.0))
        await asyncio.sleep(0.01)
        # the views of a request admitted earlier: free room, older than the waiting request
        await asyncio.wait_for(admission.admit({"views": 1}, priority=1.0), 1)
        assert not young.done()
        admission.release({"images": 2})
        await asyncio.wait_for(young, 1)

    asyncio.run(scenario())

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from moderator.errors import DeadlineExceeded, NotReady
from moderator.serving.stream import answer_in_order


class Client:
    """Requests a test puts in; the stream reads them as a gRPC request iterator would."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[int | None] = asyncio.Queue()

    async def requests(self) -> AsyncIterator[int]:
        while (item := await self.queue.get()) is not None:
            yield item


class Worker:
    """Answers n with n * 10 once released; counts how many run at once."""

    def __init__(self) -> None:
        self.running = 0
        self.most = 0
        self.started: list[int] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def answer(self, n: int) -> int:
        self.started.append(n)
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await self.gate.wait()
            await asyncio.sleep(0.01 * (n % 3))  # finish out of order
            return n * 10
        finally:
            self.running -= 1


def test_answers_come_in_order_with_at_most_the_window_at_work() -> None:
    async def scenario() -> list[int]:
        client, worker = Client(), Worker()
        for n in range(20):
            client.queue.put_nowait(n)
        client.queue.put_nowait(None)
        stream = answer_in_order(client.requests(), worker.answer, 4, 60, asyncio.Event())
        answers = [a async for a in stream]
        assert worker.most <= 4
        return answers

    assert asyncio.run(scenario()) == [n * 10 for n in range(20)]


def test_a_client_waiting_for_a_slow_answer_is_not_idle() -> None:
    async def scenario() -> None:
        client, worker = Client(), Worker()
        worker.gate.clear()
        stream = answer_in_order(client.requests(), worker.answer, 4, 0.05, asyncio.Event())
        client.queue.put_nowait(1)
        first = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.3)  # six idle periods with the answer pending
        worker.gate.set()
        assert await first == 10
        with pytest.raises(DeadlineExceeded, match=r"no request for 0\.05 s"):
            await anext(stream)  # now nothing is pending and nothing comes

    asyncio.run(scenario())


def test_a_stopping_server_answers_what_is_pending_then_ends_the_stream() -> None:
    async def scenario() -> None:
        client, worker = Client(), Worker()
        stopping = asyncio.Event()
        worker.gate.clear()
        stream = answer_in_order(client.requests(), worker.answer, 4, 60, stopping)
        for n in (1, 2):
            client.queue.put_nowait(n)
        first = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.05)
        stopping.set()
        client.queue.put_nowait(3)  # sent after the stop: never read
        worker.gate.set()
        assert [await first, await anext(stream)] == [10, 20]
        with pytest.raises(NotReady, match="shutting down"):
            await anext(stream)
        assert worker.started == [1, 2]

    asyncio.run(scenario())


def test_closing_the_stream_leaves_no_answer_running() -> None:
    async def scenario() -> None:
        client, worker = Client(), Worker()
        worker.gate.clear()
        stream = answer_in_order(client.requests(), worker.answer, 4, 60, asyncio.Event())
        for n in range(10):
            client.queue.put_nowait(n)
        first = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.05)
        assert worker.running == 4
        first.cancel()  # the call is cancelled while its stream waits for an answer
        with pytest.raises(asyncio.CancelledError):
            await first
        await asyncio.sleep(0.05)
        assert worker.running == 0
        assert len(worker.started) == 4

    asyncio.run(scenario())


def test_the_idle_clock_starts_when_the_last_answer_was_sent() -> None:
    async def scenario() -> list[int]:
        client = Client()

        async def slow(n: int) -> int:
            await asyncio.sleep(0.45)  # nearly the idle time, spent on the answer
            return n

        stream = answer_in_order(client.requests(), slow, 4, 0.5, asyncio.Event())
        answers = []
        for n in range(3):
            client.queue.put_nowait(n)
            answers.append(await anext(stream))
            await asyncio.sleep(0.1)  # the client thinks a little before its next request
        client.queue.put_nowait(None)
        return answers

    assert asyncio.run(scenario()) == [0, 1, 2]

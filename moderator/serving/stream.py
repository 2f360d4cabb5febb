"""One bidirectional stream of requests, answered in order.

Requests are read as they arrive and worked on up to `window` at once; each answer is sent as
soon as it and every earlier one are ready, so a client may wait for an answer before sending
its next request. A request's work starts only once it holds a window slot, so a cancelled
stream leaves nothing running, and a stream that sends nothing for `idle_seconds` is closed
(an idle stream would otherwise hold its call slot forever).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from moderator.errors import DeadlineExceeded

_Request = TypeVar("_Request")
_Answer = TypeVar("_Answer")


async def answer_in_order(
    requests: AsyncIterator[_Request],
    answer: Callable[[_Request], Awaitable[_Answer]],
    window: int,
    idle_seconds: float,
) -> AsyncIterator[_Answer]:
    slots = asyncio.Semaphore(window)
    started: asyncio.Queue[asyncio.Task[_Answer] | Exception | None] = asyncio.Queue()
    reader = asyncio.ensure_future(_read(requests, answer, slots, started, idle_seconds))
    try:
        while (item := await started.get()) is not None:
            if isinstance(item, Exception):
                raise item
            try:
                yield await item
            finally:
                slots.release()
    finally:
        reader.cancel()
        while not started.empty():
            if isinstance(queued := started.get_nowait(), asyncio.Task):
                queued.cancel()


async def _read(
    requests: AsyncIterator[_Request],
    answer: Callable[[_Request], Awaitable[_Answer]],
    slots: asyncio.Semaphore,
    started: asyncio.Queue[asyncio.Task[_Answer] | Exception | None],
    idle_seconds: float,
) -> None:
    try:
        while True:
            try:
                request = await asyncio.wait_for(anext(requests), idle_seconds)
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise DeadlineExceeded(
                    f"no request for {idle_seconds:g} s: stream closed (--stream-idle-seconds)"
                ) from None
            await slots.acquire()
            started.put_nowait(asyncio.ensure_future(answer(request)))
    except Exception as exc:
        started.put_nowait(exc)
        return
    started.put_nowait(None)

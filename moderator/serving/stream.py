"""One bidirectional stream of requests, answered in order.

Requests are read as they arrive and worked on up to `window` at once; each answer is sent as
soon as it and every earlier one are ready, so a client may wait for an answer before sending
its next request. A request's work starts only once it holds a window slot, so a cancelled
stream leaves nothing running. A stream with no answer pending that sends nothing for
`idle_seconds` is closed (an idle stream would otherwise hold its call slot forever). Once
`stopping` is set (the server drains), no further request is read: the pending ones are
answered, then the stream ends with NotReady, telling the client to send the rest elsewhere.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from moderator.errors import DeadlineExceeded, NotReady

_Request = TypeVar("_Request")
_Answer = TypeVar("_Answer")
_END = object()  # the client closed its side


@dataclass
class _Window(Generic[_Answer]):
    slots: asyncio.Semaphore
    started: asyncio.Queue[asyncio.Task[_Answer] | Exception | None]
    pending: int = 0  # answers started and not yet sent
    # when a request was last read or the last pending answer sent (time.monotonic())
    last_activity: float = 0.0

    def active(self) -> None:
        self.last_activity = time.monotonic()


async def answer_in_order(
    requests: AsyncIterator[_Request],
    answer: Callable[[_Request], Awaitable[_Answer]],
    window: int,
    idle_seconds: float,
    stopping: asyncio.Event,
) -> AsyncIterator[_Answer]:
    state: _Window[_Answer] = _Window(asyncio.Semaphore(window), asyncio.Queue())
    state.active()
    reader = asyncio.ensure_future(_read(requests, answer, state, idle_seconds, stopping))
    try:
        while (item := await state.started.get()) is not None:
            if isinstance(item, Exception):
                raise item
            try:
                yield await item
            finally:
                state.pending -= 1
                state.slots.release()
                state.active()
    finally:
        reader.cancel()
        while not state.started.empty():
            if isinstance(queued := state.started.get_nowait(), asyncio.Task):
                queued.cancel()


async def _read(
    requests: AsyncIterator[_Request],
    answer: Callable[[_Request], Awaitable[_Answer]],
    state: _Window[_Answer],
    idle_seconds: float,
    stopping: asyncio.Event,
) -> None:
    try:
        while (request := await _next(requests, state, idle_seconds, stopping)) is not _END:
            state.active()
            await state.slots.acquire()
            state.pending += 1
            state.started.put_nowait(asyncio.ensure_future(answer(request)))  # type: ignore[arg-type]
    except Exception as exc:
        state.started.put_nowait(exc)
        return
    state.started.put_nowait(None)


async def _next(
    requests: AsyncIterator[_Request],
    state: _Window[_Answer],
    idle_seconds: float,
    stopping: asyncio.Event,
) -> _Request | object:
    """The next request, or _END; DeadlineExceeded once the stream has been idle (nothing
    sent, nothing pending) for idle_seconds; NotReady once the server is stopping."""
    incoming = asyncio.ensure_future(_pull(requests))
    stop = asyncio.ensure_future(stopping.wait())
    try:
        while True:
            # idle: nothing read and no answer pending since last_activity
            idle_for = time.monotonic() - state.last_activity
            timeout = idle_seconds if state.pending else max(0.0, idle_seconds - idle_for)
            done, _ = await asyncio.wait(
                {incoming, stop}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if stop in done:  # first: a client that never pauses must not keep it open
                raise NotReady("the server is shutting down: send the rest of the stream again")
            if incoming in done:
                return incoming.result()
            if not state.pending and time.monotonic() - state.last_activity >= idle_seconds:
                raise DeadlineExceeded(
                    f"no request for {idle_seconds:g} s: stream closed (--stream-idle-seconds)"
                )
    finally:
        incoming.cancel()
        stop.cancel()


async def _pull(requests: AsyncIterator[_Request]) -> _Request | object:
    try:
        return await anext(requests)
    except StopAsyncIteration:
        return _END

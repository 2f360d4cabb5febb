"""Decoding in worker processes, each image under a wall-clock and a memory budget.

A decode that runs past its budget is not waited for: its worker is killed and replaced and
the image gets IMAGE_ERROR_CODE_TOO_COMPLEX, while the other workers go on. A cancelled request,
or one whose deadline has passed, never starts its pending decodes. One thread per worker
drives it (blocking pipe I/O with a timeout); pixels cross through shared memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import mmap
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from moderator.config import DecodeConfig, ImageConfig
from moderator.core.cpus import usable_cpus
from moderator.core.pdq import Pdq
from moderator.core.views import DecodedImage, Preprocessing
from moderator.errors import DeadlineExceeded, ImageErrorCode, InvalidImage, NotReady
from moderator.serving.decode_worker import (
    LENGTH_BYTES,
    MAX_MESSAGE_CHARS,
    REPLY_LENGTH_BYTES,
    WorkerSettings,
)
from moderator.serving.metrics import Metrics

log = logging.getLogger(__name__)

START_TIMEOUT_SECONDS = 60.0
MAX_REPLY_BYTES = 64 * 1024
# Each worker decodes on one core; extra threads would only compete with the others.
_WORKER_ENV = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MALLOC_ARENA_MAX": "2",
}


class WorkerLost(Exception):
    """The worker died or stopped answering; `reason` is 'timeout' or 'crash'."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class DecodeWorker:
    """One worker process and its shared memory. Used by one thread at a time."""

    def __init__(self, limits: ImageConfig, prep: Preprocessing, memory_mb: int) -> None:
        self._prep = prep
        self._view_bytes = 3 * prep.size * prep.size
        input_capacity = limits.max_bytes
        output_capacity = limits.max_views * self._view_bytes
        self._fd = os.memfd_create("moderator-decode", 0)
        os.ftruncate(self._fd, input_capacity + output_capacity)
        self._shm = mmap.mmap(self._fd, input_capacity + output_capacity)
        self._settings = WorkerSettings(
            limits, prep, memory_mb, self._fd, input_capacity, output_capacity
        )
        self._output_capacity = output_capacity
        self._process: subprocess.Popen[bytes] | None = None
        self._ready = False
        self._number = 0

    def start(self) -> None:
        """Start the process; it is ready after its first answer (see wait_ready)."""
        self._process = subprocess.Popen(
            [sys.executable, "-m", "moderator.serving.decode_worker", self._settings.to_json()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            pass_fds=(self._fd,),
            env={**os.environ, **_WORKER_ENV},
        )
        self._ready = False

    def wait_ready(self, timeout: float = START_TIMEOUT_SECONDS) -> None:
        """Wait for the worker's first answer; start it again once if it fails to start."""
        for attempt in (1, 2):
            try:
                if self._process is None:
                    self.start()
                if not self._ready:
                    if self._read_reply(timeout) != {"id": 0, "ready": True}:
                        raise WorkerLost("crash", "worker did not say it was ready")
                    self._ready = True
                return
            except (WorkerLost, OSError) as exc:
                self.kill()
                if attempt == 2:
                    raise NotReady(f"a decode worker cannot start: {exc}") from exc

    def decode(self, data: bytes, timeout: float) -> DecodedImage:
        """The views and hash of `data`; InvalidImage for a bad image, WorkerLost if the worker
        had to be killed (the pool starts another)."""
        if self._process is not None and self._process.poll() is not None:
            self.kill()  # it died while idle: this image had nothing to do with it
        self.wait_ready()
        if len(data) > self._settings.input_capacity:
            raise InvalidImage(ImageErrorCode.TOO_MANY_BYTES, "image too large")
        self._shm[: len(data)] = data
        self._number += 1
        try:
            self._send(
                len(data).to_bytes(LENGTH_BYTES, "little")
                + self._number.to_bytes(LENGTH_BYTES, "little")
            )
            count, pdq = self._view_count(self._read_reply(timeout))
        except WorkerLost:
            self.kill()
            raise
        return DecodedImage(self._views(count), pdq)

    def _view_count(self, answer: dict[str, Any]) -> tuple[int, Pdq]:
        """The number of views and the hash in a well-formed answer to the current request;
        InvalidImage for an error answer; WorkerLost for anything else (a worker out of step
        cannot be trusted)."""
        if answer.get("id") != self._number:
            raise WorkerLost("crash", f"worker answered request {answer.get('id')!r}")
        views = answer.get("views")
        if isinstance(views, int) and 1 <= views * self._view_bytes <= self._output_capacity:
            return views, _pdq_of_answer(answer)
        try:
            code = ImageErrorCode(answer.get("code"))
        except ValueError as exc:
            raise WorkerLost("crash", "worker sent a malformed answer") from exc
        raise InvalidImage(code, str(answer.get("message", ""))[:MAX_MESSAGE_CHARS])

    def _views(self, count: int) -> np.ndarray:
        size = self._prep.size
        offset = self._settings.input_capacity
        pixels = np.frombuffer(self._shm, np.uint8, count * self._view_bytes, offset)
        return pixels.reshape(count, 3, size, size).copy()  # the buffer is the next image's

    def _send(self, message: bytes) -> None:
        assert self._process is not None
        assert self._process.stdin is not None
        try:
            self._process.stdin.write(message)
            self._process.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise WorkerLost("crash", f"worker is gone: {exc}") from exc

    def _read_reply(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        length = int.from_bytes(self._read_exactly(REPLY_LENGTH_BYTES, deadline), "little")
        if length > MAX_REPLY_BYTES:
            raise WorkerLost("crash", f"worker sent a {length}-byte reply")
        try:
            answer = json.loads(self._read_exactly(length, deadline))
        except ValueError as exc:
            raise WorkerLost("crash", "worker sent a reply that is not JSON") from exc
        if not isinstance(answer, dict):
            raise WorkerLost("crash", "worker sent a reply that is not an object")
        return answer

    def _read_exactly(self, count: int, deadline: float) -> bytes:
        assert self._process is not None
        assert self._process.stdout is not None
        fd = self._process.stdout.fileno()
        chunks: list[bytes] = []
        remaining = count
        while remaining:
            wait = deadline - time.monotonic()
            if wait <= 0 or not select.select([fd], [], [], wait)[0]:
                raise WorkerLost("timeout", "decoding ran past its time budget")
            chunk = os.read(fd, remaining)
            if not chunk:
                code = self._process.poll()
                raise WorkerLost("crash", f"worker exited (status {code})")
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    def kill(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        process.kill()
        process.wait()
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                stream.close()

    def interrupt(self) -> None:
        """SIGKILL the process from any thread; the thread driving it sees it die."""
        process = self._process
        if process is not None:
            with contextlib.suppress(OSError):
                process.send_signal(signal.SIGKILL)

    def close(self) -> None:
        """Stop the worker (end of stdin ends it; a stuck one is killed) and free the memory."""
        process = self._process
        if process is not None and process.stdin is not None:
            try:
                process.stdin.close()
                process.wait(timeout=2)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()
        self._shm.close()
        os.close(self._fd)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None


class DecodePool:
    """`workers` decode processes, each driven by one thread."""

    def __init__(
        self, config: DecodeConfig, limits: ImageConfig, prep: Preprocessing, metrics: Metrics
    ) -> None:
        self.size = config.workers or usable_cpus()
        self._timeout = config.timeout_ms / 1000
        self._metrics = metrics
        self._workers = [DecodeWorker(limits, prep, config.memory_mb) for _ in range(self.size)]
        self._idle: queue.SimpleQueue[DecodeWorker] = queue.SimpleQueue()
        self._threads = ThreadPoolExecutor(max_workers=self.size, thread_name_prefix="decode")
        self._revivals: list[threading.Thread] = []
        self._stopping = threading.Event()

    def start(self) -> None:
        """Start every worker and wait until all are warm."""
        for worker in self._workers:
            worker.start()
        for worker in self._workers:
            worker.wait_ready()
            self._idle.put(worker)
        self._metrics.decode_workers.set(self.size)
        log.info("%d decode workers ready", self.size)

    def stop(self) -> None:
        """Stop now: queued decodes are cancelled and running ones killed (their callers get
        an error), so a runaway image cannot hold up a shutdown."""
        self._stopping.set()
        self._threads.shutdown(wait=False, cancel_futures=True)
        for worker in self._workers:
            worker.interrupt()
        self._threads.shutdown(wait=True)
        for revival in self._revivals:
            revival.join()
        for worker in self._workers:
            worker.close()
        self._metrics.decode_workers.set(0)

    async def decode(self, data: bytes, deadline: float | None = None) -> DecodedImage:
        """The views of one image, decoded in a worker. Cancelling the caller before a worker
        takes the image means it is never decoded."""
        return await asyncio.wrap_future(self._threads.submit(self.decode_now, data, deadline))

    def worker_pids(self) -> list[int]:
        return [pid for worker in self._workers if (pid := worker.pid) is not None]

    def decode_now(self, data: bytes, deadline: float | None = None) -> DecodedImage:
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded("the deadline passed before the image was decoded")
        worker = self._idle.get()
        if self._stopping.is_set():
            self._idle.put(worker)
            raise NotReady("the decode workers are stopping")
        started = time.perf_counter()
        lost = False
        try:
            return worker.decode(data, self._timeout)
        except WorkerLost as exc:
            if self._stopping.is_set():
                raise NotReady("the decode workers are stopping") from exc
            lost = True
            self._metrics.decode_worker_restarts.labels(reason=exc.reason).inc()
            raise _lost_image(exc, self._timeout) from exc
        finally:
            self._metrics.decode_duration.observe(time.perf_counter() - started)
            if self._stopping.is_set():
                self._idle.put(worker)
            elif lost:
                self._revive(worker)
            else:
                self._idle.put(worker)

    def _revive(self, worker: DecodeWorker) -> None:
        """Start a killed worker again in the background: this image's answer does not wait for
        it, and the other workers take the next images meanwhile."""

        def revive() -> None:
            try:
                worker.wait_ready()
            except NotReady as exc:
                log.error("%s", exc)  # the next image it gets tries again
            finally:
                self._idle.put(worker)

        self._revivals = [t for t in self._revivals if t.is_alive()]
        thread = threading.Thread(target=revive, name="decode-revive", daemon=True)
        self._revivals.append(thread)
        thread.start()


def _pdq_of_answer(answer: dict[str, Any]) -> Pdq:
    try:
        return Pdq(answer["pdq"], answer["pdq_quality"])
    except (KeyError, TypeError, ValueError) as exc:
        raise WorkerLost("crash", "worker sent a malformed hash") from exc


def _lost_image(exc: WorkerLost, timeout: float) -> InvalidImage:
    if exc.reason == "timeout":
        return InvalidImage(
            ImageErrorCode.TOO_COMPLEX,
            f"decoding took longer than the {timeout * 1000:.0f} ms budget",
        )
    log.warning("decode worker lost: %s", exc)
    return InvalidImage(ImageErrorCode.CORRUPT, f"the decoder failed on this image ({exc})")

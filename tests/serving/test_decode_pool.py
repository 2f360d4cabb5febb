"""Decode worker processes: same views as in-process, budgets enforced, workers replaced."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from prometheus_client import CollectorRegistry

from moderator.config import DecodeConfig, ImageConfig
from moderator.core.cpus import cgroup_cpu_quota, usable_cpus
from moderator.core.views import DecodedImage, Preprocessing, decode_views
from moderator.demo.hostile import gif_of_tiny_frames, png_pixel_bomb
from moderator.errors import DeadlineExceeded, ImageErrorCode, InvalidImage, NotReady
from moderator.serving.decode_pool import DecodePool
from moderator.serving.metrics import Metrics
from tests.helpers import encode, shape_png

PREP = Preprocessing(size=64, fill=(123, 117, 104))
# Slow enough to run past a short budget: 60 frames composed on a 3000x3000 canvas.
SLOW_GIF = gif_of_tiny_frames(frames=60, canvas=3000)
SLOW_LIMITS = ImageConfig(max_animation_pixels=10**9)


def make_pool(
    limits: ImageConfig = SLOW_LIMITS, workers: int = 1, timeout_ms: float = 300, memory_mb: int = 0
) -> tuple[DecodePool, Metrics]:
    metrics = Metrics(CollectorRegistry())
    config = DecodeConfig(workers=workers, timeout_ms=timeout_ms, memory_mb=memory_mb)
    pool = DecodePool(config, limits, PREP, metrics)
    pool.start()
    return pool, metrics


@pytest.fixture
def pool() -> Iterator[tuple[DecodePool, Metrics]]:
    pool, metrics = make_pool()
    try:
        yield pool, metrics
    finally:
        pool.stop()


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_a_worker_returns_the_views_decoding_in_process_gives(
    pool: tuple[DecodePool, Metrics],
) -> None:
    decoder, _ = pool
    for data in (shape_png("red", "star"), encode(Image.new("RGBA", (90, 30), (0, 9, 0, 0)))):
        assert np.array_equal(decoder.decode_now(data).views, decode_views(data, SLOW_LIMITS, PREP))


def test_a_bad_image_gets_its_code_from_the_worker(pool: tuple[DecodePool, Metrics]) -> None:
    decoder, metrics = pool
    with pytest.raises(InvalidImage) as info:
        decoder.decode_now(b"GIF89a broken")
    assert info.value.code is ImageErrorCode.CORRUPT
    assert sample(metrics, "moderator_decode_worker_restarts_total", reason="crash") == 0


def test_a_decode_over_its_time_budget_is_too_complex_and_its_worker_replaced(
    pool: tuple[DecodePool, Metrics],
) -> None:
    decoder, metrics = pool
    (before,) = decoder.worker_pids()
    started = time.monotonic()
    with pytest.raises(InvalidImage, match="300 ms budget") as info:
        decoder.decode_now(SLOW_GIF)
    assert info.value.code is ImageErrorCode.TOO_COMPLEX
    assert time.monotonic() - started < 2  # killed, not waited for
    assert sample(metrics, "moderator_decode_worker_restarts_total", reason="timeout") == 1
    assert not _alive(before)
    assert decoder.decode_now(shape_png("blue", "circle")).views.shape[0] == 1  # the new one works
    (after,) = decoder.worker_pids()
    assert after != before


def test_a_malformed_answer_is_a_lost_worker_not_a_failed_request(
    pool: tuple[DecodePool, Metrics], monkeypatch: pytest.MonkeyPatch
) -> None:
    decoder, metrics = pool
    (worker,) = decoder._workers
    real_read = worker._read_reply
    for answer in ({"id": 1, "code": 999}, {}, {"id": 999, "views": 1}, {"id": 1, "views": -1}):
        decoder.decode_now(shape_png("blue", "circle"))  # waits for the last restart
        forged: list[dict[str, Any]] = [answer]  # the next answer only

        def read(timeout: float, forged: list[dict[str, Any]] = forged) -> dict[str, Any]:
            return forged.pop() if forged else real_read(timeout)

        monkeypatch.setattr(worker, "_read_reply", read)
        monkeypatch.setattr(worker, "_number", 0)
        with pytest.raises(InvalidImage) as info:
            decoder.decode_now(shape_png("red", "star"))
        assert info.value.code is ImageErrorCode.CORRUPT
    assert sample(metrics, "moderator_decode_worker_restarts_total", reason="crash") == 4
    assert decoder.decode_now(shape_png("blue", "circle")).views.shape[0] == 1


def test_a_decode_over_its_memory_budget_is_too_complex() -> None:
    decoder, _ = make_pool(ImageConfig(max_pixels=400_000_000), timeout_ms=20_000, memory_mb=400)
    try:
        with pytest.raises(InvalidImage, match="memory") as info:
            decoder.decode_now(png_pixel_bomb(20_000, 20_000))  # 400 MB of grey, then RGB
        assert info.value.code is ImageErrorCode.TOO_COMPLEX
        assert decoder.decode_now(shape_png("blue", "circle")).views.shape[0] == 1
    finally:
        decoder.stop()


def test_a_worker_that_died_idle_is_replaced_before_the_next_image(
    pool: tuple[DecodePool, Metrics],
) -> None:
    decoder, _ = pool
    (pid,) = decoder.worker_pids()
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.1)
    assert decoder.decode_now(shape_png("green", "square")).views.shape[0] == 1


def test_a_cancelled_request_never_starts_its_pending_decodes(
    pool: tuple[DecodePool, Metrics],
) -> None:
    decoder, metrics = pool

    async def scenario() -> None:
        slow = asyncio.ensure_future(decoder.decode(SLOW_GIF))
        await asyncio.sleep(0.05)  # the only worker is busy with the slow image
        star = shape_png("red", "star")
        pending = [asyncio.ensure_future(decoder.decode(star)) for _ in range(5)]
        await asyncio.sleep(0.05)
        for task in pending:
            task.cancel()
        with pytest.raises(InvalidImage):
            await slow

    asyncio.run(scenario())
    time.sleep(0.2)
    assert sample(metrics, "moderator_decode_duration_seconds_count") == 1  # only the slow one


def test_a_passed_deadline_skips_the_decode(pool: tuple[DecodePool, Metrics]) -> None:
    decoder, metrics = pool
    with pytest.raises(DeadlineExceeded):
        decoder.decode_now(shape_png("red", "star"), deadline=time.monotonic() - 1)
    assert sample(metrics, "moderator_decode_duration_seconds_count") == 0


def test_workers_decode_in_parallel_and_stop_cleanly() -> None:
    decoder, metrics = make_pool(workers=2)
    pids = decoder.worker_pids()
    assert len(pids) == 2
    assert sample(metrics, "moderator_decode_workers") == 2

    async def both() -> list[DecodedImage]:
        return list(await asyncio.gather(*(decoder.decode(shape_png("red", "star")) for _ in "ab")))

    assert all(decoded.views.shape[0] == 1 for decoded in asyncio.run(both()))
    decoder.stop()
    assert not any(_alive(pid) for pid in pids)


def test_stopping_kills_a_runaway_decode_instead_of_waiting_for_its_budget() -> None:
    decoder, metrics = make_pool(timeout_ms=60_000)
    pids = decoder.worker_pids()

    async def scenario() -> None:
        slow = asyncio.ensure_future(decoder.decode(SLOW_GIF))
        queued = asyncio.ensure_future(decoder.decode(SLOW_GIF))
        await asyncio.sleep(0.3)  # the only worker is busy with the first
        stopping = asyncio.get_running_loop().run_in_executor(None, decoder.stop)
        with pytest.raises(NotReady, match="stopping"):
            await asyncio.wait_for(slow, 30)  # well inside the 60 s budget
        with pytest.raises(asyncio.CancelledError):
            await queued
        await stopping

    asyncio.run(scenario())
    assert not any(_alive(pid) for pid in pids)
    assert sample(metrics, "moderator_decode_worker_restarts_total", reason="crash") == 0


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "300000", "cpu/cpu.cfs_period_us": "100000"}, 3.0),
        ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
        ({}, None),
    ],
)
def test_cpu_quota_is_read_from_cgroups(
    tmp_path: Path, files: dict[str, str], expected: float | None
) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_quota(tmp_path) == expected
    cpus = usable_cpus(tmp_path)
    assert cpus >= 1
    if expected is not None:
        assert cpus <= max(1, -(-expected // 1))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child the pool has reaped no longer exists; a zombie would still answer.
    return Path(f"/proc/{pid}").exists() and "Z" not in _state(pid)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return "gone"

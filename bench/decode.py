"""Decode throughput: worker processes (the service) against threads in the server process
(the service before decode isolation), in alternating rounds of one run.

    .venv/bin/python bench/decode.py [--rounds 5] [--seconds 3] [--workers 2]

Both sides decode the same JPEGs into the same views with the same concurrency (one in-flight
image per worker), so the ratio is the cost of isolation: the pipe round trip, the copies
through shared memory and the scheduling. Nothing here is a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import photo_like_jpeg

from moderator.config import DecodeConfig, ImageConfig
from moderator.core.views import Preprocessing, decode_views
from moderator.serving.decode_pool import DecodePool
from moderator.serving.metrics import Metrics

PREP = Preprocessing(size=224, fill=(122, 116, 104))
LIMITS = ImageConfig()


async def rate(
    decode: Callable[[bytes], Awaitable[np.ndarray]],
    images: list[bytes],
    concurrency: int,
    seconds: float,
) -> float:
    done = 0
    stop = time.perf_counter() + seconds

    async def client(offset: int) -> None:
        nonlocal done
        i = offset
        while time.perf_counter() < stop:
            await decode(images[i % len(images)])
            done += 1
            i += concurrency

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    pool = DecodePool(
        DecodeConfig(workers=args.workers), LIMITS, PREP, Metrics(CollectorRegistry())
    )
    pool.start()
    threads = ThreadPoolExecutor(max_workers=args.workers)

    async def in_threads(data: bytes) -> np.ndarray:
        return await asyncio.get_running_loop().run_in_executor(
            threads, decode_views, data, LIMITS, PREP
        )

    async def in_workers(data: bytes) -> np.ndarray:
        return (await pool.decode(data)).views

    sets = {
        "224 px JPEG": [photo_like_jpeg(224, 224, seed) for seed in range(16)],
        "12 MP JPEG": [photo_like_jpeg(4000, 3000, seed) for seed in range(4)],
    }
    try:
        for name, images in sets.items():
            ratios, thread_rates, worker_rates = [], [], []
            for _ in range(args.rounds):
                t = asyncio.run(rate(in_threads, images, args.workers, args.seconds))
                w = asyncio.run(rate(in_workers, images, args.workers, args.seconds))
                thread_rates.append(t)
                worker_rates.append(w)
                ratios.append(w / t)
            print(
                f"{name}: threads {statistics.median(thread_rates):.1f} img/s, "
                f"workers {statistics.median(worker_rates):.1f} img/s, "
                f"workers/threads median of {args.rounds} paired rounds "
                f"{statistics.median(ratios):.2f} (range {min(ratios):.2f}-{max(ratios):.2f})"
            )
    finally:
        pool.stop()
        threads.shutdown()


if __name__ == "__main__":
    main()

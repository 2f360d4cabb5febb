"""N minutes at saturation with a mix of valid and hostile images.

    .venv/bin/python bench/soak.py --minutes 10 [--clients 8] [--hostile-fraction 0.1]
        [--images-per-request 4] [--seed 0] [--warmup-seconds 10] [--costly]
        [--target HOST:PORT [--server-pid PID]] [SERVER FLAGS, e.g. --decode-timeout-ms 500]

Without --target it starts `moderator serve --demo` on a free port (flags it does not know go
to the server) and stops it with SIGTERM at the end. Clients send Moderate requests back to
back: demo shapes (PNG, JPEG), the samples of moderator.demo.hostile (with --costly also those
that pass the default checks yet cost a naive decoder seconds) and mutated shapes. Reports every
30 s and at the end: requests by status, images by outcome, latency, img/s and the RSS of the
server and its descendants (decode workers). Exit status 1 when a request failed with INTERNAL
or UNAVAILABLE, or that RSS grew by more than 10% from after the warm-up to the end.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import io
import math
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moderator_client.v1 import moderator_pb2 as pb
from moderator_client.v1 import moderator_pb2_grpc as pb_grpc
from procs import descendants

from moderator.demo.hostile import COSTLY_SAMPLES, HOSTILE_SAMPLES, mutate
from moderator.demo.shapes import COLOURS, SHAPES, render_shape

# This benchmark sends the same images again and again: with the cache for repeated uploads
# on, all but the first would be hits that skip the decode and the model they measure.
NO_IMAGE_CACHE = ("--image-cache-mb", "0")

SERVER_START_TIMEOUT = 300.0
REPORT_EVERY = 30.0
REQUEST_TIMEOUT = 120.0
FATAL_CODES = ("INTERNAL", "UNAVAILABLE")
MAX_RSS_GROWTH = 0.10
MUTATED = "mutated"


@dataclass
class Stats:
    started: float = field(default_factory=time.perf_counter)
    status: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)  # (kind, outcome)
    errors: Counter[str] = field(default_factory=Counter)  # ImageErrorCode names
    latencies: list[float] = field(default_factory=list)
    valid_latencies: list[float] = field(default_factory=list)
    images: int = 0

    def add(self, kinds: list[str], code: str, seconds: float, outcomes: list[str]) -> None:
        self.status[code] += 1
        self.latencies.append(seconds)
        if all(kind == "valid" for kind in kinds):
            self.valid_latencies.append(seconds)
        self.images += len(outcomes)
        self.outcomes.update(zip(kinds, outcomes, strict=False))
        self.errors.update(o for o in outcomes if o.startswith("IMAGE_ERROR_CODE_"))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)] if ordered else math.nan


def latency(values: list[float]) -> str:
    return f"p50 {percentile(values, 0.5) * 1000:.0f} ms, p99 {percentile(values, 0.99) * 1000:.0f} ms (n={len(values)})"


def report(title: str, stats: Stats, rss: int | None) -> None:
    elapsed = time.perf_counter() - stats.started
    ok = stats.status["OK"]
    failed = ", ".join(f"{c}={n}" for c, n in sorted(stats.status.items()) if c != "OK") or "none"
    errors = ", ".join(f"{c}={n}" for c, n in sorted(stats.errors.items())) or "none"
    memory = f"{rss / 2**20:.0f} MiB" if rss is not None else "n/a"
    print(f"== {title} ({elapsed:.0f} s)")
    print(f"   requests ok {ok}, failed: {failed}")
    print(f"   image errors: {errors}")
    print(f"   latency all: {latency(stats.latencies)}; all-valid: {latency(stats.valid_latencies)}")  # fmt: skip
    print(f"   throughput {stats.images / elapsed:.1f} img/s; server RSS {memory}", flush=True)


def tree_rss(pid: int | None) -> int | None:
    """Resident bytes of `pid` and every process descended from it, or None once it is gone."""
    if pid is None:
        return None
    total = 0
    for current in [pid, *descendants(pid)]:
        try:
            status = Path(f"/proc/{current}/status").read_text()
        except OSError:
            if current == pid:
                return None
            continue
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        total += int(match.group(1)) * 1024 if match else 0
    return total


@contextmanager
def server_process(
    extra: list[str],
    model_flags: Sequence[str] = ("--demo",),
    env: Mapping[str, str] | None = None,
) -> Iterator[tuple[int, int]]:
    """Run `moderator serve` (the demo model unless `model_flags` say otherwise) in its own
    process with a cold text cache; yield (port, pid) once it says SERVING."""
    with tempfile.TemporaryDirectory() as cache:
        command = [
            sys.executable, "-m", "moderator", "serve", *model_flags, "--host", "127.0.0.1",
            "--port", "0", "--metrics-port", "-1", "--cache-dir", cache, *NO_IMAGE_CACHE, *extra,
        ]  # fmt: skip
        env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
        process = subprocess.Popen(
            command, stderr=subprocess.STDOUT, stdout=subprocess.PIPE, text=True, env=env
        )
        assert process.stdout is not None
        tail: collections.deque[str] = collections.deque(maxlen=40)
        match, deadline = None, time.monotonic() + SERVER_START_TIMEOUT
        for line in process.stdout:
            tail.append(line)
            match = re.search(r"SERVING on port (\d+)", line)
            if match or time.monotonic() > deadline:
                break
        if not match:
            process.kill()
            raise RuntimeError(f"server did not start: {' '.join(command)}\n{''.join(tail)}")
        # Keep reading its log: a full pipe would block the server's logging, and so the server.
        drain = threading.Thread(target=tail.extend, args=(process.stdout,), daemon=True)
        drain.start()
        try:
            yield int(match.group(1)), process.pid
        finally:
            process.terminate()  # SIGTERM: graceful shutdown
            try:
                code = process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                code = process.wait()
            drain.join(5)
            print(f"# server exited with {code}; last log lines:\n{''.join(list(tail)[-5:])}")


def valid_images(rng: random.Random, count: int = 64) -> list[bytes]:
    """Demo shapes of varied colour, shape, size and placement, as PNG and JPEG."""
    images = []
    for _ in range(count):
        width, height = rng.randint(96, 640), rng.randint(96, 640)
        image = render_shape(
            rng.choice(list(COLOURS)), rng.choice(SHAPES), width, height,
            scale=rng.uniform(0.35, 0.75), rotation=rng.uniform(-15, 15),
            center=(rng.uniform(0.4, 0.6), rng.uniform(0.4, 0.6)),
        )  # fmt: skip
        buffer = io.BytesIO()
        image.save(buffer, rng.choice(("PNG", "JPEG")), quality=rng.randint(70, 95))
        images.append(buffer.getvalue())
    return images


@dataclass
class Load:
    stub: pb_grpc.ModeratorStub
    valid: list[bytes]
    hostile: list[tuple[str, bytes]]
    args: argparse.Namespace
    sinks: list[Stats]

    def pick(self, rng: random.Random) -> tuple[str, bytes]:
        if rng.random() >= self.args.hostile_fraction:
            return "valid", rng.choice(self.valid)
        choice = rng.randrange(len(self.hostile) + 1)
        if choice == len(self.hostile):
            return MUTATED, mutate(rng.choice(self.valid), rng)
        return self.hostile[choice]

    async def client(self, index: int, stop_at: float) -> None:
        rng = random.Random(self.args.seed * 1000 + index)
        while time.perf_counter() < stop_at:
            chosen = [self.pick(rng) for _ in range(self.args.images_per_request)]
            request = pb.ModerateRequest(
                images=[pb.Image(id=str(k), data=d) for k, (_, d) in enumerate(chosen)]
            )
            start = time.perf_counter()
            outcomes: list[str] = []
            try:
                response = await self.stub.Moderate(request, timeout=REQUEST_TIMEOUT)
                code = "OK"
                outcomes = [outcome(result) for result in response.results]
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
            seconds = time.perf_counter() - start
            for sink in self.sinks:
                sink.add([kind for kind, _ in chosen], code, seconds, outcomes)
            await asyncio.sleep(0.1 if code in FATAL_CODES else 0)  # no hot loop on a dead server

    async def run(self, seconds: float) -> None:
        stop_at = time.perf_counter() + seconds
        await asyncio.gather(*(self.client(c, stop_at) for c in range(self.args.clients)))


def outcome(result: pb.ImageResult) -> str:
    if result.decision == pb.DECISION_ERROR:
        return str(pb.ImageErrorCode.Name(result.error.code))
    return str(pb.Decision.Name(result.decision))


async def soak(target: str, pid: int | None, args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    valid = valid_images(rng)
    samples = {**HOSTILE_SAMPLES, **(COSTLY_SAMPLES if args.costly else {})}
    hostile = [(name, make()) for name, make in samples.items()]
    options = [("grpc.max_send_message_length", 256 * 1024 * 1024)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        warmup = Stats()
        load = Load(pb_grpc.ModeratorStub(channel), valid, hostile, args, [warmup])
        await load.run(args.warmup_seconds)
        rss_start = tree_rss(pid)
        report("warm-up", warmup, rss_start)
        total = Stats()
        load.sinks = [total, Stats()]

        async def reporter() -> None:
            while True:
                await asyncio.sleep(REPORT_EVERY)
                report("last 30 s", load.sinks[1], tree_rss(pid))
                load.sinks[1] = Stats()

        ticker = asyncio.create_task(reporter())
        await load.run(args.minutes * 60)
        ticker.cancel()
        rss_end = tree_rss(pid)
    report("total", total, rss_end)
    print("   per image kind (outcome=count):")
    for kind in ["valid", *(name for name, _ in hostile), MUTATED]:
        counts = sorted((o.removeprefix("IMAGE_ERROR_CODE_"), n) for (k, o), n in total.outcomes.items() if k == kind)  # fmt: skip
        print(f"     {kind:<28} " + ", ".join(f"{o}={n}" for o, n in counts))
    return verdict(
        sum(s.status[c] for s in (warmup, total) for c in FATAL_CODES), rss_start, rss_end
    )


def verdict(fatal: int, rss_start: int | None, rss_end: int | None) -> int:
    """1 when a request failed with a fatal status or the server's RSS grew too much, else 0."""
    if fatal:
        print(f"FAIL: {fatal} requests failed with {' or '.join(FATAL_CODES)}")
    if not (rss_start and rss_end):
        print("server RSS: n/a (no local server pid)")
        return int(fatal > 0)
    growth = rss_end / rss_start - 1
    print(f"server RSS after warm-up {rss_start / 2**20:.0f} MiB, at end {rss_end / 2**20:.0f} MiB, growth {growth:+.1%}")  # fmt: skip
    if growth > MAX_RSS_GROWTH:
        print(f"FAIL: RSS grew more than {MAX_RSS_GROWTH:.0%}")
    return int(fatal > 0 or growth > MAX_RSS_GROWTH)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--minutes", type=float, default=5.0, help="measured time, after warm-up")
    parser.add_argument("--clients", type=int, default=8, help="concurrent callers")
    parser.add_argument("--hostile-fraction", type=float, default=0.1, help="of all images")
    parser.add_argument("--images-per-request", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup-seconds", type=float, default=10.0)
    parser.add_argument("--costly", action="store_true", help="add hostile.COSTLY_SAMPLES")
    parser.add_argument("--target", help="HOST:PORT of a running server (default: start one)")
    parser.add_argument("--server-pid", type=int, help="with --target: its pid, to measure RSS")
    args, server_flags = parser.parse_known_args()
    print(f"# soak: {args.minutes} min, {args.clients} clients, {args.images_per_request} images/request, hostile fraction {args.hostile_fraction}, seed {args.seed}")  # fmt: skip
    if args.target:
        if server_flags:
            parser.error(f"server flags {server_flags} need a server to start (no --target)")
        sys.exit(asyncio.run(soak(args.target, args.server_pid, args)))
    with server_process(server_flags) as (port, pid):
        print(f"# demo server pid {pid} on port {port}; flags: {' '.join(server_flags) or 'none'}")
        status = asyncio.run(soak(f"127.0.0.1:{port}", pid, args))
    sys.exit(status)


if __name__ == "__main__":
    main()

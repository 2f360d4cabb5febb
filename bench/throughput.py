"""Throughput and latency of the service against the bare model and a naive server, in one run.

    .venv/bin/python bench/throughput.py [--precision auto|fp32|bf16] [--rounds 8]
        [--round-seconds 4] [--seconds 15] [--service-args "--torch-threads 1"]

Uses ViT-B-32 with random weights (same compute as the pretrained model). Every figure is
measured in this run and printed with its ratio to a baseline from the same run, because these
machines are noisy (the same bare-model loop has read 38 and 121 img/s minutes apart): the bare
model and the service's load shapes (1-image requests, 16-image requests, 12 MP photos) are
measured in short alternating rounds, the order rotating each round, and the ratios are the
medians of each round's own ratio, with their range. The naive server, the idle latency and the
scoring and text-embedding costs are measured once each after the rounds. Nothing here is a
test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import torch
from moderator_client.v1 import moderator_pb2 as pb
from moderator_client.v1 import moderator_pb2_grpc as pb_grpc
from PIL import Image, ImageDraw

from moderator.config import REPO_ROOT, ModelConfig
from moderator.core.clip import ClipModel, load_clip
from moderator.core.embeddings import EmbeddingCache, build_policy_index
from moderator.core.policies import Policy, build_policy_set, load_policy_dir, parse_policy
from moderator.core.scoring import score_views

MODEL = "ViT-B-32"
# This benchmark sends the same images again and again: with the cache for repeated uploads
# on, all but the first would be hits that skip the decode and the model they measure.
NO_IMAGE_CACHE = ("--image-cache-mb", "0")
SERVER_START_TIMEOUT = 300.0


@dataclass
class Row:
    name: str
    value: float
    unit: str
    note: str = ""


def random_model(precision: str) -> ClipModel:
    torch.manual_seed(0)
    return load_clip(
        ModelConfig(
            name=MODEL,
            pretrained=None,
            allow_random_weights=True,
            device="cpu",
            precision=precision,
        )
    )


def timed(fn: Callable[[], object], seconds: float, min_runs: int = 3) -> float:
    """Mean seconds per call of fn, after one warm-up call."""
    fn()
    runs = 0
    start = time.perf_counter()
    while runs < min_runs or time.perf_counter() - start < seconds:
        fn()
        runs += 1
    return (time.perf_counter() - start) / runs


def photo_like_jpeg(
    width: int, height: int, seed: int, *, fmt: str = "JPEG", quality: int = 90, noise: float = 6
) -> bytes:
    """An image (a JPEG unless `fmt` says otherwise) that compresses like a photo: smooth
    gradients, shapes and sensor-like noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [
            128 + 100 * np.sin(x / (width / 3) + seed),
            128 + 100 * np.cos(y / (height / 2)),
            128 + 60 * np.sin((x + y) / (width / 5)),
        ],
        axis=-1,
    )
    base += rng.normal(0, noise, base.shape)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, width - 50)), int(rng.integers(0, height - 50))
        size = int(rng.integers(20, max(21, width // 6)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.ellipse((x0, y0, x0 + size, y0 + size), fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buffer.getvalue()


@contextmanager
def server_process(command: list[str]) -> Iterator[int]:
    """Run a server in its own process; yield its port once it says SERVING."""
    process = subprocess.Popen(
        command,
        stderr=subprocess.STDOUT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    port = 0
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    for line in process.stdout:
        match = re.search(r"SERVING on port (\d+)", line)
        if match:
            port = int(match.group(1))
            break
        if time.monotonic() > deadline:
            break
    if not port:
        process.kill()
        raise RuntimeError(f"server did not start: {' '.join(command)}")
    try:
        yield port
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


def service_command(precision: str, cache_dir: str, extra: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "moderator", "serve",
        "--model", MODEL, "--pretrained", "none", "--allow-random-weights",
        "--precision", precision, "--host", "127.0.0.1", "--port", "0",
        "--metrics-port", "-1", "--cache-dir", cache_dir, "--log-level", "INFO",
        *NO_IMAGE_CACHE, *extra,
    ]  # fmt: skip


def naive_command(precision: str) -> list[str]:
    return [
        sys.executable, str(REPO_ROOT / "bench" / "naive_server.py"),
        "--port", "0", "--precision", precision,
    ]  # fmt: skip


async def load(
    port: int, images: list[bytes], per_request: int, clients: int, seconds: float
) -> float:
    """Images per second moderated by `clients` concurrent callers over `seconds`."""
    options = [("grpc.max_send_message_length", 256 * 1024 * 1024)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        stub = pb_grpc.ModeratorStub(channel)

        def request(i: int) -> pb.ModerateRequest:
            chosen = [images[(i + k) % len(images)] for k in range(per_request)]
            return pb.ModerateRequest(
                images=[pb.Image(id=str(k), data=d) for k, d in enumerate(chosen)]
            )

        await stub.Moderate(request(0), timeout=600)  # warm-up
        done = 0
        stop_at = time.perf_counter() + seconds

        async def client(index: int) -> None:
            nonlocal done
            i = index
            while time.perf_counter() < stop_at:
                await stub.Moderate(request(i), timeout=600)
                done += per_request
                i += clients

        start = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(clients)))
        return done / (time.perf_counter() - start)


async def idle_latency(port: int, image: bytes, count: int) -> list[float]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ModeratorStub(channel)
        request = pb.ModerateRequest(images=[pb.Image(id="a", data=image)])
        await stub.Moderate(request, timeout=600)
        latencies = []
        for _ in range(count):
            start = time.perf_counter()
            await stub.Moderate(request, timeout=600)
            latencies.append(time.perf_counter() - start)
        return latencies


def synthetic_policies(count: int, descriptions: int) -> list[Policy]:
    return [
        parse_policy(
            f"p{i}",
            "title: P\naction: review\nthreshold: 0.2\ntemplates: ['{}']\ndescriptions:\n"
            + "".join(f"  - thing {i} number {d}\n" for d in range(descriptions)),
            source=f"p{i}.yaml",
        )
        for i in range(count)
    ]


def scoring_cost(clip: ClipModel, batch: int, seconds: float) -> tuple[float, float, float]:
    """(forward seconds, scoring seconds with 6 policies, with 1000 x 10) for one batch."""
    size = clip.preprocessing.size
    pixels = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    embeddings = clip.encode_images(pixels)
    forward = timed(lambda: clip.encode_images(pixels), seconds)
    costs = []
    dim = clip.embed_dim
    for policies in (
        load_policy_dir(REPO_ROOT / "policies").policies,
        synthetic_policies(1000, 10),
    ):
        policy_set = build_policy_set(policies)
        index = build_policy_index(
            policy_set,
            lambda texts: torch.nn.functional.normalize(torch.randn(len(texts), dim), dim=-1),
            EmbeddingCache(None, "bench"),
            clip.device,
        )
        costs.append(timed(lambda index=index: score_views(embeddings, index), seconds / 3))  # type: ignore[misc]
    return forward, costs[0], costs[1]


def start_up_text_cost(clip: ClipModel) -> tuple[float, float, int, int]:
    """Seconds to embed the default policy set with a cold cache, then a warm one."""
    policy_set = load_policy_dir(REPO_ROOT / "policies")
    with tempfile.TemporaryDirectory() as tmp:
        cold_cache = EmbeddingCache(Path(tmp), "bench")
        start = time.perf_counter()
        build_policy_index(policy_set, clip.encode_texts, cold_cache, clip.device)
        cold = time.perf_counter() - start
        warm_cache = EmbeddingCache(Path(tmp), "bench")
        start = time.perf_counter()
        build_policy_index(policy_set, clip.encode_texts, warm_cache, clip.device)
        warm = time.perf_counter() - start
    return cold, warm, cold_cache.encoded_total, warm_cache.encoded_total


def bare_rate(clip: ClipModel, pixels: torch.Tensor, seconds: float) -> float:
    """Images per second of the bare image encoder on `pixels`, over about `seconds`."""
    return int(pixels.shape[0]) / timed(lambda: clip.encode_images(pixels), seconds, min_runs=2)


def alternating_rounds(
    measures: dict[str, Callable[[], float]], rounds: int
) -> dict[str, list[float]]:
    """Every measure once per round, the order rotating each round; the values by name."""
    values: dict[str, list[float]] = {name: [] for name in measures}
    names = list(measures)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            values[name].append(measures[name]())
        line = ", ".join(f"{name} {values[name][-1]:.1f}" for name in names)
        print(f"round {r + 1}: {line} img/s", flush=True)
    return values


def median_range(values: Sequence[float], digits: int = 2) -> str:
    """'median (min-max)', or '-' for no values."""
    if not values:
        return "-"
    return f"{statistics.median(values):,.{digits}f} ({min(values):,.{digits}f}-{max(values):,.{digits}f})"


def paired(values: dict[str, list[float]], top: str, bottom: str) -> str:
    """The median of the rounds' own ratios top/bottom, with their range."""
    return median_range([a / b for a, b in zip(values[top], values[bottom], strict=True)])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--precision", default="auto", help="auto, fp32 or bf16")
    parser.add_argument("--rounds", type=int, default=8, help="alternating rounds")
    parser.add_argument("--round-seconds", type=float, default=4.0, help="per shape per round")
    parser.add_argument("--seconds", type=float, default=15.0, help="per phase after the rounds")
    parser.add_argument("--batch", type=int, default=16, help="--max-batch-size of the service")
    parser.add_argument("--clients", type=int, default=32, help="concurrent single-image clients")
    parser.add_argument("--service-args", default="", help="more flags for the service")
    args = parser.parse_args()

    clip = random_model(args.precision)
    precision = clip.info.precision
    print(f"# {MODEL}, random weights, {precision}, {torch.get_num_threads()} torch threads")
    size = clip.preprocessing.size
    seconds = args.seconds
    batch_pixels = torch.randint(0, 256, (args.batch, 3, size, size), dtype=torch.uint8)
    one = torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8)
    small = [photo_like_jpeg(224, 224, seed) for seed in range(16)]
    big = [photo_like_jpeg(4000, 3000, seed) for seed in range(4)]
    print(f"# 224x224 JPEG ~{len(small[0]) // 1024} KiB, 12 MP JPEG ~{len(big[0]) // 1024} KiB")

    each = args.round_seconds
    with tempfile.TemporaryDirectory() as cache:
        extra = ["--max-batch-size", str(args.batch), *args.service_args.split()]
        with server_process(service_command(args.precision, cache, extra)) as port:
            print(f"# service flags: {' '.join(extra)}")
            rounds = alternating_rounds(
                {
                    "bare": lambda: bare_rate(clip, batch_pixels, each),
                    "single": lambda: asyncio.run(load(port, small, 1, args.clients, each)),
                    "sixteen": lambda: asyncio.run(load(port, small, 16, 4, each)),
                    "photos": lambda: asyncio.run(load(port, big, 1, args.clients, each)),
                },
                args.rounds,
            )
            latencies = asyncio.run(idle_latency(port, small[0], 100))
    with server_process(naive_command(precision)) as port:
        naive_single = asyncio.run(load(port, small, 1, args.clients, seconds))
        naive_photos = asyncio.run(load(port, big, 1, args.clients, seconds))
    forward_1 = timed(lambda: clip.encode_images(one), seconds / 2)
    forward, score_6, score_1000 = scoring_cost(clip, args.batch, seconds / 2)
    cold, warm, cold_encoded, warm_encoded = start_up_text_cost(clip)

    median = {name: statistics.median(values) for name, values in rounds.items()}
    p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
    latency_target = 1.25 * forward_1 + 0.010
    rows = [
        Row(f"1. bare model, batch {args.batch} (median of rounds)", median["bare"], "img/s"),
        Row("   bare model, batch 1 forward", forward_1 * 1000, "ms"),
        Row("2. service, 224px, 1-image requests", median["single"], "img/s", f"{paired(rounds, 'single', 'bare')} x (1)  target >= 0.85"),
        Row("2. service, 224px, 16-image requests", median["sixteen"], "img/s", f"{paired(rounds, 'sixteen', 'bare')} x (1)"),
        Row("3. service, 12 MP photos", median["photos"], "img/s", f"{paired(rounds, 'photos', 'single')} x (2)  target >= 0.6"),
        Row("4. naive server, 224px (once)", naive_single, "img/s", f"service is {median['single'] / naive_single:.2f} x"),
        Row("4. naive server, 12 MP photos (once)", naive_photos, "img/s", f"(3)/(4) = {median['photos'] / naive_photos:.2f}  target >= 3"),
        Row("5. idle latency p50", p50 * 1000, "ms", f"target <= {latency_target * 1000:.1f} ms"),
        Row("5. idle latency p99", p99 * 1000, "ms"),
        Row(f"6. scoring, 6 policies, batch {args.batch}", score_6 * 1000, "ms", f"{score_6 / forward:.2%} of forward"),
        Row(f"6. scoring, 1000x10 policies, batch {args.batch}", score_1000 * 1000, "ms", f"{score_1000 / forward:.2%} of forward  target <= 5%"),
        Row("6. policy embedding, cold cache", cold * 1000, "ms", f"{cold_encoded} prompts encoded"),
        Row("6. policy embedding, warm cache", warm * 1000, "ms", f"{warm_encoded} prompts encoded  target 0"),
    ]  # fmt: skip
    width = max(len(r.name) for r in rows)
    for row in rows:
        print(f"{row.name:<{width}}  {row.value:10.1f} {row.unit:<6} {row.note}")


if __name__ == "__main__":
    main()

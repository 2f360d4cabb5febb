"""Known content: what the PDQ hash costs each decoded image, and what a hit in the cache for
repeated uploads saves, each against a baseline measured in the same run.

    .venv/bin/python bench/known_content.py [--rounds 7] [--seconds 0.4]
        [--service-rounds 5] [--service-seconds 2] [--servers demo,vit-b-32]
        [--skip-decode] [--skip-service]

Part 1, in this process: CPU-ms (thread time) per image of `core.views.decode_image` as the
decode workers run it, against the same decode without PDQ, as before the hash came in:
`pdq_of` replaced by a stub returning a constant and PDQ_MIN_SIDE set to 0, so `request_draft`
lets libjpeg decode a JPEG as small as the 224 px views allow (with PDQ it stops at 512 px on
the long side). Several kinds of image; the two sides alternate in short rounds (the first side
changing each round) and the ratio is the median of each round's own ratio, with its range. Also
`pdq_of` alone on a 640x480 picture, and on the larger pictures the JPEG kinds hand it.

Part 2, through the real service (`moderator serve` in a child process, cache on with its
default size, metrics on a free port): `Moderate` of cache hits (images sent before) against
cache misses (new bytes every time: the same JPEGs with a JPEG comment segment holding a new
number, so the decode and the model see the same pixels and only the SHA-256 differs), in
alternating rounds: 1-image and 16-image requests one at a time (latency), 1-image requests 16
in flight and 16-image requests 4 in flight (throughput), and 12 MP photos. Each sample also
gives the server's CPU-ms per image (the server process and its decode workers, from /proc),
and the cache counters are read from /metrics to check every hit was a hit and every miss a
miss. `demo` is the bundled demo model (tiny: its forward pass costs next to nothing), `vit-b-32`
is ViT-B-32 with random weights at `--precision auto` (the same compute as the pretrained
model, as in bench/throughput.py). Nothing here is a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from moderator_client.v1 import moderator_pb2 as pb
from moderator_client.v1 import moderator_pb2_grpc as pb_grpc
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procs import cpu_seconds, descendants, read_stat
from stack import print_machine
from throughput import median_range, photo_like_jpeg, service_command

from moderator.config import ImageConfig
from moderator.core import pdq, views
from moderator.core.images import open_image
from moderator.core.pdq import Pdq, pdq_of, pdq_of_array
from moderator.core.views import Preprocessing, decode_image, image_views

PREP = Preprocessing(size=224, fill=(122, 116, 104))  # ViT-B-32's views
LIMITS = ImageConfig()
NO_PDQ = Pdq("0" * 64, 0)
START_TIMEOUT = 300.0
CALL_TIMEOUT = 300.0
MIN_CALLS = 3  # a sample lasts until this many calls ended in it (or 5 x --service-seconds)
MAX_MESSAGE = 256 * 1024 * 1024


# -- part 1: PDQ in decode_image ----------------------------------------------------------


@contextmanager
def without_pdq() -> Iterator[None]:
    """decode_image as it was before PDQ: a constant for the hash, JPEG drafts as small as the
    views allow (request_draft reads views.PDQ_MIN_SIDE when it is called)."""
    names = vars(views)  # core.views imported both names from core.pdq
    saved = names["pdq_of"], names["PDQ_MIN_SIDE"], pdq.PDQ_MIN_SIDE

    def constant(image: Image.Image) -> Pdq:
        return NO_PDQ

    names["pdq_of"], names["PDQ_MIN_SIDE"], pdq.PDQ_MIN_SIDE = constant, 0, 0
    try:
        yield
    finally:
        names["pdq_of"], names["PDQ_MIN_SIDE"], pdq.PDQ_MIN_SIDE = saved


def encoded(image: Image.Image, fmt: str, **save_args: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    return buffer.getvalue()


def photo(width: int, height: int, seed: int) -> Image.Image:
    return Image.open(io.BytesIO(photo_like_jpeg(width, height, seed, fmt="PNG"))).convert("RGB")


def transparent_png(seed: int, width: int = 800, height: int = 600) -> bytes:
    """A photo-like RGBA PNG: opaque in an ellipse, fading out, transparent at the corners
    (photo content left under the transparent pixels, as cut-outs often keep it)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    radius = ((x - width / 2) / (width / 2)) ** 2 + ((y - height / 2) / (height / 2)) ** 2
    alpha = np.clip((1.2 - radius) * 400, 0, 255).astype(np.uint8)
    rgba = photo(width, height, seed)
    rgba.putalpha(Image.fromarray(alpha))
    return encoded(rgba, "PNG")


def animated_gif(seed: int, width: int = 320, height: int = 240, frames: int = 10) -> bytes:
    pictures = [photo(width, height, seed * 100 + f).quantize(256) for f in range(frames)]
    return encoded(pictures[0], "GIF", save_all=True, append_images=pictures[1:], duration=100)


def image_kinds(seeds: int) -> dict[str, list[bytes]]:
    jpeg = {
        "224x224 JPEG": (224, 224),
        "1280x960 JPEG (1.2 MP)": (1280, 960),
        "1080x1080 JPEG (1.2 MP)": (1080, 1080),
        "1920x1080 JPEG (2 MP)": (1920, 1080),
        "4000x3000 JPEG (12 MP)": (4000, 3000),
    }
    kinds = {
        name: [photo_like_jpeg(w, h, seed) for seed in range(seeds if w * h < 4e6 else 2)]
        for name, (w, h) in jpeg.items()
    }
    kinds["800x600 PNG with transparency"] = [transparent_png(seed) for seed in range(seeds)]
    kinds["320x240 GIF, 10 frames"] = [animated_gif(seed) for seed in range(2)]
    return kinds


def decode_cpu_ms(images: list[bytes], seconds: float) -> float:
    """CPU-ms (this thread) per decode_image call, over about `seconds` of CPU."""
    decode_image(images[0], LIMITS, PREP)
    calls = 0
    start = time.thread_time()
    while calls < max(2, len(images)) or time.thread_time() - start < seconds:
        decode_image(images[calls % len(images)], LIMITS, PREP)
        calls += 1
    return 1000 * (time.thread_time() - start) / calls


def cpu_ms(fn: Callable[[], object], seconds: float) -> float:
    fn()
    calls = 0
    start = time.thread_time()
    while calls < 3 or time.thread_time() - start < seconds:
        fn()
        calls += 1
    return 1000 * (time.thread_time() - start) / calls


def decoded_size(data: bytes) -> str:
    """The size of the picture the hash is made from (what libjpeg decoded) and its views."""
    pictures = image_views(open_image(data, LIMITS), data, LIMITS, PREP)
    width, height = pictures.as_stored.size
    return f"{width}x{height}, {len(pictures.views)} views"


@dataclass
class DecodeRows:
    served: list[float] = field(default_factory=list)
    bare: list[float] = field(default_factory=list)

    @property
    def ratios(self) -> list[float]:
        return [a / b for a, b in zip(self.served, self.bare, strict=True)]


def run_decode(args: argparse.Namespace) -> None:
    print(f"\n## Part 1: decode_image with and without PDQ, {args.rounds} rounds\n", flush=True)
    kinds = image_kinds(args.seeds)
    sizes = {}
    for name, images in kinds.items():
        served = decoded_size(images[0])
        with without_pdq():
            bare = decoded_size(images[0])
        sizes[name] = (served, bare, statistics.mean(map(len, images)) / 1024)
    rows = {name: DecodeRows() for name in kinds}
    for r in range(args.rounds):
        line = []
        for name, images in kinds.items():
            sides = ("served", "bare") if r % 2 == 0 else ("bare", "served")
            for side in sides:
                if side == "served":
                    rows[name].served.append(decode_cpu_ms(images, args.seconds))
                else:
                    with without_pdq():
                        rows[name].bare.append(decode_cpu_ms(images, args.seconds))
            line.append(f"{rows[name].ratios[-1]:.2f}")
        print(f"round {r + 1}: with / without PDQ " + ", ".join(line), flush=True)

    print()
    print("| image | decoded at, with PDQ / without | CPU-ms with PDQ | without | with / without |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        served, bare, kib = sizes[name]
        print(
            f"| {name}, {kib:,.0f} KiB | {served} / {bare} | {median_range(row.served)} "
            f"| {median_range(row.bare)} | **{median_range(row.ratios)}** |"
        )

    picture = photo(640, 480, 7)
    scene = np.asarray(picture, dtype=np.uint8)
    photo_1000, photo_1080 = photo(1000, 750, 7), photo(1080, 1080, 7)
    alone: dict[str, Callable[[], object]] = {
        "pdq_of_array, 640x480 RGB array": lambda: pdq_of_array(scene),
        "pdq_of, 640x480 picture (no resize)": lambda: pdq_of(picture),
        "pdq_of, 1000x750 picture (a 12 MP JPEG's 1/4 draft)": lambda: pdq_of(photo_1000),
        "pdq_of, 1080x1080 picture (resized to 640x640)": lambda: pdq_of(photo_1080),
    }
    costs: dict[str, list[float]] = {name: [] for name in alone}
    for _ in range(args.rounds):
        for name, fn in alone.items():
            costs[name].append(cpu_ms(fn, args.seconds / 2))
    print()
    print("| pdq alone | CPU-ms |")
    print("|---|---|")
    for name, values in costs.items():
        print(f"| {name} | {median_range(values)} |")


# -- part 2: the cache for repeated uploads, through the service ---------------------------


def tagged(jpeg: bytes, tag: int) -> bytes:
    """The same JPEG with a comment segment (COM) holding `tag` after its JFIF header: new
    bytes, the same pixels."""
    position = 2
    if jpeg[2:4] == b"\xff\xe0":  # APP0 (JFIF) stays first
        position = 4 + int.from_bytes(jpeg[4:6], "big")
    payload = f"known_content {tag}".encode()
    segment = b"\xff\xfe" + (len(payload) + 2).to_bytes(2, "big") + payload
    return jpeg[:position] + segment + jpeg[position:]


class Uploads:
    """Images of one kind: hits (`pool` tagged copies, sent once before any sample) or misses
    (a tag never sent before). Both are built the same way on every call, so the client's work
    is the same for both."""

    def __init__(self, bases: list[bytes], pool: int) -> None:
        self.bases = bases
        self.pool = pool
        self._hit = 0
        self._miss = pool

    def images(self, hit: bool, count: int) -> list[bytes]:
        if hit:
            tags = [(self._hit + k) % self.pool for k in range(count)]
            self._hit = (self._hit + count) % self.pool
        else:
            tags = list(range(self._miss, self._miss + count))
            self._miss += count
        return [tagged(self.bases[t % len(self.bases)], t) for t in tags]

    def every_hit(self) -> list[bytes]:
        return [tagged(self.bases[t % len(self.bases)], t) for t in range(self.pool)]


@dataclass(frozen=True)
class Shape:
    label: str
    kind: str  # key of the Uploads
    per_request: int
    in_flight: int


@dataclass(frozen=True)
class Sample:
    images: int
    calls: int
    seconds: float
    latency_ms: float  # median of the calls that ended in the window
    server_cpu: float
    cache: tuple[int, int]  # hits, misses counted by the server over the whole sample

    @property
    def rate(self) -> float:
        return self.images / self.seconds

    @property
    def cpu_ms(self) -> float:
        return 1000 * self.server_cpu / max(1, self.images)


@dataclass
class Server:
    name: str
    process: subprocess.Popen[str]
    port: int
    metrics_port: int
    log: list[str]

    def cpu(self) -> float:
        """CPU seconds of the server process (with reaped children) and its decode workers."""
        own = read_stat(Path(f"/proc/{self.process.pid}/stat"))
        if own is None:
            raise RuntimeError(f"the {self.name} server is gone:\n" + "".join(self.log[-20:]))
        total = cpu_seconds(own[1], reaped=True)
        for child in descendants(self.process.pid):
            stat = read_stat(Path(f"/proc/{child}/stat"))
            if stat is not None:
                total += cpu_seconds(stat[1], reaped=True)
        return total

    def cache_counts(self) -> tuple[int, int]:
        """moderator_image_cache_requests_total for hit and miss."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        counts = {"hit": 0, "miss": 0}
        for match in re.finditer(
            r'^moderator_image_cache_requests_total\{result="(hit|miss)"\} ([0-9.e+]+)$',
            text,
            re.MULTILINE,
        ):
            counts[match[1]] = int(float(match[2]))
        return counts["hit"], counts["miss"]


def server_command(name: str, cache_dir: str) -> list[str]:
    common = ["--policy-poll-seconds", "0", "--metrics-port", "0"]
    if name == "demo":
        return [
            sys.executable, "-m", "moderator", "serve", "--demo", "--host", "127.0.0.1",
            "--port", "0", "--cache-dir", cache_dir, *common,
        ]  # fmt: skip
    if name == "vit-b-32":
        return service_command("auto", cache_dir, common)
    raise SystemExit(f"unknown server {name!r}: demo or vit-b-32")


def start_server(name: str, cache_dir: str) -> Server:
    process = subprocess.Popen(
        server_command(name, cache_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    log: list[str] = []
    deadline = time.monotonic() + START_TIMEOUT
    for line in process.stdout:
        log.append(line)
        match = re.search(r"SERVING on port (\d+); metrics on port (\d+)", line)
        if match:
            # keep reading its log so a full pipe never blocks it
            threading.Thread(target=log.extend, args=(process.stdout,), daemon=True).start()
            return Server(name, process, int(match[1]), int(match[2]), log)
        if time.monotonic() > deadline:
            break
    process.kill()
    raise RuntimeError(f"the {name} server never reported SERVING:\n" + "".join(log[-20:]))


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(60)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


class Client:
    def __init__(self, server: Server, connections: int = 4) -> None:
        options = [
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ]
        self.channels = [
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=options)
            for _ in range(connections)
        ]
        self.stubs = [pb_grpc.ModeratorStub(channel) for channel in self.channels]

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close(None)

    async def moderate(self, index: int, images: list[bytes]) -> None:
        request = pb.ModerateRequest(
            images=[pb.Image(id=str(k), data=data) for k, data in enumerate(images)],
            detail=pb.DETAIL_DECISION,
        )
        response = await self.stubs[index % len(self.stubs)].Moderate(request, timeout=CALL_TIMEOUT)
        failed = [r.error.message for r in response.results if r.decision == pb.DECISION_ERROR]
        if len(response.results) != len(images) or failed:
            raise RuntimeError(f"not every image was decided: {failed[:3]}")


async def measure(
    server: Server,
    client: Client,
    uploads: Uploads,
    shape: Shape,
    *,
    hit: bool,
    ramp: float,
    seconds: float,
) -> Sample:
    """`shape.in_flight` callers back to back; after `ramp` s, a window of at least `seconds`
    that lasts until MIN_CALLS calls ended in it."""
    ended: list[tuple[float, float]] = []  # (start, end) of every call
    stop = asyncio.Event()

    async def caller(index: int) -> None:
        while not stop.is_set():
            images = uploads.images(hit, shape.per_request)
            started = time.perf_counter()
            await client.moderate(index, images)
            ended.append((started, time.perf_counter()))

    cache_before = server.cache_counts()
    tasks = [asyncio.ensure_future(caller(i)) for i in range(shape.in_flight)]
    try:
        await asyncio.sleep(ramp)
        cpu_before, opened = server.cpu(), time.perf_counter()
        await asyncio.sleep(seconds)
        while (
            sum(end >= opened for _, end in ended) < MIN_CALLS
            and time.perf_counter() - opened < 5 * seconds
        ):
            await asyncio.sleep(0.02)
        cpu_after, closed = server.cpu(), time.perf_counter()
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    cache_after = server.cache_counts()
    window = [end - start for start, end in ended if opened <= end <= closed]
    return Sample(
        images=len(window) * shape.per_request,
        calls=len(window),
        seconds=closed - opened,
        latency_ms=1000 * statistics.median(window) if window else float("nan"),
        server_cpu=cpu_after - cpu_before,
        cache=(cache_after[0] - cache_before[0], cache_after[1] - cache_before[1]),
    )


SHAPES = [
    Shape("224 px, 1-image requests, 1 in flight", "224", 1, 1),
    Shape("224 px, 16-image requests, 1 in flight", "224", 16, 1),
    Shape("224 px, 1-image requests, 16 in flight", "224", 1, 16),
    Shape("224 px, 16-image requests, 4 in flight", "224", 16, 4),
    Shape("12 MP photos, 1-image requests, 1 in flight", "12mp", 1, 1),
    Shape("12 MP photos, 1-image requests, 4 in flight", "12mp", 1, 4),
]


async def run_server(
    server: Server, uploads: dict[str, Uploads], args: argparse.Namespace
) -> dict[tuple[str, bool], list[Sample]]:
    client = Client(server)
    samples: dict[tuple[str, bool], list[Sample]] = {
        (shape.label, hit): [] for shape in SHAPES for hit in (True, False)
    }
    wrong = 0
    try:
        for kind in uploads.values():  # every hit sent once: in the cache from now on
            for index, data in enumerate(kind.every_hit()):
                await client.moderate(index, [data])
        for shape in SHAPES:  # warm-up, not kept
            for hit in (True, False):
                await measure(
                    server, client, uploads[shape.kind], shape, hit=hit, ramp=0.2, seconds=0.3
                )
        for r in range(args.service_rounds):
            line = []
            for shape in SHAPES:
                pair = {}
                for hit in (True, False) if r % 2 == 0 else (False, True):
                    sample = await measure(
                        server,
                        client,
                        uploads[shape.kind],
                        shape,
                        hit=hit,
                        ramp=args.ramp,
                        seconds=args.service_seconds,
                    )
                    samples[shape.label, hit].append(sample)
                    pair[hit] = sample
                    hits, misses = sample.cache
                    if (misses if hit else hits) != 0:
                        wrong += 1
                measure_of = "latency" if shape.in_flight == 1 else "img/s"
                ratio = (
                    pair[False].latency_ms / pair[True].latency_ms
                    if shape.in_flight == 1
                    else pair[True].rate / pair[False].rate
                )
                line.append(f"{ratio:.1f}x {measure_of}")
            print(f"round {r + 1} ({server.name}): " + ", ".join(line), flush=True)
    finally:
        await client.close()
    print(
        f"# cache counters: {'every hit was a hit and every miss a miss' if not wrong else f'{wrong} samples counted a hit as a miss or a miss as a hit'}"
    )
    return samples


def report_server(name: str, samples: dict[tuple[str, bool], list[Sample]]) -> None:
    print()
    print(f"### {name}")
    print()
    print(
        "| load | hit: latency p50 / img/s | miss: latency p50 / img/s "
        "| miss / hit latency | hit / miss img/s | server CPU-ms per image, hit / miss |"
    )
    print("|---|---|---|---|---|---|")
    for shape in SHAPES:
        hits, misses = samples[shape.label, True], samples[shape.label, False]
        if not hits:
            continue
        pairs = list(zip(hits, misses, strict=True))

        def summary(runs: list[Sample]) -> str:
            latency = statistics.median(s.latency_ms for s in runs)
            rate = statistics.median(s.rate for s in runs)
            return f"{latency:,.1f} ms / {rate:,.0f}"

        latency = median_range([m.latency_ms / h.latency_ms for h, m in pairs], 1)
        rate = median_range([h.rate / m.rate for h, m in pairs], 1)
        cpu = (
            f"{statistics.median(h.cpu_ms for h in hits):.2f} / "
            f"{statistics.median(m.cpu_ms for m in misses):.2f} "
            f"(miss / hit {median_range([m.cpu_ms / h.cpu_ms for h, m in pairs], 1)})"
        )
        print(
            f"| {shape.label} | {summary(hits)} | {summary(misses)} | {latency} | {rate} | {cpu} |"
        )


def run_service(args: argparse.Namespace) -> None:
    names = [name for name in args.servers.split(",") if name]
    print(
        f"\n## Part 2: cache hits against misses through the service ({', '.join(names)}), "
        f"{args.service_rounds} rounds of {args.service_seconds:g} s per sample\n",
        flush=True,
    )
    uploads = {
        "224": Uploads([photo_like_jpeg(224, 224, seed) for seed in range(8)], 64),
        "12mp": Uploads([photo_like_jpeg(4000, 3000, seed) for seed in range(2)], 8),
    }
    results = {}
    for name in names:
        with tempfile.TemporaryDirectory(prefix="known-content-") as cache_dir:
            started = time.perf_counter()
            server = start_server(name, cache_dir)
            print(f"# {name}: SERVING after {time.perf_counter() - started:.1f} s", flush=True)
            try:
                results[name] = asyncio.run(run_server(server, uploads, args))
            finally:
                stop_server(server)
    for name, samples in results.items():
        report_server(name, samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7, help="part 1 rounds")
    parser.add_argument(
        "--seconds", type=float, default=0.4, help="part 1: CPU seconds per kind per side"
    )
    parser.add_argument("--seeds", type=int, default=3, help="part 1: images of each kind")
    parser.add_argument("--service-rounds", type=int, default=5)
    parser.add_argument("--service-seconds", type=float, default=2.0)
    parser.add_argument("--ramp", type=float, default=0.5, help="part 2: seconds before a window")
    parser.add_argument("--servers", default="demo,vit-b-32", help="demo, vit-b-32 or both")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--skip-service", action="store_true")
    args = parser.parse_args()
    print_machine()
    started = time.perf_counter()
    if not args.skip_decode:
        run_decode(args)
    if not args.skip_service:
        run_service(args)
    print(f"\n# took {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()

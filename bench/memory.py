"""Resident memory and throughput of the server under glibc malloc settings, in alternating rounds.

    .venv/bin/python bench/memory.py [--pairs 4] [--requests 150] [--clients 6]
        [--settle-seconds 10] [--config NAME:VAR=VALUE[,VAR=VALUE...]]... [--demo]
        [--json FILE] [SERVER FLAGS]

Each round starts a fresh `moderator serve` (ViT-B-32 with random weights: the default model's
size and compute; --demo for the small demo model) with one configuration's environment, sends
one request of each kind, then the same --requests requests in the same order from --clients
concurrent callers (each takes the next request when its last is answered). A request is, by
a seeded draw: 1-3 large photos (40 %; 2-8 MB JPEGs of 12-24 MP, a 3 MB PNG), 16 medium or
small images (20 %; 640x480 to 1600x1200 photos, 224 px thumbnails, demo shapes), or one image
of any size (40 %); about 10 % of all images are corrupt (truncated, mutated) or hostile. Every
round does the same work, so the memory figures compare like with like. Rounds go A, B, A, B,
... (every configuration once per pair), because this machine is noisy.

Recorded per round, for the server process and (separately) its decode workers: VmRSS when idle
after the first requests; the peak during the load (VmHWM, reset through /proc/PID/clear_refs
after the idle reading, so start-up does not count; for the workers the sum of their peaks);
VmRSS --settle-seconds after the load ends (and the server's RssAnon: the malloc'd part); the
images answered per second, and the server's CPU time per image (steadier than img/s when the
machine is shared: the CPUs' worth that other processes used meanwhile, the idle share and the
hypervisor's steal time are shown, so that a disturbed round can be told); the most threads the server ran; and its
malloc heaps (64 MiB-aligned anonymous reservations, one or more per non-main glibc arena). The
table is followed by each configuration's medians and the median of its paired ratios to the
first configuration (the ratio within each pair; the range in brackets).

Without --config the configurations are `default` (glibc's defaults: every MALLOC_* variable,
GLIBC_TUNABLES and LD_PRELOAD removed) and `arena2` (MALLOC_ARENA_MAX=2). A configuration is
NAME: followed by comma-separated VAR=VALUE pairs added to that clean environment (`default:`
adds none). The decode workers get MALLOC_ARENA_MAX=2 from the server whatever the environment
(moderator/serving/decode_pool.py); the other variables reach them. Unknown flags go to the
server. Nothing here is a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import io
import json
import os
import random
import re
import statistics
import sys
import time
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moderator_client.v1 import moderator_pb2 as pb
from moderator_client.v1 import moderator_pb2_grpc as pb_grpc
from procs import descendants, process_cpu_seconds
from soak import server_process
from throughput import photo_like_jpeg

from moderator.demo.hostile import HOSTILE_SAMPLES, mutate
from moderator.demo.shapes import COLOURS, SHAPES, render_shape

MIB = 1024 * 1024
HEAP_BYTES = 64 * MIB  # glibc's HEAP_MAX_SIZE on 64-bit: each non-main arena heap is one
SERVER_START_TIMEOUT = 300.0
REQUEST_TIMEOUT = 300.0
SAMPLE_EVERY = 0.2
MALLOC_VARIABLES = re.compile(r"^(MALLOC_|GLIBC_TUNABLES$|LD_PRELOAD$)")
DEFAULT_CONFIGS = ["default:", "arena2:MALLOC_ARENA_MAX=2"]
KINDS = ("photos", "batch16", "single")  # 1-3 large photos; 16 medium or small; 1 of any
KIND_WEIGHTS = (0.4, 0.2, 0.4)
CORRUPT_FRACTION = 0.1
HOSTILE = ("png_pixel_bomb", "sixteen_bit_png", "progressive_jpeg_with_scans", "mutated_jpeg")


# -- images -------------------------------------------------------------------------------------


def shape(rng: random.Random, fmt: str) -> bytes:
    image = render_shape(
        rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.randint(96, 1024), rng.randint(96, 768),
        scale=rng.uniform(0.35, 0.75), rotation=rng.uniform(-15, 15),
    )  # fmt: skip
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


@dataclass
class Corpus:
    large: list[bytes]  # 2-8 MB photos
    medium: list[bytes]  # 640x480 to 1600x1200 photos, demo shapes
    small: list[bytes]  # 224 px thumbnails
    corrupt: list[bytes]  # truncated, mutated, hostile

    def describe(self) -> str:
        def sizes(images: list[bytes]) -> str:
            lo, hi = min(map(len, images)) / MIB, max(map(len, images)) / MIB
            return f"{len(images)} ({lo:.2f}-{hi:.2f} MB)"

        return (
            f"large {sizes(self.large)}, medium {sizes(self.medium)}, small {sizes(self.small)}, "
            f"corrupt {sizes(self.corrupt)}"
        )


def make_corpus(seed: int) -> Corpus:
    rng = random.Random(seed)
    large = [
        photo_like_jpeg(4000, 3000, 1),  # 12 MP, 2.1 MB
        photo_like_jpeg(5000, 4000, 2, quality=92),  # 20 MP, 4.3 MB
        photo_like_jpeg(6000, 4000, 3, quality=90),  # 24 MP
        photo_like_jpeg(6000, 4000, 4, quality=95),  # 24 MP, 7.5 MB
        photo_like_jpeg(1600, 1200, 5, fmt="PNG"),  # a 3 MB PNG: decoded in full, no JPEG draft
    ]
    medium = [photo_like_jpeg(640, 480, 10 + i) for i in range(6)]
    medium += [photo_like_jpeg(1600, 1200, 20 + i, quality=85) for i in range(3)]
    medium += [shape(rng, fmt) for fmt in ("PNG", "JPEG", "PNG", "JPEG", "WEBP")]
    small = [photo_like_jpeg(224, 224, 30 + i) for i in range(8)]
    corrupt = [
        large[0][: len(large[0]) // 2],  # a truncated 12 MP JPEG
        medium[6][: len(medium[6]) * 2 // 3],
        *(mutate(medium[i % 9], rng) for i in range(6)),
        *(HOSTILE_SAMPLES[name]() for name in HOSTILE),
    ]
    return Corpus(large, medium, small, corrupt)


# -- memory from /proc --------------------------------------------------------------------------


def status_field(pid: int, name: str) -> int:
    """A `kB` field of /proc/PID/status in bytes (a count for Threads); 0 once the process is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(rf"^{name}:\s+(\d+)", status, re.MULTILINE)
    if not match:
        return 0
    return int(match.group(1)) * (1 if name == "Threads" else 1024)


def machine_ticks() -> tuple[int, int, int]:
    """(idle, steal, total) CPU ticks of the machine so far, from /proc/stat: idle (with I/O
    wait), and steal (time the hypervisor gave to someone else)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return values[3] + values[4], values[7], sum(values[:8])


def reset_peak(pid: int) -> None:
    """Set VmHWM back to the current VmRSS (proc(5), clear_refs: 5)."""
    with suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def malloc_heaps(pid: int) -> int:
    """Anonymous 64 MiB-aligned reservations of HEAP_BYTES, read-write then PROT_NONE: the
    heaps glibc gives its non-main arenas (one per arena, more when one grows past 64 MiB)."""
    try:
        lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    except OSError:
        return 0
    maps = []
    for line in lines:
        fields = line.split()
        start, end = (int(a, 16) for a in fields[0].split("-"))
        maps.append((start, end, fields[1], len(fields) > 5))  # named: file, [heap], [stack]
    heaps = 0
    for i, (start, end, perms, named) in enumerate(maps):
        if named or start % HEAP_BYTES or perms != "rw-p":
            continue
        if end - start == HEAP_BYTES:
            heaps += 1
        elif i + 1 < len(maps):
            n_start, n_end, n_perms, n_named = maps[i + 1]
            if n_start == end and n_end == start + HEAP_BYTES and n_perms == "---p" and not n_named:
                heaps += 1
    return heaps


# -- one round ----------------------------------------------------------------------------------


@dataclass
class Round:
    config: str
    pair: int
    seconds: float = 0.0
    images: int = 0
    requests: int = 0
    failed_requests: dict[str, int] = field(default_factory=dict)
    image_errors: int = 0
    server_idle: int = 0
    server_peak: int = 0
    server_settled: int = 0
    server_anon_settled: int = 0
    workers_idle: int = 0
    workers_peak: int = 0
    workers_settled: int = 0
    threads: int = 0
    heaps: int = 0
    server_cpu: float = 0.0  # seconds of CPU the server used during the load
    workers_cpu: float = 0.0  # the same, of the decode workers
    steal: float = 0.0  # share of the machine's CPU time taken by the hypervisor during the load
    idle: float = 0.0  # share of the machine's CPU time nothing ran during the load
    client_cpu: float = 0.0  # seconds of CPU this process (the callers) used during the load
    other: float = 0.0  # CPUs' worth used by processes other than these during the load

    @property
    def rate(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    @property
    def cpu_per_image(self) -> float:
        """Server CPU milliseconds per image answered (steadier than img/s on a shared host)."""
        return 1000 * self.server_cpu / self.images if self.images else 0.0

    @property
    def workers_cpu_per_image(self) -> float:
        return 1000 * self.workers_cpu / self.images if self.images else 0.0


def clean_environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not MALLOC_VARIABLES.match(k)}
    return {**env, "PYTHONUNBUFFERED": "1"}


def parse_config(text: str) -> tuple[str, dict[str, str]]:
    name, _, assignments = text.partition(":")
    env = {}
    for pair in filter(None, assignments.split(",")):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"not VAR=VALUE: {pair!r} in {text!r}")
        env[key] = value
    if not name:
        raise argparse.ArgumentTypeError(f"a configuration needs a NAME: {text!r}")
    return name, env


class Load:
    """The same requests in the same order every round: `count` of them, drawn once from a
    seeded generator; the callers take the next one as each finishes its last."""

    def __init__(self, corpus: Corpus, seed: int, count: int) -> None:
        self.corpus = corpus
        rng = random.Random(seed)
        self.plan = [self.pick(rng, rng.choices(KINDS, KIND_WEIGHTS)[0]) for _ in range(count)]
        self.first = [self.pick(rng, kind) for kind in KINDS]  # before the idle reading

    def pick(self, rng: random.Random, kind: str) -> list[bytes]:
        if kind == "photos":
            return [self.image(rng, 1.0) for _ in range(rng.randint(1, 3))]
        if kind == "batch16":
            return [self.image(rng, 0.0) for _ in range(16)]
        return [self.image(rng, 0.1)]

    def image(self, rng: random.Random, large_share: float) -> bytes:
        if rng.random() < CORRUPT_FRACTION:
            return rng.choice(self.corpus.corrupt)
        if rng.random() < large_share:
            return rng.choice(self.corpus.large)
        return rng.choice(self.corpus.medium if rng.random() < 0.6 else self.corpus.small)

    @staticmethod
    def request(images: list[bytes]) -> pb.ModerateRequest:
        return pb.ModerateRequest(
            images=[pb.Image(id=str(k), data=d) for k, d in enumerate(images)]
        )

    def describe(self) -> str:
        images = [len(r) for r in self.plan]
        megabytes = sum(len(d) for r in self.plan for d in r) / MIB
        return f"{len(images)} requests of {min(images)}-{max(images)} images: {sum(images)} images, {megabytes:.0f} MB"


class Meter:
    """What the server, its decode workers, this process and the machine do during the load."""

    def __init__(self, pid: int, result: Round) -> None:
        self.pid, self.result = pid, result
        self.worker_peaks: dict[int, int] = {}
        self.worker_cpu: dict[int, float] = {}
        self.worker_cpu_start = {
            w: process_cpu_seconds(w) for w in descendants(pid)
        }  # a new one starts at 0
        self.server_cpu, self.ticks, self.own = process_cpu_seconds(pid), machine_ticks(), time.process_time()  # fmt: skip
        self.start = time.perf_counter()

    def sample(self) -> None:
        self.result.threads = max(self.result.threads, status_field(self.pid, "Threads"))
        for worker in descendants(self.pid):  # a replaced worker's peak and CPU still count
            self.worker_peaks[worker] = max(self.worker_peaks.get(worker, 0), status_field(worker, "VmHWM"))  # fmt: skip
            seconds = process_cpu_seconds(worker) - self.worker_cpu_start.get(worker, 0.0)
            self.worker_cpu[worker] = max(self.worker_cpu.get(worker, 0.0), seconds)

    def finish(self) -> None:
        result = self.result
        result.seconds = time.perf_counter() - self.start
        result.server_cpu = process_cpu_seconds(self.pid) - self.server_cpu
        result.client_cpu = time.process_time() - self.own
        result.server_peak = status_field(self.pid, "VmHWM")
        self.sample()
        result.workers_peak = sum(self.worker_peaks.values())
        result.workers_cpu = sum(self.worker_cpu.values())
        idle, steal, total = (end - start for end, start in zip(machine_ticks(), self.ticks, strict=True))  # fmt: skip
        result.idle, result.steal = idle / max(1, total), steal / max(1, total)
        busy = (total - idle - steal) / os.sysconf("SC_CLK_TCK")
        own = result.server_cpu + result.workers_cpu + result.client_cpu
        result.other = max(0.0, busy - own) / result.seconds


async def drive(port: int, pid: int, load: Load, clients: int, result: Round) -> None:
    options = [
        ("grpc.max_send_message_length", 256 * MIB),
        ("grpc.max_receive_message_length", 256 * MIB),
    ]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        stub = pb_grpc.ModeratorStub(channel)
        for images in load.first:
            await stub.Moderate(load.request(images), timeout=REQUEST_TIMEOUT)
        await asyncio.sleep(1.0)
        workers = descendants(pid)
        result.server_idle = status_field(pid, "VmRSS")
        result.workers_idle = sum(status_field(w, "VmRSS") for w in workers)
        for process in (pid, *workers):
            reset_peak(process)
        failed: collections.Counter[str] = collections.Counter()
        plan = iter(load.plan)

        async def client() -> None:
            for images in plan:  # shared: each caller takes the next request
                try:
                    response = await stub.Moderate(load.request(images), timeout=REQUEST_TIMEOUT)
                except grpc.aio.AioRpcError as exc:
                    failed[exc.code().name] += 1
                    await asyncio.sleep(0.1)
                    continue
                result.requests += 1
                result.images += len(response.results)
                result.image_errors += sum(r.decision == pb.DECISION_ERROR for r in response.results)  # fmt: skip

        async def sampler() -> None:
            while True:
                meter.sample()
                await asyncio.sleep(SAMPLE_EVERY)

        meter = Meter(pid, result)
        ticker = asyncio.create_task(sampler())
        await asyncio.gather(*(client() for _ in range(clients)))
        ticker.cancel()
        meter.finish()
        result.failed_requests = dict(failed)


def run_round(
    config: tuple[str, dict[str, str]],
    pair: int,
    args: argparse.Namespace,
    extra: list[str],
    load: Load,
) -> Round:
    name, env = config
    result = Round(name, pair)
    model = ["--demo"] if args.demo else ["--model", "ViT-B-32", "--pretrained", "none", "--allow-random-weights"]  # fmt: skip
    quiet = ["--policy-poll-seconds", "0", "--drain-seconds", "0", *extra]
    with server_process(quiet, model, {**clean_environment(), **env}) as (port, pid):
        asyncio.run(drive(port, pid, load, args.clients, result))
        time.sleep(args.settle_seconds)
        result.server_settled = status_field(pid, "VmRSS")
        result.server_anon_settled = status_field(pid, "RssAnon")
        result.workers_settled = sum(status_field(w, "VmRSS") for w in descendants(pid))
        result.heaps = malloc_heaps(pid)
    return result


# -- report -------------------------------------------------------------------------------------

FIGURES: list[tuple[str, str]] = [  # (attribute, heading)
    ("rate", "img/s"),
    ("cpu_per_image", "server CPU ms/img"),
    ("workers_cpu_per_image", "workers CPU ms/img"),
    ("server_idle", "server idle MiB"),
    ("server_peak", "server peak MiB"),
    ("server_settled", "server settled MiB"),
    ("server_anon_settled", "server anon settled MiB"),
    ("workers_idle", "workers idle MiB"),
    ("workers_peak", "workers peak MiB"),
    ("workers_settled", "workers settled MiB"),
]


def figure(result: Round, attribute: str) -> float:
    """A figure of one round: MiB for memory, as is for the rest."""
    value = float(getattr(result, attribute))
    return (
        value
        if attribute in {"rate", "cpu_per_image", "workers_cpu_per_image", "threads", "heaps"}
        else value / MIB
    )


def print_table(results: list[Round]) -> None:
    headings = ["pair", "config", *(h for _, h in FIGURES), "threads", "heaps", "seconds", "images", "errors", "failed", "client CPU s", "other CPUs", "idle", "steal"]  # fmt: skip
    rows = [
        [
            str(r.pair), r.config, *(f"{figure(r, a):.1f}" if a in {"rate", "cpu_per_image", "workers_cpu_per_image"} else f"{figure(r, a):.0f}" for a, _ in FIGURES),
            str(r.threads), str(r.heaps), f"{r.seconds:.1f}", str(r.images), str(r.image_errors),
            ",".join(f"{c}={n}" for c, n in sorted(r.failed_requests.items())) or "0",
            f"{r.client_cpu:.1f}", f"{r.other:.2f}", f"{r.idle:.0%}", f"{r.steal:.1%}",
        ]
        for r in results
    ]  # fmt: skip
    print("| " + " | ".join(headings) + " |")
    print("|" + "---|" * len(headings))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def print_summary(results: list[Round], names: list[str]) -> None:
    baseline = names[0]
    print(f"\nmedians per configuration, and the median of the paired ratios to {baseline} (range)")
    print("| figure | " + " | ".join(names) + " | " + " | ".join(f"{n} / {baseline}" for n in names[1:]) + " |")  # fmt: skip
    print("|" + "---|" * (2 * len(names)))
    by_pair = {(r.config, r.pair): r for r in results}
    pairs = sorted({r.pair for r in results})
    for attribute, heading in [*FIGURES, ("threads", "server threads (max)"), ("heaps", "malloc heaps")]:  # fmt: skip
        cells = []
        for name in names:
            values = [figure(r, attribute) for r in results if r.config == name]
            cells.append(f"{statistics.median(values):.1f}" if values else "n/a")
        for name in names[1:]:
            ratios = [
                figure(by_pair[name, p], attribute) / figure(by_pair[baseline, p], attribute)
                for p in pairs
                if (name, p) in by_pair and (baseline, p) in by_pair
                and figure(by_pair[baseline, p], attribute)
            ]  # fmt: skip
            cells.append(
                f"**{statistics.median(ratios):.3f}** ({min(ratios):.3f}-{max(ratios):.3f})"
                if ratios
                else "n/a"
            )
        print(f"| {heading} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )  # fmt: skip
    parser.add_argument("--pairs", type=int, default=4, help="rounds of every configuration")
    parser.add_argument("--requests", type=int, default=150, help="requests per round")
    parser.add_argument("--clients", type=int, default=6, help="concurrent callers")
    parser.add_argument("--settle-seconds", type=float, default=10.0, help="idle before the settled reading")  # fmt: skip
    parser.add_argument("--config", action="append", type=parse_config, help="NAME:VAR=VALUE,...")
    parser.add_argument("--demo", action="store_true", help="the demo model instead of ViT-B-32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write every round's figures here")
    args, extra = parser.parse_known_args()
    configs: list[tuple[str, dict[str, str]]] = args.config or [parse_config(c) for c in DEFAULT_CONFIGS]  # fmt: skip
    names = [name for name, _ in configs]
    if len(set(names)) != len(names):
        parser.error(f"configuration names repeat: {names}")
    cores = os.cpu_count() or 1
    print(f"# {'demo model' if args.demo else 'ViT-B-32, random weights'}; {args.pairs} pairs of rounds of {args.requests} requests from {args.clients} callers, settle {args.settle_seconds:.0f} s")  # fmt: skip
    print(f"# {cores} CPUs online: glibc's default arena limit is 8 x {cores} = {8 * cores}; server flags: {' '.join(extra) or 'none'}")  # fmt: skip
    for name, env in configs:
        print(f"# {name}: {' '.join(f'{k}={v}' for k, v in env.items()) or 'glibc defaults'}")
    started = time.perf_counter()
    corpus = make_corpus(args.seed)
    print(f"# images: {corpus.describe()} (made in {time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
    load = Load(corpus, args.seed, args.requests)
    print(f"# load: {load.describe()}", flush=True)
    results: list[Round] = []
    for pair in range(1, args.pairs + 1):
        for name, env in configs:
            result = run_round((name, env), pair, args, extra, load)
            results.append(result)
            print(
                f"  pair {pair} {name}: {result.rate:.1f} img/s ({result.cpu_per_image:.1f} server + {result.workers_cpu_per_image:.1f} workers CPU ms/img, client CPU {result.client_cpu:.1f} s, other processes {result.other:.2f} CPUs, idle {result.idle:.0%}, steal {result.steal:.1%}), server idle/peak/settled "
                f"{result.server_idle / MIB:.0f}/{result.server_peak / MIB:.0f}/{result.server_settled / MIB:.0f} MiB, "
                f"workers {result.workers_idle / MIB:.0f}/{result.workers_peak / MIB:.0f}/{result.workers_settled / MIB:.0f} MiB, "
                f"{result.threads} threads, {result.heaps} heaps, failed {result.failed_requests or 0}",
                flush=True,
            )  # fmt: skip
    print(f"\n# {len(results)} rounds in {time.perf_counter() - started:.0f} s")
    print_table(results)
    print_summary(results, names)
    if args.json:
        rows = [{**asdict(r), "rate": r.rate, "cpu_per_image": r.cpu_per_image, "workers_cpu_per_image": r.workers_cpu_per_image} for r in results]  # fmt: skip
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

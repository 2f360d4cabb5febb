"""The serving stack without the model: the server's CPU per image around a stand-in encoder.

    .venv/bin/python bench/stack.py [--quick] [--rounds 7] [--seconds 4] [--gpu-ms-per-image 0]

Runs the real service (serving/server.py `Service`: gRPC, admission, decode worker processes,
batcher, model worker, result building) in a child process of this script, with one change: the
image encoder is a stand-in that returns a fixed L2-normalised embedding (and, with
`--gpu-ms-per-image X`, sleeps X ms per image with the GIL released, as a device would). What
is left is everything a GPU host spends CPU on besides the model. The child mode is

    .venv/bin/python bench/stack.py --serve-stand-in [--view-size 224] [--gpu-ms-per-image 0]

which prints `SERVING on port N {...}` and serves until SIGTERM.

Measured in one run, in alternating rounds (wall-clock throughput on these machines swings 2x
within a minute; CPU per image is steadier, and it is what sizes a GPU host's cores):

- the floor: CPU time of decoding one image alone, in this process, with the function the
  decode workers run (`core.views.decode_views`), on the same images and view size;
- for 1-image `Moderate` requests, 16-image `Moderate` requests and `ModerateStream` (1-image
  requests on a few streams): img/s and the server's CPU-ms per image (the server process and
  its children, the decode workers, from /proc), and decode share = floor / server CPU-ms;
- CPU per image of each server thread and of the decode workers;
- a py-spy profile summary of the server under 16-image and 1-image load (falls back to cProfile
  of the server's event-loop thread when py-spy is missing or cannot attach; `--profile`).

The view size defaults to 224 (ViT-B-32's input, the default model): the stand-in replaces only
the encoder, so the view size is what sets the decode and transport cost per image. The stand-in
wraps the bundled demo model (its text encoder embeds the policies in a second) and serves the
default policy set (policies/*.yaml). Load comes from an asyncio gRPC client in this process;
its CPU is reported apart. Nothing here is a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import io
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moderator_client.v1 import moderator_pb2 as pb
from pipeline import StandInEncoder, print_figures
from pipeline import measure as measure_pipeline
from procs import cpu_seconds, descendants, read_stat
from throughput import median_range, photo_like_jpeg

from moderator.config import REPO_ROOT, ImageConfig
from moderator.core.views import Preprocessing, decode_views

if TYPE_CHECKING:
    from moderator.config import Config, ModelConfig
    from moderator.core.clip import ClipModel

SERVICE = "/moderator.v1.Moderator/"
CALL_TIMEOUT = 120.0
START_TIMEOUT = 300.0
JPEG_QUALITY = 60  # a 224 px photo-like JPEG of about 5 KB, as in issue 14
IMAGE_COUNT = 32
CHANNELS = 4
CPU_FLAGS = ("avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
DECODE_SHARE_TARGETS = {"16": 0.8, "1": 0.5}


# -- the child: the real service with a stand-in encoder ------------------------------------


def stand_in_loader(view_size: int, gpu_ms_per_image: float) -> Callable[[ModelConfig], ClipModel]:
    """A load_model for Service: the demo model (for its text encoder) with its image encoder
    replaced by the stand-in and its views made `view_size` pixels square. A partial of a
    module-level function, so --workers can send it to its worker processes."""
    return functools.partial(load_stand_in, view_size, gpu_ms_per_image)


def load_stand_in(view_size: int, gpu_ms_per_image: float, config: ModelConfig) -> ClipModel:
    import torch

    from moderator.core.clip import ClipModel, load_clip

    clip = load_clip(config)
    generator = torch.Generator().manual_seed(0)
    vector = torch.randn(clip.embed_dim, generator=generator)
    embedding = torch.nn.functional.normalize(vector, dim=0).to(clip.device)
    wrapped = object.__new__(ClipModel)
    wrapped.__dict__.update(clip.__dict__)
    wrapped.preprocessing = Preprocessing(size=view_size, fill=clip.preprocessing.fill)
    wrapped.encode_images = StandInEncoder(embedding, gpu_ms_per_image)  # type: ignore[method-assign, assignment]
    return wrapped


class ChildControls:
    """Signals the parent sends the server: SIGUSR1 writes {native thread id: name} of every
    Python thread to `thread_map`; SIGUSR2 starts cProfile on the event-loop thread, and the
    next one stops it and writes the stats to `cprofile_out`."""

    def __init__(self, thread_map: Path | None, cprofile_out: Path | None) -> None:
        self.thread_map = thread_map
        self.cprofile_out = cprofile_out
        self.profiler: Any = None

    def write_thread_map(self) -> None:
        import threading

        if self.thread_map is None:
            return
        names = {str(t.native_id): t.name for t in threading.enumerate() if t.native_id}
        temporary = self.thread_map.with_suffix(".tmp")
        temporary.write_text(json.dumps(names))
        temporary.replace(self.thread_map)

    def toggle_profile(self) -> None:
        import cProfile

        if self.profiler is None:
            self.profiler = cProfile.Profile()
            self.profiler.enable()
            return
        self.profiler.disable()
        if self.cprofile_out is not None:
            temporary = self.cprofile_out.with_suffix(".tmp")
            self.profiler.dump_stats(str(temporary))
            temporary.replace(self.cprofile_out)
        self.profiler = None


async def serve_stand_in(args: argparse.Namespace) -> None:
    import logging

    from prometheus_client import CollectorRegistry

    from moderator.config import BatchConfig, Config, DecodeConfig, ServerConfig, demo_model_config
    from moderator.serving.server import Service

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="stack-cache-") as cache:
        config = Config(
            policies_dir=args.policies,
            policy_poll_seconds=0,
            embedding_cache_dir=Path(cache),
            image_cache_mb=0,  # the same images over and over would all be cache hits
            model=demo_model_config("cpu", "fp32"),
            # the stand-in stands for a GPU: its host runs the pipeline (auto is off on a CPU)
            batching=BatchConfig(
                max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms, pipelined=True
            ),
            decode=DecodeConfig(workers=args.decode_workers),
            server=ServerConfig(
                host="127.0.0.1",
                port=0,
                metrics_port=-1,
                drain_seconds=0,
                shutdown_grace_seconds=5,
            ),
        )
        loader = stand_in_loader(args.view_size, args.gpu_ms_per_image)
        if args.workers > 1:
            await serve_workers(args, config, loader)
            return
        service = Service(config, CollectorRegistry(), loader)
        await service.start()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        controls = ChildControls(args.thread_map, args.cprofile_out)
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGUSR1, controls.write_thread_map)
        loop.add_signal_handler(signal.SIGUSR2, controls.toggle_profile)
        prep = service.engine.clip.preprocessing
        about = {
            "view_size": prep.size,
            "fill": list(prep.fill),
            "policies": len(service.engine.policies.policies),
            "decode_workers": service.engine.decode_worker_pids,
            "gpu_ms_per_image": args.gpu_ms_per_image,
        }
        print(f"SERVING on port {service.port} {json.dumps(about)}", flush=True)
        await stop.wait()
        await service.stop(drain=False)


async def serve_workers(
    args: argparse.Namespace, config: Config, loader: Callable[[ModelConfig], ClipModel]
) -> None:
    """The same service as `--workers N` runs it: a supervisor and N worker processes."""
    from dataclasses import replace

    from moderator.serving.workers import Supervisor

    server = replace(config.server, workers=args.workers)
    supervisor = Supervisor(replace(config, server=server), load_model=loader)

    def serving(running: Supervisor) -> None:
        about = {"view_size": args.view_size, "workers": running.worker_pids()}
        print(f"SERVING on port {running.port} {json.dumps(about)}", flush=True)

    await supervisor.run(serving)


# -- CPU time from /proc --------------------------------------------------------------------


@dataclass(frozen=True)
class CpuSnapshot:
    at: float  # time.perf_counter()
    process: float  # the server process, all its threads, with reaped children
    children: float  # its live descendants (the decode workers)
    threads: dict[int, tuple[str, float]]  # native thread id -> (comm, CPU seconds)
    client: float  # this process (the load client)
    images: int  # images answered so far
    failed: int

    @property
    def server(self) -> float:
        return self.process + self.children


def snapshot(pid: int, images: int = 0, failed: int = 0) -> CpuSnapshot:
    own = read_stat(Path(f"/proc/{pid}/stat"))
    if own is None:
        raise RuntimeError("the server process is gone")
    children = 0.0
    for child in descendants(pid):
        stat = read_stat(Path(f"/proc/{child}/stat"))
        if stat is not None:
            children += cpu_seconds(stat[1], reaped=True)
    threads = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        stat = read_stat(task / "stat")
        if stat is not None:
            threads[int(task.name)] = (stat[0], cpu_seconds(stat[1], reaped=False))
    return CpuSnapshot(
        at=time.perf_counter(),
        process=cpu_seconds(own[1], reaped=True),
        children=children,
        threads=threads,
        client=time.process_time(),
        images=images,
        failed=failed,
    )


# -- load -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    key: str
    label: str
    per_request: int
    clients: int  # unary: requests in flight; stream: streams
    window: int = 0  # stream: requests in flight on each stream


@dataclass
class Progress:
    images: int = 0
    failed: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    def fail(self, kind: str) -> None:
        self.failed += 1
        self.errors[kind] += 1

    def add(self, response: pb.ModerateResponse) -> None:
        if response.HasField("error"):
            self.fail(f"stream request error {response.error.code}")
            return
        for result in response.results:
            if result.decision == pb.DECISION_ERROR:
                self.fail(pb.ImageErrorCode.Name(result.error.code))
            else:
                self.images += 1


@dataclass(frozen=True)
class Sample:
    """One measured window of one shape."""

    images: int
    failed: int
    seconds: float
    server_cpu: float
    children_cpu: float
    client_cpu: float
    threads: dict[str, float]  # thread group -> CPU seconds

    @property
    def rate(self) -> float:
        return self.images / self.seconds

    @property
    def server_ms(self) -> float:
        return 1000 * self.server_cpu / max(1, self.images)

    @property
    def client_ms(self) -> float:
        return 1000 * self.client_cpu / max(1, self.images)


def request_bytes(images: list[bytes], per_request: int) -> list[bytes]:
    """Serialised ModerateRequests (once, so the client spends little per call)."""
    requests = []
    for start in range(len(images)):
        chosen = [images[(start + k) % len(images)] for k in range(per_request)]
        message = pb.ModerateRequest(
            images=[pb.Image(id=str(k), data=data) for k, data in enumerate(chosen)]
        )
        requests.append(message.SerializeToString())
    return requests


def thread_group(tid: int, comm: str, pid: int, names: dict[int, str]) -> str:
    if tid == pid:
        return "main thread (event loop)"
    name = names.get(tid)
    if name is None:
        return "native: " + (re.sub(r"[-_]?\d+$", "", comm) or comm)
    return without_number(name)


def without_number(name: str) -> str:
    """A thread's name without its pool index: decode_1 -> decode."""
    return re.sub(r"[-_]\d+$", "", re.sub(r"-\d+_\d+$", "", name))


class Load:
    """An asyncio gRPC client of the server on a few connections of its own."""

    def __init__(
        self, port: int, pid: int, images: list[bytes], connections: int = CHANNELS
    ) -> None:
        self.pid = pid
        options = [("grpc.use_local_subchannel_pool", 1)]
        self.channels = [
            grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options)
            for _ in range(connections)
        ]
        self.requests = {n: request_bytes(images, n) for n in (1, 16)}
        self.thread_names: dict[int, str] = {}
        self.errors: Counter[str] = Counter()

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close(None)

    def _unary(self, index: int) -> Any:
        return self.channels[index % len(self.channels)].unary_unary(
            SERVICE + "Moderate",
            request_serializer=None,
            response_deserializer=pb.ModerateResponse.FromString,
        )

    def _stream(self, index: int) -> Any:
        return self.channels[index % len(self.channels)].stream_stream(
            SERVICE + "ModerateStream",
            request_serializer=None,
            response_deserializer=pb.ModerateResponse.FromString,
        )

    async def check(self, shape: Shape) -> None:
        """One call of `shape`; fails unless every image got a decision."""
        progress = Progress()
        requests = self.requests[shape.per_request]
        if shape.window:
            call = self._stream(0)(timeout=CALL_TIMEOUT)
            await call.write(requests[0])
            await call.done_writing()
            async for response in call:
                progress.add(response)
        else:
            progress.add(await self._unary(0)(requests[0], timeout=CALL_TIMEOUT))
        if progress.images != shape.per_request:
            raise RuntimeError(f"{shape.label}: {progress.images} images decided, {progress}")

    async def _unary_client(
        self, shape: Shape, index: int, progress: Progress, stop: asyncio.Event
    ) -> None:
        call = self._unary(index)
        requests = self.requests[shape.per_request]
        i = index
        while not stop.is_set():
            try:
                response = await call(requests[i % len(requests)], timeout=CALL_TIMEOUT)
            except grpc.aio.AioRpcError as exc:
                progress.fail(exc.code().name)
                await asyncio.sleep(0.01)
                continue
            progress.add(response)
            i += shape.clients

    async def _stream_client(
        self, shape: Shape, index: int, progress: Progress, stop: asyncio.Event
    ) -> None:
        call = self._stream(index)(timeout=CALL_TIMEOUT)
        requests = self.requests[shape.per_request]
        credits = asyncio.Semaphore(shape.window)

        async def write() -> None:
            i = index
            while not stop.is_set():
                await credits.acquire()
                if stop.is_set():
                    break
                await call.write(requests[i % len(requests)])
                i += shape.clients
            await call.done_writing()

        writer = asyncio.ensure_future(write())
        try:
            async for response in call:
                credits.release()
                progress.add(response)
        except grpc.aio.AioRpcError as exc:
            progress.fail(exc.code().name)
            writer.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await writer

    def _start(self, shape: Shape, progress: Progress, stop: asyncio.Event) -> list[Any]:
        client = self._stream_client if shape.window else self._unary_client
        return [
            asyncio.ensure_future(client(shape, i, progress, stop)) for i in range(shape.clients)
        ]

    async def measure(
        self, shape: Shape, ramp: float, seconds: float, work: Callable[[], Any] | None = None
    ) -> tuple[Sample, Any]:
        """Load the server with `shape`; after `ramp` seconds, measure for `seconds` (or while
        `work()`, a coroutine function, runs: its result is returned with the sample)."""
        progress, stop = Progress(), asyncio.Event()
        tasks = self._start(shape, progress, stop)
        try:
            await asyncio.sleep(ramp)
            before = snapshot(self.pid, progress.images, progress.failed)
            result = None
            if work is None:
                await asyncio.sleep(seconds)
            else:
                result = await work()
            after = snapshot(self.pid, progress.images, progress.failed)
        finally:
            stop.set()
            await asyncio.gather(*tasks)
        self.errors.update(progress.errors)
        threads: defaultdict[str, float] = defaultdict(float)
        for tid, (comm, cpu) in after.threads.items():
            start = before.threads.get(tid, (comm, 0.0))[1]
            threads[thread_group(tid, comm, self.pid, self.thread_names)] += cpu - start
        threads["decode worker processes"] += after.children - before.children
        sample = Sample(
            images=after.images - before.images,
            failed=after.failed - before.failed,
            seconds=after.at - before.at,
            server_cpu=after.server - before.server,
            children_cpu=after.children - before.children,
            client_cpu=after.client - before.client,
            threads=dict(threads),
        )
        return sample, result


# -- the floor ------------------------------------------------------------------------------


def make_images(count: int, size: int = 224) -> list[bytes]:
    """Photo-like JPEGs re-encoded at JPEG_QUALITY: about 5 KB at 224 px."""
    images = []
    for seed in range(count):
        photo = Image.open(io.BytesIO(photo_like_jpeg(size, size, seed)))
        buffer = io.BytesIO()
        photo.save(buffer, "JPEG", quality=JPEG_QUALITY)
        images.append(buffer.getvalue())
    return images


def decode_floor(images: list[bytes], prep: Preprocessing, count: int) -> float:
    """CPU-ms of decoding one image into its views, alone, on this thread."""
    limits = ImageConfig()
    for data in images:
        decode_views(data, limits, prep)
    start = time.thread_time()
    for i in range(count):
        decode_views(images[i % len(images)], limits, prep)
    return 1000 * (time.thread_time() - start) / count


# -- profiles -------------------------------------------------------------------------------


# Frames every stack of a thread passes through (thread start-up, asyncio.run, the executor's
# loop): left out of the inclusive and file tables, where they would only repeat the thread table.
PLUMBING_FILES = frozenset({"threading.py", "asyncio/runners.py", "bench/stack.py"})
PLUMBING_FUNCTIONS = frozenset(
    {
        "BaseEventLoop.run_forever",
        "BaseEventLoop.run_until_complete",
        "BaseEventLoop._run_once",
        "Handle._run",
        "_worker",
        "_WorkItem.run",
    }
)


@dataclass
class Profile:
    """Seconds attributed to functions, threads and files while `images` were answered."""

    title: str
    note: str
    counted: str  # "572 samples = 2.86 s", "311 functions, 2.98 s"
    seconds: float  # what the shares are shares of
    cpu: Sample  # the server's CPU (from /proc) over the same window
    self_time: list[tuple[str, float]]
    inclusive_time: list[tuple[str, float]]
    threads: list[tuple[str, float]]
    files: list[tuple[str, float]]


def short_path(path: str) -> str:
    for marker in ("site-packages/", "/lib/python3.11/", str(REPO_ROOT) + "/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


_FRAME = re.compile(r"^(?P<func>.*) \((?P<path>.*?)(?::(?P<line>\d+))?\)$")


def frame_key(frame: str) -> tuple[str, str, bool]:
    """('function (file:line)', 'file', is plumbing) of one py-spy frame."""
    match = _FRAME.match(frame)
    if match is None:
        return frame, frame, False
    path = short_path(match["path"])
    line = f":{match['line']}" if match["line"] else ""
    plumbing = path in PLUMBING_FILES or match["func"] in PLUMBING_FUNCTIONS
    return f"{match['func']} ({path}{line})", path, plumbing


def summarise_raw(text: str, rate: int, cpu: Sample, *, title: str, note: str, top: int) -> Profile:
    """Self and inclusive time from py-spy's raw output (collapsed stacks, --threads): each
    sample stands for 1/rate seconds of one thread."""
    total = 0
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    files: Counter[str] = Counter()
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        if frames[0].startswith("thread ("):
            name = frames[0].split(": ", 1)[1] if ": " in frames[0] else frames[0]
            threads[without_number(name)] += count
            frames = frames[1:]
        if not frames:
            continue
        keys = [frame_key(frame) for frame in frames]
        total += count
        own[keys[-1][0]] += count
        for function in {key for key, _, plumbing in keys if not plumbing}:
            inclusive[function] += count
        files[keys[-1][1]] += count

    def seconds(counter: Counter[str], limit: int = top) -> list[tuple[str, float]]:
        return [(key, n / rate) for key, n in counter.most_common(limit)]

    return Profile(
        title,
        note,
        f"{total} samples = {total / rate:.2f} s",
        total / rate,
        cpu,
        seconds(own),
        seconds(inclusive),
        seconds(threads, 20),
        seconds(files),
    )


def summarise_cprofile(path: Path, cpu: Sample, title: str, top: int) -> Profile:
    import pstats

    stats: Any = pstats.Stats(str(path))
    entries = stats.stats  # {(file, line, func): (cc, nc, tottime, cumtime, callers)}
    total = sum(entry[2] for entry in entries.values()) or 1.0
    own: Counter[str] = Counter()
    cumulative: Counter[str] = Counter()
    for (filename, line, function), (_cc, _nc, tottime, cumtime, _callers) in entries.items():
        key = f"{function} ({short_path(filename)}:{line})"
        own[key] += tottime
        cumulative[key] += cumtime
    return Profile(
        title,
        "cProfile of the server's event-loop thread only (py-spy not used): shares of that "
        "thread's wall time, its waits in epoll included, inflated by cProfile's own cost per "
        "call; the model worker, decode and gRPC threads are not in it",
        f"{len(entries)} functions, {total:.2f} s",
        total,
        cpu,
        [(key, float(value)) for key, value in own.most_common(top)],
        [(key, float(value)) for key, value in cumulative.most_common(top)],
        [],
        [],
    )


def py_spy_path() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


async def py_spy(pid: int, seconds: float, rate: int, out: Path, extra: Sequence[str]) -> str:
    """Record the server with py-spy; returns the raw output, or raises RuntimeError."""
    command = py_spy_path()
    if command is None:
        raise RuntimeError("py-spy is not installed (.venv/bin/pip install py-spy)")
    process = await asyncio.create_subprocess_exec(
        command, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
        "--rate", str(rate), "--format", "raw", "--output", str(out),
        "--threads", "--function", "--full-filenames", *extra,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    log, _ = await process.communicate()
    if process.returncode != 0 or not out.exists():
        raise RuntimeError(f"py-spy failed ({process.returncode}): {log.decode()[-500:]}")
    return out.read_text()


async def cprofile(pid: int, seconds: float, out: Path) -> None:
    out.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR2)
    await asyncio.sleep(seconds)
    os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + 30
    while not out.exists():
        if time.monotonic() > deadline:
            raise RuntimeError("the server wrote no cProfile stats")
        await asyncio.sleep(0.1)


# -- the run --------------------------------------------------------------------------------


def cpu_description() -> tuple[str, dict[str, bool]]:
    model, flags = "unknown CPU", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    return model, {flag: flag in flags for flag in CPU_FLAGS}


def start_server(
    args: argparse.Namespace, directory: Path
) -> tuple[subprocess.Popen[str], int, dict[str, Any]]:
    command = [
        sys.executable, str(Path(__file__).resolve()), "--serve-stand-in",
        "--view-size", str(args.view_size), "--gpu-ms-per-image", str(args.gpu_ms_per_image),
        "--policies", str(args.policies), "--decode-workers", str(args.decode_workers),
        "--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms),
        "--workers", str(getattr(args, "workers", 1)),
        "--thread-map", str(directory / "threads.json"),
        "--cprofile-out", str(directory / "server.pstats"),
    ]  # fmt: skip
    log = (directory / "server.log").open("w")
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT
    for line in process.stdout:
        match = re.match(r"SERVING on port (\d+) (\{.*\})", line)
        if match:
            return process, int(match.group(1)), json.loads(match.group(2))
        if time.monotonic() > deadline:
            break
    process.kill()
    raise RuntimeError(
        "the stand-in server never reported SERVING:\n"
        + (directory / "server.log").read_text()[-3000:]
    )


def stop_server(process: subprocess.Popen[str]) -> None:
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()


def print_profile(profile: Profile) -> None:
    print(f"### {profile.title}")
    print()
    images = max(1, profile.cpu.images)
    print(
        f"{profile.note}. {profile.counted} while "
        f"{profile.cpu.images} images were answered ({profile.cpu.rate:,.0f} img/s under the "
        f"profiler): {1e6 * profile.seconds / images:.0f} us per image in all. Self: the function "
        "was on top of the stack; inclusive: anywhere on it (thread start-up and event-loop "
        "frames left out)."
    )
    print()
    threads = sorted(profile.cpu.threads.items(), key=lambda item: -item[1])
    print(
        f"Server CPU over the same window (/proc): {profile.cpu.server_ms:.2f} CPU-ms/img; "
        + ", ".join(f"{name} {1000 * cpu / images:.3f}" for name, cpu in threads if cpu > 0)
    )
    print()

    def rows(entries: list[tuple[str, float]], code: bool = True) -> list[tuple[str, str, str]]:
        return [
            (
                f"`{name}`" if code else name,
                f"{seconds / profile.seconds:.1%}",
                f"{1e6 * seconds / images:.1f}",
            )
            for name, seconds in entries
        ]

    if profile.threads:
        print_table(["thread", "share", "us/img"], rows(profile.threads, code=False))
    print_table(["self", "share", "us/img"], rows(profile.self_time))
    print_table(["inclusive", "share", "us/img"], rows(profile.inclusive_time))
    if profile.files:
        print_table(["file (self)", "share", "us/img"], rows(profile.files))


def source_version() -> str:
    """The commit measured, and whether moderator/ had uncommitted changes."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "moderator"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "commit unknown"
    return f"commit {commit}" + (" with uncommitted changes in moderator/" if dirty else "")


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def print_machine() -> None:
    model, flags = cpu_description()
    print(f"# bench/{Path(sys.argv[0]).name}: {' '.join(sys.argv[1:]) or '(defaults)'}")
    print(f"# {source_version()}")
    print(f"# CPU: {model}; {os.cpu_count()} CPUs; load average at start {load_average()}")
    print(
        "# flags: "
        + ", ".join(f"{flag} {'yes' if present else 'no'}" for flag, present in flags.items())
    )


async def run_bench(args: argparse.Namespace) -> None:
    print_machine()
    images = make_images(IMAGE_COUNT)
    print(
        f"# images: {len(images)} photo-like 224x224 JPEGs, mean {statistics.mean(map(len, images)) / 1024:.1f} KiB"
    )

    shapes = [
        Shape("1", "Moderate, 1-image requests", 1, args.clients),
        Shape("16", "Moderate, 16-image requests", 16, args.clients_16),
        Shape("stream", "ModerateStream, 1-image requests", 1, args.streams, args.stream_window),
    ]
    with tempfile.TemporaryDirectory(prefix="stack-bench-") as tmp:
        directory = Path(tmp)
        process, port, about = start_server(args, directory)
        prep = Preprocessing(size=int(about["view_size"]), fill=tuple(about["fill"]))
        print(
            f"# server pid {process.pid}: stand-in encoder, views {prep.size} px, "
            f"{about['policies']} policies, {len(about['decode_workers'])} decode workers, "
            f"--max-batch-size {args.max_batch_size} --max-wait-ms {args.max_wait_ms}, "
            f"--gpu-ms-per-image {about['gpu_ms_per_image']}"
        )
        print(
            f"# load: 1-image {args.clients} in flight; 16-image {args.clients_16} in flight; "
            f"stream {args.streams} streams x {args.stream_window} in flight; {CHANNELS} connections"
        )
        print(
            f"# {args.rounds} rounds of {args.seconds:g} s per shape (after {args.ramp:g} s ramp), shapes alternating"
        )
        print()
        load = Load(port, process.pid, images)
        try:
            for shape in shapes:
                await load.check(shape)
                await load.measure(shape, args.ramp, args.ramp)  # warm up connections and caches
            os.kill(process.pid, signal.SIGUSR1)
            await asyncio.sleep(0.5)
            with contextlib.suppress(OSError, ValueError):
                names = json.loads((directory / "threads.json").read_text())
                load.thread_names = {int(k): v for k, v in names.items()}

            floors: list[float] = []
            samples: dict[str, list[Sample]] = {shape.key: [] for shape in shapes}
            shares: dict[str, list[float]] = {shape.key: [] for shape in shapes}
            for r in range(args.rounds):
                floor = decode_floor(images, prep, args.floor_images)
                floors.append(floor)
                order = shapes[r % len(shapes) :] + shapes[: r % len(shapes)]
                line = [f"round {r + 1}: floor {floor:.3f} CPU-ms"]
                for shape in order:
                    sample, _ = await load.measure(shape, args.ramp, args.seconds)
                    samples[shape.key].append(sample)
                    shares[shape.key].append(floor / sample.server_ms)
                    line.append(
                        f"{shape.key}: {sample.rate:,.0f} img/s {sample.server_ms:.2f} CPU-ms/img"
                    )
                print("; ".join(line), flush=True)
            print()

            profiles: list[Profile] = []
            if args.profile != "none":
                for key in ("16", "1"):
                    shape = next(s for s in shapes if s.key == key)
                    profiles += await profile_shape(args, load, shape, process.pid, directory)
        finally:
            await load.close()
            stop_server(process)

    report(args, shapes, floors=floors, samples=samples, shares=shares, profiles=profiles)
    if load.errors:
        print(f"# failures: {dict(load.errors)}")
    if args.pipeline_rounds:
        pipeline_phase(args)
    print(f"# load average at end {load_average()}")


def pipeline_phase(args: argparse.Namespace) -> None:
    gpu_ms = args.gpu_ms_per_image or 0.1
    print(f"\n## The model pipeline alone (bench/pipeline.py), --gpu-ms-per-image {gpu_ms:g}")
    settings = argparse.Namespace(
        gpu_ms_per_image=gpu_ms,
        rounds=args.pipeline_rounds,
        seconds=2.0,
        window=128,
        batch=args.max_batch_size,
    )
    print_figures(measure_pipeline(settings))


PY_SPY_MODES = {
    "gil": (
        ["--gil"],
        "py-spy --gil: samples of the thread holding the GIL (Python code and C code that holds "
        "it), in the server process; the decode worker processes are not in it. C code py-spy "
        "cannot see (gRPC's Cython aio server, asyncio's C task step) counts as the nearest "
        "Python frame, mostly `Handle._run`",
    ),
    "active": (
        [],
        "py-spy: samples of every thread py-spy counts as active in the server process (threads "
        "blocked in a lock or a pipe read can count as active); not the decode worker processes",
    ),
}


async def profile_shape(
    args: argparse.Namespace, load: Load, shape: Shape, pid: int, directory: Path
) -> list[Profile]:
    profiles = []
    if args.profile in ("auto", "py-spy"):
        native = ["--native"] if args.py_spy_native else []
        try:
            for mode in args.py_spy_modes.split(","):
                flags, note = PY_SPY_MODES[mode]
                out = directory / f"py-spy-{shape.key}-{mode}.txt"
                rate = args.profile_rate
                record = functools.partial(
                    py_spy, pid, args.profile_seconds, rate, out, [*flags, *native]
                )
                cpu, text = await load.measure(shape, args.ramp, 0, record)
                title = f"{shape.label}: {'py-spy --gil' if mode == 'gil' else 'py-spy, active threads'}"
                profiles.append(
                    summarise_raw(text, rate, cpu, title=title, note=note, top=args.top)
                )
            return profiles
        except RuntimeError as exc:
            if args.profile == "py-spy":
                raise
            print(f"# py-spy could not record the server ({exc}); falling back to cProfile")
    out = directory / "server.pstats"
    cpu, _ = await load.measure(
        shape, args.ramp, 0, lambda: cprofile(pid, args.profile_seconds, out)
    )
    title = f"{shape.label}: cProfile, event-loop thread only"
    return [summarise_cprofile(out, cpu, title, args.top)]


def report(
    args: argparse.Namespace,
    shapes: list[Shape],
    *,
    floors: list[float],
    samples: dict[str, list[Sample]],
    shares: dict[str, list[float]],
    profiles: list[Profile],
) -> None:
    print(
        f"Decode floor (one image alone, `decode_views`, in-process): {median_range(floors, 3)} CPU-ms per image"
    )
    print()
    rows = []
    for shape in shapes:
        runs = samples[shape.key]
        rows.append(
            (
                shape.label,
                median_range([s.rate for s in runs], 0),
                median_range([s.server_ms for s in runs]),
                median_range([1000 * s.children_cpu / max(1, s.images) for s in runs]),
                median_range(shares[shape.key]),
                median_range([s.server_cpu / s.seconds for s in runs]),
                median_range([s.client_ms for s in runs]),
                str(sum(s.failed for s in runs)),
            )
        )
    print(f"Medians (range) of {args.rounds} rounds:")
    print()
    print_table(
        ["load", "img/s", "server CPU-ms/img (process + decode workers)", "of which decode workers",
         "decode share = floor / server", "server cores busy", "client CPU-ms/img", "failed"],
        rows,
    )  # fmt: skip
    for key, target in DECODE_SHARE_TARGETS.items():
        value = statistics.median(shares[key])
        verdict = "met" if value >= target else "NOT met"
        print(f"target: decode share with {key}-image requests >= {target}: {value:.2f}, {verdict}")
    if args.gpu_ms_per_image > 0:
        ceiling = 1000 / args.gpu_ms_per_image
        for shape in shapes:
            rate = statistics.median([s.rate for s in samples[shape.key]])
            print(
                f"device-bound ceiling {ceiling:,.0f} img/s: {shape.label} {rate / ceiling:.2f} of it"
            )
    print()

    groups = sorted({group for runs in samples.values() for s in runs for group in s.threads})
    thread_rows = []
    totals = {key: sum(s.images for s in runs) for key, runs in samples.items()}
    for group in groups:
        cells = [
            1000
            * sum(s.threads.get(group, 0.0) for s in samples[shape.key])
            / max(1, totals[shape.key])
            for shape in shapes
        ]
        if max(cells) >= 0.005:
            thread_rows.append((group, *(f"{cell:.3f}" for cell in cells)))
    thread_rows.sort(key=lambda row: -max(float(cell) for cell in row[1:]))
    print(
        "Server CPU-ms per image by thread (all rounds; threads named by Python, else by /proc comm):"
    )
    print()
    print_table(["thread", *(shape.label for shape in shapes)], thread_rows)
    for profile in profiles:
        print_profile(profile)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a ~1-minute smoke run")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--pipeline-rounds",
        type=int,
        default=7,
        help="rounds of bench/pipeline.py at the end (serial against pipelined worker; 0: none)",
    )
    parser.add_argument(
        "--seconds", type=float, default=4.0, help="measured window per shape and round"
    )
    parser.add_argument("--ramp", type=float, default=1.0, help="load before each window")
    parser.add_argument(
        "--floor-images", type=int, default=1000, help="images decoded per floor measurement"
    )
    parser.add_argument("--clients", type=int, default=32, help="1-image Moderate calls in flight")
    parser.add_argument(
        "--clients-16", type=int, default=8, help="16-image Moderate calls in flight"
    )
    parser.add_argument("--streams", type=int, default=8, help="ModerateStream calls")
    parser.add_argument(
        "--stream-window", type=int, default=4, help="requests in flight per stream"
    )
    parser.add_argument("--profile", choices=("auto", "py-spy", "cprofile", "none"), default="auto")
    parser.add_argument("--profile-seconds", type=float, default=6.0)
    parser.add_argument("--profile-rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument(
        "--py-spy-modes", default="gil,active", help="gil, active or both (comma-separated)"
    )
    parser.add_argument(
        "--py-spy-native",
        action="store_true",
        help="py-spy --native: C frames too (gRPC, upb); slows sampling and skews the shares",
    )
    parser.add_argument("--top", type=int, default=15, help="rows per profile table")
    # the server's settings (passed on to the child)
    parser.add_argument(
        "--view-size", type=int, default=224, help="model input; 64 is the demo model's own"
    )
    parser.add_argument(
        "--gpu-ms-per-image", type=float, default=0.0, help="device time to emulate"
    )
    parser.add_argument("--policies", type=Path, default=REPO_ROOT / "policies")
    parser.add_argument("--decode-workers", type=int, default=0, help="0: one per CPU")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    # the child mode
    parser.add_argument(
        "--serve-stand-in", action="store_true", help="serve with the stand-in encoder"
    )
    parser.add_argument("--workers", type=int, default=1, help="server processes (--workers)")
    parser.add_argument("--thread-map", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cprofile-out", type=Path, help=argparse.SUPPRESS)
    if parser.parse_known_args()[0].quick:  # new defaults; flags given still win
        parser.set_defaults(
            rounds=2,
            seconds=2.0,
            ramp=0.5,
            floor_images=300,
            profile_seconds=3.0,
            pipeline_rounds=2,
        )
    args = parser.parse_args()
    if args.serve_stand_in:
        asyncio.run(serve_stand_in(args))
        return
    asyncio.run(run_bench(args))


if __name__ == "__main__":
    main()

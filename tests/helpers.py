"""Helpers shared by the tests: images, configs, policies, a real service on a free port."""

from __future__ import annotations

import asyncio
import hashlib
import io
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import torch
from moderator_client.v1 import moderator_pb2 as pb
from PIL import Image
from prometheus_client import CollectorRegistry

from moderator.config import (
    DEMO_POLICIES_DIR,
    BatchConfig,
    Config,
    DecodeConfig,
    ImageConfig,
    ModelConfig,
    ServerConfig,
    demo_model_config,
)
from moderator.core.clip import ClipModel, load_clip
from moderator.core.embeddings import EmbeddingCache, PolicyIndex, build_policy_index
from moderator.core.policies import build_policy_set, parse_policy
from moderator.demo.shapes import render_shape
from moderator.serving.server import Service
from moderator.serving.tracing import Tracing


def encode(image: Image.Image, fmt: str = "PNG", **save_args: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    return buffer.getvalue()


def pixel(views: object, view: int, x: int, y: int) -> tuple[int, ...]:
    """The RGB of one pixel of one view in a [V, 3, H, W] array or tensor."""
    return tuple(int(v) for v in views[view, :, y, x])  # type: ignore[index]


def close_to(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 12) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


def process_rss_bytes(pid: int) -> int:
    """Resident memory of one process, from /proc (0 once it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    line = next((row for row in status.splitlines() if row.startswith("VmRSS:")), "VmRSS: 0 kB")
    return int(line.split()[1]) * 1024


def shape_png(colour: str, shape: str, width: int = 160, height: int = 160) -> bytes:
    return encode(render_shape(colour, shape, width, height))


def textured_scene(seed: int, width: int = 640, height: int = 480) -> Image.Image:
    """A photo-like picture (smooth colour fields and finer detail): what PDQ is made for (the
    demo's flat shapes sit near PDQ's median and flip bits when resized)."""
    rng = np.random.default_rng(seed)
    fields = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    detail = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    smooth = Image.fromarray(fields).resize((width, height), Image.Resampling.BICUBIC)
    fine = Image.fromarray(detail).resize((width, height), Image.Resampling.BICUBIC)
    return Image.blend(smooth, fine, 0.3)


def demo_config(
    tmp_path: Path,
    batching: BatchConfig | None = None,
    server: ServerConfig | None = None,
    decode: DecodeConfig | None = None,
    images: ImageConfig | None = None,
    *,
    image_cache_mb: int = 0,
) -> Config:
    """The demo service's config; the cache for repeated uploads is off unless asked for (most
    tests send an image again to see it go through the model again)."""
    return Config(
        policies_dir=DEMO_POLICIES_DIR,
        embedding_cache_dir=tmp_path / "cache",
        image_cache_mb=image_cache_mb,
        model=demo_model_config("cpu"),
        batching=batching or BatchConfig(),
        decode=decode or DecodeConfig(),
        images=images or ImageConfig(),
        server=server
        or ServerConfig(
            host="127.0.0.1", port=0, metrics_port=0, drain_seconds=0, shutdown_grace_seconds=5
        ),
    )


@dataclass
class RunningService:
    service: Service
    loop: asyncio.AbstractEventLoop

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.service.port}"

    def call(self, coroutine: object) -> object:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(60)  # type: ignore[arg-type]


def start_service(
    config: Config,
    load_model: Callable[[ModelConfig], ClipModel] | None = None,
    tracing: Tracing | None = None,
) -> Iterator[RunningService]:
    """Run the real service on its own event loop thread; yield once it is SERVING."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    service = Service(config, CollectorRegistry(), load_model or load_clip, tracing)
    running = RunningService(service, loop)
    running.call(service.start())
    try:
        yield running
    finally:
        running.call(service.stop())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def replace_encoder(clip: ClipModel, encode: Callable[[torch.Tensor], torch.Tensor]) -> ClipModel:
    """The same model with its image encoder wrapped (to hold or break the worker in tests)."""
    wrapped = object.__new__(ClipModel)
    wrapped.__dict__.update(clip.__dict__)
    wrapped.encode_images = encode  # type: ignore[method-assign, assignment]
    return wrapped


class GatedModel:
    """A real model whose forward passes wait while the gate is closed, or fail on demand."""

    def __init__(self, clip: ClipModel) -> None:
        self.clip = clip
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # a forward pass has reached the gate
        self.failing = False

    def load(self, _config: ModelConfig) -> ClipModel:
        return replace_encoder(self.clip, self._encode)

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        self.entered.set()
        assert self.gate.wait(60), "the test never opened the gate"
        if self.failing:
            raise RuntimeError("CUDA error: device lost (injected)")
        return self.clip.encode_images(pixels)


DIM = 8


class CountingEncoder:
    """A deterministic stand-in text encoder that records what it was asked to encode."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, texts: list[str]) -> torch.Tensor:
        self.calls.append(list(texts))
        return torch.stack([vector(t) for t in texts])

    @property
    def encoded(self) -> list[str]:
        return [t for call in self.calls for t in call]


def vector(text: str) -> torch.Tensor:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
    v = torch.randn(DIM, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.normalize(v, dim=0)


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def text_only(scores: list[list[float]]) -> torch.Tensor:
    """Text scores [N, P] laid out as score_views lays scores out ([N, 3P]): no example and no
    allow example matched."""
    text = torch.tensor(scores)
    unmatched = torch.full_like(text, float("-inf"))
    return torch.cat([text, unmatched, unmatched], dim=1)


def make_index(*policies: tuple[str, str]) -> PolicyIndex:
    parsed = [parse_policy(pid, text, pid) for pid, text in policies]
    return build_policy_index(
        build_policy_set(parsed), CountingEncoder(), EmbeddingCache(None, "m"), torch.device("cpu")
    )


def policy_doc(
    action: str,
    descriptions: list[str],
    benign: Sequence[str] = (),
    mode: str = "enforce",
    threshold: float = 0.5,
) -> str:
    """A policy file with one template, so each description is its own text embedding."""
    text = (
        f"title: T\naction: {action}\nmode: {mode}\nthreshold: {threshold}\ntemplates: ['{{}}']\n"
    )
    text += "descriptions:\n" + "".join(f"  - {d}\n" for d in descriptions)
    if benign:
        text += "benign:\n" + "".join(f"  - {b}\n" for b in benign)
    return text


def copy_demo_policies(directory: Path) -> Path:
    shutil.copytree(DEMO_POLICIES_DIR, directory)
    return directory


def unit(*values: float) -> list[float]:
    norm = math.sqrt(sum(v * v for v in values))
    return [v / norm for v in values]


@dataclass(frozen=True)
class Certificates:
    """PEM files made for a test: a CA, a server certificate for localhost and 127.0.0.1, and
    a client certificate with CN=reviewer-tools, all signed by the CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_certificates(directory: Path, server_name: str = "localhost") -> Certificates:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def issue(
        subject: str,
        issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
        names: list[x509.GeneralName],
        ca: bool,
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        issuer_name, issuer_key = issuer or (name, key)
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(issuer_key, hashes.SHA256()), key

    def write(name: str, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        (directory / f"{name}.pem").write_bytes(
            certificate.public_bytes(serialization.Encoding.PEM)
        )
        (directory / f"{name}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    ca_cert, ca_key = issue("test-ca", None, [], ca=True)
    server_names: list[x509.GeneralName] = [
        x509.DNSName(server_name),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    server = issue(server_name, (ca_cert.subject, ca_key), server_names, ca=False)
    client = issue("reviewer-tools", (ca_cert.subject, ca_key), [], ca=False)
    write("ca", ca_cert, ca_key)
    write("server", *server)
    write("client", *client)
    return Certificates(
        directory / "ca.pem",
        directory / "server.pem",
        directory / "server.key",
        directory / "client.pem",
        directory / "client.key",
    )


def wait_until(condition: Callable[[], bool], timeout: float = 30) -> None:
    """Poll `condition` until it holds; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.02)


def code_of(call: Callable[..., object], *args: object, **kwargs: object) -> grpc.StatusCode:
    """The status `call(*args, **kwargs)` ends with (OK when it returns)."""
    try:
        call(*args, **kwargs)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def own_connection(address: str) -> grpc.Channel:
    """A channel on a connection of its own (channels share connections by default)."""
    return grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


def start_demo_server_process(
    *flags: str, log: list[str] | None = None, serving: str = "SERVING on port"
) -> tuple[subprocess.Popen[str], int]:
    """`moderator serve --demo` as a child process on a free port, with `flags` added; returns
    once a log line matches `serving` (followed by "on port N"). Its log is read on in a
    thread, so a full pipe never blocks it; `log`, when given, gets every line."""
    serve = [sys.executable, "-m", "moderator", "serve", "--demo", "--host", "127.0.0.1"]
    defaults = ["--port", "0", "--metrics-port", "-1", "--policy-poll-seconds", "0"]
    process = subprocess.Popen(
        [*serve, *defaults, *flags],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stderr is not None
    lines = log if log is not None else []
    for line in process.stderr:
        lines.append(line)
        if re.search(serving, line) and (match := re.search(r"SERVING on port (\d+)", line)):
            threading.Thread(target=lines.extend, args=(process.stderr,), daemon=True).start()
            return process, int(match.group(1))
    process.kill()
    raise AssertionError("the server never reported SERVING:\n" + "".join(lines[-20:]))


class Flaky:
    """A Moderator server whose Moderate fails with `code` `failures` times, then answers."""

    def __init__(self, code: grpc.StatusCode, failures: int) -> None:
        self.code, self.failures, self.calls = code, failures, 0
        self.server = grpc.server(futures.ThreadPoolExecutor(2))
        handler = grpc.unary_unary_rpc_method_handler(
            self.moderate,
            request_deserializer=pb.ModerateRequest.FromString,
            response_serializer=pb.ModerateResponse.SerializeToString,
        )
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("moderator.v1.Moderator", {"Moderate": handler}),)
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def moderate(
        self, request: pb.ModerateRequest, context: grpc.ServicerContext
    ) -> pb.ModerateResponse:
        self.calls += 1
        if self.calls <= self.failures:
            context.abort(self.code, "try again later")
        return pb.ModerateResponse(
            results=[pb.ImageResult(id=i.id, decision=pb.DECISION_ALLOW) for i in request.images]
        )


def flip_bits(hex_digits: str, *positions: int) -> str:
    """A PDQ hash (64 hex digits) with the bits at `positions` flipped, position 0 the most
    significant (the first bit of pdqhash's vector): its Hamming distance to the original is
    the number of distinct positions."""
    value = int(hex_digits, 16)
    for position in set(positions):
        value ^= 1 << (255 - position)
    return f"{value:064x}"


def hashes_in(rows: np.ndarray) -> list[bytes]:
    """The 32-byte hashes of a core.pdq.hash_rows table (uint64 [4, N]: a quarter of every
    hash a row), in order."""
    return [rows[:, column].tobytes() for column in range(rows.shape[1])]

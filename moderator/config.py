"""Configuration: frozen dataclasses that validate themselves wherever they are built.

Each setting has one default, here; the CLI reads its flag defaults from these classes. A bad
value raises ConfigError naming the command-line flag that sets it (or the field, for settings
without a flag).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from moderator.errors import ConfigError

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"
PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = Path(__file__).resolve().parent / "demo"
DEMO_MODEL_NAME = "moderator-shapes-demo"
DEMO_CONFIG_PATH = DEMO_DIR / f"{DEMO_MODEL_NAME}.json"
DEMO_CHECKPOINT_PATH = DEMO_DIR / f"{DEMO_MODEL_NAME}.pt"
DEMO_POLICIES_DIR = REPO_ROOT / "policies" / "demo"
DEFAULT_POLICIES_DIR = Path("policies")  # relative to the working directory

MIB = 1024 * 1024
MAX_PORT = 65535
MAX_WORKERS = 64
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# A worker process with numpy and Pillow loaded maps about 100 MB before it decodes anything.
MIN_DECODE_MEMORY_MB = 256
# The default request-size limit: four images at the per-image limit, plus ids and framing.
MESSAGE_IMAGES = 4
MESSAGE_OVERHEAD_BYTES = 1 * MIB
MAX_MESSAGE_BYTES = 2**31 - 1  # gRPC takes the limit as a C int
OTLP_ENDPOINT = re.compile(r"https?://([A-Za-z0-9._\-]+|\[[0-9A-Fa-f:.]+\])(:(?P<port>\d{1,5}))?/?")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "moderator"


def require(condition: bool, setting: str, rule: str) -> None:
    """Raise ConfigError('SETTING RULE') unless `condition` holds."""
    if not condition:
        raise ConfigError(f"{setting} {rule}")


@dataclass(frozen=True)
class ModelConfig:
    name: str = DEFAULT_MODEL
    # An open_clip pretrained tag, a local checkpoint path, or None for random weights.
    pretrained: str | None = DEFAULT_PRETRAINED
    device: str = "auto"
    # auto | fp32 | bf16 | fp16 (see core.clip.resolve_precision)
    precision: str = "auto"
    allow_random_weights: bool = False
    # The weights file's SHA-256 (hex), checked before loading (core/weights.py); "": unchecked.
    pretrained_sha256: str = ""
    # Extra open_clip model-config JSON to register before creating the model (demo model).
    config_path: Path | None = None
    # torch intra-op threads; 0: the CPUs this process may use (affinity and cgroup quota),
    # not the host's (torch's own default), so a 4-CPU pod on a 64-core node runs 4.
    threads: int = 0

    def __post_init__(self) -> None:
        require(bool(self.name), "--model", "must name a model")
        require(
            not self.pretrained_sha256 or SHA256_HEX.fullmatch(self.pretrained_sha256) is not None,
            "--pretrained-sha256",
            "must be 64 hexadecimal digits, lower case",
        )
        require(
            not self.pretrained_sha256 or self.pretrained is not None,
            "--pretrained-sha256",
            "needs weights to check (--pretrained is none)",
        )
        require(self.threads >= 0, "--torch-threads", "must not be negative (0: one per CPU)")
        require(
            self.precision in PRECISION_CHOICES,
            "--precision",
            f"must be one of {', '.join(PRECISION_CHOICES)}, got {self.precision!r}",
        )


@dataclass(frozen=True)
class ImageConfig:
    max_bytes: int = 20 * MIB
    max_pixels: int = 50_000_000
    formats: frozenset[str] = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"})
    # Animations with up to this many frames have every frame scored; longer ones this many,
    # sampled by display time.
    max_frames: int = 16
    # Images whose long/short side ratio exceeds this are also scored as tiles no longer than
    # this ratio, covering the whole length; an image needing more than max_tiles is refused.
    tile_aspect_ratio: float = 2.0
    max_tiles: int = 12
    # The most views one image is scored on (frames x transparency layers x (1 + tiles)); fewer
    # frames are sampled when an animation needs more.
    max_views: int = 48
    # What decoding may cost, checked before decoding: every frame of an animation is composed
    # on its full canvas, so frames x canvas area bounds the work; progressive JPEG scans and
    # TIFF pages are counted from the raw bytes. No ordinary photo, GIF or scan comes close.
    max_animation_pixels: int = 500_000_000
    max_animation_frames: int = 10_000
    max_jpeg_scans: int = 100
    max_tiff_pages: int = 256

    def __post_init__(self) -> None:
        require(self.max_bytes >= 1, "--max-image-mb", "must be positive")
        require(self.max_pixels >= 1, "--max-image-pixels", "must be positive")
        require(bool(self.formats), "ImageConfig.formats", "must name at least one format")
        require(self.max_frames >= 1, "--max-frames", "must be at least 1")
        require(self.tile_aspect_ratio >= 1, "ImageConfig.tile_aspect_ratio", "must be at least 1")
        require(self.max_tiles >= 2, "--max-tiles", "must be at least 2")
        require(
            self.max_views >= 3,
            "--max-views",
            "must be at least 3 (an image with transparency is shown on white, on black and raw)",
        )
        require(self.max_animation_pixels >= 1, "--max-animation-pixels", "must be positive")
        require(self.max_animation_frames >= 1, "--max-animation-frames", "must be at least 1")
        require(self.max_jpeg_scans >= 1, "--max-jpeg-scans", "must be at least 1")
        require(self.max_tiff_pages >= 1, "--max-tiff-pages", "must be at least 1")


@dataclass(frozen=True)
class DecodeConfig:
    """The decode worker processes: how many, and what one image may cost them."""

    # 0: one per CPU this process may use (affinity and cgroup quota).
    workers: int = 0
    timeout_ms: float = 5000.0
    # Address-space ceiling of each worker process (RLIMIT_AS); 0 leaves it unlimited.
    memory_mb: int = 2048
    # Plain JPEGs decoded on the model's CUDA device (nvJPEG, serving/device_decode.py), the
    # rest in the worker processes; None (auto): where the device is CUDA and nvJPEG works.
    on_device: bool | None = None

    def __post_init__(self) -> None:
        require(self.workers >= 0, "--decode-workers", "must not be negative (0: one per CPU)")
        require(self.timeout_ms > 0, "--decode-timeout-ms", "must be positive")
        require(
            self.memory_mb == 0 or self.memory_mb >= MIN_DECODE_MEMORY_MB,
            "--decode-memory-mb",
            f"must be 0 (unlimited) or at least {MIN_DECODE_MEMORY_MB}",
        )


@dataclass(frozen=True)
class BatchConfig:
    max_batch_size: int = 16
    max_wait_ms: float = 5.0
    # What requests in flight may hold at once (admission): images, model views (an animation
    # or a long image is several) and encoded bytes. A request that does not fit is refused
    # with RESOURCE_EXHAUSTED (in a stream it waits); a decoded image waits for room in views.
    max_queue_images: int = 512
    max_queue_views: int = 2048
    max_queue_bytes: int = 1024 * MIB
    # The most model views one request may need; more is INVALID_ARGUMENT for that request.
    max_request_views: int = 1024
    # Health goes NOT_SERVING after this many forward passes fail in a row, or while one
    # forward pass has run longer than stuck_batch_seconds.
    max_failed_batches: int = 3
    stuck_batch_seconds: float = 60.0
    # Stage, forward and finish on threads of their own, overlapping (serving/batching.py);
    # off: in series on one thread; None (auto): see pipelined_on.
    pipelined: bool | None = None

    def __post_init__(self) -> None:
        require(self.max_batch_size >= 1, "--max-batch-size", "must be at least 1")
        require(self.max_wait_ms >= 0, "--max-wait-ms", "must not be negative")
        require(self.max_queue_images >= 1, "--max-queue-images", "must be at least 1")
        require(self.max_queue_views >= 1, "--max-queue-views", "must be at least 1")
        require(self.max_queue_bytes >= MIB, "--max-queue-mb", "must be at least 1")
        require(self.max_request_views >= 1, "--max-request-views", "must be at least 1")
        require(
            self.max_request_views <= self.max_queue_views,
            "--max-request-views",
            "must not exceed --max-queue-views",
        )
        require(self.max_failed_batches >= 1, "--max-failed-batches", "must be at least 1")
        require(self.stuck_batch_seconds > 0, "--stuck-batch-seconds", "must be positive")

    def pipelined_on(self, device_type: str) -> bool:
        """Whether the model pipeline overlaps its stages on a device of this type. Auto: on
        for CUDA, where the host's stages overlap the device's work; off on the CPU, where the
        device is the host's own cores and a second thread of torch ops competes with the
        forward pass (measured: 1.37x the idle latency, 0.96x the throughput)."""
        return self.pipelined if self.pipelined is not None else device_type == "cuda"


@dataclass(frozen=True)
class ServerConfig:
    host: str = "[::]"
    port: int = 50051
    # negative turns the metrics endpoint off; 0 picks a free port (as for `port`).
    metrics_port: int = 9090
    # 0: derived from the image limits (Config.max_message_bytes).
    max_message_bytes: int = 0
    max_images_per_request: int = 256
    max_embeddings_per_request: int = 4096
    # ScoreEmbeddings requests admitted at once (one runs, the rest wait); 0 turns the RPC off.
    max_rescore_requests: int = 4
    # Moderator calls (streams included) running at once; more are refused with
    # RESOURCE_EXHAUSTED. Health and reflection are not counted, so probes always get in.
    max_concurrent_rpcs: int = 256
    # HTTP/2 streams (calls) one connection may have open; a client queues the rest. RFC 9113
    # recommends no less than 100: clients that open many calls before the server's SETTINGS
    # arrive get the excess refused.
    max_streams_per_connection: int = 100
    # A ModerateStream that sends no request for this long is closed (DEADLINE_EXCEEDED).
    stream_idle_seconds: float = 300.0
    # On SIGTERM: NOT_SERVING, keep accepting for drain_seconds (load balancers and
    # Kubernetes endpoints catch up), then stop accepting and give accepted requests
    # shutdown_grace_seconds to finish; then up to 5 s for a running forward pass and 2 s
    # for buffered trace spans. A pod's terminationGracePeriodSeconds must cover the sum.
    drain_seconds: float = 5.0
    shutdown_grace_seconds: float = 25.0
    # YAML file of callers (token SHA-256 -> roles); None: every caller may call every method.
    auth_tokens: Path | None = None
    # Serve gRPC server reflection (lists the services; no credentials needed).
    reflection: bool = True
    # TLS for the gRPC port (both or neither); with a client CA, mutual TLS.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    # A second port serving only ReloadPolicies and ScoreEmbeddings (the public port then
    # answers them UNIMPLEMENTED); negative: off. Bind it to localhost or a private interface.
    admin_port: int = -1
    admin_host: str = "127.0.0.1"
    # The metrics endpoint's address ("" = --host) and optional TLS.
    metrics_host: str = ""
    metrics_tls_cert: Path | None = None
    metrics_tls_key: Path | None = None
    metrics_tls_client_ca: Path | None = None
    # Connections are closed (GOAWAY) after this long, so clients reconnect and spread over
    # replicas added since; calls in flight get the grace to finish. 0 = never.
    max_connection_age_seconds: float = 300.0
    max_connection_age_grace_seconds: float = 60.0
    # OpenTelemetry collector (OTLP over gRPC) for a span per RPC; "" = no tracing.
    otlp_endpoint: str = ""
    # Server processes sharing the port (SO_REUSEPORT), each with its own event loop, decode
    # workers and model replica, under one supervisor (serving/workers.py); 1: no supervisor.
    workers: int = 1
    # Set by the supervisor for its workers only: bind the port it holds, sharing it.
    reuse_port: bool = False

    def __post_init__(self) -> None:
        require(bool(self.host), "--host", "must not be empty")
        require(0 <= self.port <= MAX_PORT, "--port", f"must be 0 to {MAX_PORT}")
        require(
            self.metrics_port <= MAX_PORT,
            "--metrics-port",
            f"must be negative (off), 0 (any free port) or a port up to {MAX_PORT}",
        )
        require(
            self.max_message_bytes >= 0, "--max-message-mb", "must not be negative (0: derived)"
        )
        require(self.max_images_per_request >= 1, "--max-images-per-request", "must be positive")
        require(
            self.max_embeddings_per_request >= 1, "--max-embeddings-per-request", "must be positive"
        )
        require(
            self.max_rescore_requests >= 0,
            "--max-rescore-requests",
            "must not be negative (0 turns it off)",
        )
        require(self.max_concurrent_rpcs >= 1, "--max-concurrent-rpcs", "must be at least 1")
        require(
            self.max_streams_per_connection >= 1,
            "--max-streams-per-connection",
            "must be at least 1",
        )
        require(
            (self.tls_cert is None) == (self.tls_key is None),
            "--tls-cert",
            "and --tls-key go together",
        )
        require(
            self.tls_client_ca is None or self.tls_cert is not None,
            "--tls-client-ca",
            "needs --tls-cert and --tls-key (mutual TLS is TLS first)",
        )
        require(
            self.admin_port <= MAX_PORT, "--admin-port", f"must be at most {MAX_PORT} (-1: off)"
        )
        require(
            self.admin_port <= 0 or self.admin_port not in (self.port, self.metrics_port),
            "--admin-port",
            "must differ from --port and --metrics-port",
        )
        require(
            (self.metrics_tls_cert is None) == (self.metrics_tls_key is None),
            "--metrics-tls-cert",
            "and --metrics-tls-key go together",
        )
        require(
            self.metrics_tls_client_ca is None or self.metrics_tls_cert is not None,
            "--metrics-tls-client-ca",
            "needs --metrics-tls-cert and --metrics-tls-key",
        )
        require(
            self.max_connection_age_seconds >= 0,
            "--max-connection-age-seconds",
            "must not be negative (0: never)",
        )
        require(
            self.max_connection_age_grace_seconds >= 0,
            "--max-connection-age-grace-seconds",
            "must not be negative",
        )
        require(self.stream_idle_seconds > 0, "--stream-idle-seconds", "must be positive")
        require(self.drain_seconds >= 0, "--drain-seconds", "must not be negative")
        require(
            self.shutdown_grace_seconds >= 0, "--shutdown-grace-seconds", "must not be negative"
        )
        require(1 <= self.workers <= MAX_WORKERS, "--workers", f"must be 1 to {MAX_WORKERS}")
        endpoint = OTLP_ENDPOINT.fullmatch(self.otlp_endpoint)
        require(
            not self.otlp_endpoint
            or (endpoint is not None and int(endpoint["port"] or 1) <= MAX_PORT),
            "--otlp-endpoint",
            "must be http://HOST:PORT or https://HOST:PORT",
        )


@dataclass(frozen=True)
class Config:
    policies_dir: Path = DEFAULT_POLICIES_DIR
    # Seconds between checks of the policy directory for changes; 0 turns watching off.
    policy_poll_seconds: float = 5.0
    embedding_cache_dir: Path = field(default_factory=default_cache_dir)
    # Memory for the view embeddings of recently seen images (by SHA-256); 0 turns it off.
    image_cache_mb: int = 256
    model: ModelConfig = field(default_factory=ModelConfig)
    images: ImageConfig = field(default_factory=ImageConfig)
    batching: BatchConfig = field(default_factory=BatchConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    server: ServerConfig = field(default_factory=ServerConfig)

    def __post_init__(self) -> None:
        require(self.image_cache_mb >= 0, "--image-cache-mb", "must not be negative (0: off)")
        require(
            self.policy_poll_seconds >= 0,
            "--policy-poll-seconds",
            "must not be negative (0 turns watching off)",
        )
        require(
            self.batching.max_queue_images >= self.server.max_images_per_request,
            "--max-queue-images",
            "must be at least --max-images-per-request",
        )
        require(
            self.batching.max_request_views >= self.images.max_views,
            "--max-request-views",
            "must be at least --max-views (one image may need that many)",
        )
        require(
            self.max_message_bytes <= MAX_MESSAGE_BYTES,
            "--max-message-mb",
            f"must be at most {MAX_MESSAGE_BYTES // MIB} (gRPC's limit; derived from "
            "--max-image-mb when not set)",
        )
        require(
            self.batching.max_queue_bytes >= self.max_message_bytes,
            "--max-queue-mb",
            f"must be at least the message limit ({self.max_message_bytes // MIB} MiB)",
        )

    @property
    def max_message_bytes(self) -> int:
        """The largest request message accepted: --max-message-mb, or by default room for
        MESSAGE_IMAGES images at the per-image byte limit plus MESSAGE_OVERHEAD_BYTES."""
        if self.server.max_message_bytes:
            return self.server.max_message_bytes
        return MESSAGE_IMAGES * self.images.max_bytes + MESSAGE_OVERHEAD_BYTES


def demo_model_config(device: str = "auto", precision: str = "auto") -> ModelConfig:
    return ModelConfig(
        name=DEMO_MODEL_NAME,
        pretrained=str(DEMO_CHECKPOINT_PATH),
        device=device,
        precision=precision,
        config_path=DEMO_CONFIG_PATH,
    )

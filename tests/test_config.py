"""Config validates itself wherever it is built, and names the flag that sets a bad value."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from moderator.cli.main import build_parser
from moderator.cli.options import SERVE_OPTIONS, config_from_args
from moderator.config import (
    DEFAULT_POLICIES_DIR,
    MIB,
    BatchConfig,
    Config,
    DecodeConfig,
    ImageConfig,
    ModelConfig,
    ServerConfig,
)
from moderator.errors import ConfigError

BAD_VALUES: list[tuple[type[Any], dict[str, Any], str]] = [
    (BatchConfig, {"max_batch_size": 0}, "--max-batch-size"),
    (BatchConfig, {"max_wait_ms": -1}, "--max-wait-ms"),
    (DecodeConfig, {"workers": -1}, "--decode-workers"),
    (DecodeConfig, {"timeout_ms": 0}, "--decode-timeout-ms"),
    (DecodeConfig, {"memory_mb": 10}, "--decode-memory-mb"),
    (BatchConfig, {"max_queue_images": 0}, "--max-queue-images"),
    (ServerConfig, {"port": 70000}, "--port"),
    (ServerConfig, {"metrics_port": 70000}, "--metrics-port"),
    (ServerConfig, {"max_message_bytes": -1}, "--max-message-mb"),
    (ServerConfig, {"max_concurrent_rpcs": 0}, "--max-concurrent-rpcs"),
    (ServerConfig, {"max_streams_per_connection": 0}, "--max-streams-per-connection"),
    (ServerConfig, {"drain_seconds": -1}, "--drain-seconds"),
    (ServerConfig, {"stream_idle_seconds": 0}, "--stream-idle-seconds"),
    (ServerConfig, {"admin_port": 50051}, "--admin-port"),
    (ServerConfig, {"tls_cert": "c.pem"}, "--tls-cert"),
    (ServerConfig, {"metrics_tls_key": "k.pem"}, "--metrics-tls-cert"),
    (ServerConfig, {"shutdown_grace_seconds": -1}, "--shutdown-grace-seconds"),
    (BatchConfig, {"max_queue_views": 0}, "--max-queue-views"),
    (BatchConfig, {"max_queue_bytes": 1000}, "--max-queue-mb"),
    (BatchConfig, {"max_request_views": 0}, "--max-request-views"),
    (BatchConfig, {"max_request_views": 4096}, "--max-request-views"),
    (BatchConfig, {"max_failed_batches": 0}, "--max-failed-batches"),
    (BatchConfig, {"stuck_batch_seconds": 0}, "--stuck-batch-seconds"),
    (ServerConfig, {"max_images_per_request": 0}, "--max-images-per-request"),
    (ServerConfig, {"max_embeddings_per_request": 0}, "--max-embeddings-per-request"),
    (ServerConfig, {"max_rescore_requests": -1}, "--max-rescore-requests"),
    (ImageConfig, {"max_bytes": 0}, "--max-image-mb"),
    (ImageConfig, {"max_pixels": 0}, "--max-image-pixels"),
    (ImageConfig, {"max_frames": 0}, "--max-frames"),
    (ImageConfig, {"max_tiles": 1}, "--max-tiles"),
    (ImageConfig, {"max_views": 0}, "--max-views"),
    (ImageConfig, {"max_animation_frames": 0}, "--max-animation-frames"),
    (ModelConfig, {"precision": "fp8"}, "--precision"),
    (ModelConfig, {"threads": -1}, "--torch-threads"),
    (Config, {"policy_poll_seconds": -1}, "--policy-poll-seconds"),
]


@pytest.mark.parametrize(("kind", "values", "flag"), BAD_VALUES)
def test_a_bad_value_is_refused_where_it_is_built(
    kind: type[Any], values: dict[str, Any], flag: str
) -> None:
    with pytest.raises(ConfigError, match=flag):
        kind(**values)


def test_settings_that_must_agree_are_checked_together() -> None:
    with pytest.raises(ConfigError, match="--max-queue-images must be at least"):
        Config(
            batching=BatchConfig(max_queue_images=8),
            server=ServerConfig(max_images_per_request=16),
        )
    Config(
        batching=BatchConfig(max_queue_images=16), server=ServerConfig(max_images_per_request=16)
    )
    with pytest.raises(ConfigError, match="--max-request-views must be at least --max-views"):
        Config(batching=BatchConfig(max_request_views=40), images=ImageConfig(max_views=48))
    with pytest.raises(ConfigError, match="--max-message-mb must be at most 2047"):
        Config(images=ImageConfig(max_bytes=600 * MIB))  # derives 2401 MiB
    with pytest.raises(ConfigError, match=r"--max-queue-mb must be at least the message limit"):
        Config(batching=BatchConfig(max_queue_bytes=50 * MIB))  # the default message is 81 MiB


def test_the_message_limit_follows_the_image_limit_unless_set() -> None:
    assert Config().max_message_bytes == 4 * ImageConfig().max_bytes + MIB
    small = Config(images=ImageConfig(max_bytes=MIB))
    assert small.max_message_bytes == 5 * MIB
    assert Config(server=ServerConfig(max_message_bytes=7 * MIB)).max_message_bytes == 7 * MIB


def test_the_model_pipeline_is_on_for_cuda_and_off_on_the_cpu_unless_set() -> None:
    assert BatchConfig().pipelined_on("cuda")
    assert not BatchConfig().pipelined_on("cpu")
    assert BatchConfig(pipelined=True).pipelined_on("cpu")
    assert not BatchConfig(pipelined=False).pipelined_on("cuda")


def test_flag_defaults_are_the_config_defaults() -> None:
    config = config_from_args(build_parser({}).parse_args(["serve"]))
    assert config.policies_dir == DEFAULT_POLICIES_DIR == Config().policies_dir
    assert config.batching == BatchConfig()
    assert config.images == ImageConfig()
    assert config.model == ModelConfig()
    assert config.policy_poll_seconds == Config().policy_poll_seconds
    server = config.server
    assert (server.host, server.port, server.metrics_port) == ("[::]", 50051, 9090)
    assert server == ServerConfig()
    assert {option.flag for option in SERVE_OPTIONS} >= {"--policies", "--max-batch-size"}


def test_serve_names_the_bad_flag_before_loading_anything() -> None:
    code = (
        "import sys; from moderator.cli.main import main; "
        "code = main(['serve', '--max-batch-size', '0']); "
        "served = any(m.startswith('moderator.serving') for m in sys.modules); "
        "print(code, 'torch' in sys.modules, served)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert done.stdout.split() == ["2", "False", "False"]
    assert "--max-batch-size must be at least 1" in done.stderr


@pytest.mark.parametrize(
    "endpoint",
    ["http://otel-collector.monitoring:4317", "https://[::1]:4317", "http://otel_collector:4317"],
)
def test_otlp_endpoints_that_work_are_accepted(endpoint: str) -> None:
    assert ServerConfig(otlp_endpoint=endpoint).otlp_endpoint == endpoint


@pytest.mark.parametrize(
    "endpoint", ["otel:4317", "grpc://otel:4317", "http://otel:99999", "http://otel:4317/x y"]
)
def test_otlp_endpoints_that_cannot_work_name_the_flag(endpoint: str) -> None:
    with pytest.raises(ConfigError, match="--otlp-endpoint"):
        ServerConfig(otlp_endpoint=endpoint)

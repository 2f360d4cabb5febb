"""Flags, their MODERATOR_* environment variables, and the Config they build.

Every default comes from the config dataclasses, so a setting has one default wherever it is
read. The CLI is the only place that reads the environment.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from moderator.cli.flags import (
    TRUE_WORDS,
    Option,
    auto_on_off,
    env_name,
    kind_with_env,
    on_off,
    one_of,
)
from moderator.config import (
    DEFAULT_POLICIES_DIR,
    DEMO_POLICIES_DIR,
    MIB,
    BatchConfig,
    Config,
    DecodeConfig,
    ImageConfig,
    ModelConfig,
    ServerConfig,
    default_cache_dir,
    demo_model_config,
)
from moderator.logs import LOG_FORMATS, LOG_LEVELS

if TYPE_CHECKING:
    from moderator.core.clip import ClipModel
    from moderator.core.embeddings import EmbeddingCache

LOG_OPTIONS = (
    Option("--log-level", one_of(*LOG_LEVELS), "INFO", "DEBUG, INFO, WARNING or ERROR"),
    Option("--log-format", one_of(*LOG_FORMATS), "text", "text, or json: one object per line"),
    Option("--log-requests", on_off, "off", "log one line per RPC (and stream request)"),
)
MODEL_OPTIONS = (
    Option("--model", str, ModelConfig.name, "open_clip model name, or hf-hub:ORG/REPO"),
    Option(
        "--pretrained",
        str,
        ModelConfig.pretrained,
        "open_clip pretrained tag, checkpoint PATH, or none",
    ),
    Option("--pretrained-sha256", str, "", "the weights' SHA-256, checked before loading"),
    Option("--device", str, ModelConfig.device, "auto, cpu, cuda or cuda:N"),
    Option(
        "--precision",
        str,
        ModelConfig.precision,
        "auto, fp32, bf16 or fp16 (auto: bf16 where fast)",
    ),
    Option("--cache-dir", Path, None, "embedding cache directory (default: ~/.cache/moderator)"),
    Option(
        "--torch-threads", int, 0, "torch intra-op threads (0: the CPUs this container may use)"
    ),
)
SERVE_OPTIONS = (
    Option(
        "--policies",
        Path,
        None,
        f"policy directory (default: ./{DEFAULT_POLICIES_DIR}, or policies/demo with --demo)",
    ),
    Option(
        "--policy-poll-seconds",
        float,
        Config.policy_poll_seconds,
        "check the policy directory this often (0: off)",
    ),
    Option("--host", str, ServerConfig.host, "address to listen on"),
    Option("--port", int, ServerConfig.port, "gRPC port (0 picks a free one)"),
    Option("--workers", int, ServerConfig.workers, "server processes sharing --port, each a model"),
    Option(
        "--metrics-port", int, ServerConfig.metrics_port, "Prometheus port (0: free port, -1: off)"
    ),
    Option("--max-batch-size", int, BatchConfig.max_batch_size, "image views per forward pass"),
    Option("--max-wait-ms", float, BatchConfig.max_wait_ms, "longest wait to fill a batch"),
    Option(
        "--pipeline",
        auto_on_off,
        "auto",
        "stage, run and finish batches on overlapping threads: auto (on for CUDA), on or off",
    ),
    Option(
        "--max-queue-images",
        int,
        BatchConfig.max_queue_images,
        "images in flight before RESOURCE_EXHAUSTED",
    ),
    Option(
        "--max-queue-views",
        int,
        BatchConfig.max_queue_views,
        "model views in flight (decoded images wait for room)",
    ),
    Option(
        "--max-queue-mb",
        float,
        BatchConfig.max_queue_bytes / MIB,
        "encoded image bytes in flight before RESOURCE_EXHAUSTED, MiB",
    ),
    Option(
        "--max-request-views",
        int,
        BatchConfig.max_request_views,
        "model views one request may need (INVALID_ARGUMENT above)",
    ),
    Option(
        "--max-failed-batches",
        int,
        BatchConfig.max_failed_batches,
        "forward passes failing in a row before health says NOT_SERVING",
    ),
    Option(
        "--stuck-batch-seconds",
        float,
        BatchConfig.stuck_batch_seconds,
        "a forward pass running this long makes health NOT_SERVING",
    ),
    Option("--gpu-decode", auto_on_off, "auto", "plain JPEGs decoded on CUDA: auto, on or off"),
    Option("--image-cache-mb", int, Config.image_cache_mb, "repeated uploads cache (0: off)"),
    Option(
        "--decode-workers",
        int,
        DecodeConfig.workers,
        "image decoding processes (0: one per CPU this container may use)",
    ),
    Option(
        "--decode-timeout-ms",
        float,
        DecodeConfig.timeout_ms,
        "time budget to decode one image (TOO_COMPLEX above; its worker is replaced)",
    ),
    Option(
        "--decode-memory-mb",
        int,
        DecodeConfig.memory_mb,
        "address-space ceiling of each decode worker (0: none)",
    ),
    Option(
        "--max-images-per-request", int, ServerConfig.max_images_per_request, "images per request"
    ),
    Option(
        "--max-embeddings-per-request",
        int,
        ServerConfig.max_embeddings_per_request,
        "stored embeddings per ScoreEmbeddings request",
    ),
    Option(
        "--max-rescore-requests",
        int,
        ServerConfig.max_rescore_requests,
        "ScoreEmbeddings requests admitted at once (0 turns the RPC off)",
    ),
    Option(
        "--max-message-mb",
        float,
        0.0,
        "largest request message, MiB (0: 4 x --max-image-mb + 1)",
    ),
    Option(
        "--max-concurrent-rpcs",
        int,
        ServerConfig.max_concurrent_rpcs,
        "RPCs and streams running at once (RESOURCE_EXHAUSTED above)",
    ),
    Option(
        "--max-streams-per-connection",
        int,
        ServerConfig.max_streams_per_connection,
        "concurrent calls one HTTP/2 connection may open",
    ),
    Option(
        "--stream-idle-seconds",
        float,
        ServerConfig.stream_idle_seconds,
        "close a ModerateStream that sends nothing for this long",
    ),
    Option(
        "--auth-tokens",
        Path,
        None,
        "YAML file of callers: token SHA-256 and roles (default: no authentication)",
    ),
    Option("--reflection", on_off, "on", "serve gRPC server reflection: on or off"),
    Option("--tls-cert", Path, None, "serve TLS with this PEM certificate chain (with --tls-key)"),
    Option("--tls-key", Path, None, "the PEM private key of --tls-cert"),
    Option(
        "--tls-client-ca",
        Path,
        None,
        "mutual TLS: require client certificates signed by this PEM CA",
    ),
    Option("--admin-port", int, -1, "serve ReloadPolicies/ScoreEmbeddings only here (-1: off)"),
    Option("--admin-host", str, ServerConfig.admin_host, "address of --admin-port"),
    Option("--metrics-host", str, "", "address of the metrics endpoint (default: --host)"),
    Option("--metrics-tls-cert", Path, None, "serve /metrics over TLS (with --metrics-tls-key)"),
    Option("--metrics-tls-key", Path, None, "the PEM private key of --metrics-tls-cert"),
    Option("--metrics-tls-client-ca", Path, None, "require scraper certificates from this CA"),
    Option("--max-connection-age-seconds", float, 300.0, "close connections this old (0: never)"),
    Option("--max-connection-age-grace-seconds", float, 60.0, "then: time for calls to finish"),
    Option(
        "--drain-seconds",
        float,
        ServerConfig.drain_seconds,
        "on SIGTERM: NOT_SERVING but still accepting for this long",
    ),
    Option(
        "--shutdown-grace-seconds",
        float,
        ServerConfig.shutdown_grace_seconds,
        "then: time for accepted requests to finish",
    ),
    Option("--max-image-mb", float, ImageConfig.max_bytes / MIB, "largest image, MiB"),
    Option("--max-image-pixels", int, ImageConfig.max_pixels, "largest image, width x height"),
    Option(
        "--max-frames",
        int,
        ImageConfig.max_frames,
        "animation frames scored: all up to this, this many by display time beyond",
    ),
    Option(
        "--max-tiles",
        int,
        ImageConfig.max_tiles,
        "tiles to see an extreme aspect ratio whole (TOO_COMPLEX above)",
    ),
    Option("--max-views", int, ImageConfig.max_views, "views scored per image, at most"),
    Option(
        "--max-animation-frames",
        int,
        ImageConfig.max_animation_frames,
        "most frames in an animation (TOO_COMPLEX above)",
    ),
    Option(
        "--max-animation-pixels",
        int,
        ImageConfig.max_animation_pixels,
        "largest animation, frames x canvas width x height (TOO_COMPLEX above)",
    ),
    Option(
        "--max-jpeg-scans",
        int,
        ImageConfig.max_jpeg_scans,
        "most scans in a progressive JPEG (TOO_COMPLEX above)",
    ),
    Option(
        "--max-tiff-pages",
        int,
        ImageConfig.max_tiff_pages,
        "most pages in a TIFF (TOO_COMPLEX above)",
    ),
    Option(
        "--otlp-endpoint",
        str,
        "",
        "send a trace span per RPC to this OpenTelemetry collector (OTLP/gRPC, "
        "http://HOST:4317); needs moderator[tracing]",
    ),
    *LOG_OPTIONS,
)
MODEL_SWITCHES = (
    ("--demo", "use the bundled demo model (and policies/demo when serving); no network needed"),
    ("--allow-random-weights", "allow --pretrained none (random weights; benchmarks only)"),
)


def serve_variables() -> frozenset[str]:
    """The MODERATOR_* variable of every `moderator serve` setting."""
    switches = {env_name(flag) for flag, _ in MODEL_SWITCHES}
    return frozenset({o.env for o in (*MODEL_OPTIONS, *SERVE_OPTIONS)} | switches)


def add_options(
    parser: argparse.ArgumentParser, options: Sequence[Option], env: Mapping[str, str]
) -> None:
    """Flags with defaults from MODERATOR_* variables, plus the model switches."""
    for option in options:
        # argparse converts a string default with `type`, so a bad value gets a clean usage error
        default = env.get(option.env, option.default)
        parser.add_argument(
            option.flag,
            type=kind_with_env(option, env),
            default=default,
            help=f"{option.help} [{option.env}]",
        )
    for flag, text in MODEL_SWITCHES:
        variable = env_name(flag)
        default = env.get(variable, "").lower() in TRUE_WORDS
        parser.add_argument(flag, action="store_true", default=default, help=f"{text} [{variable}]")


def model_config_from_args(args: argparse.Namespace) -> ModelConfig:
    if args.demo:
        return replace(demo_model_config(args.device, args.precision), threads=args.torch_threads)
    return ModelConfig(
        name=args.model,
        pretrained=None if str(args.pretrained).lower() == "none" else args.pretrained,
        device=args.device,
        precision=args.precision,
        allow_random_weights=args.allow_random_weights,
        pretrained_sha256=args.pretrained_sha256.lower(),
        threads=args.torch_threads,
    )


def config_from_args(args: argparse.Namespace) -> Config:
    """The serve Config; raises ConfigError (naming the flag) for a value that cannot work."""
    default_policies = DEMO_POLICIES_DIR if args.demo else DEFAULT_POLICIES_DIR
    return Config(
        policies_dir=args.policies or default_policies,
        policy_poll_seconds=args.policy_poll_seconds,
        embedding_cache_dir=args.cache_dir or default_cache_dir(),
        image_cache_mb=args.image_cache_mb,
        model=model_config_from_args(args),
        images=ImageConfig(
            max_bytes=int(args.max_image_mb * MIB),
            max_pixels=args.max_image_pixels,
            max_frames=args.max_frames,
            max_tiles=args.max_tiles,
            max_views=args.max_views,
            max_animation_frames=args.max_animation_frames,
            max_animation_pixels=args.max_animation_pixels,
            max_jpeg_scans=args.max_jpeg_scans,
            max_tiff_pages=args.max_tiff_pages,
        ),
        batching=BatchConfig(
            max_batch_size=args.max_batch_size,
            max_wait_ms=args.max_wait_ms,
            max_queue_images=args.max_queue_images,
            max_queue_views=args.max_queue_views,
            max_queue_bytes=int(args.max_queue_mb * MIB),
            max_request_views=args.max_request_views,
            max_failed_batches=args.max_failed_batches,
            stuck_batch_seconds=args.stuck_batch_seconds,
            pipelined=args.pipeline,
        ),
        decode=DecodeConfig(
            workers=args.decode_workers,
            timeout_ms=args.decode_timeout_ms,
            memory_mb=args.decode_memory_mb,
            on_device=args.gpu_decode,
        ),
        server=ServerConfig(
            host=args.host,
            port=args.port,
            metrics_port=args.metrics_port,
            max_message_bytes=int(args.max_message_mb * MIB),
            max_images_per_request=args.max_images_per_request,
            max_embeddings_per_request=args.max_embeddings_per_request,
            max_rescore_requests=args.max_rescore_requests,
            max_concurrent_rpcs=args.max_concurrent_rpcs,
            max_streams_per_connection=args.max_streams_per_connection,
            stream_idle_seconds=args.stream_idle_seconds,
            auth_tokens=args.auth_tokens,
            reflection=args.reflection,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_client_ca=args.tls_client_ca,
            admin_port=args.admin_port,
            admin_host=args.admin_host,
            metrics_host=args.metrics_host,
            metrics_tls_cert=args.metrics_tls_cert,
            metrics_tls_key=args.metrics_tls_key,
            metrics_tls_client_ca=args.metrics_tls_client_ca,
            max_connection_age_seconds=args.max_connection_age_seconds,
            max_connection_age_grace_seconds=args.max_connection_age_grace_seconds,
            drain_seconds=args.drain_seconds,
            shutdown_grace_seconds=args.shutdown_grace_seconds,
            otlp_endpoint=args.otlp_endpoint,
            workers=args.workers,
        ),
    )


def load_model(args: argparse.Namespace) -> tuple[ClipModel, EmbeddingCache]:
    """The model named by the model options, and its text-embedding cache (offline tools)."""
    from moderator.core.clip import TEXT_PRECISION, load_clip
    from moderator.core.embeddings import EmbeddingCache

    clip = load_clip(model_config_from_args(args))
    cache = EmbeddingCache.for_model(
        args.cache_dir or default_cache_dir(), clip.info.weights_key, TEXT_PRECISION
    )
    return clip, cache

"""Shared fixtures: the bundled demo model, images, and a real server on a free port."""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image
from prometheus_client import CollectorRegistry

from moderator.clip import ClipModel, load_clip
from moderator.config import (
    DEMO_POLICIES_DIR,
    BatchConfig,
    Config,
    ServerConfig,
    demo_model_config,
)
from moderator.demo.shapes import render_shape
from moderator.server import Service


@pytest.fixture(scope="session")
def demo_clip() -> ClipModel:
    return load_clip(demo_model_config("cpu", "fp32"))


def encode(image: Image.Image, fmt: str = "PNG", **save_args: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    return buffer.getvalue()


def shape_png(colour: str, shape: str, width: int = 160, height: int = 160) -> bytes:
    return encode(render_shape(colour, shape, width, height))


def demo_config(tmp_path: Path, batching: BatchConfig | None = None) -> Config:
    return Config(
        policies_dir=DEMO_POLICIES_DIR,
        embedding_cache_dir=tmp_path / "cache",
        model=demo_model_config("cpu"),
        batching=batching or BatchConfig(),
        server=ServerConfig(host="127.0.0.1", port=0, metrics_port=0, shutdown_grace_seconds=5),
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


def start_service(config: Config) -> Iterator[RunningService]:
    """Run the real service on its own event loop thread; yield once it is SERVING."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    service = Service(config, CollectorRegistry())
    running = RunningService(service, loop)
    running.call(service.start())
    try:
        yield running
    finally:
        running.call(service.stop())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


@pytest.fixture(scope="module")
def demo_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    yield from start_service(demo_config(tmp_path_factory.mktemp("demo")))

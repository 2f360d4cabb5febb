"""Configuration: frozen dataclasses built once at start-up by the CLI."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = Path(__file__).resolve().parent / "demo"
DEMO_MODEL_NAME = "moderator-shapes-demo"
DEMO_CONFIG_PATH = DEMO_DIR / f"{DEMO_MODEL_NAME}.json"
DEMO_CHECKPOINT_PATH = DEMO_DIR / f"{DEMO_MODEL_NAME}.pt"
DEMO_POLICIES_DIR = REPO_ROOT / "policies" / "demo"

MIB = 1024 * 1024


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "moderator"


@dataclass(frozen=True)
class ModelConfig:
    name: str = DEFAULT_MODEL
    # An open_clip pretrained tag, a local checkpoint path, or None for random weights.
    pretrained: str | None = DEFAULT_PRETRAINED
    device: str = "auto"
    # auto | fp32 | bf16 | fp16 (see clip.resolve_precision)
    precision: str = "auto"
    allow_random_weights: bool = False
    # Extra open_clip model-config JSON to register before creating the model (demo model).
    config_path: Path | None = None


@dataclass(frozen=True)
class ImageConfig:
    max_bytes: int = 20 * MIB
    max_pixels: int = 50_000_000
    formats: frozenset[str] = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"})
    # Animated images are checked on up to this many frames spread over the animation.
    max_frames: int = 4
    # Images whose long/short side ratio exceeds this are also scored as square tiles.
    tile_aspect_ratio: float = 2.0
    max_tiles: int = 4

    @property
    def max_views(self) -> int:
        """The most views one image can get: each frame whole, plus its tiles (images.py makes
        tiles only when at least 2 are allowed)."""
        tiles = self.max_tiles if self.max_tiles >= 2 else 0
        return max(self.max_frames, 1) * (1 + tiles)


@dataclass(frozen=True)
class BatchConfig:
    max_batch_size: int = 16
    max_wait_ms: float = 5.0
    max_queue_images: int = 512
    decode_threads: int = 2


@dataclass(frozen=True)
class ServerConfig:
    host: str = "[::]"
    port: int = 50051
    metrics_port: int = 9090
    max_message_bytes: int = 128 * MIB
    max_images_per_request: int = 256
    max_embeddings_per_request: int = 4096
    # ScoreEmbeddings requests admitted at once (one runs, the rest wait); 0 turns the RPC off.
    max_rescore_requests: int = 4
    shutdown_grace_seconds: float = 30.0


@dataclass(frozen=True)
class Config:
    policies_dir: Path = REPO_ROOT / "policies"
    # Seconds between checks of the policy directory for changes; 0 turns watching off.
    policy_poll_seconds: float = 5.0
    embedding_cache_dir: Path = field(default_factory=default_cache_dir)
    model: ModelConfig = field(default_factory=ModelConfig)
    images: ImageConfig = field(default_factory=ImageConfig)
    batching: BatchConfig = field(default_factory=BatchConfig)
    server: ServerConfig = field(default_factory=ServerConfig)


def demo_model_config(device: str = "auto", precision: str = "auto") -> ModelConfig:
    return ModelConfig(
        name=DEMO_MODEL_NAME,
        pretrained=str(DEMO_CHECKPOINT_PATH),
        device=device,
        precision=precision,
        config_path=DEMO_CONFIG_PATH,
    )

"""Embedding policy example images as live images are embedded: the same decode and views (the
server decodes them in a decode worker, as untrusted as an upload), the same image encoder.

Each example's view embeddings are cached by content digest, in memory and on disk (the
embedding cache folder, `image-embeddings-<model>`): a reload embeds only new or changed
examples, and a restart none. An example whose bytes changed since its policy was read, or
that does not decode, fails the load naming the file (the running set stays).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from moderator.config import ImageConfig
from moderator.core.clip import ClipModel
from moderator.core.embeddings import NORM_TOLERANCE, EmbeddingCache
from moderator.core.known_content import MAX_EXAMPLE_BYTES, ExampleImage
from moderator.core.policy_files import read_referenced_bytes
from moderator.core.views import Preprocessing
from moderator.errors import InvalidImage, PolicyError

log = logging.getLogger(__name__)

Decode = Callable[[bytes], torch.Tensor]  # image bytes -> views, uint8 [V, 3, S, S]


def image_pipeline_key(precision: str, prep: Preprocessing, limits: ImageConfig) -> str:
    """What an example's view embeddings depend on besides the weights and the bytes."""
    settings = {**dataclasses.asdict(limits), "formats": sorted(limits.formats)}
    described = json.dumps([precision, prep.size, list(prep.fill), settings], sort_keys=True)
    return hashlib.sha256(described.encode()).hexdigest()[:16]


class ExampleEmbedder:
    """An example image -> its view embeddings [V, E] (float32, CPU, L2-normalised)."""

    def __init__(self, clip: ClipModel, decode: Decode, cache: EmbeddingCache) -> None:
        self._clip = clip
        self._decode = decode
        self._cache = cache
        self.embedded_total = 0  # examples decoded and encoded (not found cached)

    @classmethod
    def for_model(
        cls, clip: ClipModel, decode: Decode, cache_dir: Path | None, limits: ImageConfig
    ) -> ExampleEmbedder:
        """The embedder for `clip`, caching in the embedding cache folder `cache_dir`."""
        pipeline = image_pipeline_key(clip.info.precision, clip.preprocessing, limits)
        cache = EmbeddingCache.for_images(cache_dir, clip.info.weights_key, pipeline)
        return cls(clip, decode, cache)

    def __call__(self, example: ExampleImage) -> torch.Tensor:
        def encode(_keys: list[str]) -> torch.Tensor:
            return self._encode(example)

        views = self._valid(self._cache.lookup([example.sha256], encode)[0])
        if views is None:  # verified, but no encoder of this model made it: a forged entry
            log.warning(
                "example embedding of %s in the cache is unusable: encoded again", example.name
            )
            self._cache.forget(example.sha256)
            views = self._valid(self._cache.lookup([example.sha256], encode)[0])
            assert views is not None  # just made by this model's encoder
        return views

    def _valid(self, vector: torch.Tensor) -> torch.Tensor | None:
        """The views in a cached vector, when they are what this model's encoder makes."""
        views = unpacked(vector)
        if views is None or views.shape[1] != self._clip.embed_dim:
            return None
        norms = views.norm(dim=1)
        return views if bool(((norms - 1).abs() < NORM_TOLERANCE).all()) else None

    def _encode(self, example: ExampleImage) -> torch.Tensor:
        path = Path(example.path)
        data = read_referenced_bytes(path, "/", example.name, MAX_EXAMPLE_BYTES, "an example image")
        if hashlib.sha256(data).hexdigest() != example.sha256:
            raise PolicyError([f"{example.name}: changed while the policies were loading"])
        try:
            pixels = self._decode(data)
        except InvalidImage as exc:
            raise PolicyError([f"{example.name}: example image cannot be used: {exc}"]) from exc
        views = self._clip.encode_images(pixels).float().cpu()
        self.embedded_total += 1
        return packed(views).unsqueeze(0)


def packed(views: torch.Tensor) -> torch.Tensor:
    """[V, E] -> one vector: V, then the views' values (the cache keeps one vector a key)."""
    return torch.cat([torch.tensor([float(views.shape[0])]), views.flatten()])


def unpacked(vector: torch.Tensor) -> torch.Tensor | None:
    """`packed` undone; None for a vector no `packed` made."""
    if vector.numel() < 2 or not bool(torch.isfinite(vector).all()):
        return None
    count = float(vector[0])
    values = vector[1:]
    if count < 1 or count != int(count) or values.numel() % int(count):
        return None
    return values.view(int(count), -1)

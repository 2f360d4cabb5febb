"""Scoring without a server: the service's own pipeline, for policy tooling.

`moderator policies test`, `calibrate` and `rescore` must score exactly as the service does,
so this reuses its pieces: views.decode_image, ClipModel, build_policy_index (examples embedded
by core.examples), core.rescoring.score_stored and rescore_images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from moderator.config import ImageConfig
from moderator.core.clip import ClipModel
from moderator.core.embeddings import EmbeddingCache, PolicyIndex, build_policy_index
from moderator.core.examples import ExampleEmbedder
from moderator.core.hash_index import ImageHashes
from moderator.core.outcomes import ImageOutcome
from moderator.core.policies import PolicySet
from moderator.core.rescoring import EmbeddedImage, rescore_images, score_stored
from moderator.core.scoring import ScoredImage
from moderator.core.views import decode_image
from moderator.errors import InvalidImage


@dataclass(frozen=True)
class ImageScores:
    """One image scored against every policy of the set (index order), or why it was not."""

    path: Path
    scored: ScoredImage | None
    error: InvalidImage | None = None


class OfflineScorer:
    def __init__(
        self,
        clip: ClipModel,
        policy_set: PolicySet,
        cache: EmbeddingCache,
        limits: ImageConfig | None = None,
    ) -> None:
        """Example images' embeddings are cached beside the text ones (`cache`)."""
        self.clip = clip
        self.limits = limits or ImageConfig()
        examples = ExampleEmbedder.for_model(clip, self._pixels, cache.directory, self.limits)
        self.index: PolicyIndex = build_policy_index(
            policy_set, clip.encode_texts, cache, clip.device, embed_example=examples
        )

    @property
    def policy_set(self) -> PolicySet:
        return self.index.policy_set

    def score_files(self, paths: list[Path]) -> list[ImageScores]:
        return [self.score_file(path) for path in paths]

    def score_file(self, path: Path) -> ImageScores:
        """The image at `path` scored as the service scores it: views, examples and hashes."""
        try:
            data = path.read_bytes()
            decoded = decode_image(data, self.limits, self.clip.preprocessing)
        except InvalidImage as exc:
            return ImageScores(path=path, scored=None, error=exc)
        embeddings = self.clip.encode_images(torch.from_numpy(decoded.views)).float().cpu()
        hashes = ImageHashes.of_bytes(data, decoded.pdq)
        [scored] = score_stored([embeddings], self.index, [hashes])
        return ImageScores(path=path, scored=scored)

    def score_embeddings(self, images: list[EmbeddedImage]) -> tuple[ImageOutcome, ...]:
        """Stored embeddings -> the outcomes the service would return for their images."""
        return rescore_images(images, self.index, None, self.limits.max_views)

    def _pixels(self, data: bytes) -> torch.Tensor:
        return torch.from_numpy(decode_image(data, self.limits, self.clip.preprocessing).views)

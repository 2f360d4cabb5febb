"""Scoring without a server: the service's own pipeline, for policy tooling.

`moderator policies test`, `calibrate` and `rescore` must score exactly as the service does,
so this reuses its pieces: images.decode_views, ClipModel, build_policy_index, score_views,
reduce_views and build_outcomes (through core.rescoring.rescore_images).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from moderator.config import ImageConfig
from moderator.core.clip import ClipModel
from moderator.core.embeddings import EmbeddingCache, PolicyIndex, build_policy_index
from moderator.core.outcomes import ImageOutcome
from moderator.core.policies import PolicySet
from moderator.core.rescoring import EmbeddedImage, rescore_images
from moderator.core.scoring import reduce_views, score_views
from moderator.core.views import decode_views
from moderator.errors import InvalidImage


@dataclass(frozen=True)
class ImageScores:
    """One image's score against every policy of the set (index order), or why it has none."""

    path: Path
    scores: torch.Tensor | None  # [P] float32
    error: InvalidImage | None = None


class OfflineScorer:
    def __init__(
        self,
        clip: ClipModel,
        policy_set: PolicySet,
        cache: EmbeddingCache,
        limits: ImageConfig | None = None,
    ) -> None:
        self.clip = clip
        self.limits = limits or ImageConfig()
        self.index: PolicyIndex = build_policy_index(
            policy_set, clip.encode_texts, cache, clip.device
        )

    @property
    def policy_set(self) -> PolicySet:
        return self.index.policy_set

    def score_files(self, paths: list[Path]) -> list[ImageScores]:
        return [self.score_file(path) for path in paths]

    def score_file(self, path: Path) -> ImageScores:
        try:
            views = torch.from_numpy(
                decode_views(path.read_bytes(), self.limits, self.clip.preprocessing)
            )
        except InvalidImage as exc:
            return ImageScores(path=path, scores=None, error=exc)
        embeddings = self.clip.encode_images(views)
        scores, matched = score_views(embeddings, self.index)
        image_scores, _ = reduce_views(scores.cpu(), matched.cpu(), [views.shape[0]])
        return ImageScores(path=path, scores=image_scores[0])

    def score_embeddings(self, images: list[EmbeddedImage]) -> tuple[ImageOutcome, ...]:
        """Stored embeddings -> the outcomes the service would return for their images."""
        return rescore_images(images, self.index, None, self.limits.max_views)

"""Scoring stored image embeddings against a policy set, without the images.

`Moderate` with `include_embeddings` returns each image's embedding (and, for an image scored
on several views, every view). Scoring those against a policy index is the same matrix product
and reduction the live path runs, so a rescore equals what `Moderate` would return for the same
images and policies (to float32 rounding). ScoreEmbeddings and `moderator rescore` both use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
import numpy.typing as npt
import torch

from moderator.core.embeddings import NORM_TOLERANCE, PolicyIndex
from moderator.core.hash_index import ImageHashes
from moderator.core.outcomes import ImageOutcome, Report, Selection, build_outcomes
from moderator.core.pdq import PDQ_HEX, Pdq
from moderator.core.scoring import ScoredImage, score_views, scored_images
from moderator.errors import ImageErrorCode, InvalidImage

CHUNK = 256  # views scored at once

Vector: TypeAlias = Sequence[float] | npt.NDArray[np.float32]


@dataclass(frozen=True, eq=False)
class EmbeddedImage:
    """A stored image: one embedding per view, the whole image first.

    The values stay as given (a list, a protobuf repeated field) until `score_embedded`
    converts them, so a request's conversion runs where its scoring runs, off the event loop.
    """

    id: str
    views: tuple[Vector, ...]
    hashes: ImageHashes | None = None  # matched against hash lists when given
    invalid: str = ""  # why it cannot be scored, found before any conversion


def embedded_image(
    image_id: str,
    embedding: Vector,
    views: Sequence[Vector] = (),
    *,
    sha256: str = "",
    pdq: str = "",
    pdq_quality: int = 0,
) -> EmbeddedImage:
    """The image as Moderate returned it: `views` when it had several, else `embedding`, and
    its hashes when they were stored ('' when not)."""
    all_views = tuple(views) if views else (embedding,)
    if sha256 and not PDQ_HEX.fullmatch(sha256):  # a SHA-256 is 64 hex digits too
        return EmbeddedImage(image_id, all_views, invalid="sha256 must be 64 lowercase hex digits")
    if pdq and not PDQ_HEX.fullmatch(pdq):
        return EmbeddedImage(image_id, all_views, invalid="pdq must be 64 lowercase hex digits")
    if type(pdq_quality) is not int or not 0 <= pdq_quality <= 100:
        return EmbeddedImage(image_id, all_views, invalid="pdq_quality must be 0 to 100")
    if not sha256 and not pdq:
        return EmbeddedImage(image_id, all_views)
    hashes = ImageHashes(sha256, Pdq(pdq, pdq_quality) if pdq else None)
    return EmbeddedImage(image_id, all_views, hashes)


def score_embedded(
    images: Sequence[EmbeddedImage], index: PolicyIndex, max_views: int
) -> list[ScoredImage | InvalidImage]:
    """Every image scored against `index`; an invalid embedding fails alone.

    `max_views`: the most views Moderate gives one image (ImageConfig.max_views).
    """
    dim = int(index.matrix.shape[1])
    failed: dict[int, InvalidImage] = {}
    rows: list[npt.NDArray[np.float32]] = []
    owners: list[int] = []  # the image of each row
    for i, image in enumerate(images):
        views = _invalid(image.invalid) if image.invalid else _view_arrays(image, dim, max_views)
        if isinstance(views, InvalidImage):
            failed[i] = views
        else:
            rows.extend(views)
            owners.extend([i] * len(views))
    matrix = torch.from_numpy(np.stack(rows)) if rows else torch.zeros(0, dim)
    _fail_unnormalised(matrix, owners, failed)
    keep = torch.tensor([owner not in failed for owner in owners], dtype=torch.bool)
    if not bool(keep.any()):
        return [failed[i] for i in range(len(images))]
    kept = matrix[keep]
    scores, matched = _score_in_chunks(kept, index)
    kept_images = [image for i, image in enumerate(images) if i not in failed]
    scored = iter(
        scored_images(
            kept,
            scores,
            matched,
            [len(image.views) for image in kept_images],
            index,
            hashes=[image.hashes for image in kept_images],
        )
    )
    return [failed[i] if i in failed else next(scored) for i in range(len(images))]


def score_stored(
    views: Sequence[torch.Tensor], index: PolicyIndex, hashes: Sequence[ImageHashes | None]
) -> list[ScoredImage]:
    """Images' view embeddings ([V, E] each, float32, CPU) as the live path made them, scored
    together as the live path scores a batch (on the index's device)."""
    matrix = torch.cat(list(views))
    scores, matched = _score_in_chunks(matrix, index)
    counts = [len(image) for image in views]
    return scored_images(matrix, scores, matched, counts, index, hashes=hashes)


def _score_in_chunks(matrix: torch.Tensor, index: PolicyIndex) -> tuple[torch.Tensor, torch.Tensor]:
    """`score_views` over `matrix` ([V, E], CPU) CHUNK views at a time, on the index's device:
    scoring gathers [views, policies, most rows of a policy] at once, which grows to GBs for
    thousands of views against policies with many examples."""
    parts = [
        score_views(matrix[at : at + CHUNK].to(index.matrix.device), index)
        for at in range(0, len(matrix), CHUNK)
    ]
    return torch.cat([s for s, _ in parts]).cpu(), torch.cat([m for _, m in parts]).cpu()


def rescore_images(
    images: Sequence[EmbeddedImage],
    index: PolicyIndex,
    selected: Selection,
    max_views: int,
    report: Report = Report.ALL_POLICIES,
) -> tuple[ImageOutcome, ...]:
    """Stored embeddings -> the outcomes Moderate would return for their images, scored on the
    CPU copy of `index`."""
    scored = score_embedded(images, index.on_cpu, max_views)
    ids = [image.id for image in images]
    return build_outcomes(ids, scored, index.policy_set, selected=selected, report=report)


def _view_arrays(
    image: EmbeddedImage, dim: int, max_views: int
) -> list[npt.NDArray[np.float32]] | InvalidImage:
    if not 1 <= len(image.views) <= max_views:
        return _invalid(f"{len(image.views)} views; Moderate returns 1 to {max_views}")
    try:
        views = [np.asarray(view, dtype=np.float32) for view in image.views]
    except (TypeError, ValueError):
        return _invalid("an embedding must be a list of numbers")
    if any(view.shape != (dim,) for view in views):
        found = ", ".join(str(n) for n in sorted({view.size for view in views}))
        return _invalid(f"embedding has {found} values; this model's have {dim}")
    return views


def _fail_unnormalised(
    matrix: torch.Tensor, owners: list[int], failed: dict[int, InvalidImage]
) -> None:
    """Record each image with a view that is not finite or not L2-normalised."""
    finite = torch.isfinite(matrix).all(dim=1)
    norms = torch.where(finite.unsqueeze(1), matrix, 0.0).norm(dim=1)
    bad = ~finite | ((norms - 1).abs() > NORM_TOLERANCE)
    for row in bad.nonzero().flatten().tolist():
        if owners[row] in failed:
            continue
        if not finite[row]:
            failed[owners[row]] = _invalid("embedding has NaN or infinite values")
        else:
            failed[owners[row]] = _invalid(
                f"embedding is not L2-normalised (norm {float(norms[row]):.4f}); "
                "pass the embedding Moderate returned"
            )


def _invalid(message: str) -> InvalidImage:
    return InvalidImage(ImageErrorCode.INVALID_EMBEDDING, message)

"""Scores and decisions: the tensor work done once per batch, no I/O; Python touches only each
image's result and the policies it violated."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moderator.core.embeddings import PolicyIndex
from moderator.core.policies import Action, Mode, Policy


class Decision(enum.IntEnum):
    ALLOW = 1
    REVIEW = 2
    BLOCK = 3
    ERROR = 4


@dataclass(frozen=True)
class ScoredImage:
    """One image's result of a forward pass: every policy's best score over its views, as
    plain Python values, made for a whole batch at once (`scored_images`)."""

    embeddings: torch.Tensor  # [V, E] float32 on the CPU, L2-normalised: every view
    scores: list[float]  # [P] each policy's best score over the views
    matched: list[int]  # [P] the best description of each policy in the best view
    violated: tuple[int, ...]  # positions of the policies whose score reached the threshold


def score_views(
    image_embeddings: torch.Tensor, index: PolicyIndex
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings [B, E] -> (scores [B, P], matched description [B, P]).

    One matrix product against every description and benign text of every policy; then each
    policy's best description match, minus its best benign match when it has benign texts.
    """
    similarities = image_embeddings @ index.text_matrix.T  # [B, D]
    padded = F.pad(similarities, (0, 1), value=float("-inf"))  # column D is the padding row
    best, matched = padded[:, index.violating_rows].max(dim=2)  # [B, P]
    best_benign = padded[:, index.benign_rows].amax(dim=2)
    scores = best - torch.where(index.has_benign, best_benign, torch.zeros_like(best_benign))
    return scores, matched


def reduce_views(
    scores: torch.Tensor, matched: torch.Tensor, view_counts: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-view (scores [V, P], matched [V, P]), each image's views in consecutive rows ->
    per-image (scores [N, P], matched [N, P]): each policy's max over the image's views.

    A batch of one-view images needs no work; images with the same number of views are reduced
    together, one operation per view count.
    """
    if len(view_counts) == scores.shape[0]:
        return scores, matched
    best = torch.empty(len(view_counts), scores.shape[1], dtype=scores.dtype)
    choices = torch.empty(len(view_counts), scores.shape[1], dtype=matched.dtype)
    by_count: dict[int, tuple[list[int], list[int]]] = {}
    offset = 0
    for image, count in enumerate(view_counts):
        images, starts = by_count.setdefault(count, ([], []))
        images.append(image)
        starts.append(offset)
        offset += count
    for count, (images, starts) in by_count.items():
        rows = torch.tensor(starts).unsqueeze(1) + torch.arange(count)  # [k, count]
        group_best, view = scores[rows].max(dim=1)
        best[images] = group_best
        choices[images] = matched[rows].gather(1, view.unsqueeze(1)).squeeze(1)
    return best, choices


def scored_images(
    embeddings: torch.Tensor,
    scores: torch.Tensor,
    matched: torch.Tensor,
    view_counts: Sequence[int],
    thresholds: torch.Tensor,
) -> list[ScoredImage]:
    """A batch's per-view results (CPU tensors, each image's views in consecutive rows) -> one
    ScoredImage per image: a few tensor operations and one conversion for the whole batch."""
    best, choices = reduce_views(scores, matched, view_counts)
    flagged: list[list[int]] = [[] for _ in view_counts]
    for image, policy in (best >= thresholds).nonzero().tolist():
        flagged[image].append(policy)
    results = []
    offset = 0
    for count, score_row, matched_row, violated in zip(
        view_counts, best.tolist(), choices.tolist(), flagged, strict=True
    ):
        views = embeddings[offset : offset + count]
        results.append(ScoredImage(views, score_row, matched_row, tuple(violated)))
        offset += count
    return results


def decision_of(violated: Iterable[int], policies: Sequence[Policy]) -> Decision:
    """BLOCK if an enforced block policy among the `violated` positions is, else REVIEW if an
    enforced review policy is, else ALLOW. Shadow policies never decide."""
    decision = Decision.ALLOW
    for position in violated:
        policy = policies[position]
        if policy.mode is not Mode.ENFORCE:
            continue
        if policy.action is Action.BLOCK:
            return Decision.BLOCK
        decision = Decision.REVIEW
    return decision

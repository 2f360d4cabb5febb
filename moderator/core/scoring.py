"""Scores and decisions: pure torch, no I/O, no Python loop over policies or images."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moderator.core.embeddings import PolicyIndex


class Decision(enum.IntEnum):
    ALLOW = 1
    REVIEW = 2
    BLOCK = 3
    ERROR = 4


@dataclass(frozen=True)
class ViewScores:
    """Per-view results of one forward pass, on the CPU."""

    embeddings: torch.Tensor  # [V, E] float32, L2-normalised
    scores: torch.Tensor  # [V, P] float32
    matched: torch.Tensor  # [V, P] long: index of the best description within its policy


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


def reduce_views(images: Sequence[ViewScores]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's views -> (scores [N, P], matched [N, P]): each policy's max over the views.

    Images with the same number of views are reduced together, one operation per view count.
    """
    policies = images[0].scores.shape[1] if images else 0
    scores = torch.empty(len(images), policies)
    matched = torch.empty(len(images), policies, dtype=torch.long)
    by_count: dict[int, list[int]] = {}
    for i, image in enumerate(images):
        by_count.setdefault(image.scores.shape[0], []).append(i)
    for members in by_count.values():
        rows = torch.tensor(members)
        best, view = torch.stack([images[i].scores for i in members]).max(dim=1)
        choices = torch.stack([images[i].matched for i in members])
        scores[rows] = best
        matched[rows] = choices.gather(1, view.unsqueeze(1)).squeeze(1)
    return scores, matched


def decide(violated: torch.Tensor, index: PolicyIndex, selected: torch.Tensor) -> torch.Tensor:
    """violated [N, P] bool -> decisions [N] (Decision values).

    BLOCK if a selected enforced block policy is violated, else REVIEW if a selected enforced
    review policy is, else ALLOW. Shadow policies never decide.
    """
    enforced = violated & index.enforced & selected
    block = (enforced & index.blocks).any(dim=1)
    review = (enforced & ~index.blocks).any(dim=1)
    return torch.where(
        block,
        int(Decision.BLOCK),
        torch.where(review, int(Decision.REVIEW), int(Decision.ALLOW)),
    )

"""Scores and decisions: the tensor work done once per batch, no I/O; Python touches only each
image's result and the policies it violated."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moderator.core.embeddings import PolicyIndex
from moderator.core.hash_index import ImageHashes
from moderator.core.policies import Action, Mode, Policy


class Decision(enum.IntEnum):
    ALLOW = 1
    REVIEW = 2
    BLOCK = 3
    ERROR = 4


@dataclass(frozen=True)
class ScoredImage:
    """One image's result of a forward pass: every policy's best scores over its views, as
    plain Python values, made for a whole batch at once (`scored_images`). Position p of each
    list is policy p of the index; a policy without descriptions (or examples) scores -inf."""

    embeddings: torch.Tensor  # [V, E] float32 on the CPU, L2-normalised: every view
    scores: list[float]  # [P] text: best description similarity less best benign one
    matched: list[int]  # [P] the best description of each policy in the best view
    example_scores: list[float]  # [P] best similarity to a violating example's view
    allow_scores: list[float]  # [P] best similarity to an allow example's view
    violated: tuple[int, ...]  # positions of the policies the image violates
    matched_examples: dict[int, str]  # position -> the example that reached example_threshold
    allowed_by: dict[int, str]  # position -> the allow example that kept it from violating
    hash_matches: dict[int, str]  # position -> the hash list entry the image matched
    hashes: ImageHashes | None = None


# The score kinds, each P columns of score_views' result, in this order.
TEXT, EXAMPLE, ALLOW = 0, 1, 2
KINDS = 3


def score_views(
    image_embeddings: torch.Tensor, index: PolicyIndex
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings [B, E] -> (scores [B, 3P], matched row [B, 3P]): for each policy its text
    score (best description match less its best benign match when it has benign texts), its
    best violating-example similarity and its best allow-example similarity, in that order.

    One matrix product against every text and example view of every policy, then one gather
    and reduction per kind.
    """
    similarities = image_embeddings @ index.matrix.T  # [B, R]
    padded = F.pad(similarities, (0, 1), value=float("-inf"))  # column R is the padding row
    best, matched = padded[:, index.violating_rows].max(dim=2)  # [B, P]
    best_benign = padded[:, index.benign_rows].amax(dim=2)
    text = best - torch.where(index.has_benign, best_benign, torch.zeros_like(best_benign))
    example, example_row = padded[:, index.example_rows].max(dim=2)
    allow, allow_row = padded[:, index.allow_rows].max(dim=2)
    return torch.cat([text, example, allow], dim=1), torch.cat(
        [matched, example_row, allow_row], dim=1
    )


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
    index: PolicyIndex,
    *,
    hashes: Sequence[ImageHashes | None],
) -> list[ScoredImage]:
    """A batch's per-view results (CPU tensors, each image's views in consecutive rows) -> one
    ScoredImage per image: a few tensor operations and one conversion for the whole batch.

    A policy is violated when its text score reaches its threshold or an example its
    example_threshold, unless an allow example reaches allow_threshold; and, whatever the
    scores, when the image's hash is on one of its lists."""
    best, choices = reduce_views(scores, matched, view_counts)
    reached = best.view(len(view_counts), KINDS, -1) >= index.thresholds  # [N, 3, P]
    flagged = reached[:, TEXT] | reached[:, EXAMPLE]
    spared = flagged & reached[:, ALLOW]
    by_example = _names_at(reached[:, EXAMPLE], choices, EXAMPLE, index.example_names)
    allowed_by = _names_at(spared, choices, ALLOW, index.allow_names)
    violating: list[set[int]] = [set() for _ in view_counts]
    for image, policy in (flagged & ~spared).nonzero().tolist():
        violating[image].add(policy)
    results = []
    offset = 0
    policies = len(index.example_names)
    for image, (count, score_row, choice_row, image_hashes) in enumerate(
        zip(view_counts, best.tolist(), choices.tolist(), hashes, strict=True)
    ):
        matches = index.hashes.match(image_hashes)
        results.append(
            ScoredImage(
                embeddings=embeddings[offset : offset + count],
                scores=score_row[:policies],
                matched=choice_row[:policies],
                example_scores=score_row[EXAMPLE * policies : (EXAMPLE + 1) * policies],
                allow_scores=score_row[ALLOW * policies :],
                violated=tuple(sorted(violating[image] | matches.keys())),
                matched_examples=by_example[image],
                allowed_by={p: n for p, n in allowed_by[image].items() if p not in matches},
                hash_matches=matches,
                hashes=image_hashes,
            )
        )
        offset += count
    return results


def _names_at(
    where: torch.Tensor, choices: torch.Tensor, kind: int, names: Sequence[Sequence[str]]
) -> list[dict[int, str]]:
    """For each image, policy position -> the name of the example row chosen for `kind`,
    wherever `where` [N, P] holds."""
    found: list[dict[int, str]] = [{} for _ in range(where.shape[0])]
    if not where.any():
        return found
    rows = choices.view(where.shape[0], KINDS, -1)[:, kind]
    for image, policy in where.nonzero().tolist():
        found[image][policy] = names[policy][int(rows[image, policy])]
    return found


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

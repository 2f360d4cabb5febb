"""Per-image results from per-view scores: the one place decisions are turned into outcomes.

Live moderation, ScoreEmbeddings and `moderator rescore` all end here, so a stored embedding
rescored against a policy set gets exactly the outcome a live image would.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moderator.core.embeddings import PolicyIndex
from moderator.core.policies import Policy, PolicySet
from moderator.core.scoring import Decision, ViewScores, decide, reduce_views
from moderator.errors import InvalidImage, InvalidRequest


@dataclass(frozen=True)
class PolicyOutcome:
    policy: Policy
    score: float
    violated: bool
    matched_description: str


@dataclass(frozen=True)
class ImageOutcome:
    id: str
    decision: Decision
    policies: tuple[PolicyOutcome, ...] = ()
    error: InvalidImage | None = None
    embedding: tuple[float, ...] = ()
    views: tuple[tuple[float, ...], ...] = ()  # every view, only when there is more than one


@dataclass(frozen=True)
class ModerationResult:
    results: tuple[ImageOutcome, ...]
    policy_version: str
    model_id: str
    precision: str


def selected_policies(policy_set: PolicySet, policy_ids: Sequence[str]) -> torch.Tensor:
    """[P] bool: the policies a request asked for (all when it named none)."""
    if not policy_ids:
        return torch.ones(len(policy_set.policies), dtype=torch.bool)
    known = set(policy_set.ids)
    unknown = sorted(set(policy_ids) - known)
    if unknown:
        raise InvalidRequest(
            f"unknown policy id(s): {', '.join(unknown)}; active policies: "
            f"{', '.join(policy_set.ids) or '(none)'}"
        )
    wanted = set(policy_ids)
    return torch.tensor([pid in wanted for pid in policy_set.ids], dtype=torch.bool)


def build_outcomes(
    ids: Sequence[str],
    views: Sequence[ViewScores | InvalidImage],
    index: PolicyIndex,
    selected: torch.Tensor,
    include_embeddings: bool = False,
) -> tuple[ImageOutcome, ...]:
    """One outcome per image, in order: its decision and the selected policies' results."""
    scored = [(i, v) for i, v in enumerate(views) if isinstance(v, ViewScores)]
    by_position: dict[int, ImageOutcome] = {}
    if scored:
        scores, matched = reduce_views([v for _, v in scored])
        violated = scores >= index.thresholds
        decisions = decide(violated, index, selected).tolist()
        chosen = [p for p, keep in enumerate(selected.tolist()) if keep]
        policies = index.policy_set.policies
        rows = zip(scores.tolist(), violated.tolist(), matched.tolist(), strict=True)
        for (i, view_scores), decision, (score_row, violated_row, matched_row) in zip(
            scored, decisions, rows, strict=True
        ):
            embedding, all_views = _embeddings(view_scores) if include_embeddings else ((), ())
            by_position[i] = ImageOutcome(
                id=ids[i],
                decision=Decision(decision),
                policies=tuple(
                    PolicyOutcome(
                        policy=policies[p],
                        score=score_row[p],
                        violated=violated_row[p],
                        matched_description=policies[p].descriptions[matched_row[p]],
                    )
                    for p in chosen
                ),
                embedding=embedding,
                views=all_views,
            )
    return tuple(
        ImageOutcome(id=ids[i], decision=Decision.ERROR, error=view)
        if isinstance(view, InvalidImage)
        else by_position[i]
        for i, view in enumerate(views)
    )


def _embeddings(
    view_scores: ViewScores,
) -> tuple[tuple[float, ...], tuple[tuple[float, ...], ...]]:
    rows = [tuple(row) for row in view_scores.embeddings.tolist()]
    return rows[0], tuple(rows) if len(rows) > 1 else ()

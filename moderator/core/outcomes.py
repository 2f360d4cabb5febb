"""Per-image results from scored images: the one place decisions are turned into outcomes.

Live moderation, ScoreEmbeddings and `moderator rescore` all end here, so a stored embedding
rescored against a policy set gets exactly the outcome a live image would.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from moderator.core.policies import Policy, PolicySet
from moderator.core.scoring import Decision, ScoredImage, decision_of
from moderator.errors import InvalidImage, InvalidRequest

# Policy positions a request asked for; None: every policy.
Selection = frozenset[int] | None


class Report(enum.Enum):
    """Which policies an image's outcome lists (the API's Detail)."""

    ALL_POLICIES = "all_policies"
    VIOLATIONS = "violations"
    DECISION = "decision"  # none: the decision alone


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
    policies: tuple[PolicyOutcome, ...] = ()  # as the request's Report asked
    error: InvalidImage | None = None
    embedding: tuple[float, ...] = ()
    views: tuple[tuple[float, ...], ...] = ()  # every view, only when there is more than one
    violated: tuple[Policy, ...] = ()  # the selected policies it violated, whatever is reported


@dataclass(frozen=True)
class ModerationResult:
    results: tuple[ImageOutcome, ...]
    policy_version: str
    model_id: str
    precision: str


def selected_policies(policy_set: PolicySet, policy_ids: Sequence[str]) -> Selection:
    """The positions of the policies a request asked for (None: it named none, so all)."""
    if not policy_ids:
        return None
    positions = {pid: p for p, pid in enumerate(policy_set.ids)}
    unknown = sorted(set(policy_ids) - positions.keys())
    if unknown:
        raise InvalidRequest(
            f"unknown policy id(s): {', '.join(unknown)}; active policies: "
            f"{', '.join(policy_set.ids) or '(none)'}"
        )
    return frozenset(positions[pid] for pid in policy_ids)


def build_outcomes(
    ids: Sequence[str],
    images: Sequence[ScoredImage | InvalidImage],
    policy_set: PolicySet,
    *,
    selected: Selection = None,
    report: Report = Report.ALL_POLICIES,
    include_embeddings: bool = False,
) -> tuple[ImageOutcome, ...]:
    """One outcome per image, in order: its decision and the policies `report` asks for."""
    policies = policy_set.policies
    chosen = range(len(policies)) if selected is None else sorted(selected)
    return tuple(
        ImageOutcome(id=image_id, decision=Decision.ERROR, error=image)
        if isinstance(image, InvalidImage)
        else _outcome(
            image_id,
            image,
            policies,
            selected=selected,
            chosen=chosen,
            report=report,
            include_embeddings=include_embeddings,
        )
        for image_id, image in zip(ids, images, strict=True)
    )


def _outcome(
    image_id: str,
    image: ScoredImage,
    policies: Sequence[Policy],
    *,
    selected: Selection,
    chosen: Sequence[int],
    report: Report,
    include_embeddings: bool,
) -> ImageOutcome:
    violated = [p for p in image.violated if selected is None or p in selected]
    if report is Report.ALL_POLICIES:
        reported: Sequence[int] = chosen
    elif report is Report.VIOLATIONS:
        reported = violated
    else:
        reported = ()
    flagged = set(violated)
    embedding, all_views = _embeddings(image) if include_embeddings else ((), ())
    return ImageOutcome(
        id=image_id,
        decision=decision_of(violated, policies),
        policies=tuple(
            PolicyOutcome(
                policy=policies[p],
                score=image.scores[p],
                violated=p in flagged,
                matched_description=policies[p].descriptions[image.matched[p]],
            )
            for p in reported
        ),
        embedding=embedding,
        views=all_views,
        violated=tuple(policies[p] for p in violated),
    )


def _embeddings(image: ScoredImage) -> tuple[tuple[float, ...], tuple[tuple[float, ...], ...]]:
    rows = [tuple(row) for row in image.embeddings.tolist()]
    return rows[0], tuple(rows) if len(rows) > 1 else ()

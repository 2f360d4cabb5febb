"""Per-image results from scored images: the one place decisions are turned into outcomes.

Live moderation, ScoreEmbeddings and `moderator rescore` all end here, so a stored embedding
rescored against a policy set gets exactly the outcome a live image would.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from moderator.core.hash_index import ImageHashes
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
    score: float  # text score; 0 for a policy without descriptions
    violated: bool
    matched_description: str
    example_score: float = 0.0  # best similarity to a violating example; 0 without examples
    matched_example: str = ""  # the example that reached example_threshold
    allowed_by: str = ""  # the allow example that kept the policy from being violated
    matched_hash: str = ""  # the hash list entry the image matched (violated whatever else)


@dataclass(frozen=True)
class ImageOutcome:
    id: str
    decision: Decision
    policies: tuple[PolicyOutcome, ...] = ()  # as the request's Report asked
    error: InvalidImage | None = None
    embedding: tuple[float, ...] = ()
    views: tuple[tuple[float, ...], ...] = ()  # every view, only when there is more than one
    hashes: ImageHashes | None = None  # SHA-256 and PDQ, when known
    # (policy id, 'example' | 'hash' | 'allow') for each selected policy decided by known
    # content, whatever is reported
    known_rules: tuple[tuple[str, str], ...] = ()
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
            policy_outcome(image, p, policies[p], violated=p in flagged) for p in reported
        ),
        embedding=embedding,
        views=all_views,
        violated=tuple(policies[p] for p in violated),
        hashes=image.hashes,
        known_rules=_known_rules(image, policies, selected),
    )


def _known_rules(
    image: ScoredImage, policies: Sequence[Policy], selected: Selection
) -> tuple[tuple[str, str], ...]:
    rules = [
        *((p, "hash") for p in image.hash_matches),
        *((p, "allow") for p in image.allowed_by),
        *((p, "example") for p in image.matched_examples if p in image.violated),
    ]
    return tuple((policies[p].id, rule) for p, rule in rules if selected is None or p in selected)


def policy_outcome(image: ScoredImage, p: int, policy: Policy, violated: bool) -> PolicyOutcome:
    """Policy `policy`, at position `p` of the index, for one scored image: its scores and the
    rule that decided."""
    return PolicyOutcome(
        policy=policy,
        score=image.scores[p] if policy.descriptions else 0.0,
        violated=violated,
        matched_description=policy.descriptions[image.matched[p]] if policy.descriptions else "",
        example_score=image.example_scores[p] if policy.known.examples else 0.0,
        matched_example=image.matched_examples.get(p, ""),
        allowed_by=image.allowed_by.get(p, ""),
        matched_hash=image.hash_matches.get(p, ""),
    )


def _embeddings(image: ScoredImage) -> tuple[tuple[float, ...], tuple[tuple[float, ...], ...]]:
    rows = [tuple(row) for row in image.embeddings.tolist()]
    return rows[0], tuple(rows) if len(rows) > 1 else ()

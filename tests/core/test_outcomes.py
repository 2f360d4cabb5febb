from __future__ import annotations

import pytest
import torch

from moderator.core.outcomes import Report, build_outcomes, selected_policies
from moderator.core.scoring import Decision, ScoredImage, scored_images
from moderator.errors import ImageErrorCode, InvalidImage, InvalidRequest
from tests.helpers import make_index, policy_doc, text_only

INDEX = make_index(
    ("block", policy_doc("block", ["x"], threshold=0.5)),
    ("review", policy_doc("review", ["y"], threshold=0.5)),
    ("shadow", policy_doc("block", ["z"], mode="shadow", threshold=0.5)),
)
POLICIES = INDEX.policy_set


def scored(*rows: list[float]) -> list[ScoredImage | InvalidImage]:
    return list(
        scored_images(
            torch.zeros(len(rows), 4),
            text_only(list(rows)),
            torch.zeros(len(rows), 9, dtype=torch.long),
            [1] * len(rows),
            INDEX,
            hashes=[None] * len(rows),
        )
    )


def test_every_policy_is_reported_by_default_and_the_decision_is_over_all() -> None:
    images = [*scored([0.9, 0.9, 0.1], [0.1, 0.1, 0.9]), InvalidImage(ImageErrorCode.CORRUPT, "x")]
    blocked, shadowed, broken = build_outcomes(["a", "b", "c"], images, POLICIES)
    assert blocked.decision is Decision.BLOCK
    assert [p.policy.id for p in blocked.policies] == ["block", "review", "shadow"]
    assert [p.violated for p in blocked.policies] == [True, True, False]
    assert [p.id for p in blocked.violated] == ["block", "review"]
    assert shadowed.decision is Decision.ALLOW  # a shadow policy never decides
    assert [p.id for p in shadowed.violated] == ["shadow"]
    assert broken.decision is Decision.ERROR
    assert broken.error is not None
    assert broken.policies == ()


def test_a_selection_decides_and_reports_on_its_policies_only() -> None:
    selection = selected_policies(POLICIES, ["review"])
    (outcome,) = build_outcomes(["a"], scored([0.9, 0.9, 0.9]), POLICIES, selected=selection)
    assert outcome.decision is Decision.REVIEW
    assert [p.policy.id for p in outcome.policies] == ["review"]
    assert [p.id for p in outcome.violated] == ["review"]


def test_the_report_chooses_the_listed_policies_not_the_decision() -> None:
    images = scored([0.9, 0.1, 0.9])
    outcomes = {
        report: build_outcomes(["a"], images, POLICIES, report=report)[0] for report in Report
    }
    assert {outcome.decision for outcome in outcomes.values()} == {Decision.BLOCK}
    assert len(outcomes[Report.ALL_POLICIES].policies) == 3
    assert [p.policy.id for p in outcomes[Report.VIOLATIONS].policies] == ["block", "shadow"]
    assert outcomes[Report.DECISION].policies == ()
    for outcome in outcomes.values():
        assert [p.id for p in outcome.violated] == ["block", "shadow"]


def test_an_unknown_policy_id_is_refused_with_the_known_ones() -> None:
    assert selected_policies(POLICIES, []) is None
    with pytest.raises(InvalidRequest, match=r"unknown policy id.*nope.*block, review, shadow"):
        selected_policies(POLICIES, ["nope", "block"])

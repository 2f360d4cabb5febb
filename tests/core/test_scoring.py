from __future__ import annotations

import pytest
import torch

from moderator.core.embeddings import PolicyIndex
from moderator.core.scoring import (
    Decision,
    decision_of,
    reduce_views,
    score_views,
    scored_images,
)
from tests.helpers import make_index, policy_doc, text_only, vector


def reference_scores(
    images: torch.Tensor, index: PolicyIndex
) -> tuple[list[list[float]], list[list[int]]]:
    """The obvious per-image, per-policy loops that the vectorised scorer must equal."""
    scores, matched = [], []
    for image in images:
        row_scores, row_matched = [], []
        for policy in index.policy_set.policies:
            sims = [float(image @ vector(d)) for d in policy.descriptions]
            best = max(sims)
            benign = max((float(image @ vector(b)) for b in policy.benign), default=None)
            row_scores.append(best - benign if benign is not None else best)
            row_matched.append(sims.index(best))
        scores.append(row_scores)
        matched.append(row_matched)
    return scores, matched


def test_scores_equal_the_per_policy_reference() -> None:
    index = make_index(
        ("a", policy_doc("block", ["knife", "gun", "sword"], ["spoon", "fork"])),
        ("b", policy_doc("review", ["pill"])),
        ("c", policy_doc("review", ["flag", "tattoo"], ["temple"])),
    )
    images = torch.nn.functional.normalize(
        torch.randn(5, 8, generator=torch.Generator().manual_seed(1)), dim=-1
    )
    scores, matched = score_views(images, index)
    expected_scores, expected_matched = reference_scores(images, index)
    assert torch.allclose(scores[:, :3], torch.tensor(expected_scores), atol=1e-5)
    assert matched[:, :3].tolist() == expected_matched
    assert bool((scores[:, 3:] == float("-inf")).all())  # no examples: nothing matched


def test_an_image_equal_to_a_description_matches_it() -> None:
    index = make_index(("a", policy_doc("block", ["knife", "gun"])))
    scores, matched = score_views(vector("gun").unsqueeze(0), index)
    assert abs(float(scores[0, 0]) - 1.0) < 1e-5
    assert matched.tolist() == [[1, 0, 0]]  # description 1; no example, no allow example


def test_benign_match_lowers_the_score() -> None:
    plain = make_index(("a", policy_doc("block", ["knife"])))
    with_benign = make_index(("a", policy_doc("block", ["knife"], ["spoon"])))
    image = vector("spoon").unsqueeze(0)
    assert float(score_views(image, with_benign)[0][0, 0]) < float(
        score_views(image, plain)[0][0, 0]
    )


def test_decisions_block_beats_review_and_shadow_never_decides() -> None:
    policies = make_index(
        ("block", policy_doc("block", ["x"])),
        ("review", policy_doc("review", ["x"])),
        ("shadow", policy_doc("block", ["x"], mode="shadow")),
    ).policy_set.policies
    # policy order is by id: block 0, review 1, shadow 2
    cases = {(): Decision.ALLOW, (1,): Decision.REVIEW, (0, 1): Decision.BLOCK}
    cases |= {(2,): Decision.ALLOW, (0, 2): Decision.BLOCK, (1, 2): Decision.REVIEW}
    for violated, decision in cases.items():
        assert decision_of(violated, policies) is decision, violated


def test_reduce_views_takes_each_policy_max_over_each_images_views() -> None:
    # images of 3, 1, 3 and 2 views, in consecutive rows
    scores = torch.tensor(
        [
            *([0.1, 0.9], [0.7, 0.2], [0.3, 0.4]),
            [-0.5, -0.2],
            *([0.0, 0.0], [0.2, 0.1], [0.1, 0.3]),
            *([0.4, 0.4], [0.5, 0.3]),
        ]
    )
    matched = torch.arange(18).reshape(9, 2)
    best, choice = reduce_views(scores, matched, [3, 1, 3, 2])
    assert best.tolist() == [
        pytest.approx([0.7, 0.9]),
        pytest.approx([-0.5, -0.2]),
        pytest.approx([0.2, 0.3]),
        pytest.approx([0.5, 0.4]),
    ]
    assert choice.tolist() == [[2, 1], [6, 7], [10, 13], [16, 15]]


def test_one_view_images_are_their_own_reduction() -> None:
    scores, matched = torch.rand(4, 3), torch.zeros(4, 3, dtype=torch.long)
    assert reduce_views(scores, matched, [1, 1, 1, 1])[0] is scores


def test_scored_images_carry_each_images_views_scores_and_violations() -> None:
    embeddings = torch.arange(12.0).reshape(4, 3)
    scores = text_only([[0.1, 0.6], [0.7, 0.2], [0.5, 0.5], [0.1, 0.1]])
    matched = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]]).repeat(1, 3)
    index = make_index(
        ("a", policy_doc("block", ["x"], threshold=0.5)),
        ("b", policy_doc("block", ["y"], threshold=0.6)),
    )
    first, second, third = scored_images(
        embeddings, scores, matched, [2, 1, 1], index, hashes=[None] * 3
    )
    assert first.embeddings.tolist() == embeddings[:2].tolist()
    assert first.scores == [pytest.approx(0.7), pytest.approx(0.6)]
    assert first.matched == [2, 1]
    assert first.violated == (0, 1)
    assert second.violated == (0,)  # 0.5 reaches 0.5; 0.5 does not reach 0.6
    assert third.violated == ()
    assert third.embeddings.tolist() == [[9.0, 10.0, 11.0]]

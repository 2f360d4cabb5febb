from __future__ import annotations

import torch

from moderator.core.embeddings import PolicyIndex
from moderator.core.scoring import Decision, ViewScores, decide, reduce_views, score_views
from tests.helpers import make_index, policy_doc, vector


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
    assert torch.allclose(scores, torch.tensor(expected_scores), atol=1e-5)
    assert matched.tolist() == expected_matched


def test_an_image_equal_to_a_description_matches_it() -> None:
    index = make_index(("a", policy_doc("block", ["knife", "gun"])))
    scores, matched = score_views(vector("gun").unsqueeze(0), index)
    assert abs(float(scores[0, 0]) - 1.0) < 1e-5
    assert matched.tolist() == [[1]]


def test_benign_match_lowers_the_score() -> None:
    plain = make_index(("a", policy_doc("block", ["knife"])))
    with_benign = make_index(("a", policy_doc("block", ["knife"], ["spoon"])))
    image = vector("spoon").unsqueeze(0)
    assert float(score_views(image, with_benign)[0][0, 0]) < float(
        score_views(image, plain)[0][0, 0]
    )


def test_decisions_block_beats_review_and_shadow_never_decides() -> None:
    index = make_index(
        ("block", policy_doc("block", ["x"])),
        ("review", policy_doc("review", ["x"])),
        ("shadow", policy_doc("block", ["x"], mode="shadow")),
    )
    # policy order is by id: block, review, shadow
    violated = torch.tensor(
        [
            [False, False, False],
            [False, True, False],
            [True, True, False],
            [False, False, True],
            [True, False, True],
        ]
    )
    everything = torch.ones(3, dtype=torch.bool)
    assert decide(violated, index, everything).tolist() == [
        Decision.ALLOW,
        Decision.REVIEW,
        Decision.BLOCK,
        Decision.ALLOW,
        Decision.BLOCK,
    ]
    only_review = torch.tensor([False, True, False])
    assert decide(violated, index, only_review).tolist()[2] == Decision.REVIEW


def test_reduce_views_takes_each_policy_max_over_each_images_views() -> None:
    three_views = ViewScores(
        embeddings=torch.eye(3),
        scores=torch.tensor([[0.1, 0.9], [0.7, 0.2], [0.3, 0.4]]),
        matched=torch.tensor([[0, 5], [2, 6], [1, 7]]),
    )
    one_view = ViewScores(
        embeddings=torch.eye(3)[:1],
        scores=torch.tensor([[-0.5, -0.2]]),
        matched=torch.tensor([[3, 4]]),
    )
    scores, matched = reduce_views([three_views, one_view])
    assert torch.equal(scores, torch.tensor([[0.7, 0.9], [-0.5, -0.2]]))
    assert matched.tolist() == [[2, 5], [3, 4]]

from __future__ import annotations

import pytest
import torch

from moderator.core import rescoring
from moderator.core.embeddings import EmbeddingCache, PolicyIndex, build_policy_index
from moderator.core.policies import PolicySet, parse_policy
from moderator.core.rescoring import CHUNK, embedded_image, score_embedded, score_stored
from moderator.core.scoring import ScoredImage, score_views
from moderator.errors import ImageErrorCode, InvalidImage
from tests.helpers import unit


def toy_index() -> PolicyIndex:
    policy = parse_policy(
        "toy",
        "title: Toy\naction: block\nthreshold: 0.5\ndescriptions: [x, y]\nbenign: [z]\n"
        'templates: ["{}"]\n',
        source="toy.yaml",
    )
    vectors = {"x": unit(1, 0, 0), "y": unit(0, 1, 0), "z": unit(0, 0, 1)}

    def encode_texts(texts: list[str]) -> torch.Tensor:
        return torch.tensor([vectors[t] for t in texts])

    policy_set = PolicySet(policies=(policy,), version="v")
    return build_policy_index(
        policy_set, encode_texts, EmbeddingCache(None, "toy"), torch.device("cpu")
    )


def test_score_embedded_equals_score_views_and_fails_bad_embeddings_alone() -> None:
    index = toy_index()
    images = [
        embedded_image("good", unit(1, 0, 0)),
        embedded_image("short", unit(1, 0)),
        embedded_image("nan", [float("nan"), 0.0, 0.0]),
        embedded_image("unnormalised", [3.0, 0.0, 0.0]),
        embedded_image("views", unit(0, 0, 1), [unit(0, 0, 1), unit(0, 1, 0)]),
        embedded_image("too many views", unit(0, 0, 1), [unit(0, 0, 1)] * 3),
    ]
    results = score_embedded(images, index, max_views=2)
    good, short, nan, unnormalised, views, too_many = results
    assert isinstance(good, ScoredImage)
    assert isinstance(views, ScoredImage)
    expected, _ = score_views(torch.tensor([unit(1, 0, 0)]), index)
    assert good.scores == expected[0, :1].tolist()  # the text scores: one policy
    assert good.scores == [pytest.approx(1.0)]  # best description 1, no benign match
    assert views.embeddings.shape == (2, 3)
    # the best of the views' scores: -1 (z is the benign text) and 1
    assert views.scores == [pytest.approx(1.0)]
    for failed, words in (
        (short, "2 values"),
        (nan, "NaN"),
        (unnormalised, "normalised"),
        (too_many, "3 views; Moderate returns 1 to 2"),
    ):
        assert isinstance(failed, InvalidImage)
        assert failed.code is ImageErrorCode.INVALID_EMBEDDING
        assert words in failed.message


def test_stored_views_are_scored_in_chunks_as_one_pass_would(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A request of many cached images: the scoring gather stays CHUNK views wide."""
    index = toy_index()
    generator = torch.Generator().manual_seed(0)
    images = [
        torch.nn.functional.normalize(torch.randn(views, 3, generator=generator))
        for views in [7] * 90  # 630 views: two full chunks and a part
    ]
    whole, _ = score_views(torch.cat(images), index)
    widths: list[int] = []

    def recorded(matrix: torch.Tensor, index: PolicyIndex) -> tuple[torch.Tensor, torch.Tensor]:
        widths.append(len(matrix))
        return score_views(matrix, index)

    monkeypatch.setattr(rescoring, "score_views", recorded)
    scored = score_stored(images, index, [None] * len(images))
    assert widths == [CHUNK, CHUNK, 630 - 2 * CHUNK]
    at = 0
    for image, result in zip(images, scored, strict=True):
        best = whole[at : at + len(image), 0].max()
        assert result.scores == [pytest.approx(float(best))]
        at += len(image)

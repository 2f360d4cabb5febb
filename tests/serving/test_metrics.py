"""The metrics a dashboard and alerts can rely on from a pod's first scrape."""

from __future__ import annotations

import torch
from prometheus_client import CollectorRegistry, generate_latest

from moderator.core.outcomes import Report, build_outcomes
from moderator.core.scoring import Decision, ScoredImage, scored_images
from moderator.errors import ImageErrorCode, InvalidImage
from moderator.serving.metrics import REJECTION_REASONS, Metrics
from tests.helpers import make_index, policy_doc, text_only


def exported(metrics: Metrics) -> str:
    return generate_latest(metrics.registry).decode()


def test_every_known_label_value_is_exported_at_zero_before_its_first_event() -> None:
    """rate() over a series that appears with its first event misses that event: the first
    overload or failed reload of a pod would never alert."""
    text = exported(Metrics(CollectorRegistry()))
    for decision in Decision:
        assert f'moderator_images_total{{decision="{decision.name.lower()}"}} 0.0' in text
    for code in ImageErrorCode:
        assert f'moderator_image_errors_total{{code="{code.value}"}} 0.0' in text
    for reason in REJECTION_REASONS:
        assert f'moderator_rejected_requests_total{{reason="{reason}"}} 0.0' in text
    assert 'moderator_policy_reloads_total{result="error"} 0.0' in text
    assert 'moderator_decode_worker_restarts_total{reason="timeout"} 0.0' in text


def test_process_memory_and_cpu_are_exported_on_the_injected_registry() -> None:
    text = exported(Metrics(CollectorRegistry()))
    assert "process_resident_memory_bytes " in text
    assert "process_cpu_seconds_total " in text
    assert "python_info{" in text


def test_a_requests_images_are_counted_by_decision_error_and_violated_policy() -> None:
    index = make_index(
        ("red", policy_doc("block", ["red"], threshold=0.5)),
        ("blue", policy_doc("review", ["blue"], threshold=0.5)),
    )
    # columns in policy-id order (blue, red): red alone, both, neither
    scores = [[0.1, 0.9], [0.9, 0.9], [0.1, 0.1]]
    views: list[ScoredImage | InvalidImage] = list(
        scored_images(
            torch.zeros(3, 4),
            text_only(scores),
            torch.zeros(3, 6, dtype=torch.long),
            [1, 1, 1],
            index,
            hashes=[None] * 3,
        )
    )
    views.append(InvalidImage(ImageErrorCode.CORRUPT, "broken"))
    # a caller that asked for the decision alone still counts every violation
    outcomes = build_outcomes(["a", "b", "c", "d"], views, index.policy_set, report=Report.DECISION)
    assert all(not outcome.policies for outcome in outcomes)
    metrics = Metrics(CollectorRegistry())
    metrics.count_outcomes(outcomes)
    metrics.count_outcomes(outcomes[:1])
    text = exported(metrics)
    assert 'moderator_images_total{decision="block"} 3.0' in text
    assert 'moderator_images_total{decision="allow"} 1.0' in text
    assert 'moderator_images_total{decision="error"} 1.0' in text
    assert 'moderator_image_errors_total{code="corrupt"} 1.0' in text
    assert 'moderator_policy_violations_total{mode="enforce",policy="red"} 3.0' in text
    assert 'moderator_policy_violations_total{mode="enforce",policy="blue"} 1.0' in text

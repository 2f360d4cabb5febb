"""The metrics a dashboard and alerts can rely on from a pod's first scrape."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from moderator.core.scoring import Decision
from moderator.errors import ImageErrorCode
from moderator.serving.metrics import REJECTION_REASONS, Metrics


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

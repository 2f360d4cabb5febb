from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from moderator.errors import Overloaded
from moderator.serving.admission import Admission
from moderator.serving.metrics import Metrics


def overload_rejections(metrics: Metrics) -> float:
    return float(metrics.rejected_requests.labels(reason="overload")._value.get())


def test_admits_up_to_the_limit_and_refuses_past_it() -> None:
    metrics = Metrics(CollectorRegistry())
    admission = Admission(5, "images", metrics)
    with admission.admitted(3), admission.admitted(2):
        assert admission.in_flight == 5
        refused = "5 images in flight; 1 more would pass the limit of 5"
        with pytest.raises(Overloaded, match=refused), admission.admitted(1):
            pass
        assert admission.in_flight == 5
    assert admission.in_flight == 0
    assert overload_rejections(metrics) == 1


def test_units_are_released_when_the_request_fails() -> None:
    admission = Admission(2, "requests", Metrics(CollectorRegistry()))
    with pytest.raises(RuntimeError), admission.admitted(2):
        raise RuntimeError("the model failed")
    assert admission.in_flight == 0
    with admission.admitted(2):
        assert admission.in_flight == 2


def test_a_request_larger_than_the_limit_is_refused_even_when_idle() -> None:
    admission = Admission(2, "images", Metrics(CollectorRegistry()))
    with pytest.raises(Overloaded, match="0 images in flight; 3 more"), admission.admitted(3):
        pass
    assert admission.in_flight == 0

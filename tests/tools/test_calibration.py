"""Calibration numbers on sets whose answers are worked out by hand, then the CLI end to end."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from moderator.config import DEMO_POLICIES_DIR
from moderator.core.policies import load_policy_dir
from moderator.errors import PolicyError
from moderator.tools.calibration import (
    LabelledScore,
    OperatingPoint,
    Target,
    average_precision,
    calibrate_policy,
    precision_recall_curve,
    read_labels_csv,
    tidy,
)


def labelled(violating: list[float], benign: list[float]) -> list[LabelledScore]:
    return [LabelledScore(Path(f"v{s}"), s, True) for s in violating] + [
        LabelledScore(Path(f"b{s}"), s, False) for s in benign
    ]


# Sorted by score: 0.9 V, 0.8 V, 0.7 B, 0.6 V, 0.3 B
SMALL_SET = labelled([0.9, 0.8, 0.6], [0.7, 0.3])


def counts(point: OperatingPoint) -> tuple[int, int, int, int]:
    return (
        point.true_positives,
        point.false_positives,
        point.false_negatives,
        point.true_negatives,
    )


def test_the_curve_has_one_point_per_distinct_score() -> None:
    curve = precision_recall_curve(SMALL_SET)
    assert [p.threshold for p in curve] == [0.9, 0.8, 0.7, 0.6, 0.3]
    assert [counts(p) for p in curve] == [
        (1, 0, 2, 2),
        (2, 0, 1, 2),
        (2, 1, 1, 1),
        (3, 1, 0, 1),
        (3, 2, 0, 0),
    ]
    assert [p.precision for p in curve] == pytest.approx([1, 1, 2 / 3, 3 / 4, 3 / 5])
    assert [p.recall for p in curve] == pytest.approx([1 / 3, 2 / 3, 2 / 3, 1, 1])
    assert curve[3].f1 == pytest.approx(6 / 7)
    # recall gained x precision: 1/3 * 1 + 1/3 * 1 + 0 + 1/3 * 3/4 + 0
    assert average_precision(curve) == pytest.approx(11 / 12)


def test_tied_scores_make_one_point() -> None:
    curve = precision_recall_curve(labelled([0.5, 0.4], [0.5]))
    assert [(p.threshold, counts(p)) for p in curve] == [(0.5, (1, 1, 1, 0)), (0.4, (2, 1, 0, 0))]


@pytest.mark.parametrize(
    ("target", "value", "threshold", "expected"),
    [
        # precision >= 0.9: best recall 2/3 at score 0.8; the gap below it reaches down to 0.7
        (Target.PRECISION, 0.9, 0.75, (2, 0, 1, 2)),
        (Target.PRECISION, 1.0, 0.75, (2, 0, 1, 2)),
        # precision >= 0.7: recall 1 at score 0.6 (precision 3/4); the gap reaches down to 0.3
        (Target.PRECISION, 0.7, 0.45, (3, 1, 0, 1)),
        # recall >= 1: score 0.6 has the better precision (3/4 against 3/5 at 0.3)
        (Target.RECALL, 1.0, 0.45, (3, 1, 0, 1)),
        # recall >= 0.5: 2/3 at 0.8 with precision 1
        (Target.RECALL, 0.5, 0.75, (2, 0, 1, 2)),
    ],
)
def test_suggested_threshold_meets_the_target_with_a_margin(
    target: Target, value: float, threshold: float, expected: tuple[int, int, int, int]
) -> None:
    result = calibrate_policy("p", SMALL_SET, 0.65, target, value)
    assert result.suggested is not None
    assert result.suggested.threshold == threshold
    assert counts(result.suggested) == expected


def test_current_operating_point_and_best_f1() -> None:
    result = calibrate_policy("p", SMALL_SET, 0.65, Target.PRECISION, 0.9)
    assert counts(result.current) == (2, 1, 1, 1)
    assert result.current.precision == pytest.approx(2 / 3)
    assert result.best_f1 is not None
    assert result.best_f1.threshold == 0.45
    assert result.best_f1.f1 == pytest.approx(6 / 7)
    assert (result.violating, result.benign) == (3, 2)
    assert result.few_examples


def test_an_unreachable_target_or_one_sided_labels_suggest_nothing() -> None:
    inverted = calibrate_policy("p", labelled([0.5], [0.9]), 0.7, Target.PRECISION, 0.9)
    assert inverted.suggested is None
    assert inverted.usable
    only_violating = calibrate_policy("p", labelled([0.5, 0.6], []), 0.7, Target.RECALL, 0.9)
    assert only_violating.suggested is None
    assert not only_violating.usable
    assert math.isnan(only_violating.average_precision)
    assert math.isnan(only_violating.current.precision)  # nothing flagged at 0.7


def test_tidy_stays_inside_a_gap_of_a_few_float32_steps() -> None:
    rng = np.random.default_rng(0)
    for start in rng.uniform(-1, 1, 200).astype(np.float32):
        low = float(start)
        high = float(np.nextafter(np.nextafter(start, np.float32(2)), np.float32(2)))
        chosen = float(np.float32(tidy((low + high) / 2, low, high)))
        assert low < chosen <= high


def f32(value: float) -> float:
    """A score as the service computes it."""
    return float(np.float32(value))


def test_tidy_rounds_to_the_fewest_decimals_inside_the_gap() -> None:
    assert tidy(0.75, f32(0.7), f32(0.8)) == 0.75
    assert tidy(0.71236, f32(0.7123), f32(0.7124)) == 0.7124  # the upper end is inside
    assert tidy(0.71231, f32(0.7123), f32(0.7124)) == 0.71231
    assert tidy(0.5, f32(0.2), f32(0.5)) == 0.5


def test_labels_csv_resolves_paths_and_reports_every_bad_row(tmp_path: Path) -> None:
    policy_set = load_policy_dir(DEMO_POLICIES_DIR)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"")
    good = tmp_path / "good.csv"
    good.write_text(
        "\ufeff# exported from the labelling tool\npath,policy_id,label\n"
        "images/a.png,red,violating\nimages/a.png,stars,0\nimages/a.png,red,1\n",
        encoding="utf-8",
    )
    examples = read_labels_csv(good, policy_set)  # BOM, comment, header, repeated row
    assert [(e.policy_id, e.path, e.should_violate) for e in examples] == [
        ("red", tmp_path / "images" / "a.png", True),
        ("stars", tmp_path / "images" / "a.png", False),
    ]
    bad = tmp_path / "bad.csv"
    bad.write_text(
        "images/a.png,red\nimages/a.png,weapons,benign\nimages/a.png,red,maybe\n"
        "missing.png,red,1\nimages/a.png,red,1\nimages/a.png,red,benign\n"
    )
    with pytest.raises(PolicyError) as info:
        read_labels_csv(bad, policy_set)
    problems = info.value.problems
    assert [p.split(": ", 1)[0] for p in problems] == [f"{bad}:{n}" for n in (1, 2, 3, 4, 6)]
    assert "expected 3 columns" in problems[0]
    assert "no active policy with id 'weapons'" in problems[1]
    assert "got 'maybe'" in problems[2]
    assert "no such image file" in problems[3]
    assert "labelled for 'red' both ways (also line 5)" in problems[4]

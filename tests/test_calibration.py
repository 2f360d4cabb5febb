"""Calibration numbers on sets whose answers are worked out by hand, then the CLI end to end."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from moderator.calibration import (
    LabelledScore,
    OperatingPoint,
    Target,
    average_precision,
    calibrate_policy,
    precision_recall_curve,
    read_labels_csv,
    tidy,
)
from moderator.cli import main
from moderator.config import DEMO_POLICIES_DIR
from moderator.errors import PolicyError
from moderator.policies import (
    format_threshold,
    load_policy_dir,
    parse_policy_file,
    write_thresholds,
)
from tests.test_watcher import copy_demo_policies

SHIPPED_EXAMPLES = DEMO_POLICIES_DIR / "examples"


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


def test_write_thresholds_changes_only_the_threshold_values(tmp_path: Path) -> None:
    policies = copy_demo_policies(tmp_path / "policies")
    red = policies / "red.yaml"
    red.write_bytes(red.read_bytes().replace(b"threshold: 0.71", b"threshold: 0.71  # tuned"))
    stars_target = tmp_path / "stars-target.yaml"
    (policies / "stars.yaml").rename(stars_target)
    (policies / "stars.yaml").symlink_to(stars_target)
    stars_target.write_bytes(stars_target.read_bytes().replace(b"\n", b"\r\n"))
    before = {path: path.read_bytes() for path in (red, stars_target)}

    written = write_thresholds(policies, {"red": 0.6523, "stars": 0.00005})

    assert written == {"red": red.resolve(), "stars": stars_target}
    assert (policies / "stars.yaml").is_symlink()  # the link's target was rewritten
    assert red.read_bytes() == before[red].replace(
        b"threshold: 0.71  # tuned", b"threshold: 0.6523  # tuned"
    )
    assert stars_target.read_bytes() == before[stars_target].replace(
        b"threshold: 0.74", b"threshold: 0.00005"
    )  # CRLF line endings kept
    assert parse_policy_file(red).threshold == 0.6523
    assert parse_policy_file(policies / "stars.yaml").threshold == 0.00005


def test_write_thresholds_changes_nothing_when_one_file_would_be_invalid(tmp_path: Path) -> None:
    policies = copy_demo_policies(tmp_path / "policies")
    before = {path.name: path.read_bytes() for path in policies.glob("*.yaml")}
    with pytest.raises(PolicyError, match=r"stars\.yaml"):
        write_thresholds(policies, {"red": 0.5, "stars": math.inf})
    assert {path.name: path.read_bytes() for path in policies.glob("*.yaml")} == before
    assert sorted(p.name for p in policies.iterdir() if p.is_file()) == sorted(before)


def test_format_threshold_is_fixed_point() -> None:
    assert [format_threshold(v) for v in (0.75, 0.00005, 1.0, -0.05, 0.123456789123)] == [
        "0.75",
        "0.00005",
        "1.0",
        "-0.05",
        "0.123456789",
    ]


# -- the CLI on the demo model ----------------------------------------------------------------


def calibrate_cli(policies: Path, labels: Path, cache: Path, *extra: str) -> int:
    args = ["calibrate", str(policies), str(labels), "--demo", "--cache-dir", str(cache)]
    return main([*args, *extra])


def table_row(output: str, policy_id: str) -> list[str]:
    return next(line.split() for line in output.splitlines() if line.startswith(policy_id + " "))


def test_calibrate_on_the_shipped_examples(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "report.html"
    assert (
        calibrate_cli(DEMO_POLICIES_DIR, SHIPPED_EXAMPLES, tmp_path, "--report", str(report)) == 0
    )
    output = capsys.readouterr().out
    # `policies test` passes on these examples, so the current thresholds separate them fully
    red = table_row(output, "red")
    assert red[:8] == ["red", "3", "3", "1.000", "0.71", "1.000", "1.000", "1.000"]
    assert red[9:] == ["1.000", "1.000", "1.000"]
    page = report.read_text()
    assert page.count("<section") == 3
    assert page.count("<svg") == 6
    assert "Fewer than 20" in page


def test_calibrate_write_keeps_the_examples_passing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policies = copy_demo_policies(tmp_path / "policies")
    examples = tmp_path / "examples"
    shutil.copytree(SHIPPED_EXAMPLES, examples)
    csv = tmp_path / "labels.csv"
    rows = ["path,policy_id,label"] + [
        f"{p.relative_to(tmp_path)},{p.parent.parent.name},{p.parent.name}"
        for p in sorted(examples.rglob("*.png"))
    ]
    csv.write_text("\n".join(rows) + "\n")
    assert calibrate_cli(policies, csv, tmp_path / "cache", "--target-recall", "1", "--write") == 0
    assert "red: not written, too few labelled images" in capsys.readouterr().out
    assert (policies / "red.yaml").read_text() == (DEMO_POLICIES_DIR / "red.yaml").read_text()
    args = ("--target-recall", "1", "--write", "--force")
    assert calibrate_cli(policies, csv, tmp_path / "cache", *args) == 0
    output = capsys.readouterr().out
    written = re.findall(r"(\S+\.yaml): threshold (\S+) -> (\S+)", output)
    assert {Path(path).name for path, _, _ in written} == {
        "red.yaml",
        "stars.yaml",
        "green_squares.yaml",
    }
    for path, _, new in written:
        assert parse_policy_file(Path(path)).threshold == float(new)
        assert table_row(output, Path(path).stem)[8] == new
    assert "# Threshold: midway" in (policies / "red.yaml").read_text()
    cache = str(tmp_path / "cache")
    assert (
        main(["policies", "test", str(policies), str(examples), "--demo", "--cache-dir", cache])
        == 0
    )


def test_calibrate_rejects_a_target_outside_zero_to_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        calibrate_cli(DEMO_POLICIES_DIR, SHIPPED_EXAMPLES, tmp_path, "--target-precision", "90")
        == 2
    )
    assert "--target-precision must be in (0, 1]" in capsys.readouterr().err

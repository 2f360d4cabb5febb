"""Calibration: precision, recall and F1 of each policy across thresholds, from labelled images.

An image violates a policy when its score is at or above the threshold, as in the service.
Every distinct score of a labelled image is a candidate threshold; between two neighbouring
scores every threshold gives the same counts on this set, so a suggested threshold is placed
midway between the chosen score and the next lower one (and rounded to the fewest decimals
that stay in that gap), which keeps a margin on both sides for images not in the set.
"""

from __future__ import annotations

import csv
import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moderator.core.policies import PolicySet
from moderator.errors import PolicyError
from moderator.tools.offline import OfflineScorer
from moderator.tools.regression import Example, run_examples
from moderator.tools.tables import aligned_rows
from moderator.tools.thresholds import format_threshold

# Below this many labelled images of either kind a threshold is a rough guess; the report says so.
FEW_EXAMPLES = 20
LABELS = {
    "violating": True,
    "violation": True,
    "positive": True,
    "1": True,
    "true": True,
    "yes": True,
    "benign": False,
    "negative": False,
    "0": False,
    "false": False,
    "no": False,
}
CSV_COLUMNS = ("path", "policy_id", "label")


class Target(enum.Enum):
    PRECISION = "precision"
    RECALL = "recall"


@dataclass(frozen=True)
class OperatingPoint:
    """Counts and rates of one policy at one threshold."""

    threshold: float
    true_positives: int
    false_positives: int
    false_negatives: int
    true_negatives: int

    @property
    def precision(self) -> float:
        flagged = self.true_positives + self.false_positives
        return self.true_positives / flagged if flagged else math.nan

    @property
    def recall(self) -> float:
        violating = self.true_positives + self.false_negatives
        return self.true_positives / violating if violating else math.nan

    @property
    def f1(self) -> float:
        both = 2 * self.true_positives + self.false_positives + self.false_negatives
        return 2 * self.true_positives / both if both else math.nan


@dataclass(frozen=True)
class LabelledScore:
    path: Path
    score: float
    violating: bool


@dataclass(frozen=True)
class PolicyCalibration:
    policy_id: str
    key: str  # the threshold calibrated: 'threshold' (text) or 'example_threshold'
    samples: tuple[LabelledScore, ...]
    current: OperatingPoint
    curve: tuple[OperatingPoint, ...]  # one point per distinct score, highest threshold first
    suggested: OperatingPoint | None  # None when the target cannot be reached (or no data)
    best_f1: OperatingPoint | None
    average_precision: float

    @property
    def name(self) -> str:
        """How tables name it: the policy id, and which threshold when not the text one."""
        return self.policy_id if self.key == "threshold" else f"{self.policy_id} ({self.key})"

    @property
    def anchor(self) -> str:
        return self.policy_id if self.key == "threshold" else f"{self.policy_id}-{self.key}"

    @property
    def violating(self) -> int:
        return sum(s.violating for s in self.samples)

    @property
    def benign(self) -> int:
        return len(self.samples) - self.violating

    @property
    def usable(self) -> bool:
        return self.violating > 0 and self.benign > 0

    @property
    def few_examples(self) -> bool:
        return min(self.violating, self.benign) < FEW_EXAMPLES


def violates(score: float, threshold: float) -> bool:
    """As the service decides: a float32 score against the float32 threshold."""
    return score >= float(np.float32(threshold))


def operating_point(samples: Sequence[LabelledScore], threshold: float) -> OperatingPoint:
    tp = sum(s.violating and violates(s.score, threshold) for s in samples)
    fp = sum(not s.violating and violates(s.score, threshold) for s in samples)
    violating = sum(s.violating for s in samples)
    return OperatingPoint(threshold, tp, fp, violating - tp, len(samples) - violating - fp)


def precision_recall_curve(samples: Sequence[LabelledScore]) -> tuple[OperatingPoint, ...]:
    """One operating point per distinct score, from the highest threshold down; O(n log n)."""
    ordered = sorted(samples, key=lambda s: s.score, reverse=True)
    violating = sum(s.violating for s in samples)
    benign = len(samples) - violating
    points = []
    tp = fp = 0
    for i, sample in enumerate(ordered):
        tp += sample.violating
        fp += not sample.violating
        if i + 1 < len(ordered) and ordered[i + 1].score == sample.score:
            continue  # ties: a threshold admits every image with that score at once
        points.append(OperatingPoint(sample.score, tp, fp, violating - tp, benign - fp))
    return tuple(points)


def average_precision(curve: Sequence[OperatingPoint]) -> float:
    """Sum over the curve of precision x the recall gained (the area under the PR curve)."""
    area = 0.0
    previous_recall = 0.0
    for point in curve:
        if math.isnan(point.recall):
            return math.nan
        area += (point.recall - previous_recall) * point.precision
        previous_recall = point.recall
    return area


def choose_point(
    curve: Sequence[OperatingPoint], target: Target, value: float
) -> OperatingPoint | None:
    """The point that meets the target with the most of the other rate; None if none does.

    PRECISION: the highest recall with precision >= value. RECALL: the highest precision with
    recall >= value. Ties go to the higher threshold (fewer images flagged).
    """
    if target is Target.PRECISION:
        meeting = [p for p in curve if p.precision >= value]
        return max(meeting, key=lambda p: (p.recall, p.precision, p.threshold), default=None)
    meeting = [p for p in curve if p.recall >= value]
    return max(meeting, key=lambda p: (p.precision, p.threshold), default=None)


def suggested_threshold(curve: Sequence[OperatingPoint], point: OperatingPoint) -> float:
    """A tidy threshold in (next lower score, point's score]: same counts, some margin."""
    position = list(curve).index(point)
    if position + 1 == len(curve):
        return tidy(point.threshold, point.threshold - 0.01, point.threshold)
    lower = curve[position + 1].threshold
    return tidy((point.threshold + lower) / 2, lower, point.threshold)


def tidy(value: float, low: float, high: float) -> float:
    """`value` rounded to the fewest decimals that keep it in (low, high] as the service sees
    it (in float32); `high` itself when no rounding does (scores only a few float32 steps
    apart)."""
    for decimals in range(2, 10):
        rounded = round(value, decimals)
        if low < float(np.float32(rounded)) <= high:
            return rounded
    return high


def calibrate_policy(
    policy_id: str,
    samples: Sequence[LabelledScore],
    current_threshold: float,
    target: Target,
    value: float,
    *,
    key: str = "threshold",
) -> PolicyCalibration:
    curve = precision_recall_curve(samples)
    usable = any(s.violating for s in samples) and any(not s.violating for s in samples)
    chosen = choose_point(curve, target, value) if usable else None
    suggested = None
    if chosen is not None:
        suggested = operating_point(samples, suggested_threshold(curve, chosen))
    best_f1 = max(curve, key=lambda p: (p.f1, p.threshold), default=None) if usable else None
    if best_f1 is not None:
        best_f1 = operating_point(samples, suggested_threshold(curve, best_f1))
    return PolicyCalibration(
        policy_id=policy_id,
        key=key,
        samples=tuple(samples),
        current=operating_point(samples, current_threshold),
        curve=curve,
        suggested=suggested,
        best_f1=best_f1,
        average_precision=average_precision(curve) if usable else math.nan,
    )


# -- labelled sets ----------------------------------------------------------------------------


def read_labels_csv(path: Path, policy_set: PolicySet) -> list[Example]:
    """CSV rows of image path (relative to the CSV), policy id and label; header optional.

    Repeated rows count once. Raises PolicyError listing every bad or conflicting row.
    """
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:  # -sig: Excel's BOM
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise PolicyError([f"{path}: cannot read labels: {exc}"]) from exc
    labels: dict[tuple[Path, str], tuple[bool, int]] = {}  # (image, policy) -> (label, line)
    problems: list[str] = []
    seen_data = False
    for number, row in enumerate(rows, start=1):
        cells = [cell.strip() for cell in row]
        if not any(cells) or cells[0].startswith("#"):
            continue
        if not seen_data and tuple(c.lower() for c in cells) == CSV_COLUMNS:
            continue
        seen_data = True
        problem = _row_problem(cells, policy_set)
        image = path.parent / cells[0]
        if not problem and not image.is_file():
            problem = f"no such image file {image}"
        if problem:
            problems.append(f"{path}:{number}: {problem}")
            continue
        label = LABELS[cells[2].lower()]
        earlier = labels.setdefault((image, cells[1]), (label, number))
        if earlier[0] != label:
            problems.append(
                f"{path}:{number}: {cells[0]} is labelled for '{cells[1]}' both ways "
                f"(also line {earlier[1]})"
            )
    if problems:
        raise PolicyError(problems)
    if not labels:
        raise PolicyError([f"{path}: no labelled images (rows of {', '.join(CSV_COLUMNS)})"])
    return [Example(pid, image, label) for (image, pid), (label, _) in labels.items()]


def _row_problem(cells: list[str], policy_set: PolicySet) -> str:
    if len(cells) != len(CSV_COLUMNS):
        return f"expected {len(CSV_COLUMNS)} columns ({', '.join(CSV_COLUMNS)}), got {len(cells)}"
    _, policy_id, label = cells
    if policy_id not in policy_set.ids:
        return f"no active policy with id '{policy_id}'"
    if label.lower() not in LABELS:
        return f"label must be one of {', '.join(LABELS)}; got '{label}'"
    return ""


# -- a whole labelled set ---------------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    policies: tuple[PolicyCalibration, ...]
    unreadable: tuple[tuple[Path, str], ...]  # (image, why): left out of every count
    target: Target
    value: float
    policy_version: str


def calibrate(
    scorer: OfflineScorer, examples: Sequence[Example], target: Target, value: float
) -> Calibration:
    """Score each labelled image once (the service's pipeline), then calibrate each policy's
    text threshold and, for a policy with example images, its example_threshold (each on its
    own: an image either rule flags is flagged, so calibrate the one you trust first)."""
    policy_set = scorer.policy_set
    text: dict[str, list[LabelledScore]] = {pid: [] for pid in policy_set.ids}
    by_example: dict[str, list[LabelledScore]] = {pid: [] for pid in policy_set.ids}
    results = run_examples(scorer, examples)
    for result in results:
        example = result.example
        for scores, score in ((text, result.score), (by_example, result.example_score)):
            if score is not None:
                scores[example.policy_id].append(
                    LabelledScore(example.path, score, example.should_violate)
                )
    unreadable = tuple(dict.fromkeys((r.example.path, r.error) for r in results if r.error))
    policies = []
    for policy in policy_set.policies:
        if text[policy.id]:
            policies.append(
                calibrate_policy(policy.id, text[policy.id], policy.threshold, target, value)
            )
        if by_example[policy.id]:
            current = policy.known.example_threshold
            policies.append(
                calibrate_policy(
                    policy.id,
                    by_example[policy.id],
                    current,
                    target,
                    value,
                    key="example_threshold",
                )
            )
    return Calibration(tuple(policies), unreadable, target, value, policy_set.version)


def format_calibration(calibration: Calibration) -> str:
    header = (
        "policy",
        "violating",
        "benign",
        "AP",
        "threshold",
        "precision",
        "recall",
        "F1",
        "suggested",
        "precision",
        "recall",
        "F1",
    )
    rows = [header]
    notes = []
    for c in calibration.policies:
        suggested = c.suggested
        rows.append(
            (
                c.name,
                str(c.violating),
                str(c.benign),
                _rate(c.average_precision),
                format_threshold(c.current.threshold),
                *_rates(c.current),
                *(
                    (format_threshold(suggested.threshold), *_rates(suggested))
                    if suggested
                    else ("-",) * 4
                ),
            )
        )
        if not c.usable:
            notes.append(f"{c.name}: needs both violating and benign images to calibrate")
        elif suggested is None:
            notes.append(
                f"{c.name}: no threshold reaches {calibration.target.value} "
                f"{calibration.value:g} on this set"
            )
        elif c.few_examples:
            notes.append(
                f"{c.name}: fewer than {FEW_EXAMPLES} violating or benign images; "
                "treat the suggestion as rough"
            )
    lines = aligned_rows(rows)
    lines.insert(
        0,
        f"suggested thresholds: the highest "
        f"{'recall' if calibration.target is Target.PRECISION else 'precision'} with "
        f"{calibration.target.value} >= {calibration.value:g} "
        f"(policy version {calibration.policy_version})",
    )
    lines += notes
    lines += [f"unreadable, left out: {path}: {why}" for path, why in calibration.unreadable]
    return "\n".join(line.rstrip() for line in lines)


def _rate(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f}"


def _rates(point: OperatingPoint) -> tuple[str, str, str]:
    return _rate(point.precision), _rate(point.recall), _rate(point.f1)

"""The calibration report: one self-contained HTML page, charts drawn as inline SVG.

No plotting library: the page opens in any browser, offline, and can be attached to a pull
request of the policy repository. Per policy it shows the precision-recall curve, the score
histograms of violating and benign images with the current and suggested thresholds, the
operating points side by side, and the images the current threshold gets wrong.
"""

from __future__ import annotations

import html
import math
import os
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

from moderator.tools.calibration import (
    FEW_EXAMPLES,
    Calibration,
    LabelledScore,
    OperatingPoint,
    PolicyCalibration,
    violates,
)
from moderator.tools.thresholds import format_threshold

WIDTH, HEIGHT, MARGIN = 360, 260, 40
BINS = 30
LISTED_MISTAKES = 12
VIOLATING_COLOUR, BENIGN_COLOUR = "#d64545", "#3b7dd8"
CURRENT_COLOUR, SUGGESTED_COLOUR = "#e69f00", "#1a9850"

LEGEND = (
    f"<p class='legend'><span style='color:{VIOLATING_COLOUR}'>&#9632; violating</span> "
    f"<span style='color:{BENIGN_COLOUR}'>&#9632; benign</span> "
    f"<span style='color:{CURRENT_COLOUR}'>&#9679;&#9474; current threshold</span> "
    f"<span style='color:{SUGGESTED_COLOUR}'>&#9679;&#9474; suggested threshold</span></p>"
)
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
section { border-top: 1px solid #ddd; padding-top: 1em; margin-top: 2em; }
.charts { display: flex; gap: 2em; flex-wrap: wrap; }
table { border-collapse: collapse; margin: 1em 0; }
td, th { border: 1px solid #ddd; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.note { color: #9a6700; }
.mistakes { display: flex; flex-wrap: wrap; gap: 8px; }
.mistakes figure { margin: 0; width: 120px; font-size: 12px; word-break: break-all; }
.mistakes img { width: 120px; height: 120px; object-fit: contain; background: #f4f4f4; }
svg text { font-size: 11px; }
.legend span { margin-right: 1.5em; }
"""


def render_report(calibration: Calibration, report_path: Path) -> str:
    target = f"{calibration.target.value} &ge; {calibration.value:g}"
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        "<title>Moderator calibration</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>Policy calibration</h1>",
        f"<p>Policy set version <code>{html.escape(calibration.policy_version)}</code>. "
        f"Suggested threshold: the best operating point with {target}. An image violates a "
        "policy when its score is at or above the threshold.</p>",
    ]
    if calibration.unreadable:
        items = "".join(
            f"<li>{html.escape(str(path))}: {html.escape(why)}</li>"
            for path, why in calibration.unreadable
        )
        parts.append(f"<p class='note'>Unreadable images, left out:</p><ul>{items}</ul>")
    parts += [_policy_section(c, report_path.parent) for c in calibration.policies]
    parts.append("</body></html>")
    return "\n".join(parts)


def _policy_section(c: PolicyCalibration, base: Path) -> str:
    parts = [
        f"<section id='{html.escape(c.anchor)}'><h2>{html.escape(c.name)}</h2>",
        f"<p>{c.violating} violating and {c.benign} benign images; average precision "
        f"{_number(c.average_precision)}.</p>",
    ]
    if not c.usable:
        parts.append("<p class='note'>Needs both violating and benign images to calibrate.</p>")
    elif c.suggested is None:
        parts.append("<p class='note'>No threshold reaches the target on this set.</p>")
    elif c.few_examples:
        parts.append(
            f"<p class='note'>Fewer than {FEW_EXAMPLES} violating or benign images: treat the "
            "suggestion as rough.</p>"
        )
    parts.append(_points_table(c))
    parts.append(
        f"<div class='charts'>{_pr_curve(c)}{_histogram(c.samples, c.current, c.suggested)}</div>"
    )
    parts.append(LEGEND)
    parts.append(_mistakes(c, base))
    parts.append("</section>")
    return "\n".join(parts)


def _points_table(c: PolicyCalibration) -> str:
    rows = [("current", c.current), ("suggested", c.suggested), ("best F1", c.best_f1)]
    header = "".join(
        f"<th>{name}</th>"
        for name in ("", "threshold", "precision", "recall", "F1", "TP", "FP", "FN", "TN")
    )
    body = "".join(
        f"<tr><td>{name}</td><td>{format_threshold(p.threshold)}</td><td>{_number(p.precision)}</td>"
        f"<td>{_number(p.recall)}</td><td>{_number(p.f1)}</td><td>{p.true_positives}</td>"
        f"<td>{p.false_positives}</td><td>{p.false_negatives}</td><td>{p.true_negatives}</td></tr>"
        for name, p in rows
        if p is not None
    )
    return f"<table><tr>{header}</tr>{body}</table>"


def _pr_curve(c: PolicyCalibration) -> str:
    points = [(p.recall, p.precision) for p in c.curve if not math.isnan(p.recall)]
    path = " ".join(f"{_x(r):.1f},{_y(p):.1f}" for r, p in points)
    marks = [
        _dot(point, colour, label)
        for point, colour, label in (
            (c.current, CURRENT_COLOUR, "current"),
            (c.suggested, SUGGESTED_COLOUR, "suggested"),
        )
        if point is not None and not math.isnan(point.precision) and not math.isnan(point.recall)
    ]
    return _svg(
        "Precision-recall",
        x_label="recall",
        y_label="precision",
        content=f"<polyline fill='none' stroke='#444' stroke-width='1.5' points='{path}'/>"
        + "".join(marks),
        x_range=(0.0, 1.0),
        y_range=(0.0, 1.0),
    )


def _dot(point: OperatingPoint, colour: str, label: str) -> str:
    x, y = _x(point.recall), _y(point.precision)
    return (
        f"<circle cx='{x:.1f}' cy='{y:.1f}' r='5' fill='{colour}'>"
        f"<title>{label}: threshold {format_threshold(point.threshold)}</title></circle>"
    )


def _histogram(
    samples: Sequence[LabelledScore],
    current: OperatingPoint,
    suggested: OperatingPoint | None,
) -> str:
    thresholds = [current.threshold] + ([suggested.threshold] if suggested else [])
    values = [s.score for s in samples] + thresholds
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    low, high = low - 0.02 * span, high + 0.02 * span
    width = (high - low) / BINS
    counts = {True: [0] * BINS, False: [0] * BINS}
    for s in samples:
        counts[s.violating][min(BINS - 1, int((s.score - low) / width))] += 1
    tallest = max(*counts[True], *counts[False], 1)
    bar_width = (WIDTH - 2 * MARGIN) / BINS
    bars = []
    for violating, colour in ((False, BENIGN_COLOUR), (True, VIOLATING_COLOUR)):
        for i, count in enumerate(counts[violating]):
            if count:
                top = _y(count / tallest)
                bars.append(
                    f"<rect x='{MARGIN + i * bar_width:.1f}' y='{top:.1f}' "
                    f"width='{bar_width:.1f}' height='{HEIGHT - MARGIN - top:.1f}' "
                    f"fill='{colour}' fill-opacity='0.55'/>"
                )
    lines = [
        _threshold_line((point.threshold - low) / (high - low), colour, label)
        for point, colour, label in (
            (current, CURRENT_COLOUR, "current"),
            (suggested, SUGGESTED_COLOUR, "suggested"),
        )
        if point is not None
    ]
    return _svg(
        "Scores",
        x_label="score",
        y_label="images",
        content="".join(bars) + "".join(lines),
        x_range=(low, high),
        y_range=(0, tallest),
    )


def _threshold_line(fraction: float, colour: str, label: str) -> str:
    x = MARGIN + fraction * (WIDTH - 2 * MARGIN)
    return (
        f"<line x1='{x:.1f}' x2='{x:.1f}' y1='{MARGIN / 2}' y2='{HEIGHT - MARGIN}' "
        f"stroke='{colour}' stroke-width='2'><title>{label} threshold</title></line>"
    )


def _svg(
    title: str,
    *,
    x_label: str,
    y_label: str,
    content: str,
    x_range: tuple[float, float],
    y_range: tuple[float, float],
) -> str:
    bottom, right = HEIGHT - MARGIN, WIDTH - MARGIN
    ticks = (
        f"<text x='{MARGIN}' y='{bottom + 14}' text-anchor='middle'>{x_range[0]:.3g}</text>"
        f"<text x='{right}' y='{bottom + 14}' text-anchor='middle'>{x_range[1]:.3g}</text>"
        f"<text x='{MARGIN - 4}' y='{bottom}' text-anchor='end'>{y_range[0]:.3g}</text>"
        f"<text x='{MARGIN - 4}' y='{MARGIN / 2 + 4}' text-anchor='end'>{y_range[1]:.3g}</text>"
    )
    return (
        f"<svg width='{WIDTH}' height='{HEIGHT}' role='img' aria-label='{title}'>"
        f"<text x='{WIDTH / 2}' y='12' text-anchor='middle' font-weight='bold'>{title}</text>"
        f"<line x1='{MARGIN}' y1='{bottom}' x2='{right}' y2='{bottom}' stroke='#888'/>"
        f"<line x1='{MARGIN}' y1='{MARGIN / 2}' x2='{MARGIN}' y2='{bottom}' stroke='#888'/>"
        f"{ticks}"
        f"<text x='{WIDTH / 2}' y='{HEIGHT - 8}' text-anchor='middle'>{x_label}</text>"
        f"<text x='12' y='{HEIGHT / 2}' transform='rotate(-90 12 {HEIGHT / 2})' "
        f"text-anchor='middle'>{y_label}</text>{content}</svg>"
    )


def _x(fraction: float) -> float:
    return MARGIN + fraction * (WIDTH - 2 * MARGIN)


def _y(fraction: float) -> float:
    return HEIGHT - MARGIN - fraction * (HEIGHT - 1.5 * MARGIN)


def _mistakes(c: PolicyCalibration, base: Path) -> str:
    threshold = c.current.threshold
    missed = sorted(
        (s for s in c.samples if s.violating and not violates(s.score, threshold)),
        key=lambda s: s.score,
    )
    flagged = sorted(
        (s for s in c.samples if not s.violating and violates(s.score, threshold)),
        key=lambda s: -s.score,
    )
    parts = []
    for title, mistakes in (
        ("Violating images the current threshold misses", missed),
        ("Benign images the current threshold flags", flagged),
    ):
        if mistakes:
            figures = "".join(_figure(s, base) for s in mistakes[:LISTED_MISTAKES])
            more = (
                f" (the {LISTED_MISTAKES} furthest off)" if len(mistakes) > LISTED_MISTAKES else ""
            )
            parts.append(
                f"<h3>{title}: {len(mistakes)}{more}</h3><div class='mistakes'>{figures}</div>"
            )
    return "".join(parts)


def _figure(sample: LabelledScore, base: Path) -> str:
    try:
        source = urllib.parse.quote(
            Path(os.path.relpath(sample.path.resolve(), base.resolve())).as_posix()
        )
    except ValueError:  # another drive on Windows
        source = sample.path.resolve().as_uri()
    name = html.escape(sample.path.name)
    return (
        f"<figure><img src='{html.escape(source)}' alt='{name}' loading='lazy'>"
        f"<figcaption>{name}<br>score {sample.score:.4f}</figcaption></figure>"
    )


def _number(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f}"

from __future__ import annotations

from pathlib import Path

from moderator.tools.calibration import Calibration, LabelledScore, Target, calibrate_policy
from moderator.tools.report import render_report


def test_report_shows_each_policy_and_links_its_mistakes_safely(tmp_path: Path) -> None:
    odd = tmp_path / "images" / "<b>a#1&.png"
    samples = [
        LabelledScore(tmp_path / "images" / "hit.png", 0.9, True),
        LabelledScore(odd, 0.2, True),  # missed at the current threshold
        LabelledScore(tmp_path / "images" / "fine.png", 0.1, False),
        LabelledScore(tmp_path / "images" / "flagged.png", 0.8, False),
    ]
    policy = calibrate_policy("weapons", samples, 0.5, Target.PRECISION, 0.9)
    calibration = Calibration(
        (policy,), ((tmp_path / "x.jpg", "corrupt <jpeg>"),), Target.PRECISION, 0.9, "v1"
    )
    page = render_report(calibration, tmp_path / "report.html")

    assert "<section id='weapons'>" in page
    assert page.count("<svg") == 2
    assert "precision &ge; 0.9" in page
    assert "corrupt &lt;jpeg&gt;" in page
    assert "Violating images the current threshold misses: 1" in page
    assert "Benign images the current threshold flags: 1" in page
    assert "src='images/%3Cb%3Ea%231%26.png'" in page  # relative to the report, URL-quoted
    assert "&lt;b&gt;a#1&amp;.png" in page
    assert "<b>a#1" not in page
    # suggested: precision >= 0.9 only at score 0.9, placed midway down to 0.8
    assert "<td>suggested</td><td>0.85</td><td>1.000</td><td>0.500</td>" in page

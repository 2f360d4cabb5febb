from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from moderator.cli.main import main
from moderator.config import DEMO_POLICIES_DIR
from moderator.core.policies import parse_policy_file
from moderator.demo.shapes import render_shape
from tests.helpers import copy_demo_policies, encode

SHIPPED_EXAMPLES = DEMO_POLICIES_DIR / "examples"


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


def test_calibrate_calibrates_and_writes_an_example_threshold(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An examples-only policy: its example_threshold is calibrated on the labelled images'
    best example similarity, and --write adds the key (left at its default in the file)."""
    policies = copy_demo_policies(tmp_path / "policies")
    (policies / "known").mkdir()
    (policies / "known" / "triangle.png").write_bytes(encode(render_shape("blue", "triangle")))
    policy = policies / "blue_triangles.yaml"
    policy.write_text("title: Blue triangles\naction: review\nexamples: [known/]")  # no newline
    labels = tmp_path / "labels"
    for kind, images in {
        "violating": [render_shape("blue", "triangle", 120 + 20 * i, 140) for i in range(4)],
        "benign": [render_shape("blue", shape) for shape in ("circle", "square", "star")]
        + [render_shape("orange", "triangle")],
    }.items():
        folder = labels / "blue_triangles" / kind
        folder.mkdir(parents=True)
        for i, image in enumerate(images):
            (folder / f"{i}.png").write_bytes(encode(image))
    args = ("--target-precision", "1", "--write", "--force")
    assert calibrate_cli(policies, labels, tmp_path / "cache", *args) == 0
    output = capsys.readouterr().out
    row = table_row(output, "blue_triangles")
    assert row[:5] == ["blue_triangles", "(example_threshold)", "4", "4", "1.000"]
    [(path, old, new)] = re.findall(r"(\S+\.yaml): example_threshold (\S+) -> (\S+)", output)
    assert (Path(path).name, old) == ("blue_triangles.yaml", "0.9")
    written = policy.read_text()
    assert (
        written
        == f"title: Blue triangles\naction: review\nexamples: [known/]\nexample_threshold: {new}\n"
    )
    assert parse_policy_file(policy, policies).known.example_threshold == float(new)

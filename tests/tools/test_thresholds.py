from __future__ import annotations

import math
from pathlib import Path

import pytest
from PIL import Image

from moderator.core.policies import parse_policy_file
from moderator.errors import PolicyError
from moderator.tools.thresholds import format_threshold, write_thresholds
from tests.helpers import copy_demo_policies, encode


def test_write_thresholds_changes_only_the_threshold_values(tmp_path: Path) -> None:
    policies = copy_demo_policies(tmp_path / "policies")
    red = policies / "red.yaml"
    red.write_bytes(red.read_bytes().replace(b"threshold: 0.71", b"threshold: 0.71  # tuned"))
    stars_target = tmp_path / "stars-target.yaml"
    (policies / "stars.yaml").rename(stars_target)
    (policies / "stars.yaml").symlink_to(stars_target)
    stars_target.write_bytes(stars_target.read_bytes().replace(b"\n", b"\r\n"))
    before = {path: path.read_bytes() for path in (red, stars_target)}

    changes = {("red", "threshold"): 0.6523, ("stars", "threshold"): 0.00005}
    written = write_thresholds(policies, changes)

    assert written == {("red", "threshold"): red.resolve(), ("stars", "threshold"): stars_target}
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
        write_thresholds(policies, {("red", "threshold"): 0.5, ("stars", "threshold"): math.inf})
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


@pytest.mark.parametrize(
    "text",
    [
        "{title: T, action: block, examples: [known/]}\n",  # flow style
        "title: T\naction: block\nexamples: [known/]\n...\n",  # an explicit document end
    ],
)
def test_an_example_threshold_that_cannot_be_appended_is_asked_for_by_hand(
    tmp_path: Path, text: str
) -> None:
    policies = tmp_path / "policies"
    (policies / "known").mkdir(parents=True)
    (policies / "known" / "a.png").write_bytes(encode(Image.new("RGB", (8, 8))))
    (policies / "t.yaml").write_text(text)
    with pytest.raises(PolicyError, match=r"add 'example_threshold: 0\.8' to it by hand"):
        write_thresholds(policies, {("t", "example_threshold"): 0.8})
    assert (policies / "t.yaml").read_text() == text

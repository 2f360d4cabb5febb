from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from moderator.cli.main import main
from moderator.config import DEMO_POLICIES_DIR
from tests.helpers import copy_demo_policies, edit, shape_png

SHIPPED_EXAMPLES = DEMO_POLICIES_DIR / "examples"


def policies_test(policies: Path, examples: Path, cache: Path) -> int:
    return main(
        ["policies", "test", str(policies), str(examples), "--demo", "--cache-dir", str(cache)]
    )


def test_shipped_demo_examples_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert policies_test(DEMO_POLICIES_DIR, SHIPPED_EXAMPLES, tmp_path) == 0
    out = capsys.readouterr().out
    assert "red/violating/red-circle.png" in out
    assert "FAIL" not in out
    assert out.strip().endswith("17 passed, 0 failed")


def test_a_wrong_example_fails_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    examples = tmp_path / "examples"
    shutil.copytree(SHIPPED_EXAMPLES, examples)
    (examples / "red" / "benign" / "actually-red.png").write_bytes(shape_png("red", "square"))
    (examples / "stars" / "violating" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    assert policies_test(DEMO_POLICIES_DIR, examples, tmp_path / "cache") == 1
    lines = capsys.readouterr().out.splitlines()
    wrong = next(line for line in lines if "actually-red.png" in line)
    assert "benign" in wrong
    assert wrong.endswith("FAIL")
    broken = next(line for line in lines if "broken.png" in line)
    assert "FAIL: broken PNG header" in broken
    assert lines[-1] == "17 passed, 2 failed"


def test_a_threshold_change_is_caught(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policies = copy_demo_policies(tmp_path / "policies")
    edit(policies / "red.yaml", "threshold: 0.71", "threshold: 0.95")
    assert policies_test(policies, SHIPPED_EXAMPLES, tmp_path / "cache") == 1
    assert "3 failed" in capsys.readouterr().out


def test_examples_for_unknown_policies_are_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    examples = tmp_path / "examples"
    (examples / "weapons" / "violating").mkdir(parents=True)
    assert policies_test(DEMO_POLICIES_DIR, examples, tmp_path / "cache") == 2
    assert "no active policy with id 'weapons'" in capsys.readouterr().err


def test_examples_of_disabled_policies_are_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policies = copy_demo_policies(tmp_path / "policies")
    edit(policies / "green_squares.yaml", "mode: shadow", "mode: disabled")
    assert policies_test(policies, SHIPPED_EXAMPLES, tmp_path / "cache") == 0
    out = capsys.readouterr().out
    assert "green_squares/" not in out.split("skipped")[0]
    assert "skipped examples of disabled policies: green_squares" in out

"""moderator-scan against the real demo server: interrupted and resumed, a busy server waited
for, its output read by `moderator rescore`."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from moderator_client import ModeratorClient

from moderator.demo.shapes import render_shape
from tests.helpers import Flaky, RunningService, shape_png, wait_until

COLOURS = ("red", "green", "blue", "yellow", "purple")
SHAPES = ("circle", "square", "star", "triangle")


def scan_command(server: str, out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "moderator_client.scan", "--server", server, "--out", str(out),
            "--progress-seconds", "0.2", *args]  # fmt: skip


def make_images(folder: Path, count: int) -> list[Path]:
    """Shapes of the demo model's colours, at a few sizes, in nested folders."""
    kinds = itertools.cycle(itertools.product(COLOURS, SHAPES, (48, 64, 80)))
    paths = []
    for i, (colour, shape, size) in zip(range(count), kinds, strict=False):
        path = folder / f"part-{i % 3}" / f"{i:04d}-{colour}-{shape}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        render_shape(colour, shape, size, size).save(path)
        paths.append(path)
    (folder / "notes.txt").write_text("not an image: not scanned")
    return paths


def lines_of(out: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.read_text().splitlines()]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    folder = tmp_path_factory.mktemp("backlog")
    return folder, make_images(folder, 300)


def test_an_interrupted_scan_resumes_with_every_image_exactly_once(
    demo_service: RunningService, images: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    folder, paths = images
    out = tmp_path / "results.jsonl"
    command = scan_command(demo_service.address, out, str(folder), "--batch", "1")
    first = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: out.exists() and len(out.read_text().splitlines()) >= 10, timeout=60)
    first.send_signal(signal.SIGINT)
    _, log = first.communicate(timeout=60)
    assert first.returncode == 130, log
    assert "interrupted: finishing the batches in flight" in log
    written = len(lines_of(out))
    assert 10 <= written < len(paths)

    resumed = subprocess.run(
        [*command, "--resume"], capture_output=True, text=True, timeout=120, check=False
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"{written:,} images already in the output: skipped" in resumed.stderr
    records = lines_of(out)
    assert sorted(str(r["id"]) for r in records) == sorted(str(p) for p in paths)
    with ModeratorClient(demo_service.address) as client:
        one_by_one = {str(p): client.moderate([p]).results[0].decision for p in paths}
    decisions = {
        str(r["id"]): str(r["decision"]).removeprefix("DECISION_").lower() for r in records
    }
    assert decisions == one_by_one
    assert set(one_by_one.values()) >= {"allow", "block"}


def test_a_line_cut_short_by_a_crash_is_dropped_and_its_image_scanned_again(
    demo_service: RunningService, tmp_path: Path
) -> None:
    paths = make_images(tmp_path / "few", 3)
    out = tmp_path / "results.jsonl"
    command = scan_command(demo_service.address, out, str(tmp_path / "few"))
    assert subprocess.run(command, capture_output=True, check=False).returncode == 0
    whole = out.read_text().splitlines()
    out.write_text("\n".join(whole[:2]) + "\n" + whole[2][:25])  # the crash, mid-line
    assert subprocess.run([*command, "--resume"], capture_output=True, check=False).returncode == 0
    assert sorted(str(r["id"]) for r in lines_of(out)) == sorted(str(p) for p in paths)


def test_an_existing_output_is_not_appended_to_without_resume(
    demo_service: RunningService, tmp_path: Path
) -> None:
    out = tmp_path / "results.jsonl"
    out.write_text('{"id": "x"}\n')
    done = subprocess.run(
        scan_command(demo_service.address, out, str(tmp_path)), capture_output=True, text=True,
        check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--resume to go on" in done.stderr
    assert out.read_text() == '{"id": "x"}\n'


def test_a_busy_server_is_waited_for_not_given_up_on(tmp_path: Path) -> None:
    """7 refusals: more than one call's 5 attempts, so the scan's own backoff is needed."""
    busy = Flaky(grpc.StatusCode.RESOURCE_EXHAUSTED, 7)
    try:
        image = tmp_path / "one.png"
        image.write_bytes(shape_png("red", "circle"))
        out = tmp_path / "results.jsonl"
        started = time.monotonic()
        done = subprocess.run(
            scan_command(f"127.0.0.1:{busy.port}", out, str(image)),
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    finally:
        busy.server.stop(None)
    assert done.returncode == 0, done.stderr
    assert "server busy (RESOURCE_EXHAUSTED)" in done.stderr
    assert [r["id"] for r in lines_of(out)] == [str(image)]
    assert busy.calls == 8
    assert time.monotonic() - started < 60


def test_a_scan_with_embeddings_feeds_moderator_rescore(
    demo_service: RunningService, tmp_path: Path
) -> None:
    make_images(tmp_path / "set", 12)
    out = tmp_path / "stored.jsonl"
    scanned = subprocess.run(
        scan_command(demo_service.address, out, str(tmp_path / "set"), "--embeddings"),
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert scanned.returncode == 0, scanned.stderr
    assert "decisions: allow" in scanned.stderr
    rescored = subprocess.run(
        [sys.executable, "-m", "moderator", "rescore", str(out), "--demo",
         "--policies", "policies/demo", "--out", str(tmp_path / "rescored.jsonl")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert rescored.returncode == 0, rescored.stderr
    before = {r["id"]: r["decision"] for r in lines_of(out)}
    after = {r["id"]: r["decision"] for r in lines_of(tmp_path / "rescored.jsonl")}
    assert after == before  # the same policies decide the same

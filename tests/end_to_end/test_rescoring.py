"""Rescoring stored embeddings: unit behaviour, then equality with live scoring end to end."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from moderator_client import format_json
from moderator_client.v1 import moderator_pb2 as pb
from moderator_client.v1 import moderator_pb2_grpc as pb_grpc

from moderator.cli.main import main
from moderator.config import DEMO_POLICIES_DIR, ImageConfig
from moderator.demo.shapes import render_shape
from moderator.tools.embeddings_file import READ_CHUNK
from tests.helpers import copy_demo_policies, demo_config, edit, encode, shape_png, start_service

# Live scores come from a batched matmul on the server, rescores from another batch shape:
# float32 rounding is all that may differ.
SCORE_TOLERANCE = 1e-5
LONGER_RED_DESCRIPTION = (
    "  - a red circle\n  - a bright red circle drawn on a plain light background, seen head on\n"
)


# -- end to end: live Moderate -> stored file -> rescore ---------------------------------------


def animated_gif(*colours: str, width: int = 128, height: int = 128) -> bytes:
    frames = [render_shape(colour, "circle", width, height) for colour in colours]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100)
    return buffer.getvalue()


def stored_images() -> list[pb.Image]:
    data = {
        "red-circle": shape_png("red", "circle"),
        "blue-star": shape_png("blue", "star"),
        "green-square": shape_png("green", "square"),
        "orange-triangle": shape_png("orange", "triangle"),
        "wide-red-star": encode(render_shape("red", "star", 640, 128)),
        "blue-then-red": animated_gif("blue", "red"),
        # 4 frames x (the whole frame + 3 tiles of 256 x 128)
        "wide-animation": animated_gif("blue", "green", "yellow", "red", width=640, height=128),
        "corrupt": b"\x89PNG\r\n\x1a\nnope",
    }
    return [pb.Image(id=name, data=value) for name, value in data.items()]


@pytest.fixture(scope="module")
def served_policies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_demo_policies(tmp_path_factory.mktemp("served") / "policies")


@pytest.fixture(scope="module")
def live(
    served_policies: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[pb_grpc.ModeratorStub, pb.ModerateResponse]]:
    """The server's answers, after a reload: its text cache then holds prompts encoded in two
    batches (start-up and reload), which a cold offline cache encodes in one."""
    config = replace(
        demo_config(tmp_path_factory.mktemp("live")),
        policies_dir=served_policies,
        policy_poll_seconds=0,
    )
    for running in start_service(config):
        with grpc.insecure_channel(running.address) as channel:
            stub = pb_grpc.ModeratorStub(channel)
            edit(served_policies / "red.yaml", "  - a red circle\n", LONGER_RED_DESCRIPTION)
            assert stub.ReloadPolicies(pb.ReloadPoliciesRequest(), timeout=60).status.ok
            request = pb.ModerateRequest(images=stored_images(), include_embeddings=True)
            yield stub, stub.Moderate(request, timeout=60)


@pytest.fixture
def stored_file(live: tuple[pb_grpc.ModeratorStub, pb.ModerateResponse], tmp_path: Path) -> Path:
    _, response = live
    path = tmp_path / "stored.jsonl"
    context = (response.policy_version, response.model, response.precision)
    lines = [format_json(r, *context) for r in response.results]
    path.write_text("\n".join(lines) + "\n")
    return path


def scores_of(results: object) -> dict[tuple[str, str], float]:
    return {(r.id, p.policy_id): p.score for r in results for p in r.policies}  # type: ignore[attr-defined]


def assert_same_results(rescored: list[pb.ImageResult], live: list[pb.ImageResult]) -> None:
    assert [(r.id, r.decision) for r in rescored] == [(r.id, r.decision) for r in live]
    live_scores = scores_of(live)
    new_scores = scores_of(rescored)
    assert new_scores.keys() == live_scores.keys()
    for key, score in live_scores.items():
        assert new_scores[key] == pytest.approx(score, abs=SCORE_TOLERANCE), key
    matched = {(r.id, p.policy_id): p.matched_description for r in live for p in r.policies}
    assert matched == {
        (r.id, p.policy_id): p.matched_description for r in rescored for p in r.policies
    }


def test_multi_view_images_return_every_view(
    live: tuple[pb_grpc.ModeratorStub, pb.ModerateResponse],
) -> None:
    _, response = live
    views = {r.id: len(r.views) for r in response.results}
    assert views["wide-red-star"] > 1
    assert views["blue-then-red"] == 2
    assert views["wide-animation"] == 16
    assert views["red-circle"] == 0  # one view: `embedding` is all there is
    gif = next(r for r in response.results if r.id == "blue-then-red")
    assert list(gif.views[0].values) == list(gif.embedding)
    assert gif.decision == pb.DECISION_BLOCK  # the red frame decides


def test_score_embeddings_rpc_equals_live_scoring(
    live: tuple[pb_grpc.ModeratorStub, pb.ModerateResponse],
) -> None:
    stub, response = live
    request = pb.ScoreEmbeddingsRequest(
        images=[
            pb.EmbeddedImage(id=r.id, embedding=r.embedding, views=r.views)
            for r in response.results
            if r.decision != pb.DECISION_ERROR
        ],
        model=response.model,
    )
    rescored = stub.ScoreEmbeddings(request, timeout=60)
    assert rescored.policy_version == response.policy_version
    scored_live = [r for r in response.results if r.decision != pb.DECISION_ERROR]
    assert_same_results(list(rescored.results), scored_live)
    assert not any(r.embedding for r in rescored.results)
    request.detail = pb.DETAIL_VIOLATIONS
    violations = stub.ScoreEmbeddings(request, timeout=60).results
    assert [r.decision for r in violations] == [r.decision for r in rescored.results]
    for brief, full in zip(violations, rescored.results, strict=True):
        assert [p.policy_id for p in brief.policies] == [
            p.policy_id for p in full.policies if p.violated
        ]


def test_score_embeddings_rpc_fails_a_bad_embedding_alone_and_refuses_another_model(
    live: tuple[pb_grpc.ModeratorStub, pb.ModerateResponse],
) -> None:
    stub, response = live
    good = response.results[0]
    too_many = ImageConfig().max_views + 1
    many_views = [pb.Embedding(values=good.embedding)] * too_many
    request = pb.ScoreEmbeddingsRequest(
        images=[
            pb.EmbeddedImage(id="short", embedding=[1.0, 0.0]),
            pb.EmbeddedImage(id=good.id, embedding=good.embedding),
            pb.EmbeddedImage(id="many", embedding=good.embedding, views=many_views),
        ],
        policy_ids=["red"],
        model=response.model,
    )
    results = stub.ScoreEmbeddings(request, timeout=60).results
    too_many_views = f"{too_many} views; Moderate returns 1 to {too_many - 1}"
    for failed, words in (
        (results[0], "has 2 values; this model's have 64"),
        (results[2], too_many_views),
    ):
        assert failed.decision == pb.DECISION_ERROR
        assert failed.error.code == pb.IMAGE_ERROR_CODE_INVALID_EMBEDDING
        assert words in failed.error.message
    assert results[1].decision == good.decision
    assert [p.policy_id for p in results[1].policies] == ["red"]


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"model": "ViT-B-32/openai"}, "ViT-B-32/openai"),
        ({"count": 4097}, "more than 4096 embeddings"),
    ],
)
def test_score_embeddings_rpc_refuses_another_model_and_huge_requests(
    live: tuple[pb_grpc.ModeratorStub, pb.ModerateResponse], change: dict[str, Any], words: str
) -> None:
    stub, response = live
    good = response.results[0]
    image = pb.EmbeddedImage(id=good.id, embedding=good.embedding)
    request = pb.ScoreEmbeddingsRequest(images=[image] * change.pop("count", 1), **change)
    with pytest.raises(grpc.RpcError) as info:
        stub.ScoreEmbeddings(request, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in str(info.value.details())


def rescore(stored: Path, policies: Path, cache: Path, *extra: str) -> int:
    args = ["rescore", str(stored), "--policies", str(policies), "--demo"]
    return main([*args, "--cache-dir", str(cache), *extra])


def read_lines(path: Path) -> list[pb.ImageResult]:
    from google.protobuf.json_format import ParseDict

    results = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        results.append(ParseDict(record, pb.ImageResult(), ignore_unknown_fields=True))
    return results


def test_rescore_with_the_same_policies_changes_nothing_and_equals_live(
    live: tuple[pb_grpc.ModeratorStub, pb.ModerateResponse],
    served_policies: Path,
    stored_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "rescored.jsonl"
    assert rescore(stored_file, served_policies, tmp_path / "cache", "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert "7 images" in printed
    assert "0 images changed decision" in printed
    assert "1 images that failed at moderation time were skipped" in printed
    _, response = live
    assert_same_results(
        read_lines(out), [r for r in response.results if r.decision != pb.DECISION_ERROR]
    )


def test_rescore_at_another_precision_scores_the_same(
    live: tuple[pb_grpc.ModeratorStub, pb.ModerateResponse],
    served_policies: Path,
    stored_file: Path,
    tmp_path: Path,
) -> None:
    """Policy text is embedded in fp32 whatever the image precision, so it does not matter."""
    _, response = live
    other = "fp32" if response.precision != "fp32" else "bf16"
    target = tmp_path / "rescored.jsonl"
    out = tmp_path / "link.jsonl"
    out.symlink_to(target)
    args = ("--precision", other, "--out", str(out))
    assert rescore(stored_file, served_policies, tmp_path / "cache", *args) == 0
    assert out.is_symlink()  # written through the link, not replaced
    assert_same_results(
        read_lines(target), [r for r in response.results if r.decision != pb.DECISION_ERROR]
    )
    precisions = {json.loads(line)["precision"] for line in target.read_text().splitlines()}
    assert precisions == {response.precision}  # the precision that made the embeddings


def test_rescore_summarises_what_a_policy_change_would_do(
    served_policies: Path, stored_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policies = tmp_path / "policies"
    shutil.copytree(served_policies, policies)
    edit(policies / "red.yaml", "mode: enforce", "mode: shadow")
    assert rescore(stored_file, policies, tmp_path / "cache") == 0
    printed = capsys.readouterr().out
    # red alone blocked red-circle and blue-then-red; wide-red-star and wide-animation also
    # violate stars (review)
    assert "BLOCK  -> ALLOW         2  (changed)" in printed
    assert "BLOCK  -> REVIEW        2  (changed)" in printed
    assert "changed: red-circle, wide-red-star, blue-then-red, wide-animation" in printed
    red = next(line for line in printed.splitlines() if line.strip().startswith("red "))
    assert red.split()[1:] == ["kept", "4", "4", "0", "0"]  # shadow still scores and flags

    assert (
        rescore(stored_file, served_policies, tmp_path / "cache", "--baseline", str(policies)) == 0
    )
    printed = capsys.readouterr().out
    assert "BLOCK  -> ALLOW" not in printed
    assert "ALLOW  -> BLOCK         2  (changed)" in printed
    assert "REVIEW -> BLOCK         2  (changed)" in printed


def test_rescore_refuses_embeddings_of_another_model(
    stored_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = stored_file.read_text()
    model = json.loads(text.splitlines()[0])["model"]
    stored_file.write_text(text.replace(model, "ViT-B-32/openai"))
    assert rescore(stored_file, DEMO_POLICIES_DIR, tmp_path / "cache") == 2
    assert "made by ViT-B-32/openai" in capsys.readouterr().err


def test_rescore_compares_only_images_with_a_stored_decision(
    served_policies: Path, stored_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records = [json.loads(line) for line in stored_file.read_text().splitlines()]
    del records[0]["decision"]
    stored_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "rescored.jsonl"
    assert rescore(stored_file, served_policies, tmp_path / "cache", "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert "6 images:" in printed
    assert "1 images have no stored decision: scored, not compared" in printed
    assert len(out.read_text().splitlines()) == 7  # every scored image is written


def test_rescore_reports_invalid_embeddings_and_exits_one(
    served_policies: Path, stored_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records = [json.loads(line) for line in stored_file.read_text().splitlines()]
    records[1]["embedding"] = records[1]["embedding"][:10]
    records[2]["embedding"] = [2 * v for v in records[2]["embedding"]]
    stored_file.write_text("".join(json.dumps(r) + "\n" for r in records) + "{oops\n")
    assert rescore(stored_file, served_policies, tmp_path / "cache") == 1
    captured = capsys.readouterr()
    assert "5 images:" in captured.out  # the 3 left out are not counted as changes
    assert "0 images changed decision" in captured.out
    assert "invalid embedding: blue-star: embedding has 10 values" in captured.err
    assert "invalid embedding: green-square: embedding is not L2-normalised" in captured.err
    assert f"skipped {stored_file}:9: " in captured.err
    assert "1 unreadable lines (listed above) and 2 invalid embeddings (the first 2" in captured.err


def test_rescore_reads_a_file_larger_than_one_chunk(
    served_policies: Path, stored_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records = [json.loads(line) for line in stored_file.read_text().splitlines()]
    scored = [r for r in records if r.get("embedding")]
    copies = READ_CHUNK // len(scored) + 1
    with stored_file.open("w") as out:
        for copy in range(copies):
            for record in scored:
                out.write(json.dumps({**record, "id": f"{record['id']}-{copy}"}) + "\n")
    total = copies * len(scored)
    assert total > READ_CHUNK
    out_file = tmp_path / "rescored.jsonl"
    assert rescore(stored_file, served_policies, tmp_path / "cache", "--out", str(out_file)) == 0
    printed = capsys.readouterr().out
    assert f"{total} images:" in printed
    assert "0 images changed decision" in printed
    assert len(out_file.read_text().splitlines()) == total

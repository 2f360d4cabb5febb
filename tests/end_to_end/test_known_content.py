"""Known content through the real server: example images, allow examples, PDQ and SHA-256 hash
lists, and the cache for repeated uploads; then the policy tools agree with what it served."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import numpy as np
import pdqhash
import pytest
from moderator_client import format_json
from moderator_client.v1 import moderator_pb2 as pb
from moderator_client.v1 import moderator_pb2_grpc as pb_grpc
from PIL import Image

from moderator.cli.main import main
from moderator.demo.shapes import render_shape
from moderator.errors import PolicyError
from tests.helpers import (
    copy_demo_policies,
    demo_config,
    edit,
    encode,
    start_service,
    textured_scene,
)

EXAMPLE = "known/blue-triangle.png"
ALLOWED = "allowed/red-square.png"
PDQ_LIST = "lists/known-bad.csv"
SHA_LIST = "lists/exact.csv"


def jpeg(image: Image.Image, quality: int = 70) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def pdq_hex(image: Image.Image) -> str:
    """The image's PDQ as python-threatexchange writes it: pdqhash's bits, first one highest."""
    bits, _quality = pdqhash.compute(np.asarray(image.convert("RGB")))
    return f"{int(''.join(str(int(b)) for b in bits), 2):064x}"


EXACT_BYTES = encode(textured_scene(9))


def write_known_content(policies: Path) -> None:
    """Beside the demo policies: an examples-only policy, an allow example on `red`, and a
    policy of hash lists."""
    (policies / "known").mkdir()
    (policies / "allowed").mkdir()
    (policies / "lists").mkdir()
    (policies / EXAMPLE).write_bytes(encode(render_shape("blue", "triangle")))
    (policies / ALLOWED).write_bytes(encode(render_shape("red", "square")))
    (policies / "blue_triangles.yaml").write_text(
        "title: Blue triangles\naction: review\nexamples: [known/]\n"
    )
    with (policies / "red.yaml").open("a") as red:
        red.write(f"allow_examples: [{ALLOWED}]\nallow_threshold: 0.99\n")
    (policies / PDQ_LIST).write_text(f"# known scenes\n{pdq_hex(textured_scene(1))},scene-1\n")
    (policies / SHA_LIST).write_text(f"{hashlib.sha256(EXACT_BYTES).hexdigest()},exact-1\n")
    (policies / "known_scenes.yaml").write_text(
        "title: Known scenes\naction: block\n"
        f"hash_lists: [{PDQ_LIST}]\npdq_max_distance: 31\nsha256_lists: [{SHA_LIST}]\n"
    )


@dataclass
class Served:
    stub: pb_grpc.ModeratorStub
    policies: Path
    metrics_url: str
    stub_address: str


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    policies = copy_demo_policies(tmp_path_factory.mktemp("known") / "policies")
    write_known_content(policies)
    config = replace(
        demo_config(tmp_path_factory.mktemp("live"), image_cache_mb=64),
        policies_dir=policies,
        policy_poll_seconds=0,
    )
    for running in start_service(config):
        with grpc.insecure_channel(running.address) as channel:
            metrics = f"http://127.0.0.1:{running.service.metrics_port}/metrics"
            yield Served(pb_grpc.ModeratorStub(channel), policies, metrics, running.address)


def moderate(stub: pb_grpc.ModeratorStub, **images: bytes) -> dict[str, pb.ImageResult]:
    request = pb.ModerateRequest(
        images=[pb.Image(id=name, data=data) for name, data in images.items()],
        include_embeddings=True,
    )
    return {r.id: r for r in stub.Moderate(request, timeout=60).results}


def policy(result: pb.ImageResult, policy_id: str) -> pb.PolicyResult:
    [found] = [p for p in result.policies if p.policy_id == policy_id]
    return found


def test_an_examples_only_policy_catches_new_renderings_and_not_other_shapes(
    served: Served,
) -> None:
    renderings = {
        "wide": encode(render_shape("blue", "triangle", 200, 120, scale=0.5, center=(0.3, 0.5))),
        "tall": encode(render_shape("blue", "triangle", 120, 200, scale=0.7, center=(0.5, 0.6))),
        "small": jpeg(render_shape("blue", "triangle", 256, 256, scale=0.35, center=(0.7, 0.3))),
    }
    others = {
        "square": encode(render_shape("blue", "square")),
        "circle": encode(render_shape("blue", "circle")),
        "orange-triangle": encode(render_shape("orange", "triangle")),
        "green-star": encode(render_shape("green", "star")),
    }
    results = moderate(served.stub, **renderings, **others)
    for name in renderings:
        found = policy(results[name], "blue_triangles")
        assert found.violated, name
        assert found.matched_example == EXAMPLE
        assert found.example_score >= found.example_threshold == pytest.approx(0.90)
        assert found.score == 0.0  # no descriptions: the examples are its only signal
        assert results[name].decision == pb.DECISION_REVIEW
    for name in others:
        found = policy(results[name], "blue_triangles")
        assert not found.violated, name
        assert found.matched_example == ""
        assert found.example_score < 0.9


def test_an_allow_example_suppresses_one_false_positive_and_nothing_else(served: Served) -> None:
    results = moderate(
        served.stub,
        allowed=(served.policies / ALLOWED).read_bytes(),
        **{shape: encode(render_shape("red", shape)) for shape in ("circle", "triangle", "star")},
    )
    allowed = policy(results["allowed"], "red")
    assert not allowed.violated
    assert allowed.allowed_by == ALLOWED
    assert allowed.score >= allowed.threshold  # the text rule alone would have blocked it
    assert results["allowed"].decision == pb.DECISION_ALLOW
    for shape in ("circle", "triangle", "star"):
        red = policy(results[shape], "red")
        assert red.violated, shape
        assert red.allowed_by == ""
        assert results[shape].decision == pb.DECISION_BLOCK


def test_a_pdq_list_matches_a_reencoded_resized_copy_and_not_another_image(
    served: Served,
) -> None:
    copy = jpeg(textured_scene(1).resize((400, 300), Image.Resampling.BICUBIC))
    results = moderate(served.stub, copy=copy, other=jpeg(textured_scene(2)))
    known = policy(results["copy"], "known_scenes")
    assert known.violated
    assert known.matched_hash == f"{PDQ_LIST}:scene-1"
    assert results["copy"].decision == pb.DECISION_BLOCK
    assert not policy(results["other"], "known_scenes").violated
    assert results["other"].decision == pb.DECISION_ALLOW
    for name, data in (("copy", copy), ("other", None)):
        result = results[name]
        assert len(result.pdq) == 64
        assert 0 <= result.pdq_quality <= 100
        if data is not None:
            assert result.sha256 == hashlib.sha256(data).hexdigest()


def test_a_sha256_list_matches_the_exact_bytes_only(served: Served) -> None:
    results = moderate(served.stub, exact=EXACT_BYTES, reencoded=jpeg(textured_scene(9), 95))
    assert policy(results["exact"], "known_scenes").matched_hash == f"{SHA_LIST}:exact-1"
    assert results["exact"].decision == pb.DECISION_BLOCK
    assert not policy(results["reencoded"], "known_scenes").violated


def test_list_policies_counts_the_known_content(served: Served) -> None:
    listed = {p.id: p for p in served.stub.ListPolicies(pb.ListPoliciesRequest()).policies}
    assert listed["blue_triangles"].example_count == 1
    assert listed["blue_triangles"].description_count == 0
    assert listed["red"].allow_example_count == 1
    assert listed["known_scenes"].hash_count == 2


def cache_hits(served: Served) -> float:
    import urllib.request

    with urllib.request.urlopen(served.metrics_url, timeout=10) as response:
        text = response.read().decode()
    line = 'moderator_image_cache_requests_total{result="hit"}'
    return float(next(row for row in text.splitlines() if row.startswith(line)).split()[-1])


def test_a_repeated_image_is_a_cache_hit_with_identical_scores(served: Served) -> None:
    data = encode(render_shape("purple", "triangle", 180, 150))
    first = moderate(served.stub, image=data)["image"]
    hits = cache_hits(served)
    again = moderate(served.stub, image=data)["image"]
    assert cache_hits(served) == hits + 1
    assert again == first  # every score, decision, embedding and hash, bit for bit


def test_a_cached_image_is_decided_by_the_policies_in_force(served: Served) -> None:
    data = encode(render_shape("red", "circle", 150, 170))
    assert moderate(served.stub, image=data)["image"].decision == pb.DECISION_BLOCK
    hits = cache_hits(served)
    edit(served.policies / "red.yaml", "mode: enforce", "mode: shadow")
    try:
        assert served.stub.ReloadPolicies(pb.ReloadPoliciesRequest(), timeout=60).status.ok
        after = moderate(served.stub, image=data)["image"]
    finally:
        edit(served.policies / "red.yaml", "mode: shadow", "mode: enforce")
        assert served.stub.ReloadPolicies(pb.ReloadPoliciesRequest(), timeout=60).status.ok
    assert cache_hits(served) == hits + 1
    assert policy(after, "red").violated
    assert after.decision == pb.DECISION_ALLOW  # a shadow policy never decides


def agreeing_images() -> dict[str, bytes]:
    return {
        "triangle": encode(render_shape("blue", "triangle", 200, 150, scale=0.5)),
        "allowed": encode(render_shape("red", "square")),
        "red-star": encode(render_shape("red", "star")),
        "copy": jpeg(textured_scene(1).resize((480, 360))),
        "exact": EXACT_BYTES,
        "plain": encode(render_shape("yellow", "circle")),
    }


def decided(result: pb.ImageResult) -> dict[str, tuple[bool, str, str, str]]:
    return {
        p.policy_id: (p.violated, p.matched_example, p.allowed_by, p.matched_hash)
        for p in result.policies
    }


def test_score_embeddings_and_rescore_agree_with_live(served: Served, tmp_path: Path) -> None:
    live = served.stub.Moderate(
        pb.ModerateRequest(
            images=[pb.Image(id=k, data=v) for k, v in agreeing_images().items()],
            include_embeddings=True,
        ),
        timeout=60,
    )
    stored = [
        pb.EmbeddedImage(
            id=r.id,
            embedding=r.embedding,
            views=r.views,
            sha256=r.sha256,
            pdq=r.pdq,
            pdq_quality=r.pdq_quality,
        )
        for r in live.results
    ]
    request = pb.ScoreEmbeddingsRequest(images=stored, model=live.model)
    rescored = served.stub.ScoreEmbeddings(request, timeout=60)
    for before, after in zip(live.results, rescored.results, strict=True):
        assert after.decision == before.decision, before.id
        assert decided(after) == decided(before), before.id
    lines = tmp_path / "stored.jsonl"
    lines.write_text(
        "".join(
            format_json(r, live.policy_version, live.model, live.precision) + "\n"
            for r in live.results
        )
    )
    out = tmp_path / "rescored.jsonl"
    args = ["rescore", str(lines), "--policies", str(served.policies), "--demo"]
    main([*args, "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    offline = {json.loads(line)["id"]: json.loads(line) for line in out.read_text().splitlines()}
    for result in live.results:
        assert offline[result.id]["decision"] == pb.Decision.Name(result.decision), result.id
        violated = {
            p["policy_id"] for p in offline[result.id].get("policies", []) if p.get("violated")
        }
        assert violated == {p.policy_id for p in result.policies if p.violated}, result.id


def test_policies_test_agrees_with_live(
    served: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = agreeing_images()
    live = moderate(served.stub, **images)
    examples = tmp_path / "examples"
    for name, data in images.items():
        for policy_id in ("blue_triangles", "red", "known_scenes"):
            kind = "violating" if policy(live[name], policy_id).violated else "benign"
            folder = examples / policy_id / kind
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{name}.img").write_bytes(data)
    args = ["policies", "test", str(served.policies), str(examples), "--demo"]
    assert main([*args, "--cache-dir", str(tmp_path / "cache")]) == 0, capsys.readouterr().out
    table = capsys.readouterr().out
    assert f"example {EXAMPLE}" in table
    assert f"allowed by {ALLOWED}" in table
    assert f"hash {PDQ_LIST}:scene-1" in table


def test_a_changed_example_is_embedded_again_and_a_broken_one_keeps_the_running_set(
    served: Served,
) -> None:
    stub = served.stub
    example = served.policies / EXAMPLE
    original = example.read_bytes()
    before = {p.id: p.version for p in stub.ListPolicies(pb.ListPoliciesRequest()).policies}
    circle = encode(render_shape("blue", "circle"))
    try:
        example.write_bytes(circle)  # the example is now a circle
        status = stub.ReloadPolicies(pb.ReloadPoliciesRequest(), timeout=60).status
        assert status.ok, status.message
        assert "encoded 0 new prompts and 1 new example images" in status.message
        after = {p.id: p.version for p in stub.ListPolicies(pb.ListPoliciesRequest()).policies}
        assert after["blue_triangles"] != before["blue_triangles"]
        assert {k: v for k, v in after.items() if k != "blue_triangles"} == {
            k: v for k, v in before.items() if k != "blue_triangles"
        }
        result = moderate(stub, circle=encode(render_shape("blue", "circle", 140, 120)))["circle"]
        assert policy(result, "blue_triangles").violated
        example.write_bytes(original[:200])  # cut short: cannot be decoded
        status = stub.ReloadPolicies(pb.ReloadPoliciesRequest(), timeout=60).status
        assert not status.ok
        assert EXAMPLE in status.message
        assert "still serving" in status.message
        result = moderate(stub, circle=encode(render_shape("blue", "circle", 140, 120)))["circle"]
        assert policy(result, "blue_triangles").violated  # the running set: the circle example
    finally:
        example.write_bytes(original)
        assert stub.ReloadPolicies(pb.ReloadPoliciesRequest(), timeout=60).status.ok
    listed = stub.ListPolicies(pb.ListPoliciesRequest()).policies
    assert {p.id: p.version for p in listed} == before


def test_a_server_whose_example_is_broken_does_not_start(tmp_path: Path) -> None:
    policies = copy_demo_policies(tmp_path / "policies")
    (policies / "known").mkdir()
    (policies / "known" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (policies / "broken.yaml").write_text("title: Broken\naction: block\nexamples: [known/]\n")
    config = replace(demo_config(tmp_path), policies_dir=policies)
    with pytest.raises(PolicyError, match=r"known/bad\.png"):
        for _ in start_service(config):
            pass


def test_check_says_what_decided(
    served: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = {
        "allowed.png": (served.policies / ALLOWED).read_bytes(),
        "triangle.png": encode(render_shape("blue", "triangle", 150, 150)),
        "exact.png": EXACT_BYTES,
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    address = served.stub_address
    assert main(["check", "--server", address, *(str(tmp_path / name) for name in files)]) == 0
    lines = dict(line.split("\t", 1) for line in capsys.readouterr().out.splitlines())
    assert lines[str(tmp_path / "allowed.png")] == f"ALLOW\tred: allowed by {ALLOWED}"
    assert lines[str(tmp_path / "triangle.png")].startswith("REVIEW\tblue_triangles=")
    assert f"({EXAMPLE})" in lines[str(tmp_path / "triangle.png")]
    assert lines[str(tmp_path / "exact.png")] == f"BLOCK\tknown_scenes=hash {SHA_LIST}:exact-1"


def test_pdq_is_of_the_pixels_as_stored_as_python_threatexchange_hashes_them(
    served: Served,
) -> None:
    """A portrait phone photo is stored sideways with EXIF orientation 6; lists made with
    python-threatexchange hash the stored pixels, so must the service (the model sees it
    turned)."""
    stored = textured_scene(1)  # the list's entry was made from these pixels
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, "JPEG", quality=90, exif=exif)
    turned = moderate(served.stub, phone=buffer.getvalue())["phone"]
    assert policy(turned, "known_scenes").matched_hash == f"{PDQ_LIST}:scene-1"
    assert turned.pdq == moderate(served.stub, plain=jpeg(stored, 90))["plain"].pdq


def test_a_request_mixing_hits_and_misses_answers_in_order_as_if_fresh(served: Served) -> None:
    first, second, new = (
        encode(render_shape(colour, "circle", 130, 150)) for colour in ("red", "blue", "green")
    )
    before = moderate(served.stub, first=first, second=second)
    hits = cache_hits(served)
    request = pb.ModerateRequest(
        images=[
            pb.Image(id="second", data=second),
            pb.Image(id="new", data=new),
            pb.Image(id="first", data=first),
            pb.Image(id="first-again", data=first),
        ]
    )
    results = served.stub.Moderate(request, timeout=60).results
    assert cache_hits(served) == hits + 3  # scored together, in one pass
    assert [r.id for r in results] == ["second", "new", "first", "first-again"]
    for result in (results[0], results[2], results[3]):
        earlier = before[result.id.removesuffix("-again")]
        assert result.decision == earlier.decision
        assert result.pdq == earlier.pdq
        for now, then in zip(result.policies, earlier.policies, strict=True):
            assert (now.policy_id, now.violated) == (then.policy_id, then.violated)
            assert now.score == pytest.approx(then.score, abs=1e-6)  # float32 rounding at most
    assert results[1].decision == pb.DECISION_ALLOW


def metric(served: Served, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(served.metrics_url, timeout=10) as response:
        text = response.read().decode()
    return float(next(row for row in text.splitlines() if row.startswith(name + " ")).split()[-1])


def test_the_same_new_bytes_twice_in_a_request_are_decoded_once(served: Served) -> None:
    data = encode(render_shape("yellow", "triangle", 170, 140))
    decodes = metric(served, "moderator_decode_duration_seconds_count")
    results = moderate(served.stub, first=data, second=data)
    assert metric(served, "moderator_decode_duration_seconds_count") == decodes + 1
    first, second = results["first"], results["second"]
    assert (first.decision, first.pdq, first.sha256) == (second.decision, second.pdq, second.sha256)
    assert [p.score for p in first.policies] == pytest.approx([p.score for p in second.policies])

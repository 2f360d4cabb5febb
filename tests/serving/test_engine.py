from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from moderator.config import BatchConfig, Config, DecodeConfig, ServerConfig, demo_model_config
from moderator.core.clip import ClipModel, load_clip
from moderator.core.outcomes import ModerationResult
from moderator.core.rescoring import embedded_image
from moderator.core.scoring import Decision
from moderator.errors import ConfigError, Disabled, InvalidRequest, NotReady, Overloaded
from moderator.serving.engine import ImageInput, ModerationEngine
from moderator.serving.metrics import Metrics
from tests.helpers import copy_demo_policies, demo_config, edit, replace_encoder, shape_png

# The largest |bf16 - fp32| score difference over the 24 shape images was 0.0032 on the demo
# model here; 0.02 leaves room for other CPUs' bf16 kernels.
BF16_SCORE_TOLERANCE = 0.02


def started_engine(config: Config, clip: ClipModel) -> ModerationEngine:
    engine = ModerationEngine(config, Metrics(CollectorRegistry()), load_model=lambda _: clip)
    engine.start()
    return engine


@pytest.fixture(scope="module")
def engine(
    demo_clip: ClipModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ModerationEngine]:
    running = started_engine(demo_config(tmp_path_factory.mktemp("engine")), demo_clip)
    yield running
    running.stop()


def test_results_keep_request_order_and_ids(engine: ModerationEngine) -> None:
    images = [
        ImageInput("red", shape_png("red", "circle")),
        ImageInput("broken", b"\x89PNG\r\n\x1a\nbroken"),
        ImageInput("blue", shape_png("blue", "square")),
    ]
    result = asyncio.run(engine.moderate(images))
    assert [r.id for r in result.results] == ["red", "broken", "blue"]
    assert [r.decision for r in result.results] == [Decision.BLOCK, Decision.ERROR, Decision.ALLOW]
    assert result.policy_version == engine.policies.version
    assert result.model_id == engine.model_id


def test_the_pipelined_worker_gives_the_serial_workers_results(
    engine: ModerationEngine, demo_clip: ClipModel, tmp_path: Path
) -> None:
    """On the CPU the engine runs the model serially unless told (--pipeline auto)."""
    assert [t.name for t in engine._batcher._threads] == ["model-worker"]  # type: ignore[union-attr]
    pipelined = started_engine(demo_config(tmp_path, BatchConfig(pipelined=True)), demo_clip)
    try:
        assert len(pipelined._batcher._threads) == 3  # type: ignore[union-attr]
        images = [
            ImageInput(f"{colour}-{shape}", shape_png(colour, shape))
            for colour in ("red", "blue", "yellow")
            for shape in ("circle", "star", "square")
        ]
        serial = asyncio.run(engine.moderate(images, include_embeddings=True)).results
        piped = asyncio.run(pipelined.moderate(images, include_embeddings=True)).results
        assert [r.decision for r in piped] == [r.decision for r in serial]
        for ours, theirs in zip(piped, serial, strict=True):
            assert [p.score for p in ours.policies] == pytest.approx(
                [p.score for p in theirs.policies], abs=1e-5
            )
            assert ours.embedding == pytest.approx(theirs.embedding, abs=1e-5)
    finally:
        pipelined.stop()


def test_policy_selection_reports_and_decides_on_selected_policies_only(
    engine: ModerationEngine,
) -> None:
    image = [ImageInput("red-star", shape_png("red", "star"))]
    everything = asyncio.run(engine.moderate(image)).results[0]
    only_stars = asyncio.run(engine.moderate(image, policy_ids=["stars"])).results[0]
    assert everything.decision is Decision.BLOCK
    assert [p.policy.id for p in everything.policies] == list(engine.policies.ids)
    assert only_stars.decision is Decision.REVIEW
    assert [p.policy.id for p in only_stars.policies] == ["stars"]


def test_unknown_policy_and_oversized_requests_are_refused(engine: ModerationEngine) -> None:
    with pytest.raises(InvalidRequest, match=r"unknown policy id.*nope"):
        asyncio.run(engine.moderate([], policy_ids=["nope"]))
    limit = engine.config.server.max_images_per_request
    with pytest.raises(InvalidRequest, match=f"at most {limit}"):
        asyncio.run(engine.moderate([ImageInput("x", b"")] * (limit + 1)))


def test_embeddings_are_returned_on_request(engine: ModerationEngine) -> None:
    image = [ImageInput("a", shape_png("green", "triangle"))]
    without = asyncio.run(engine.moderate(image)).results[0]
    with_embedding = asyncio.run(engine.moderate(image, include_embeddings=True)).results[0]
    assert without.embedding == ()
    vector = torch.tensor(with_embedding.embedding)
    assert vector.shape == (engine.clip.embed_dim,)
    assert abs(float(vector.norm()) - 1.0) < 1e-4


def test_warm_cache_restart_encodes_no_text(demo_clip: ClipModel, tmp_path: Path) -> None:
    config = demo_config(tmp_path)
    cold = started_engine(config, demo_clip)
    cold.stop()
    assert cold.metrics.text_embeddings_encoded._value.get() > 0
    warm = started_engine(config, demo_clip)
    warm.stop()
    assert warm.metrics.text_embeddings_encoded._value.get() == 0
    assert torch.equal(cold.index.matrix, warm.index.matrix)


def test_requests_before_start_are_not_ready(tmp_path: Path) -> None:
    idle = ModerationEngine(demo_config(tmp_path), Metrics(CollectorRegistry()))
    with pytest.raises(NotReady):
        asyncio.run(idle.moderate([ImageInput("a", b"x")]))


def test_a_full_queue_fails_fast(demo_clip: ClipModel, tmp_path: Path) -> None:
    gate = threading.Event()
    gate.set()
    entered = threading.Event()

    def gated(pixels: torch.Tensor) -> torch.Tensor:
        entered.set()
        gate.wait(30)
        return demo_clip.encode_images(pixels)

    clip = replace_encoder(demo_clip, gated)
    config = demo_config(
        tmp_path,
        BatchConfig(max_queue_images=2, max_wait_ms=0),
        ServerConfig(max_images_per_request=2),
    )
    engine = started_engine(config, clip)  # warms up with the gate open
    gate.clear()
    entered.clear()
    metrics = engine.metrics
    two = [ImageInput(str(i), shape_png("red", "circle")) for i in range(2)]

    async def scenario() -> None:
        first = asyncio.ensure_future(engine.moderate(two))
        await asyncio.get_running_loop().run_in_executor(None, entered.wait, 30)
        with pytest.raises(Overloaded, match="limit of 2"):
            await engine.moderate(two[:1])
        gate.set()
        assert [r.decision for r in (await first).results] == [Decision.BLOCK, Decision.BLOCK]
        assert len((await engine.moderate(two)).results) == 2  # capacity is back

    try:
        asyncio.run(scenario())
    finally:
        gate.set()
        engine.stop()
    assert metrics.rejected_requests.labels(reason="overload")._value.get() == 1


def test_bf16_and_fp32_make_the_same_decisions(demo_clip: ClipModel, tmp_path: Path) -> None:
    images = [
        ImageInput(f"{c}-{s}", shape_png(c, s))
        for c in ("red", "green", "blue", "yellow", "purple", "orange")
        for s in ("circle", "square", "triangle", "star")
    ]
    bf16_clip = load_clip(demo_model_config("cpu", "bf16"))
    results = {}
    for name, clip in (("fp32", demo_clip), ("bf16", bf16_clip)):
        engine = started_engine(demo_config(tmp_path / name), clip)
        try:
            results[name] = asyncio.run(engine.moderate(images)).results
        finally:
            engine.stop()
    for fp32, bf16 in zip(results["fp32"], results["bf16"], strict=True):
        assert bf16.decision == fp32.decision, fp32.id
        for a, b in zip(fp32.policies, bf16.policies, strict=True):
            assert b.score == pytest.approx(a.score, abs=BF16_SCORE_TOLERANCE), (
                fp32.id,
                a.policy.id,
            )


@pytest.fixture
def reloadable(demo_clip: ClipModel, tmp_path: Path) -> Iterator[ModerationEngine]:
    policies = copy_demo_policies(tmp_path / "policies")
    engine = started_engine(replace(demo_config(tmp_path), policies_dir=policies), demo_clip)
    yield engine
    engine.stop()


def test_reload_swaps_in_a_changed_policy_and_encodes_only_new_text(
    reloadable: ModerationEngine,
) -> None:
    engine = reloadable
    before = engine.policies.version
    encoded = engine.metrics.text_embeddings_encoded._value.get()
    stars = engine.config.policies_dir / "stars.yaml"
    edit(stars, "  - an orange star\n", "  - an orange star\n  - a blue circle\n")
    status = asyncio.run(engine.reload())
    assert status.ok, status.message
    assert engine.policies.version != before
    assert engine.policies.policies[engine.policies.index_of("stars")].descriptions[-1] == (
        "a blue circle"
    )
    templates = 3
    assert engine.metrics.text_embeddings_encoded._value.get() == encoded + templates
    result = asyncio.run(engine.moderate([ImageInput("b", shape_png("blue", "circle"))]))
    assert result.results[0].decision is Decision.REVIEW
    assert result.policy_version == engine.policies.version
    assert engine.metrics.policy_reloads.labels(result="success")._value.get() == 2
    assert engine.metrics.policy_set_info.labels(version=engine.policies.version)._value.get() == 1


def test_a_broken_reload_keeps_the_running_set(reloadable: ModerationEngine) -> None:
    engine = reloadable
    before = engine.policies.version
    edit(engine.config.policies_dir / "red.yaml", "action: block", "action: obliterate")
    status = asyncio.run(engine.reload())
    assert not status.ok
    assert "red.yaml:3: key 'action'" in status.message
    assert before in status.message
    assert engine.last_reload == status
    assert engine.policies.version == before
    result = asyncio.run(engine.moderate([ImageInput("r", shape_png("red", "circle"))]))
    assert result.results[0].decision is Decision.BLOCK
    assert engine.metrics.policy_reloads.labels(result="error")._value.get() == 1


def test_a_reload_without_changes_changes_nothing(reloadable: ModerationEngine) -> None:
    before = reloadable.policies
    status = asyncio.run(reloadable.reload())
    assert status.ok
    assert "unchanged" in status.message
    assert reloadable.policies is before


def test_mode_switch_is_a_reload(reloadable: ModerationEngine) -> None:
    engine = reloadable
    image = [ImageInput("g", shape_png("green", "square"))]
    assert asyncio.run(engine.moderate(image)).results[0].decision is Decision.ALLOW
    edit(engine.config.policies_dir / "green_squares.yaml", "mode: shadow", "mode: enforce")
    assert asyncio.run(engine.reload()).ok
    assert asyncio.run(engine.moderate(image)).results[0].decision is Decision.BLOCK
    edit(engine.config.policies_dir / "green_squares.yaml", "mode: enforce", "mode: disabled")
    assert asyncio.run(engine.reload()).ok
    assert "green_squares" not in engine.policies.ids
    assert engine.policies.disabled == ("green_squares",)


def test_rescoring_equals_moderation_and_extra_requests_fail_fast(
    engine: ModerationEngine,
) -> None:
    live = asyncio.run(
        engine.moderate([ImageInput("red", shape_png("red", "circle"))], include_embeddings=True)
    )
    stored = embedded_image("red", live.results[0].embedding)
    metrics = engine.metrics
    scored_before = metrics.embeddings_scored.labels(result="scored")._value.get()
    rejected_before = metrics.rejected_requests.labels(reason="overload")._value.get()
    gate = threading.Event()

    async def scenario() -> list[ModerationResult]:
        assert engine.rescorer._pool is not None
        blocker = engine.rescorer._pool.submit(gate.wait, 30)  # hold the rescoring thread
        admitted = [
            asyncio.ensure_future(engine.score_embeddings([stored]))
            for _ in range(ServerConfig.max_rescore_requests)
        ]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="4 rescore_requests in flight"):
            await engine.score_embeddings([stored])
        admitted[0].cancel()  # a client gone while waiting frees its place
        await asyncio.sleep(0)
        extra = asyncio.ensure_future(engine.score_embeddings([stored]))
        gate.set()
        blocker.result(30)
        return await asyncio.gather(*admitted[1:], extra)

    try:
        results = asyncio.run(scenario())
    finally:
        gate.set()
    assert engine.budgets.rescore.held("rescore_requests") == 0
    live_scores = [p.score for p in live.results[0].policies]
    for result in results:
        assert result.results[0].decision == Decision.BLOCK
        assert [p.score for p in result.results[0].policies] == pytest.approx(live_scores, abs=1e-6)
    scored = metrics.embeddings_scored.labels(result="scored")._value.get() - scored_before
    assert scored == ServerConfig.max_rescore_requests
    assert metrics.rejected_requests.labels(reason="overload")._value.get() == rejected_before + 1


def test_score_embeddings_can_be_turned_off(demo_clip: ClipModel, tmp_path: Path) -> None:
    config = replace(demo_config(tmp_path), server=ServerConfig(max_rescore_requests=0))
    engine = started_engine(config, demo_clip)
    try:
        with pytest.raises(Disabled, match="--max-rescore-requests 0"):
            asyncio.run(engine.score_embeddings([embedded_image("x", [1.0])]))
    finally:
        engine.stop()


def test_gpu_decode_on_without_cuda_stops_the_start_with_the_reason(
    tmp_path: Path, demo_clip: ClipModel
) -> None:
    config = demo_config(tmp_path, decode=DecodeConfig(on_device=True))
    engine = ModerationEngine(config, Metrics(CollectorRegistry()), load_model=lambda _: demo_clip)
    with pytest.raises(ConfigError, match="--gpu-decode on needs a CUDA device with nvJPEG"):
        engine.start()
    engine.stop()

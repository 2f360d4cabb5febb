"""core/examples.py: example images embedded as live images are, cached on disk by content."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from moderator.config import ImageConfig
from moderator.core.clip import ClipModel
from moderator.core.embeddings import NORM_TOLERANCE, EmbeddingCache
from moderator.core.examples import (
    ExampleEmbedder,
    image_pipeline_key,
    packed,
    unpacked,
)
from moderator.core.known_content import ExampleImage
from moderator.core.policies import parse_policy_file
from moderator.core.views import decode_views
from moderator.errors import PolicyError
from tests.helpers import encode, replace_encoder, shape_png, textured_scene

LIMITS = ImageConfig()


class CountingDecode:
    """The service's decode (core.views), counting the images it is given."""

    def __init__(self, clip: ClipModel, limits: ImageConfig = LIMITS) -> None:
        self.clip = clip
        self.limits = limits
        self.calls = 0

    def __call__(self, data: bytes) -> torch.Tensor:
        self.calls += 1
        return torch.from_numpy(decode_views(data, self.limits, self.clip.preprocessing))


class CountingModel:
    """The demo model with its image encoder counting the images it encodes."""

    def __init__(self, clip: ClipModel) -> None:
        self.real = clip
        self.images = 0
        self.clip = replace_encoder(clip, self._encode)

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        self.images += int(pixels.shape[0])
        return self.real.encode_images(pixels)


@dataclasses.dataclass
class Embedding:
    """One embedder with its counters, on a cache folder."""

    model: CountingModel
    decode: CountingDecode
    embedder: ExampleEmbedder


def embedding(clip: ClipModel, cache_dir: Path | None, limits: ImageConfig = LIMITS) -> Embedding:
    model = CountingModel(clip)
    decode = CountingDecode(clip, limits)
    return Embedding(
        model, decode, ExampleEmbedder.for_model(model.clip, decode, cache_dir, limits)
    )


@pytest.fixture
def policies(tmp_path: Path) -> Path:
    directory = tmp_path / "policies"
    (directory / "known").mkdir(parents=True)
    return directory


def examples_of(policies: Path, files: dict[str, bytes]) -> tuple[ExampleImage, ...]:
    """The examples of a policy naming `files` (written under known/), as the policy read them."""
    for name, data in files.items():
        (policies / "known" / name).write_bytes(data)
    policy = policies / "p.yaml"
    policy.write_text("title: T\naction: block\nexamples: [known/]\n")
    return parse_policy_file(policy, policies).known.examples


# -- packed and unpacked ----------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1), (1, 64), (3, 8), (7, 512)])
def test_packed_and_unpacked_round_trip(shape: tuple[int, int]) -> None:
    views = torch.randn(*shape)
    vector = packed(views)
    assert vector.shape == (1 + shape[0] * shape[1],)
    assert vector[0].item() == shape[0]
    back = unpacked(vector)
    assert back is not None
    assert torch.equal(back, views)


@pytest.mark.parametrize(
    "values",
    [
        [],
        [1.0],  # a count and no values
        [0.0, 1.0, 2.0],  # no views
        [-2.0, 1.0, 2.0],
        [1.5, 1.0, 2.0],  # a fractional count
        [2.0, 1.0, 2.0, 3.0],  # values not a whole number of views
        [4.0, 1.0, 2.0],  # more views than values
    ],
)
def test_unpacked_refuses_a_vector_no_packed_made(values: list[float]) -> None:
    assert unpacked(torch.tensor(values, dtype=torch.float32)) is None


@pytest.mark.parametrize("count", [float("nan"), float("inf"), float("-inf")])
def test_unpacked_refuses_a_count_that_is_not_finite(count: float) -> None:
    assert unpacked(torch.tensor([count, 1.0, 2.0])) is None


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_unpacked_refuses_values_that_are_not_finite(value: float) -> None:
    assert unpacked(torch.tensor([2.0, 1.0, value, 3.0, 4.0])) is None
    assert unpacked(torch.tensor([2.0, 1.0, 0.5, 3.0, 4.0])) is not None  # finite: the views


# -- the pipeline key -------------------------------------------------------------------------


def test_the_pipeline_key_follows_what_changes_the_views(demo_clip: ClipModel) -> None:
    prep = demo_clip.preprocessing
    key = image_pipeline_key("fp32", prep, LIMITS)
    assert key == image_pipeline_key("fp32", prep, ImageConfig())
    assert len(key) == 16
    others = {
        image_pipeline_key("bf16", prep, LIMITS),
        image_pipeline_key("fp32", dataclasses.replace(prep, size=prep.size + 1), LIMITS),
        image_pipeline_key("fp32", dataclasses.replace(prep, fill=(0, 0, 0)), LIMITS),
        image_pipeline_key(
            "fp32", prep, dataclasses.replace(LIMITS, max_views=LIMITS.max_views - 1)
        ),
    }
    assert key not in others
    assert len(others) == 4


# -- embedding and caching --------------------------------------------------------------------


def test_an_example_is_embedded_as_a_live_image_is(demo_clip: ClipModel, policies: Path) -> None:
    data = shape_png("blue", "triangle")
    [example] = examples_of(policies, {"a.png": data})
    one = embedding(demo_clip, policies.parent / "cache")
    views = one.embedder(example)
    live = demo_clip.encode_images(CountingDecode(demo_clip)(data)).float().cpu()
    assert views.dtype == torch.float32
    assert views.shape == live.shape == (1, demo_clip.embed_dim)
    assert torch.allclose(views, live, atol=1e-5)
    assert torch.allclose(views.norm(dim=1), torch.ones(1), atol=1e-4)
    assert (one.decode.calls, one.model.images, one.embedder.embedded_total) == (1, 1, 1)


def test_every_view_of_an_example_is_kept(demo_clip: ClipModel, policies: Path) -> None:
    wide = encode(textured_scene(1, 900, 200))  # a panorama: several views
    [example] = examples_of(policies, {"wide.png": wide})
    one = embedding(demo_clip, None)
    views = one.embedder(example)
    expected = CountingDecode(demo_clip)(wide).shape[0]
    assert expected > 1
    assert views.shape == (expected, demo_clip.embed_dim)
    assert one.model.images == expected


def test_a_second_embedder_on_the_same_cache_encodes_nothing(
    demo_clip: ClipModel, policies: Path
) -> None:
    files = {"a.png": shape_png("blue", "triangle"), "b.png": shape_png("red", "star")}
    examples = examples_of(policies, files)
    cache = policies.parent / "cache"
    first = embedding(demo_clip, cache)
    embedded = [first.embedder(example) for example in examples]
    for example, views in zip(examples, embedded, strict=True):
        assert torch.equal(first.embedder(example), views)  # in memory
    assert (first.decode.calls, first.model.images, first.embedder.embedded_total) == (2, 2, 2)
    assert len(list(cache.glob("image-embeddings-*/*.f32"))) == 2

    second = embedding(demo_clip, cache)  # a restart: the same model, the same folder
    again = [second.embedder(example) for example in examples]
    assert (second.decode.calls, second.model.images, second.embedder.embedded_total) == (0, 0, 0)
    for before, after in zip(embedded, again, strict=True):
        assert torch.equal(before, after)


def test_the_cache_is_keyed_by_content_not_by_name(demo_clip: ClipModel, policies: Path) -> None:
    data = shape_png("green", "square")
    [example] = examples_of(policies, {"a.png": data})
    cache = policies.parent / "cache"
    embedding(demo_clip, cache).embedder(example)
    renamed = policies / "known" / "renamed.png"
    (policies / "known" / "a.png").rename(renamed)
    [moved] = examples_of(policies, {})
    assert moved.name == "known/renamed.png"
    assert moved.sha256 == example.sha256
    second = embedding(demo_clip, cache)
    second.embedder(moved)
    assert second.decode.calls == 0
    renamed.write_bytes(shape_png("green", "circle"))  # the same name, new bytes
    [changed] = examples_of(policies, {})
    second.embedder(changed)
    assert second.decode.calls == 1


def test_without_a_cache_folder_a_restart_embeds_again(
    demo_clip: ClipModel, policies: Path
) -> None:
    [example] = examples_of(policies, {"a.png": shape_png("blue", "circle")})
    embedding(demo_clip, None).embedder(example)
    second = embedding(demo_clip, None)
    second.embedder(example)
    assert second.embedder.embedded_total == 1


def test_other_image_limits_are_another_cache(demo_clip: ClipModel, policies: Path) -> None:
    [example] = examples_of(policies, {"a.png": shape_png("blue", "circle")})
    cache = policies.parent / "cache"
    embedding(demo_clip, cache).embedder(example)
    limits = dataclasses.replace(LIMITS, max_views=LIMITS.max_views - 1)
    other = embedding(demo_clip, cache, limits)
    other.embedder(example)
    assert other.embedder.embedded_total == 1
    assert len(list(cache.glob("image-embeddings-*"))) == 2


def example_cache(clip: ClipModel, cache: Path) -> EmbeddingCache:
    """The example cache of `clip` in the folder `cache`, as a new embedder opens it."""
    pipeline = image_pipeline_key(clip.info.precision, clip.preprocessing, LIMITS)
    return EmbeddingCache.for_images(cache, clip.info.weights_key, pipeline)


def forge(clip: ClipModel, cache: Path, digest: str, vector: torch.Tensor) -> None:
    """Write a verified entry for `digest` into the example cache of `clip`, as anyone able to
    write the folder can (the checksum has no secret)."""
    example_cache(clip, cache).lookup([digest], lambda _: vector.unsqueeze(0))


def stored(clip: ClipModel, cache: Path, digest: str) -> torch.Tensor:
    """The entry for `digest` on disk (read by a new cache: nothing from memory)."""

    def encode(_: list[str]) -> torch.Tensor:
        raise AssertionError("the entry should be on disk")

    return example_cache(clip, cache).lookup([digest], encode)[0]


def assert_encoded_again_and_written_back(
    clip: ClipModel, policies: Path, example: ExampleImage
) -> None:
    """An embedder on a cache whose entry for `example` is unusable: it encodes the example
    again, returns the new views, and writes them over the entry."""
    cache = policies.parent / "cache"
    one = embedding(clip, cache)
    views = one.embedder(example)
    fresh = embedding(clip, None).embedder(example)
    assert views.shape == (1, clip.embed_dim)
    assert torch.allclose(views, fresh, atol=1e-5)
    assert (one.decode.calls, one.model.images, one.embedder.embedded_total) == (1, 1, 1)
    assert torch.equal(stored(clip, cache, example.sha256), packed(views))
    again = embedding(clip, cache)  # a restart finds the good entry
    assert torch.equal(again.embedder(example), views)
    assert again.embedder.embedded_total == 0


def test_a_cached_entry_of_no_packed_shape_is_encoded_again(
    demo_clip: ClipModel, policies: Path
) -> None:
    [example] = examples_of(policies, {"a.png": shape_png("red", "circle")})
    cache = policies.parent / "cache"
    forge(demo_clip, cache, example.sha256, torch.tensor([0.0, 1.0, 2.0]))
    assert_encoded_again_and_written_back(demo_clip, policies, example)


def test_a_cached_entry_of_another_width_is_encoded_again(
    demo_clip: ClipModel, policies: Path
) -> None:
    """A verified entry of [3, 5] views would fail the set's index (or every image scored)."""
    [example] = examples_of(policies, {"a.png": shape_png("red", "circle")})
    cache = policies.parent / "cache"
    unit_views = torch.nn.functional.normalize(torch.ones(3, 5), dim=1)
    forge(demo_clip, cache, example.sha256, packed(unit_views))
    assert_encoded_again_and_written_back(demo_clip, policies, example)


@pytest.mark.parametrize("scale", [0.0, 0.5, 2.0, 1.01])
def test_a_cached_entry_that_is_not_normalised_is_encoded_again(
    demo_clip: ClipModel, policies: Path, scale: float
) -> None:
    """The right width, but no encoder made it: its similarities would not be cosines."""
    data = shape_png("red", "circle")
    [example] = examples_of(policies, {"a.png": data})
    cache = policies.parent / "cache"
    real = embedding(demo_clip, None).embedder(example)
    forge(demo_clip, cache, example.sha256, packed(real * scale))
    assert_encoded_again_and_written_back(demo_clip, policies, example)


def test_an_unusable_entry_is_removed_even_when_encoding_again_fails(
    demo_clip: ClipModel, policies: Path
) -> None:
    [example] = examples_of(policies, {"a.png": shape_png("red", "circle")})
    cache = policies.parent / "cache"
    forge(demo_clip, cache, example.sha256, packed(torch.ones(3, 5)))
    assert len(list(cache.glob("image-embeddings-*/*.f32"))) == 1
    (policies / "known" / "a.png").write_bytes(shape_png("red", "star"))
    with pytest.raises(PolicyError) as info:
        embedding(demo_clip, cache).embedder(example)
    assert info.value.problems == ["known/a.png: changed while the policies were loading"]
    assert not list(cache.glob("image-embeddings-*/*.f32"))  # forgotten on disk too


def test_a_cached_entry_within_the_norm_tolerance_is_used(
    demo_clip: ClipModel, policies: Path
) -> None:
    [example] = examples_of(policies, {"a.png": shape_png("red", "circle")})
    cache = policies.parent / "cache"
    near = embedding(demo_clip, None).embedder(example) * (1 + NORM_TOLERANCE / 2)
    forge(demo_clip, cache, example.sha256, packed(near))
    one = embedding(demo_clip, cache)
    assert torch.equal(one.embedder(example), near)
    assert one.embedder.embedded_total == 0


def test_the_same_bytes_under_two_names_are_embedded_once(
    demo_clip: ClipModel, policies: Path
) -> None:
    (policies / "known" / "a.png").write_bytes(shape_png("blue", "square"))
    os.symlink("a.png", policies / "known" / "alias.png")
    examples = examples_of(policies, {})
    assert [e.name for e in examples] == ["known/a.png", "known/alias.png"]
    one = embedding(demo_clip, policies.parent / "cache")
    first, second = (one.embedder(example) for example in examples)
    assert torch.equal(first, second)
    assert (one.decode.calls, one.model.images, one.embedder.embedded_total) == (1, 1, 1)


# -- examples that cannot be used -------------------------------------------------------------


def test_an_example_changed_after_the_policy_was_read_is_refused(
    demo_clip: ClipModel, policies: Path
) -> None:
    [example] = examples_of(policies, {"a.png": shape_png("blue", "star")})
    (policies / "known" / "a.png").write_bytes(shape_png("red", "star"))
    one = embedding(demo_clip, policies.parent / "cache")
    with pytest.raises(PolicyError) as info:
        one.embedder(example)
    assert info.value.problems == ["known/a.png: changed while the policies were loading"]
    assert (one.decode.calls, one.model.images) == (0, 0)


def test_an_example_removed_after_the_policy_was_read_is_refused(
    demo_clip: ClipModel, policies: Path
) -> None:
    [example] = examples_of(policies, {"a.png": shape_png("blue", "star")})
    (policies / "known" / "a.png").unlink()
    with pytest.raises(PolicyError) as info:
        embedding(demo_clip, None).embedder(example)
    assert info.value.problems == ["known/a.png: cannot read: No such file or directory"]


@pytest.fixture
def swapped_for_a_fifo(policies: Path) -> Iterator[tuple[ExampleImage, Path]]:
    """An example read as a file, then replaced by a FIFO. Cleanup opens its writing end once,
    which releases a reader stuck in open() should a regression block there."""
    [example] = examples_of(policies, {"a.png": shape_png("blue", "star")})
    path = policies / "known" / "a.png"
    path.unlink()
    os.mkfifo(path)
    yield example, path
    with contextlib.suppress(OSError):
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


@pytest.mark.timeout(20)
def test_an_example_swapped_for_a_fifo_is_refused_not_waited_for(
    demo_clip: ClipModel, swapped_for_a_fifo: tuple[ExampleImage, Path]
) -> None:
    example, _ = swapped_for_a_fifo
    with pytest.raises(PolicyError) as info:
        embedding(demo_clip, None).embedder(example)
    assert info.value.problems == ["known/a.png: is a FIFO, not a regular file"]


@pytest.mark.parametrize(
    "data",
    [b"not an image at all", shape_png("red", "square")[:60], b""],
    ids=["text", "truncated-png", "empty"],
)
def test_an_example_that_does_not_decode_is_refused_naming_it(
    demo_clip: ClipModel, policies: Path, data: bytes
) -> None:
    [example] = examples_of(policies, {"broken.png": data})
    cache = policies.parent / "cache"
    one = embedding(demo_clip, cache)
    with pytest.raises(PolicyError) as info:
        one.embedder(example)
    [problem] = info.value.problems
    assert problem.startswith("known/broken.png: example image cannot be used: ")
    assert one.model.images == 0
    assert one.embedder.embedded_total == 0
    assert not list(cache.glob("image-embeddings-*/*.f32"))  # nothing cached for it
    with pytest.raises(PolicyError):  # and it fails again, decoded again
        one.embedder(example)
    assert one.decode.calls == 2


def test_the_digest_is_of_the_bytes_read(demo_clip: ClipModel, policies: Path) -> None:
    data = shape_png("orange", "circle")
    [example] = examples_of(policies, {"a.png": data})
    assert example.sha256 == hashlib.sha256(data).hexdigest()
    forged = dataclasses.replace(example, sha256="0" * 64)
    with pytest.raises(PolicyError, match="changed while the policies were loading"):
        embedding(demo_clip, None).embedder(forged)

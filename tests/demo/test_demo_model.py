"""The bundled demo model and its synthetic images: small, loadable, and really zero-shot."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
import yaml
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image

from moderator.config import (
    DEMO_CHECKPOINT_PATH,
    DEMO_CONFIG_PATH,
    DEMO_MODEL_NAME,
    DEMO_POLICIES_DIR,
)
from moderator.core.views import Preprocessing, fit_to_square, to_chw_array
from moderator.demo.shapes import COLOURS, SHAPES, random_shape_image, render_shape

MAX_CHECKPOINT_BYTES = 10_000_000
HELD_OUT_SEED = 20_240_607
HELD_OUT_IMAGES = 120
CLASSES = [(colour, shape) for colour in COLOURS for shape in SHAPES]


def phrase(colour: str, shape: str) -> str:
    article = "an" if colour[0] in "aeiou" else "a"
    return f"{article} {colour} {shape}"


@pytest.fixture(scope="module")
def model() -> Any:
    open_clip.add_model_config(DEMO_CONFIG_PATH)
    return open_clip.create_model(DEMO_MODEL_NAME, pretrained=str(DEMO_CHECKPOINT_PATH)).eval()


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    open_clip.add_model_config(DEMO_CONFIG_PATH)
    return open_clip.get_tokenizer(DEMO_MODEL_NAME)


@pytest.fixture(scope="module")
def prep(model: Any) -> Preprocessing:
    size = model.visual.image_size
    red, green, blue = (round(255 * m) for m in OPENAI_DATASET_MEAN)
    return Preprocessing(size[0] if isinstance(size, tuple) else size, (red, green, blue))


@torch.no_grad()
def embed_images(model: Any, images: list[Image.Image], prep: Preprocessing) -> torch.Tensor:
    """The service's path: letterbox, uint8 CHW, CLIP mean/std, normalised image features."""
    arrays = [to_chw_array(fit_to_square(image, prep)) for image in images]
    pixels = torch.from_numpy(np.stack(arrays))
    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    features: torch.Tensor = model.encode_image((pixels.float() / 255 - mean) / std)
    return F.normalize(features, dim=-1)


@torch.no_grad()
def embed_texts(model: Any, tokenizer: Any, texts: list[str]) -> torch.Tensor:
    features: torch.Tensor = model.encode_text(tokenizer(texts))
    return F.normalize(features, dim=-1)


def test_checkpoint_is_at_most_10_mb() -> None:
    size = DEMO_CHECKPOINT_PATH.stat().st_size
    assert 1_000_000 < size <= MAX_CHECKPOINT_BYTES


def test_checkpoint_is_a_plain_fp16_state_dict() -> None:
    state = torch.load(DEMO_CHECKPOINT_PATH, map_location="cpu", weights_only=True)
    assert isinstance(state, dict)
    assert {tensor.dtype for tensor in state.values()} == {torch.float16}
    assert state["token_embedding.weight"].shape[0] == 49408  # the default open_clip tokenizer


def test_zero_shot_accuracy_on_held_out_images(
    model: Any, tokenizer: Any, prep: Preprocessing
) -> None:
    rng = random.Random(HELD_OUT_SEED)
    samples = [random_shape_image(rng) for _ in range(HELD_OUT_IMAGES)]
    images = embed_images(model, [image for image, _, _ in samples], prep)
    classes = embed_texts(model, tokenizer, [phrase(c, s) for c, s in CLASSES])
    predicted = (images @ classes.T).argmax(dim=1).tolist()
    expected = [CLASSES.index((colour, shape)) for _, colour, shape in samples]
    accuracy = sum(p == e for p, e in zip(predicted, expected, strict=True)) / len(expected)
    assert accuracy >= 0.90


def test_zero_shot_is_right_on_every_default_render(
    model: Any, tokenizer: Any, prep: Preprocessing
) -> None:
    images = embed_images(model, [render_shape(c, s) for c, s in CLASSES], prep)
    classes = embed_texts(model, tokenizer, [phrase(c, s) for c, s in CLASSES])
    predicted = (images @ classes.T).argmax(dim=1).tolist()
    assert [CLASSES[p] for p in predicted] == CLASSES


def policy_score(
    model: Any, tokenizer: Any, policy: dict[str, Any], images: torch.Tensor
) -> torch.Tensor:
    """The service's scoring: template-ensembled descriptions, best match minus best benign."""

    def ensembled(descriptions: list[str]) -> torch.Tensor:
        templates: list[str] = policy["templates"]
        prompts = [t.format(d) for d in descriptions for t in templates]
        features = embed_texts(model, tokenizer, prompts).view(
            len(descriptions), len(templates), -1
        )
        return F.normalize(features.mean(dim=1), dim=-1)

    scores = (images @ ensembled(policy["descriptions"]).T).max(dim=1).values
    if policy.get("benign"):
        scores = scores - (images @ ensembled(policy["benign"]).T).max(dim=1).values
    return scores


@pytest.mark.parametrize(
    ("policy_id", "violating"),
    [
        ("red", {(colour, shape) for colour, shape in CLASSES if colour == "red"}),
        ("stars", {(colour, shape) for colour, shape in CLASSES if shape == "star"}),
        ("green_squares", {("green", "square")}),
    ],
)
def test_demo_policy_thresholds_split_default_renders(
    model: Any,
    tokenizer: Any,
    prep: Preprocessing,
    policy_id: str,
    violating: set[tuple[str, str]],
) -> None:
    policy = yaml.safe_load(Path(DEMO_POLICIES_DIR / f"{policy_id}.yaml").read_text())
    images = embed_images(model, [render_shape(c, s) for c, s in CLASSES], prep)
    scores = policy_score(model, tokenizer, policy, images).tolist()
    flagged = {
        label for label, score in zip(CLASSES, scores, strict=True) if score >= policy["threshold"]
    }
    assert flagged == violating


def test_render_shape_is_deterministic() -> None:
    first = render_shape("purple", "star", 120, 90, scale=0.5, center=(0.4, 0.6), rotation=10)
    second = render_shape("purple", "star", 120, 90, scale=0.5, center=(0.4, 0.6), rotation=10)
    other = render_shape("purple", "star", 120, 90, scale=0.5, center=(0.4, 0.6), rotation=20)
    assert first.size == (120, 90)
    assert first.mode == "RGB"
    assert first.tobytes() == second.tobytes()
    assert first.tobytes() != other.tobytes()


@pytest.mark.parametrize(("colour", "shape"), CLASSES)
def test_render_shape_draws_the_requested_colour(colour: str, shape: str) -> None:
    background = (230, 240, 250)
    image = render_shape(colour, shape, 100, 80, background=background)
    assert image.getpixel((50, 40)) == COLOURS[colour]
    assert image.getpixel((1, 1)) == background
    assert image.getpixel((98, 78)) == background


def test_shapes_differ_in_outline() -> None:
    masks = [render_shape("blue", shape).convert("L").tobytes() for shape in SHAPES]
    assert len(set(masks)) == len(SHAPES)


def test_render_shape_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="colour"):
        render_shape("teal", "circle")
    with pytest.raises(ValueError, match="shape"):
        render_shape("red", "hexagon")


def test_random_shape_images_are_varied_and_reproducible() -> None:
    samples = [random_shape_image(random.Random(7)) for _ in range(2)]
    assert samples[0][0].tobytes() == samples[1][0].tobytes()
    assert samples[0][1:] == samples[1][1:]

    rng = random.Random(8)
    sizes, labels = set(), set()
    for _ in range(200):
        image, colour, shape = random_shape_image(rng)
        width, height = image.size
        assert 0.5 <= width / height <= 2.0
        assert min(width, height) >= 48
        assert max(width, height) <= 256
        assert (colour, shape) in CLASSES
        sizes.add(image.size)
        labels.add((colour, shape))
    assert len(labels) == len(CLASSES)
    assert len(sizes) > 100


def test_random_shape_stays_inside_the_canvas() -> None:
    rng = random.Random(9)
    for _ in range(50):
        image, _, _ = random_shape_image(rng)
        width, height = image.size
        background = image.getpixel((0, 0))
        border = (
            [image.getpixel((x, 0)) for x in range(width)]
            + [image.getpixel((x, height - 1)) for x in range(width)]
            + [image.getpixel((0, y)) for y in range(height)]
            + [image.getpixel((width - 1, y)) for y in range(height)]
        )
        assert all(pixel == background for pixel in border)

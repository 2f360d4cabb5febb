from __future__ import annotations

from dataclasses import replace

import open_clip
import pytest
import torch

from moderator.config import (
    DEMO_CHECKPOINT_PATH,
    DEMO_CONFIG_PATH,
    DEMO_MODEL_NAME,
    ImageConfig,
    ModelConfig,
    demo_model_config,
)
from moderator.core.clip import (
    ClipModel,
    PrecisionProbes,
    StagedPixels,
    assemble_on_device,
    copy_to_host,
    encode_text_trimmed,
    load_clip,
    resolve_device,
    resolve_precision,
)
from moderator.core.cpus import usable_cpus
from moderator.core.views import decode_views
from moderator.errors import ConfigError, ModelLoadError
from tests.helpers import shape_png

PROMPTS = [
    "a red circle",
    "a photo of an orange star that is slightly rotated.",
    "x",
    "a picture of a purple triangle.",
]


@pytest.fixture(scope="module")
def random_clip() -> ClipModel:
    torch.manual_seed(0)
    return load_clip(
        ModelConfig(
            name=DEMO_MODEL_NAME,
            pretrained=None,
            allow_random_weights=True,
            device="cpu",
            precision="fp32",
            config_path=DEMO_CONFIG_PATH,
        )
    )


def test_trimmed_text_encoding_equals_open_clip(random_clip: ClipModel) -> None:
    tokens = random_clip.tokenizer(PROMPTS)
    expected = random_clip.model.encode_text(tokens)
    with torch.inference_mode():
        trimmed = encode_text_trimmed(random_clip.model, tokens)
    assert trimmed.shape == expected.shape
    assert torch.allclose(trimmed, expected, atol=1e-5)


def test_encode_texts_is_normalised_and_order_preserving(random_clip: ClipModel) -> None:
    together = random_clip.encode_texts(PROMPTS)
    alone = torch.cat([random_clip.encode_texts([p]) for p in PROMPTS])
    assert torch.allclose(together.norm(dim=-1), torch.ones(len(PROMPTS)), atol=1e-5)
    assert torch.allclose(together, alone, atol=1e-5)


def test_encode_images_normalises_on_the_device(random_clip: ClipModel) -> None:
    size = random_clip.preprocessing.size
    pixels = torch.randint(0, 256, (3, 3, size, size), dtype=torch.uint8)
    embeddings = random_clip.encode_images(pixels)
    assert embeddings.shape == (3, random_clip.embed_dim)
    assert embeddings.dtype == torch.float32
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    reference = random_clip.model.encode_image((pixels.float() / 255 - mean) / std)
    reference = torch.nn.functional.normalize(reference, dim=-1)
    assert torch.allclose(embeddings, reference, atol=1e-5)


def test_preprocessing_comes_from_the_model(random_clip: ClipModel) -> None:
    assert random_clip.preprocessing.size == 64
    assert random_clip.preprocessing.fill == (123, 117, 104)  # CLIP's mean colour


def test_demo_model_info(demo_clip: ClipModel) -> None:
    assert demo_clip.info.model_id == f"{DEMO_MODEL_NAME}/{DEMO_MODEL_NAME}.pt"
    assert demo_clip.info.device == "cpu"
    assert demo_clip.info.precision == "fp32"
    assert demo_clip.info.weights_key is not None


def test_random_weights_need_an_explicit_flag() -> None:
    with pytest.raises(ConfigError, match="--allow-random-weights"):
        load_clip(ModelConfig(name="ViT-B-32", pretrained=None))


def test_missing_weights_fail_with_an_actionable_message(tmp_path: object) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_clip(ModelConfig(name="ViT-B-32", pretrained="/nonexistent/weights.pt", device="cpu"))
    message = str(info.value)
    assert "--pretrained PATH" in message
    assert "--demo" in message


def test_device_resolution() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    with pytest.raises(ConfigError):
        resolve_device("tpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda:0")


def probes(cpu_bf16: bool, cuda_bf16: bool) -> PrecisionProbes:
    return PrecisionProbes(cpu_bf16=lambda: cpu_bf16, cuda_bf16=lambda: cuda_bf16)


@pytest.mark.parametrize(
    ("device", "cpu_bf16", "cuda_bf16", "expected"),
    [
        ("cpu", True, False, torch.bfloat16),
        ("cpu", False, False, torch.float32),
        ("cuda", False, True, torch.bfloat16),
        ("cuda", False, False, torch.float16),
    ],
)
def test_auto_precision_follows_the_hardware(
    device: str, cpu_bf16: bool, cuda_bf16: bool, expected: torch.dtype
) -> None:
    chosen = resolve_precision("auto", torch.device(device), probes(cpu_bf16, cuda_bf16))
    assert chosen == expected


def test_explicit_precision_wins_and_typos_are_refused() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu, probes(True, True)) == torch.float32
    assert resolve_precision("bf16", cpu, probes(False, False)) == torch.bfloat16
    with pytest.raises(ConfigError, match="--precision"):
        resolve_precision("fp8", cpu)


def test_bf16_embeddings_stay_close_to_fp32(demo_clip: ClipModel) -> None:
    bf16 = load_clip(demo_model_config("cpu", "bf16"))
    assert bf16.info.precision == "bf16"
    assert bf16.model.visual.conv1.weight.dtype == torch.bfloat16
    images = torch.stack(
        [
            torch.from_numpy(decode_views(shape_png(c, s), ImageConfig(), demo_clip.preprocessing))[
                0
            ]
            for c in ("red", "blue", "yellow")
            for s in ("circle", "star")
        ]
    )
    image_cosine = (bf16.encode_images(images) * demo_clip.encode_images(images)).sum(-1)
    assert image_cosine.dtype == torch.float32
    assert float(image_cosine.min()) > 0.995


def test_the_image_tower_is_cast_as_open_clip_casts_a_bf16_model() -> None:
    ours = load_clip(demo_model_config("cpu", "bf16"))
    theirs = open_clip.create_model(
        DEMO_MODEL_NAME, pretrained=str(DEMO_CHECKPOINT_PATH), device="cpu", precision="bf16"
    ).eval()
    our_modules = [type(m) for m in ours.model.visual.modules()]
    assert our_modules == [type(m) for m in theirs.visual.modules()]
    our_state, their_state = ours.model.visual.state_dict(), theirs.visual.state_dict()
    assert our_state.keys() == their_state.keys()
    for name, tensor in our_state.items():
        assert tensor.dtype == their_state[name].dtype, name
        assert torch.equal(tensor, their_state[name]), name
    pixels = torch.rand(2, 3, ours.preprocessing.size, ours.preprocessing.size)
    with torch.inference_mode():
        expected = theirs.encode_image(pixels.to(torch.bfloat16))
        assert torch.equal(ours.model.encode_image(pixels.to(torch.bfloat16)), expected)


def test_text_is_embedded_in_fp32_at_every_precision_whatever_the_batch(
    demo_clip: ClipModel,
) -> None:
    bf16 = load_clip(demo_model_config("cpu", "bf16"))
    assert bf16.model.transformer.resblocks[0].mlp.c_fc.weight.dtype == torch.float32
    together = bf16.encode_texts(PROMPTS)
    one_by_one = torch.cat([bf16.encode_texts([prompt]) for prompt in PROMPTS])
    assert torch.allclose(together, one_by_one, atol=1e-6)
    assert torch.allclose(together, demo_clip.encode_texts(PROMPTS), atol=1e-6)


def test_staged_batches_encode_as_the_images_do(demo_clip: ClipModel) -> None:
    """The path the model pipeline takes (stage, encode, copy back) gives what one call does."""
    size = demo_clip.preprocessing.size
    images = [torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8) for n in (1, 2)]
    staged = demo_clip.stage_images(images)
    (embeddings,) = copy_to_host(demo_clip.encode_images(staged)).wait()
    assert torch.equal(embeddings, demo_clip.encode_images(torch.cat(images)))
    assert demo_clip.stage_images(images[:1]) is images[0]  # one image: nothing to gather


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_gpu_batches_are_staged_from_pinned_memory_on_a_copy_stream() -> None:
    clip = load_clip(demo_model_config("cuda"))
    assert clip.dtype in (torch.float16, torch.bfloat16)
    size = clip.preprocessing.size
    pixels = torch.randint(0, 256, (3, 3, size, size), dtype=torch.uint8)
    staged = clip.stage_images([pixels[:1], pixels[1:]])
    assert isinstance(staged, StagedPixels)
    assert staged.pixels.device.type == "cuda"
    assert staged.ready is not None
    on_host = copy_to_host(clip.encode_images(staged))
    (embeddings,) = on_host.wait()
    assert embeddings.is_pinned()  # a non-blocking copy back lands in page-locked memory
    cpu = load_clip(demo_model_config("cpu", "fp32"))
    cosine = (embeddings * cpu.encode_images(pixels)).sum(-1)
    assert float(cosine.min()) > 0.99


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device views need CUDA")
def test_views_decoded_on_the_gpu_are_staged_in_order_among_host_views() -> None:
    clip = load_clip(demo_model_config("cuda"))
    size = clip.preprocessing.size
    parts = [torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8) for n in (2, 1, 3, 1)]
    mixed = [part.cuda() if i % 2 else part for i, part in enumerate(parts)]  # host, device, ...
    staged = clip.stage_images(mixed)
    assert isinstance(staged, StagedPixels)
    assert staged.ready is not None
    staged.ready.synchronize()
    assert torch.equal(staged.pixels.cpu(), torch.cat(parts))
    only_device = assemble_on_device([p.cuda() for p in parts], clip.device)
    assert torch.equal(only_device.cpu(), torch.cat(parts))


def test_torch_threads_follow_the_cpus_this_process_may_use_unless_set() -> None:
    before = torch.get_num_threads()
    try:
        load_clip(demo_model_config("cpu", "fp32"))
        assert torch.get_num_threads() == usable_cpus()
        load_clip(replace(demo_model_config("cpu", "fp32"), threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)

"""--gpu-decode through the real server: plain JPEGs decoded by the device decoder, everything
else by the decode workers, with the same decisions as a server that decodes all on the CPU.

There is no GPU here: the device decoder runs on the CPU (torchvision's libjpeg-turbo), the same
code that runs nvJPEG on CUDA. Only the selection (CUDA and nvJPEG present) is forced; it has
its own tests in tests/serving/test_device_decode.py.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import grpc
import pytest
from moderator_client.v1 import moderator_pb2 as pb
from moderator_client.v1 import moderator_pb2_grpc as pb_grpc
from PIL import Image

from moderator.core.clip import ClipModel
from moderator.demo.shapes import render_shape
from moderator.serving import decoding
from tests.helpers import RunningService, demo_config, shape_png, start_service

# What two decoders may move a score on the demo model: measured up to 0.013 on these images
# (the CPU path resamples after libjpeg's draft scaling, the device resizes once).
SCORE_TOLERANCE = 0.02


def jpeg(image: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=92, **options)
    return buffer.getvalue()


def rotated_with_exif(colour: str, shape: str) -> bytes:
    """A photo stored sideways with EXIF orientation 6, as phones write them."""
    exif = Image.Exif()
    exif[0x0112] = 6
    upright = render_shape(colour, shape, 480, 360)
    return jpeg(upright.transpose(Image.Transpose.ROTATE_90), exif=exif)


ON_DEVICE = {
    "red-circle": jpeg(render_shape("red", "circle")),
    "green-square-wide": jpeg(render_shape("green", "square", 300, 200)),
    "yellow-star-big": jpeg(render_shape("yellow", "star", 1200, 900)),
    "blue-triangle-grey": jpeg(render_shape("blue", "triangle").convert("L")),
    "red-star-sideways": rotated_with_exif("red", "star"),
}
ON_CPU = {
    "png": shape_png("green", "circle"),
    "progressive": jpeg(render_shape("red", "square"), progressive=True),
    "long": jpeg(render_shape("purple", "star", 900, 150)),  # tiles: several views
    "truncated": jpeg(render_shape("red", "circle"))[:600],
}


def never_on_device(_wanted: bool | None, _device: object) -> bool:
    return False


def always_on_device(_wanted: bool | None, _device: object) -> bool:
    return True


def serve(
    choose: object, demo_clip: ClipModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningService]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(decoding, "decode_on_device", choose)
        yield from start_service(
            demo_config(tmp_path_factory.mktemp("decode")), lambda _config: demo_clip
        )


@pytest.fixture(scope="module")
def on_cpu(
    demo_clip: ClipModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningService]:
    yield from serve(never_on_device, demo_clip, tmp_path_factory)


@pytest.fixture(scope="module")
def on_device(
    demo_clip: ClipModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningService]:
    yield from serve(always_on_device, demo_clip, tmp_path_factory)


def moderate(running: RunningService, images: dict[str, bytes]) -> dict[str, pb.ImageResult]:
    request = pb.ModerateRequest(images=[pb.Image(id=k, data=v) for k, v in images.items()])
    with grpc.insecure_channel(running.address) as channel:
        answer = pb_grpc.ModeratorStub(channel).Moderate(request, timeout=60)
    return {result.id: result for result in answer.results}


def decoded(running: RunningService, path: str) -> float:
    value = running.service.registry.get_sample_value(
        "moderator_device_decodes_total", {"path": path}
    )
    return value or 0.0


def test_plain_jpegs_are_decoded_on_the_device_and_scored_as_on_the_cpu(
    on_cpu: RunningService, on_device: RunningService
) -> None:
    images = {**ON_DEVICE, **ON_CPU}
    before = decoded(on_device, "device"), decoded(on_device, "cpu")
    expected, actual = moderate(on_cpu, images), moderate(on_device, images)
    after = decoded(on_device, "device"), decoded(on_device, "cpu")
    assert (after[0] - before[0], after[1] - before[1]) == (len(ON_DEVICE), len(ON_CPU))
    assert decoded(on_cpu, "device") == decoded(on_cpu, "cpu") == 0  # never offered
    for name in images:
        want, got = expected[name], actual[name]
        assert got.decision == want.decision, name
        assert got.error.code == want.error.code, name
        for a, b in zip(want.policies, got.policies, strict=True):
            assert a.policy_id == b.policy_id
            assert abs(a.score - b.score) <= SCORE_TOLERANCE, (name, a.policy_id)
            assert a.violated == b.violated, (name, a.policy_id)
    assert actual["red-circle"].decision == pb.DECISION_BLOCK
    assert actual["red-star-sideways"].decision == pb.DECISION_BLOCK
    assert actual["truncated"].error.code == pb.IMAGE_ERROR_CODE_CORRUPT


def test_a_batch_mixing_device_and_cpu_views_keeps_each_image_its_own_result(
    on_device: RunningService,
) -> None:
    alone = {name: moderate(on_device, {name: data})[name] for name, data in ON_DEVICE.items()}
    mixed = moderate(on_device, {**ON_CPU, **ON_DEVICE})
    for name, result in alone.items():
        assert [p.score for p in mixed[name].policies] == pytest.approx(
            [p.score for p in result.policies], abs=1e-5
        )

"""The device decode path, run on the CPU device: selection, eligibility, fidelity to the CPU
path, batching and shutdown. Nothing here runs nvJPEG: no test claims GPU behaviour."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms, ImageDraw
from torchvision.io import decode_jpeg

from moderator.config import ImageConfig
from moderator.core.jpeg_header import JpegHeader, read_jpeg_header
from moderator.core.pdq import distances, hash_rows, pdq_bytes
from moderator.core.views import (
    Preprocessing,
    apply_orientation,
    decode_image,
    decode_views,
    fit_to_square,
)
from moderator.errors import ConfigError
from moderator.serving import device_decode
from moderator.serving.device_decode import (
    DecodedPixels,
    DeviceDecoder,
    decode_on_device,
    device_eligible,
    fit_square,
    nvjpeg_works,
    orient,
)
from tests.helpers import encode, textured_scene

# torchvision 0.29 deprecates its image codecs; the module under test silences it, pytest not.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")

PREP = Preprocessing(size=224, fill=(123, 117, 104))
LIMITS = ImageConfig()
CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a cuda device object needs no GPU
# Mean absolute difference from decode_views, in grey levels, measured while writing this: at
# most 0.61 (640x480 and 1000x700 scenes; 0.00 at 224x224, 0.13-0.19 for the small ones, 0.17 at
# 4000x3000 where Pillow decodes at 1/8 scale). The tolerance leaves room for other libjpeg builds.
MEAN_TOLERANCE = 1.0


def scene(width: int, height: int, mode: str = "RGB") -> Image.Image:
    """Shapes and noise: edges and texture, like a photo, unlike a flat test card."""
    rng = np.random.default_rng(width * 7919 + height)
    image = Image.new("RGB", (width, height), (200, 180, 160))
    draw = ImageDraw.Draw(image)
    for _ in range(30):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        size = int(rng.integers(4, max(5, max(width, height) // 3)))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.ellipse((x, y, x + size, y + size // 2 + 1), fill=colour)
    noisy = Image.blend(image, Image.effect_noise((width, height), 30).convert("RGB"), 0.15)
    return noisy.convert(mode)


def jpeg(image: Image.Image, **save_args: object) -> bytes:
    return encode(image, "JPEG", quality=90, **save_args)


def oriented(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg(image, exif=exif)


def eligible(data: bytes, limits: ImageConfig = LIMITS, max_pixels: int = 16_000_000) -> bool:
    return device_eligible(data, read_jpeg_header(data), limits, max_pixels)


def decoder(**bounds: int) -> DeviceDecoder:
    return DeviceDecoder(CPU, PREP, LIMITS, **bounds)


def as_array(view: torch.Tensor | None) -> np.ndarray:
    assert view is not None
    assert view.shape == (1, 3, PREP.size, PREP.size)
    assert view.dtype == torch.uint8
    assert view.is_contiguous()
    return view[0].numpy()


# -- selection ---------------------------------------------------------------------------------


def never(_device: torch.device) -> bool:
    raise AssertionError("nvJPEG must not be probed here")


@pytest.mark.parametrize(
    ("mode", "device", "works", "expected"),
    [
        (False, CPU, never, False),
        (False, CUDA, never, False),
        (None, CPU, never, False),
        (None, CUDA, lambda _d: True, True),
        (None, CUDA, lambda _d: False, False),
        (True, CUDA, lambda _d: True, True),
    ],
)
def test_gpu_decode_mode_selects_the_device_path(
    mode: bool | None, device: torch.device, works: object, expected: bool
) -> None:
    assert decode_on_device(mode, device, works) is expected  # type: ignore[arg-type]


def test_gpu_decode_on_refuses_what_cannot_work() -> None:
    with pytest.raises(ConfigError, match=r"needs a CUDA device with nvJPEG; device is cpu$"):
        decode_on_device(True, CPU, never)
    with pytest.raises(ConfigError, match=r"device is cuda \(nvJPEG failed"):
        decode_on_device(True, CUDA, lambda _d: False)


def test_the_probe_decodes_on_the_cpu_and_never_raises() -> None:
    assert nvjpeg_works(CPU)  # torchvision's own decoder: the probe's image round-trips
    if not torch.cuda.is_available():
        assert not nvjpeg_works(CUDA)  # no GPU here: False, not an exception


# -- eligibility -------------------------------------------------------------------------------


def test_plain_baseline_rgb_and_grey_jpegs_are_eligible() -> None:
    assert eligible(jpeg(scene(300, 200)))
    assert eligible(jpeg(scene(200, 300, "L")))
    assert eligible(oriented(scene(300, 200), 6))
    assert eligible(jpeg(scene(400, 200)))  # aspect ratio 2: still one view


def test_what_the_device_would_not_reproduce_goes_to_the_cpu() -> None:
    photo = scene(300, 200)
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    cases = {
        "progressive": jpeg(photo, progressive=True),
        "icc profile": jpeg(photo, icc_profile=srgb),
        "cmyk": jpeg(photo.convert("CMYK")),
        "png": encode(photo),
        "garbage": b"\xff\xd8\xff" + bytes(500),
        "tiles (aspect ratio 3)": jpeg(scene(600, 200)),
        "rgb-coded (component ids R, G, B)": rgb_component_ids(jpeg(photo)),
        "untrusted exif": jpeg(photo, exif=b"Exif\x00\x00XX*\x00\x08\x00\x00\x00"),
        # 4 bytes a pixel and a megabyte more: stuffing the decoding thread would have to walk
        "padded": jpeg(photo)[:-2] + b"\xff\x00" * (2 * 300 * 200 + 2**20) + b"\xff\xd9",
    }
    for name, data in cases.items():
        assert not eligible(data), name


def test_the_limits_of_both_paths_apply() -> None:
    data = jpeg(scene(300, 200))
    assert not eligible(data, max_pixels=300 * 200 - 1)  # the decoder's own bound
    assert not eligible(data, ImageConfig(max_pixels=300 * 200 - 1))
    assert not eligible(data, ImageConfig(max_bytes=len(data) - 1))
    assert not eligible(data, ImageConfig(formats=frozenset({"PNG"})))
    assert eligible(data, ImageConfig(max_pixels=300 * 200, max_bytes=len(data)))
    two_scans = data[:-2] + b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00" + b"\x55" * 8 + data[-2:]
    assert not eligible(two_scans, ImageConfig(max_jpeg_scans=1))
    assert eligible(two_scans, ImageConfig(max_jpeg_scans=2))


def rgb_component_ids(data: bytes) -> bytes:
    """The file with its three components named R, G and B (libjpeg then reads RGB, no YCbCr)."""
    start = data.index(b"\xff\xc0") + 10
    patched = bytearray(data)
    for i, name in enumerate(b"RGB"):
        patched[start + 3 * i] = name
    return bytes(patched)


# -- what the model is shown -------------------------------------------------------------------


def test_orientation_matches_pillow_transposes() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (3, 5, 7), dtype=np.uint8)
    image = Image.fromarray(pixels.transpose(1, 2, 0))
    for orientation in range(1, 9):
        expected = np.asarray(apply_orientation(image, orientation)).transpose(2, 0, 1)
        assert np.array_equal(orient(torch.from_numpy(pixels), orientation).numpy(), expected)


@pytest.mark.parametrize(("width", "height"), [(64, 48), (300, 200), (640, 480), (50, 400)])
def test_resize_and_letterbox_match_fit_to_square(width: int, height: int) -> None:
    """Same pixels in, so only the resampling differs: measured mean 0.02-0.18 grey levels."""
    image = scene(width, height)
    expected = np.asarray(fit_to_square(image, PREP)).transpose(2, 0, 1)
    pixels = torch.from_numpy(np.asarray(image).transpose(2, 0, 1).copy())
    actual = as_array(fit_square(pixels, PREP))
    assert np.abs(actual.astype(int) - expected).mean() <= 0.5
    assert np.array_equal(actual[:, 0, 0], PREP.fill)  # a corner is in the letterbox bars
    assert np.array_equal(expected[:, 0, 0], PREP.fill)


@pytest.mark.parametrize(
    ("width", "height", "orientation", "mode"),
    [
        (64, 48, 1, "RGB"),  # upscaled
        (224, 224, 1, "RGB"),  # no resize at all
        (300, 200, 1, "L"),  # grey, decoded as RGB
        (200, 300, 1, "RGB"),  # portrait: bars left and right
        (640, 480, 6, "RGB"),  # EXIF says turn it: shown 480 x 640
        (1000, 700, 3, "RGB"),  # Pillow decodes at 1/4 scale (draft), the device at full
    ],
)
def test_the_device_path_shows_what_the_cpu_path_shows(
    width: int, height: int, orientation: int, mode: str
) -> None:
    data = oriented(scene(width, height, mode), orientation)
    expected = decode_views(data, LIMITS, PREP)
    assert expected.shape[0] == 1
    decoded = decoder().decode_batch([data])[0]
    actual = as_array(None if decoded is None else decoded.pixels)
    assert actual.shape == expected[0].shape
    assert np.abs(actual.astype(int) - expected[0]).mean() <= MEAN_TOLERANCE
    shown_width, shown_height = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    if shown_width != shown_height:  # the letterbox bars are the fill colour, exactly
        edge = (slice(None), 0) if shown_width > shown_height else (slice(None), slice(None), 0)
        assert (actual[edge] == np.array(PREP.fill).reshape(3, 1)).all()
        assert np.array_equal(actual[edge], expected[0][edge])


# -- batching ----------------------------------------------------------------------------------


def test_a_batch_decodes_the_good_files_and_returns_none_for_the_rest() -> None:
    good = [jpeg(scene(120, 90)), jpeg(scene(90, 120, "L")), oriented(scene(100, 80), 8)]
    truncated = good[0][: len(good[0]) // 2]
    garbage = b"\xff\xd8" + bytes(range(256)) * 4
    batch = [good[0], truncated, good[1], garbage, encode(scene(50, 50)), good[2]]
    results = decoder().decode_batch(batch)
    assert [r is not None for r in results] == [True, False, True, False, False, True]
    for data, result in zip(good, [results[0], results[2], results[5]], strict=True):
        alone = decoder().decode_batch([data])[0]
        assert alone is not None
        assert result is not None
        assert torch.equal(result.pixels, alone.pixels)  # neighbours did not change the result


def test_a_failed_batched_call_is_retried_one_file_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[int] = []

    def counting(input: torch.Tensor | list[torch.Tensor], **kwargs: object) -> object:
        calls.append(len(input) if isinstance(input, list) else 1)
        return decode_jpeg(input, **kwargs)

    monkeypatch.setattr(device_decode, "decode_jpeg", counting)
    good = jpeg(scene(120, 90))
    truncated = good[: len(good) - 200]  # the header is whole: eligible, but cannot decode
    results = decoder().decode_batch([good, truncated, good])
    assert calls == [3, 1, 1, 1]
    assert [r is not None for r in results] == [True, False, True]


def test_a_decoded_size_other_than_the_header_says_goes_to_the_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def wrong_size(input: list[torch.Tensor], **_kwargs: object) -> list[torch.Tensor]:
        return [torch.zeros((3, 10, 10), dtype=torch.uint8) for _ in input]

    monkeypatch.setattr(device_decode, "decode_jpeg", wrong_size)
    assert decoder().decode_batch([jpeg(scene(120, 90))]) == [None]


class Gate:
    """Holds the decoder's thread in decode_read until opened; records each batch's size."""

    def __init__(self, decoder: DeviceDecoder) -> None:
        self.open = threading.Event()
        self.sizes: list[int] = []
        self._decode_read = decoder.decode_read
        decoder.decode_read = self  # type: ignore[method-assign]

    def __call__(self, items: list[tuple[bytes, JpegHeader | None]]) -> list[DecodedPixels | None]:
        self.sizes.append(len(items))
        assert self.open.wait(30), "the test never opened the gate"
        return self._decode_read(items)


def test_concurrent_decodes_from_an_event_loop_are_batched() -> None:
    files = [jpeg(scene(80 + 10 * i, 60)) for i in range(5)] + [b"\xff\xd8 not a jpeg"]
    expected = decoder().decode_batch(files)
    subject = decoder(max_batch_images=3)
    gate = Gate(subject)
    subject.start()

    async def run() -> list[DecodedPixels | None]:
        tasks = [asyncio.create_task(subject.decode(data)) for data in files]
        await asyncio.sleep(0.05)  # every task has queued its file; the thread holds the first
        gate.open.set()
        return await asyncio.gather(*tasks)

    try:
        results = asyncio.run(run())
    finally:
        subject.stop()
    assert sum(gate.sizes) == 5  # the file with no JPEG header never reached the thread
    assert max(gate.sizes) <= 3
    assert len(gate.sizes) <= 3  # 1 then 3 then 1 at most: never one by one
    for result, alone in zip(results, expected, strict=True):
        assert (result is None) == (alone is None)
        if result is not None and alone is not None:
            assert torch.equal(result.pixels, alone.pixels)


def test_the_pixel_bound_splits_batches() -> None:
    files = [jpeg(scene(100, 100)) for _ in range(4)]
    subject = decoder(max_batch_pixels=25_000)  # two 100 x 100 images at most
    gate = Gate(subject)
    gate.open.set()
    subject.start()

    async def run() -> list[DecodedPixels | None]:
        return await asyncio.gather(*(subject.decode(data) for data in files))

    try:
        assert all(result is not None for result in asyncio.run(run()))
    finally:
        subject.stop()
    assert max(gate.sizes) <= 2


def test_stop_with_work_pending_resolves_it_with_none_and_does_not_hang() -> None:
    subject = decoder()
    gate = Gate(subject)  # never opened before stop(): the thread is stuck mid-batch
    subject.start()

    async def run() -> tuple[list[DecodedPixels | None], float]:
        tasks = [asyncio.create_task(subject.decode(jpeg(scene(64, 64)))) for _ in range(4)]
        await asyncio.sleep(0.05)
        started = time.monotonic()
        subject.stop(timeout=0.2)
        results = await asyncio.wait_for(asyncio.gather(*tasks), 5)
        return results, time.monotonic() - started

    results, took = asyncio.run(run())
    gate.open.set()  # let the stuck batch finish: its late results go nowhere
    assert results == [None] * 4
    assert took < 2


def test_decode_before_start_or_after_stop_is_none_and_a_cancelled_caller_is_harmless() -> None:
    subject = decoder()
    data = jpeg(scene(64, 64))
    assert asyncio.run(subject.decode(data)) is None  # not started
    gate = Gate(subject)
    subject.start()

    async def run() -> DecodedPixels | None:
        cancelled = asyncio.create_task(subject.decode(data))
        kept = asyncio.create_task(subject.decode(data))
        await asyncio.sleep(0.05)
        cancelled.cancel()
        gate.open.set()
        return await kept

    try:
        assert asyncio.run(run()) is not None
    finally:
        subject.stop()
    assert asyncio.run(subject.decode(data)) is None  # stopped


@pytest.mark.parametrize(("width", "height"), [(640, 480), (1400, 1000), (500, 900)])
def test_the_device_path_hashes_what_the_cpu_path_hashes(width: int, height: int) -> None:
    data = jpeg(textured_scene(3, width, height))
    decoded = decoder().decode_batch([data])[0]
    assert decoded is not None
    on_cpu = decode_image(data, LIMITS, PREP).pdq
    distance = distances(hash_rows([pdq_bytes(on_cpu.hex)]), pdq_bytes(decoded.pdq.hex))[0]
    assert distance <= 16  # two decoders, two box filters: a few bits, far under 31
    assert decoded.pdq.quality == on_cpu.quality

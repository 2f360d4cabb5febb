"""Decoding JPEGs on the model's device: nvJPEG through torchvision on CUDA (--gpu-decode).

For the plain baseline JPEGs that make one view (most traffic) the device does what the CPU path
(core/views.py) does, and the pixels never cross to the host and back. Files it cannot reproduce
faithfully (device_eligible), and any it fails on, get None: "use the CPU path". One background
thread decodes all that is queued in one batched call; on a CPU device the same code runs on
torchvision's libjpeg-turbo (how it is tested). On CUDA the work runs on a stream of its own,
synchronized before the tensors are handed over; their memory belongs to that stream, so each is
recorded on the default stream, where the engine reads it (a consumer on another stream calls
tensor.record_stream(its_stream) itself), and the allocator cannot reuse it while still read.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

from moderator.config import ImageConfig
from moderator.core.jpeg_header import JpegHeader, read_jpeg_header
from moderator.core.pdq import PDQ_MAX_SIDE, Pdq, pdq_of_array
from moderator.core.structure import count_jpeg_scans
from moderator.core.views import Preprocessing
from moderator.errors import ConfigError

log = logging.getLogger(__name__)

# torchvision 0.29 deprecates its image codecs (for TorchCodec) and warns on every call.
warnings.filterwarnings("ignore", "The image decoding and encoding .*", DeprecationWarning)

# A baseline JPEG at quality 100 without chroma subsampling is under 3 bytes per pixel; the
# application segments (EXIF thumbnail, ICC, XMP) add up to about a megabyte in practice.
MAX_BYTES_PER_PIXEL = 4
MAX_HEADER_BYTES = 1024 * 1024
_SEQUENTIAL_HUFFMAN = frozenset({0xC0, 0xC1})  # SOF0 baseline, SOF1 extended sequential
_RGB_COMPONENT_IDS = (82, 71, 66)  # 'R', 'G', 'B': libjpeg reads such a file as RGB, not YCbCr
# EXIF orientation -> Pillow's transpose (views.apply_orientation) on [C, H, W]: t = transpose
# H and W, then flip h = H, w = W. 2..8: FLIP_LEFT_RIGHT ... ROTATE_90, in Pillow's order.
_TURNS = {2: "w", 3: "hw", 4: "h", 5: "t", 6: "tw", 7: "thw", 8: "th"}


def nvjpeg_works(device: torch.device) -> bool:
    """Whether torchvision decodes a JPEG on `device` (built with nvJPEG, which loads and runs
    there): a tiny image is decoded and its pixels checked; any failure is False."""
    try:
        grey = torch.full((3, 16, 16), 128, dtype=torch.uint8)
        image = decode_jpeg(encode_jpeg(grey), mode=ImageReadMode.RGB, device=device)
        mean = float(image.float().mean())  # waits for the device
        return tuple(image.shape) == (3, 16, 16) and abs(mean - 128) < 4
    except Exception:
        log.debug("no JPEG decoding on %s", device, exc_info=True)
        return False


def decode_on_device(
    wanted: bool | None,
    device: torch.device,
    nvjpeg: Callable[[torch.device], bool] = nvjpeg_works,
) -> bool:
    """Settle --gpu-decode: off (False) never; auto (None) on a CUDA device where nvJPEG works;
    on (True) the same, but a ConfigError where it cannot (a flag asked for explicitly must not
    be ignored)."""
    usable = wanted is not False and device.type == "cuda" and nvjpeg(device)
    if wanted is True and not usable:
        why = " (nvJPEG failed to decode a test image there)" if device.type == "cuda" else ""
        need = "--gpu-decode on needs a CUDA device with nvJPEG"
        raise ConfigError(f"{need}; device is {device}{why}")
    return usable


def device_eligible(
    data: bytes, header: JpegHeader | None, limits: ImageConfig, max_pixels: int
) -> bool:
    """Whether the device path shows the model what the CPU path would, within the same limits:
    header_eligible, then the scan count (it walks the whole file)."""
    return (
        header is not None
        and header_eligible(header, len(data), limits, max_pixels)
        and count_jpeg_scans(data, limits.max_jpeg_scans) <= limits.max_jpeg_scans
    )


def header_eligible(header: JpegHeader, size: int, limits: ImageConfig, max_pixels: int) -> bool:
    """What the header alone tells: a plain sequential 8-bit JPEG of one view, within the
    limits, and no bigger in bytes than such an image can be (a file padded with megabytes of
    stuffing would cost the decoding thread for nothing)."""
    if "JPEG" not in limits.formats:
        return False
    if header.has_mpf and "MPO" not in limits.formats:
        return False  # Pillow opens it as MPO, which the CPU path would refuse
    width, height = header.width, header.height
    pixels = width * height
    return (
        0 < size <= min(limits.max_bytes, MAX_BYTES_PER_PIXEL * pixels + MAX_HEADER_BYTES)
        and header.frame_marker in _SEQUENTIAL_HUFFMAN
        and header.precision == 8
        and header.orientation_trusted
        and _plain_colour(header)
        and pixels <= min(limits.max_pixels, max_pixels)
        and max(width, height) / min(width, height) <= limits.tile_aspect_ratio  # one view
    )


def _plain_colour(header: JpegHeader) -> bool:
    """Grey, or YCbCr that libjpeg and nvJPEG turn into the same RGB: no ICC profile, no Adobe
    transform but YCbCr (0 is RGB, 2 is YCCK), and not RGB-coded by its component ids."""
    ycbcr = header.adobe_transform in (None, 1) and header.component_ids != _RGB_COMPONENT_IDS
    colour = header.components == 3 and ycbcr
    return not header.has_icc_profile and (header.components == 1 or colour)


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """[C, H, W] turned as views.apply_orientation turns a Pillow image."""
    turn = _TURNS.get(orientation, "")
    image = image.transpose(-2, -1) if "t" in turn else image
    flips = [dim for axis, dim in (("h", -2), ("w", -1)) if axis in turn]
    return image.flip(flips) if flips else image


def fit_square(image: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """uint8 [3, H, W] -> [1, 3, S, S] as views.fit_to_square: the longer side resized to S
    (bicubic, antialiased as Pillow's), the shorter padded with prep.fill at the same offsets."""
    size = prep.size
    _, height, width = image.shape
    scale = size / max(width, height)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    batch = image.unsqueeze(0)
    if (new_w, new_h) != (width, height):
        resized = F.interpolate(batch.float(), (new_h, new_w), mode="bicubic", antialias=True)
        batch = resized.round_().clamp_(0, 255).to(torch.uint8)
    if (new_w, new_h) == (size, size):
        return batch.contiguous()
    canvas = torch.empty((1, 3, size, size), dtype=torch.uint8, device=image.device)
    for channel, value in enumerate(prep.fill):
        canvas[0, channel].fill_(value)  # no host-to-device copy of the colour
    left, top = (size - new_w) // 2, (size - new_h) // 2
    canvas[:, :, top : top + new_h, left : left + new_w] = batch
    return canvas


@dataclass(frozen=True)
class DecodedPixels:
    """An image's views as the model takes them (uint8 [V, 3, S, S], on the host or the
    device) and its PDQ hash."""

    pixels: torch.Tensor
    pdq: Pdq


def pdq_on_host(image: torch.Tensor) -> Pdq:
    """PDQ of uint8 [3, H, W] on any device as core.pdq.pdq_of computes it: a copy at most
    PDQ_MAX_SIDE on its long side (a box filter, where the image is), hashed on the host."""
    _, height, width = image.shape
    scale = PDQ_MAX_SIDE / max(width, height)
    if scale < 1:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        small = F.interpolate(image.unsqueeze(0).float(), size, mode="area")  # a box filter
        image = small[0].round_().clamp_(0, 255).to(torch.uint8)
    return pdq_of_array(image.permute(1, 2, 0).cpu().numpy())


@dataclass
class _Pending:
    data: bytes
    header: JpegHeader  # read once, on the caller's side
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[DecodedPixels | None]

    @property
    def pixels(self) -> int:
        return self.header.width * self.header.height

    def settle(self, value: DecodedPixels | None) -> None:
        """Resolve the future on its loop (unless resolved or cancelled meanwhile)."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            self.loop.call_soon_threadsafe(_resolve, self.future, value)


def _resolve(future: asyncio.Future[DecodedPixels | None], value: DecodedPixels | None) -> None:
    if not future.done():
        future.set_result(value)


class DeviceDecoder:
    """Decodes eligible JPEGs in batches on one thread; None means "CPU path". Started once and
    stopped once: stop() resolves all pending decodes with None and waits `timeout` at most."""

    def __init__(
        self,
        device: torch.device,
        prep: Preprocessing,
        limits: ImageConfig,
        *,
        max_batch_images: int = 32,
        max_batch_pixels: int = 64_000_000,
        max_image_pixels: int = 16_000_000,
    ) -> None:
        self.device, self.prep, self.limits = device, prep, limits
        self.max_batch_images = max(1, max_batch_images)
        self.max_batch_pixels, self.max_image_pixels = max_batch_pixels, max_image_pixels
        self._lock = threading.Condition()
        self._queue: collections.deque[_Pending] = collections.deque()
        self._in_flight: list[_Pending] = []
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._stream: Any = None  # torch.cuda.Stream on CUDA

    def start(self) -> None:
        with self._lock:
            if self._thread is not None or self._stopped:
                return
            if self.device.type == "cuda":
                if str(self.device) == "cuda":  # torchvision picks its streams by device index
                    self.device = torch.device("cuda", torch.cuda.current_device())
                self._stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
            self._thread = threading.Thread(target=self._run, name="device-decode", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._stopped = True
            abandoned, thread = [*self._queue, *self._in_flight], self._thread
            self._queue.clear()
            self._lock.notify_all()
        for item in abandoned:
            item.settle(None)
        if thread is not None:
            thread.join(timeout)

    async def decode(self, data: bytes) -> DecodedPixels | None:
        """The file's single view, uint8 [1, 3, S, S] on the device; None: use the CPU path."""
        header = read_jpeg_header(data)  # bounded: MAX_SEGMENTS, MAX_FILL_BYTES
        if header is None or not header_eligible(
            header, len(data), self.limits, self.max_image_pixels
        ):
            return None
        loop = asyncio.get_running_loop()
        future: asyncio.Future[DecodedPixels | None] = loop.create_future()
        with self._lock:
            if self._thread is None or self._stopped:
                return None
            self._queue.append(_Pending(data, header, loop, future))
            self._lock.notify()
        return await future

    def decode_batch(self, items: list[bytes]) -> list[DecodedPixels | None]:
        """Each file's view on the device, in order; None for a file that is not eligible, fails
        to decode, or decodes to another size than its header says."""
        return self.decode_read([(data, read_jpeg_header(data)) for data in items])

    def decode_read(
        self, items: list[tuple[bytes, JpegHeader | None]]
    ) -> list[DecodedPixels | None]:
        """decode_batch of files whose headers were read already."""
        results: list[DecodedPixels | None] = [None] * len(items)
        chosen = [
            (i, header)
            for i, (data, header) in enumerate(items)
            if device_eligible(data, header, self.limits, self.max_image_pixels)
        ]
        if not chosen:
            return results
        with contextlib.nullcontext() if self._stream is None else torch.cuda.stream(self._stream):
            decoded = self._decode_all([items[i][0] for i, _ in chosen])
            for (i, header), image in zip(chosen, decoded, strict=True):
                results[i] = None if image is None else self._finish(image, header)
            self._hand_over(results)
        return results

    def _decode_all(self, files: list[bytes]) -> list[torch.Tensor | None]:
        """One batched call; if it raises (one corrupt file fails it all), each file alone."""
        tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in files]
        try:
            return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device))
        except Exception:
            log.debug("batched decode of %d JPEGs failed", len(files), exc_info=True)
        return [self._decode_one(tensor) for tensor in tensors] if len(tensors) > 1 else [None]

    def _decode_one(self, tensor: torch.Tensor) -> torch.Tensor | None:
        try:
            image: torch.Tensor = decode_jpeg(tensor, mode=ImageReadMode.RGB, device=self.device)
        except Exception:
            return None
        return image

    def _finish(self, image: torch.Tensor, header: JpegHeader | None) -> DecodedPixels | None:
        if header is None or tuple(image.shape) != (3, header.height, header.width):
            return None  # the decoder read another frame than the header walk did
        try:
            view = fit_square(orient(image, header.orientation), self.prep)
            return DecodedPixels(view, pdq_on_host(image))  # hashed as stored, not turned
        except Exception:  # out of device memory, most likely: the CPU path has its own budget
            log.warning("device resize failed; image sent to the CPU path", exc_info=True)
            return None

    def _hand_over(self, results: list[DecodedPixels | None]) -> None:
        """On CUDA: the tensors complete and kept from reuse (see the module docstring)."""
        if self._stream is not None:
            default = torch.cuda.default_stream(self.device)
            for decoded in results:
                if decoded is not None:
                    decoded.pixels.record_stream(default)
            self._stream.synchronize()

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            try:
                results = self.decode_read([(item.data, item.header) for item in batch])
            except Exception:
                log.exception("device decode of a batch failed; its images go to the CPU path")
                results = [None] * len(batch)
            for item, result in zip(batch, results, strict=True):
                item.settle(result)

    def _take(self) -> list[_Pending] | None:
        """What is queued, up to the batch bounds, less what callers gave up; None: stopped."""
        with self._lock:
            self._in_flight = []
            while not self._queue and not self._stopped:
                self._lock.wait()
            if self._stopped:
                return None
            batch = [self._queue.popleft()]
            pixels = batch[0].pixels
            while self._queue and len(batch) < self.max_batch_images:
                if pixels + self._queue[0].pixels > self.max_batch_pixels:
                    break
                batch.append(self._queue.popleft())
                pixels += batch[-1].pixels
            self._in_flight = [item for item in batch if not item.future.done()]
            return self._in_flight

"""Image bytes to the model's views: on the device for the plain JPEGs it takes (--gpu-decode),
in the decode worker processes for everything else and for whatever the device fails on."""

from __future__ import annotations

import logging

import torch

from moderator.config import Config
from moderator.core.views import Preprocessing
from moderator.serving.decode_pool import DecodePool
from moderator.serving.device_decode import DecodedPixels, DeviceDecoder, decode_on_device
from moderator.serving.metrics import Metrics

log = logging.getLogger(__name__)


class ImageDecoder:
    def __init__(
        self, config: Config, prep: Preprocessing, device: torch.device, metrics: Metrics
    ) -> None:
        on_device = decode_on_device(config.decode.on_device, device)  # may refuse: first
        self._device = DeviceDecoder(device, prep, config.images) if on_device else None
        self._pool = DecodePool(config.decode, config.images, prep, metrics)
        self._metrics = metrics

    def start(self) -> None:
        self._pool.start()
        if self._device is not None:
            self._device.start()
        log.info("JPEG decoding on the device: %s", "on" if self._device is not None else "off")

    def stop(self) -> None:
        if self._device is not None:
            self._device.stop()
        self._pool.stop()

    def worker_pids(self) -> list[int]:
        return self._pool.worker_pids()

    async def decode(self, data: bytes, deadline: float | None) -> DecodedPixels:
        """The image's views, uint8 [V, 3, S, S] (on the host, or on the device when it decoded
        them), and its hash. Raises InvalidImage (from the CPU path, which judges every bad
        file)."""
        if self._device is not None:
            decoded = await self._device.decode(data)
            self._metrics.device_decodes.labels(path="cpu" if decoded is None else "device").inc()
            if decoded is not None:
                return decoded
        on_host = await self._pool.decode(data, deadline)
        return DecodedPixels(torch.from_numpy(on_host.views), on_host.pdq)

    def decode_pixels(self, data: bytes) -> torch.Tensor:
        """The views alone, blocking, in a decode worker: for policy example images, decoded
        off the event loop."""
        return torch.from_numpy(self._pool.decode_now(data).views)

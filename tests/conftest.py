"""Shared fixtures: the bundled demo model, and a real demo service on a free port."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from PIL import Image

from moderator.config import ImageConfig, demo_model_config
from moderator.core.clip import ClipModel, load_clip
from tests.helpers import RunningService, demo_config, start_service


@pytest.fixture(autouse=True)
def pillow_pixel_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow's pixel limit is global and the service sets it per image (core/images.py): each
    test starts from the service's default and leaves no other behind."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", ImageConfig().max_pixels)


@pytest.fixture(scope="session")
def demo_clip() -> ClipModel:
    return load_clip(demo_model_config("cpu", "fp32"))


@pytest.fixture(scope="module")
def demo_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    yield from start_service(demo_config(tmp_path_factory.mktemp("demo")))

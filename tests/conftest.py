"""Shared fixtures: the bundled demo model, and a real demo service on a free port."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from moderator.config import demo_model_config
from moderator.core.clip import ClipModel, load_clip
from tests.helpers import RunningService, demo_config, start_service


@pytest.fixture(scope="session")
def demo_clip() -> ClipModel:
    return load_clip(demo_model_config("cpu", "fp32"))


@pytest.fixture(scope="module")
def demo_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    yield from start_service(demo_config(tmp_path_factory.mktemp("demo")))

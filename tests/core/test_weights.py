"""--pretrained-sha256: the weights are checked before they are loaded."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from moderator.config import DEMO_CHECKPOINT_PATH, ModelConfig, demo_model_config
from moderator.core.clip import load_clip
from moderator.core.weights import file_sha256, verify_weights
from moderator.errors import ConfigError

WRONG = "0" * 64


def test_the_right_digest_loads_and_a_wrong_one_stops_before_loading(tmp_path: Path) -> None:
    right = file_sha256(DEMO_CHECKPOINT_PATH)
    demo = demo_model_config("cpu", "fp32")
    verify_weights(replace(demo, pretrained_sha256=right))
    with pytest.raises(ConfigError, match=f"has SHA-256 {right}, not the {WRONG} expected"):
        load_clip(replace(demo, pretrained_sha256=WRONG))
    tampered = tmp_path / "model.pt"
    tampered.write_bytes(DEMO_CHECKPOINT_PATH.read_bytes() + b"\0")
    with pytest.raises(ConfigError, match="refusing to load it"):
        verify_weights(replace(demo, pretrained=str(tampered), pretrained_sha256=right))


def test_what_cannot_be_checked_is_refused() -> None:
    with pytest.raises(ConfigError, match="--pretrained-sha256"):
        ModelConfig(pretrained_sha256="abc")
    with pytest.raises(ConfigError, match="needs weights to check"):
        ModelConfig(pretrained=None, pretrained_sha256=WRONG)
    hub = ModelConfig(name="hf-hub:org/model", pretrained="", pretrained_sha256=WRONG)
    with pytest.raises(ConfigError, match="download the checkpoint"):
        verify_weights(hub)
    with pytest.raises(ConfigError, match="not a file, nor a known tag"):
        verify_weights(ModelConfig(pretrained="no-such-tag", pretrained_sha256=WRONG))

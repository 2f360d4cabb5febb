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
    checkpoint = str(DEMO_CHECKPOINT_PATH)  # a real file: the hub's weights would load instead
    hub = ModelConfig(name="hf-hub:org/model", pretrained=checkpoint, pretrained_sha256=WRONG)
    with pytest.raises(ConfigError, match="open_clip loads its weights itself"):
        verify_weights(hub)
    with pytest.raises(ConfigError, match="not a known tag, nor a file"):
        verify_weights(ModelConfig(pretrained="no-such-tag", pretrained_sha256=WRONG))


def test_a_tag_is_checked_before_a_file_of_the_same_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """open_clip loads the tag's download when --pretrained names both: that is what is checked."""
    monkeypatch.chdir(tmp_path)
    Path("openai").write_bytes(b"a file named like the tag")
    download = tmp_path / "download.bin"
    download.write_bytes(b"the tag's weights")
    monkeypatch.setattr("open_clip.download_pretrained", lambda settings: str(download))
    config = ModelConfig(name="ViT-B-32", pretrained="openai", pretrained_sha256=WRONG)
    with pytest.raises(ConfigError, match=f"{download} has SHA-256"):
        verify_weights(config)

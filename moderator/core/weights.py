"""The model weights checked against the digest the operator gave (--pretrained-sha256) before
they are loaded: a replaced checkpoint (a writable volume, a poisoned cache, a hub repository
that changed) stops the start instead of silently changing every decision."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import open_clip

from moderator.config import ModelConfig
from moderator.errors import ConfigError

log = logging.getLogger(__name__)

CHUNK_BYTES = 1024 * 1024


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def weights_file(config: ModelConfig) -> Path:
    """The checkpoint `--pretrained` names: a local file, or an open_clip tag's download (made
    now, into open_clip's cache, where loading finds it)."""
    assert config.pretrained is not None
    if Path(config.pretrained).is_file():
        return Path(config.pretrained)
    if config.name.startswith(("hf-hub:", "local-dir:")):
        raise ConfigError(
            "--pretrained-sha256 checks a checkpoint file or an open_clip pretrained tag; for "
            f"{config.name} download the checkpoint and give --pretrained PATH"
        )
    settings = open_clip.get_pretrained_cfg(config.name, config.pretrained)
    if not settings:
        raise ConfigError(f"--pretrained {config.pretrained!r}: not a file, nor a known tag")
    return Path(open_clip.download_pretrained(settings))


def verify_weights(config: ModelConfig) -> None:
    """ConfigError unless the weights' SHA-256 is the one configured (nothing set: nothing
    checked)."""
    if not config.pretrained_sha256:
        return
    path = weights_file(config)
    found = file_sha256(path)
    if found != config.pretrained_sha256:
        raise ConfigError(
            f"--pretrained-sha256: {path} has SHA-256 {found}, not the "
            f"{config.pretrained_sha256} expected; refusing to load it"
        )
    log.info("weights %s match --pretrained-sha256", path)

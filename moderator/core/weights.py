"""The model weights checked against the digest the operator gave (--pretrained-sha256) before
they are loaded: a replaced checkpoint (a writable volume, a poisoned cache) stops the start
instead of silently changing every decision."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import open_clip

from moderator.config import ModelConfig
from moderator.errors import ConfigError, ModelLoadError

log = logging.getLogger(__name__)

CHUNK_BYTES = 1024 * 1024
HUB_PREFIXES = ("hf-hub:", "local-dir:")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def weights_file(config: ModelConfig) -> Path:
    """The checkpoint open_clip will load, found the way it finds it: a pretrained tag first
    (its download, made now into open_clip's cache, where loading finds it), then a file."""
    assert config.pretrained is not None
    if config.name.startswith(HUB_PREFIXES):
        raise ConfigError(  # open_clip loads the hub's or folder's weights, whatever --pretrained
            f"--pretrained-sha256 cannot check {config.name}: open_clip loads its weights "
            "itself; download the checkpoint and give --model NAME --pretrained PATH"
        )
    settings = open_clip.get_pretrained_cfg(config.name, config.pretrained)
    if settings:
        try:
            return Path(open_clip.download_pretrained(settings))
        except Exception as exc:  # network, hub and cache errors of many types
            raise ModelLoadError(
                f"cannot download the {config.pretrained!r} weights of {config.name} to check "
                f"them: {exc}"
            ) from exc
    if Path(config.pretrained).is_file():
        return Path(config.pretrained)
    raise ConfigError(f"--pretrained {config.pretrained!r}: not a known tag, nor a file")


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

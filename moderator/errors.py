"""Domain errors. They know nothing of gRPC: serving/servicer.py maps them to status codes."""

from __future__ import annotations

import enum


class ModeratorError(Exception):
    """Base class of every error the service raises on purpose."""


class ConfigError(ModeratorError):
    """The service was configured in a way that cannot work."""


class ModelLoadError(ModeratorError):
    """The CLIP model or its weights could not be loaded."""


class PolicyError(ModeratorError):
    """One or more policy files are invalid. `problems` lists each one."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


class InvalidRequest(ModeratorError):
    """The request as a whole is malformed (too many images, unknown policy id)."""


class Overloaded(ModeratorError):
    """The queue is full; the caller should back off and retry."""


class DeadlineExceeded(ModeratorError):
    """The request's deadline passed before the model reached it."""


class Disabled(ModeratorError):
    """This server is configured to refuse the request (ScoreEmbeddings turned off)."""


class ModelFailed(ModeratorError):
    """The model failed on a batch (a broken device, out of memory); retrying may succeed."""


class NotReady(ModeratorError):
    """The engine is not started (or is stopping)."""


class ImageErrorCode(enum.Enum):
    EMPTY = "empty"
    TOO_MANY_BYTES = "too_many_bytes"
    TOO_MANY_PIXELS = "too_many_pixels"
    UNSUPPORTED_FORMAT = "unsupported_format"
    CORRUPT = "corrupt"
    TOO_COMPLEX = "too_complex"  # would cost more to decode than the limits allow
    INVALID_EMBEDDING = "invalid_embedding"


class InvalidImage(ModeratorError):
    """One image (or its stored embedding) cannot be scored. It fails alone, never its batch."""

    def __init__(self, code: ImageErrorCode, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code.value}: {message}")

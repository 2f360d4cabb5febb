"""Log lines for people (`text`) or for log pipelines (`json`: one object per line).

Structured fields travel on a record as `extra={"fields": {...}}`. The JSON format merges them
into the object beside time, level, logger and message; the text format appends them as one
JSON object, so a value with spaces or newlines (a file name, a client's request id) can
neither break a line nor pass for another field.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from typing import Any

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# One line per RPC (and per request of a stream) at INFO, when --log-requests is on.
REQUEST_LOGGER = "moderator.requests"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CORE_KEYS = ("time", "level", "logger", "message")


def fields_of(record: logging.LogRecord) -> Mapping[str, Any]:
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, Mapping) else {}


def utc_time(created: float) -> str:
    """RFC 3339 in UTC with milliseconds: 2026-11-24T09:15:02.123Z."""
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created % 1 * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            key: value for key, value in fields_of(record).items() if key not in CORE_KEYS
        }
        entry.update(
            time=utc_time(record.created),
            level=record.levelname,
            logger=record.name,
            message=record.getMessage(),
        )
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(_finite(entry), default=str, separators=(",", ":"))


def _finite(entry: dict[str, Any]) -> dict[str, Any]:
    """NaN and infinities as strings: json.dumps would write them as bare NaN/Infinity, which
    is not JSON."""
    return {
        key: str(value) if isinstance(value, float) and not math.isfinite(value) else value
        for key, value in entry.items()
    }


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        line = super().formatMessage(record)
        fields = fields_of(record)
        return f"{line} {json.dumps(fields, default=str)}" if fields else line


def configure_logging(
    level: str, log_format: str, log_requests: bool = False, worker: int | None = None
) -> None:
    """Root handler on stderr in `log_format`; the request log on or off; with `worker`, every
    line says which server worker process (--workers) wrote it."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    if worker is not None:
        handler.addFilter(_WorkerField(worker))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.captureWarnings(True)  # Python warnings as log records, in the same format
    logging.getLogger(REQUEST_LOGGER).setLevel(logging.INFO if log_requests else logging.WARNING)


class _WorkerField(logging.Filter):
    def __init__(self, worker: int) -> None:
        super().__init__()
        self._worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        record.fields = {**fields_of(record), "worker": self._worker}
        return True

"""A decode worker process: image bytes in, views out, under a memory ceiling.

Started by serving/decode_pool.py as `python -m moderator.serving.decode_worker SETTINGS_JSON`.
It imports no torch (so it starts in a fraction of a second) and trusts nothing it decodes:
its replies are small JSON documents, never pickles, so a decoder exploited by a hostile file
cannot send the server code to run. The image bytes come in and the views go out through a
shared memory file the server maps too (no copies through pipes).

Protocol, one image at a time: the server writes the image into the shared memory at offset 0
and sends its length and a request number (8 bytes each, little-endian) on stdin; the worker
writes the views at `input_capacity` and answers on stdout with a length-prefixed (4 bytes) JSON
object: {"id": N, "views": V, "pdq": HEX, "pdq_quality": Q} or {"id": N, "code": ImageErrorCode
value, "message": ...}. The
first answer, {"id": 0, "ready": true}, comes once the worker has warmed up. End of stdin ends
the worker.
"""

from __future__ import annotations

import contextlib
import io
import json
import mmap
import os
import resource
import sys
from dataclasses import dataclass
from typing import Any

from PIL import Image

from moderator.config import MIB, ImageConfig
from moderator.core.views import Preprocessing, decode_image, decode_views
from moderator.errors import ImageErrorCode, InvalidImage

LENGTH_BYTES = 8
REPLY_LENGTH_BYTES = 4
MAX_MESSAGE_CHARS = 500


@dataclass(frozen=True)
class WorkerSettings:
    limits: ImageConfig
    prep: Preprocessing
    memory_mb: int  # 0: no ceiling
    shm_fd: int
    input_capacity: int
    output_capacity: int

    def to_json(self) -> str:
        limits = {**self.limits.__dict__, "formats": sorted(self.limits.formats)}
        return json.dumps(
            {
                "limits": limits,
                "prep": {"size": self.prep.size, "fill": list(self.prep.fill)},
                "memory_mb": self.memory_mb,
                "shm_fd": self.shm_fd,
                "input_capacity": self.input_capacity,
                "output_capacity": self.output_capacity,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> WorkerSettings:
        doc = json.loads(text)
        limits = {**doc["limits"], "formats": frozenset(doc["limits"]["formats"])}
        prep = doc["prep"]
        return cls(
            limits=ImageConfig(**limits),
            prep=Preprocessing(size=prep["size"], fill=tuple(prep["fill"])),
            memory_mb=doc["memory_mb"],
            shm_fd=doc["shm_fd"],
            input_capacity=doc["input_capacity"],
            output_capacity=doc["output_capacity"],
        )


def main(argv: list[str]) -> int:
    settings = WorkerSettings.from_json(argv[1])
    requests, replies = sys.stdin.buffer, _private_stdout()
    shm = mmap.mmap(settings.shm_fd, settings.input_capacity + settings.output_capacity)
    warm_up(settings)
    limit_resources(settings.memory_mb)
    reply(replies, {"id": 0, "ready": True})
    while True:
        header = requests.read(2 * LENGTH_BYTES)
        if len(header) < 2 * LENGTH_BYTES:
            return 0  # the server closed the pipe: it is stopping or gone
        length = int.from_bytes(header[:LENGTH_BYTES], "little")
        number = int.from_bytes(header[LENGTH_BYTES:], "little")
        reply(replies, {"id": number, **decode_one(shm, length, settings)})


def decode_one(shm: mmap.mmap, length: int, settings: WorkerSettings) -> dict[str, Any]:
    if length > settings.input_capacity:
        return {"code": ImageErrorCode.TOO_MANY_BYTES.value, "message": "image too large"}
    try:
        decoded = decode_image(shm[:length], settings.limits, settings.prep)
    except InvalidImage as exc:
        return {"code": exc.code.value, "message": exc.message[:MAX_MESSAGE_CHARS]}
    except MemoryError:
        return {
            "code": ImageErrorCode.TOO_COMPLEX.value,
            "message": f"decoding it needs more than the {settings.memory_mb} MB memory budget",
        }
    views = decoded.views
    if views.nbytes > settings.output_capacity:  # decode_image bounds the views; never here
        return {"code": ImageErrorCode.TOO_COMPLEX.value, "message": "too many views"}
    # decode_image returns a contiguous array: its buffer goes into the shared memory in one copy.
    start = settings.input_capacity
    shm[start : start + views.nbytes] = views.data.cast("B")
    pdq = decoded.pdq
    return {"views": int(views.shape[0]), "pdq": pdq.hex, "pdq_quality": pdq.quality}


def _private_stdout() -> Any:
    """The reply pipe, kept to ourselves: whatever a library prints goes to stderr instead."""
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    return replies


def reply(stream: Any, message: dict[str, Any]) -> None:
    body = json.dumps(message).encode()
    stream.write(len(body).to_bytes(REPLY_LENGTH_BYTES, "little") + body)
    stream.flush()


def warm_up(settings: WorkerSettings) -> None:
    """Import every accepted format's plugin and run the whole pipeline once, before the
    memory ceiling and before the first real image."""
    for fmt in ("PNG", "JPEG", "GIF", "WEBP", "TIFF", "BMP"):
        if fmt in settings.limits.formats:
            buffer = io.BytesIO()
            Image.new("RGBA" if fmt in ("PNG", "WEBP") else "RGB", (8, 8)).save(buffer, fmt)
            # A limit set so low that a tiny image is refused still warms the code up.
            with contextlib.suppress(InvalidImage):
                decode_views(buffer.getvalue(), settings.limits, settings.prep)


def limit_resources(memory_mb: int) -> None:
    """No core files, no files written; address space capped (a runaway decode gets
    MemoryError, reported as TOO_COMPLEX, instead of taking the host's memory)."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    if memory_mb > 0:
        ceiling = memory_mb * MIB
        resource.setrlimit(resource.RLIMIT_AS, (ceiling, ceiling))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main(sys.argv))

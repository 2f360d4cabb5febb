"""The embeddings file that `moderator rescore` reads.

The embeddings file is JSON lines, one image per line, exactly what
`moderator check --embeddings` prints (an ImageResult in protobuf's JSON mapping plus its
response's `model`, `precision` and `policy_version`):

    {"id": "a.jpg", "model": "ViT-B-32/laion2b_s34b_b79k", "precision": "bf16",
     "policy_version": "3f2a...", "decision": "DECISION_BLOCK", "embedding": [0.0123, ...],
     "views": [{"values": [...]}, ...],            # only for multi-view images
     "sha256": "9f86...", "pdq": "e3b0...",        # matched against the hash lists
     "policies": [{"policy_id": "weapons", "score": 0.061, "violated": true, ...}, ...]}

Only `id` and `embedding` are required; `decision` and `policies` are the stored results a
rescore is compared with; without `sha256` and `pdq` the hash lists cannot match. The file
is read in chunks, so its size is not bounded by memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from moderator.core.rescoring import EmbeddedImage, embedded_image
from moderator.core.scoring import Decision
from moderator.tools.changes import Verdict

READ_CHUNK = 4096


@dataclass(frozen=True)
class StoredImage:
    image: EmbeddedImage
    model: str
    precision: str  # of the image encoder that made the embedding
    policy_version: str
    verdict: Verdict | None  # the stored result, when the line has one


@dataclass(frozen=True)
class StoredChunk:
    images: list[StoredImage]
    problems: list[str]  # "FILE:LINE: reason" for each line that could not be used
    without_embedding: int  # lines for images that failed at moderation time


def read_embeddings_file(path: Path, chunk_size: int = READ_CHUNK) -> Iterator[StoredChunk]:
    """The file in chunks of up to `chunk_size` images. Raises OSError if it cannot be read."""
    images: list[StoredImage] = []
    problems: list[str] = []
    without_embedding = 0
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                stored = _stored_image(json.loads(raw.decode("utf-8")))
            except KeyError as exc:
                problems.append(f"{path}:{number}: missing key {exc}")
                continue
            except (ValueError, TypeError, AttributeError) as exc:  # UnicodeDecodeError too
                problems.append(f"{path}:{number}: {exc}")
                continue
            if stored is None:
                without_embedding += 1
                continue
            images.append(stored)
            if len(images) == chunk_size:
                yield StoredChunk(images, problems, without_embedding)
                images, problems, without_embedding = [], [], 0
    if images or problems or without_embedding:
        yield StoredChunk(images, problems, without_embedding)


def _stored_image(record: Any) -> StoredImage | None:
    if not isinstance(record, dict):
        raise ValueError("a line must be a JSON object")
    image_id = record.get("id")
    if not isinstance(image_id, str):
        raise ValueError("missing 'id' (a string)")
    embedding = record.get("embedding")
    if not embedding:
        if record.get("decision") == "DECISION_ERROR":
            return None
        raise ValueError(f"image {image_id!r} has no 'embedding'")
    views = [_floats(view["values"]) for view in record.get("views", [])]
    sha256, pdq = record.get("sha256", ""), record.get("pdq", "")
    quality = record.get("pdq_quality", 0)
    if not isinstance(sha256, str) or not isinstance(pdq, str) or type(quality) is not int:
        raise ValueError("'sha256' and 'pdq' must be hex digits, 'pdq_quality' a whole number")
    image = embedded_image(
        image_id, _floats(embedding), views, sha256=sha256, pdq=pdq, pdq_quality=quality
    )
    return StoredImage(
        image=image,
        model=str(record.get("model", "")),
        precision=str(record.get("precision", "")),
        policy_version=str(record.get("policy_version", "")),
        verdict=_stored_verdict(record),
    )


def _floats(values: Any) -> npt.NDArray[np.float32]:
    """A JSON list of numbers as float32; numpy's own conversion does the checking (fast)."""
    try:
        array = np.asarray(values, dtype=np.float32) if isinstance(values, list) else None
    except (TypeError, ValueError):
        array = None
    if array is None or array.ndim != 1 or any(type(v) is bool for v in values):
        raise ValueError("an embedding must be a list of numbers")
    return array


def _stored_verdict(record: dict[str, Any]) -> Verdict | None:
    name = record.get("decision")
    if not isinstance(name, str):
        return None
    try:
        decision = Decision[name.removeprefix("DECISION_")]
    except KeyError:
        raise ValueError(f"unknown decision {name!r}") from None
    policies = record.get("policies", [])
    return Verdict(
        decision=decision,
        violated=frozenset(p["policy_id"] for p in policies if p.get("violated")),
        evaluated=frozenset(p["policy_id"] for p in policies),
    )


def source_mismatch(images: Sequence[StoredImage], model_id: str) -> str | None:
    """Why these stored embeddings cannot be rescored with this model, if they cannot.

    Only the model matters: policy text is embedded in fp32 at every precision.
    """
    models = sorted({s.model for s in images if s.model and s.model != model_id})
    if not models:
        return None
    return (
        f"the embeddings were made by {', '.join(models)}, but the loaded model is "
        f"{model_id}: scores would be meaningless (use the same --model/--pretrained)"
    )

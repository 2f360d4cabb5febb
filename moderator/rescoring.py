"""Rescoring stored image embeddings against a policy set, without the images.

`Moderate` with `include_embeddings` returns each image's embedding (and, for an image scored
on several views, every view). Scoring those against a policy index is the same matrix product
and reduction the live path runs, so a rescore equals what `Moderate` would return for the same
images and policies (to float32 rounding).

The embeddings file is JSON lines, one image per line, exactly what
`moderator check --embeddings` prints (an ImageResult in protobuf's JSON mapping plus its
response's `model`, `precision` and `policy_version`):

    {"id": "a.jpg", "model": "ViT-B-32/laion2b_s34b_b79k", "precision": "bf16",
     "policy_version": "3f2a...", "decision": "DECISION_BLOCK", "embedding": [0.0123, ...],
     "views": [{"values": [...]}, ...],            # only for multi-view images
     "policies": [{"policy_id": "weapons", "score": 0.061, "violated": true, ...}, ...]}

Only `id` and `embedding` are required; `decision` and `policies` are the stored results a
rescore is compared with. The file is read in chunks, so its size is not bounded by memory.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt
import torch

from moderator.embeddings import PolicyIndex
from moderator.errors import ImageErrorCode, InvalidImage
from moderator.outcomes import ImageOutcome, build_outcomes
from moderator.scoring import Decision, ViewScores, score_views
from moderator.tables import aligned_rows

# A stored embedding is L2-normalised; allow for float32 rounding and JSON round trips.
NORM_TOLERANCE = 1e-3
READ_CHUNK = 4096

Vector: TypeAlias = Sequence[float] | npt.NDArray[np.float32]


@dataclass(frozen=True, eq=False)
class EmbeddedImage:
    """A stored image: one embedding per view, the whole image first.

    The values stay as given (a list, a protobuf repeated field) until `score_embedded`
    converts them, so a request's conversion runs where its scoring runs, off the event loop.
    """

    id: str
    views: tuple[Vector, ...]


def embedded_image(image_id: str, embedding: Vector, views: Sequence[Vector] = ()) -> EmbeddedImage:
    """The image as Moderate returned it: `views` when it had several, else `embedding`."""
    return EmbeddedImage(image_id, tuple(views) if views else (embedding,))


def score_embedded(
    images: Sequence[EmbeddedImage], index: PolicyIndex, max_views: int
) -> list[ViewScores | InvalidImage]:
    """Per-view scores of every image against `index`; an invalid embedding fails alone.

    `max_views`: the most views Moderate gives one image (ImageConfig.max_views).
    """
    dim = int(index.text_matrix.shape[1])
    failed: dict[int, InvalidImage] = {}
    rows: list[npt.NDArray[np.float32]] = []
    owners: list[int] = []  # the image of each row
    for i, image in enumerate(images):
        views = _view_arrays(image, dim, max_views)
        if isinstance(views, InvalidImage):
            failed[i] = views
        else:
            rows.extend(views)
            owners.extend([i] * len(views))
    matrix = torch.from_numpy(np.stack(rows)) if rows else torch.zeros(0, dim)
    _fail_unnormalised(matrix, owners, failed)
    keep = torch.tensor([owner not in failed for owner in owners], dtype=torch.bool)
    if not bool(keep.any()):
        return [failed[i] for i in range(len(images))]
    kept = matrix[keep]
    scores, matched = score_views(kept.to(index.text_matrix.device), index)
    scores, matched = scores.cpu(), matched.cpu()
    results: list[ViewScores | InvalidImage] = []
    offset = 0
    for i, image in enumerate(images):
        if i in failed:
            results.append(failed[i])
            continue
        end = offset + len(image.views)
        results.append(ViewScores(kept[offset:end], scores[offset:end], matched[offset:end]))
        offset = end
    return results


def rescore_images(
    images: Sequence[EmbeddedImage], index: PolicyIndex, selected: torch.Tensor, max_views: int
) -> tuple[ImageOutcome, ...]:
    """Stored embeddings -> the outcomes Moderate would return for their images, scored on the
    CPU copy of `index`."""
    views = score_embedded(images, index.on_cpu, max_views)
    return build_outcomes([image.id for image in images], views, index, selected)


def _view_arrays(
    image: EmbeddedImage, dim: int, max_views: int
) -> list[npt.NDArray[np.float32]] | InvalidImage:
    if not 1 <= len(image.views) <= max_views:
        return _invalid(f"{len(image.views)} views; Moderate returns 1 to {max_views}")
    try:
        views = [np.asarray(view, dtype=np.float32) for view in image.views]
    except (TypeError, ValueError):
        return _invalid("an embedding must be a list of numbers")
    if any(view.shape != (dim,) for view in views):
        found = ", ".join(str(n) for n in sorted({view.size for view in views}))
        return _invalid(f"embedding has {found} values; this model's have {dim}")
    return views


def _fail_unnormalised(
    matrix: torch.Tensor, owners: list[int], failed: dict[int, InvalidImage]
) -> None:
    """Record each image with a view that is not finite or not L2-normalised."""
    finite = torch.isfinite(matrix).all(dim=1)
    norms = torch.where(finite.unsqueeze(1), matrix, 0.0).norm(dim=1)
    bad = ~finite | ((norms - 1).abs() > NORM_TOLERANCE)
    for row in bad.nonzero().flatten().tolist():
        if owners[row] in failed:
            continue
        if not finite[row]:
            failed[owners[row]] = _invalid("embedding has NaN or infinite values")
        else:
            failed[owners[row]] = _invalid(
                f"embedding is not L2-normalised (norm {float(norms[row]):.4f}); "
                "pass the embedding Moderate returned"
            )


def _invalid(message: str) -> InvalidImage:
    return InvalidImage(ImageErrorCode.INVALID_EMBEDDING, message)


# -- the embeddings file ---------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """What one policy set decided for one image."""

    decision: Decision
    violated: frozenset[str]  # ids of the policies it violated, shadow ones included
    evaluated: frozenset[str]  # ids of the policies it was scored against


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
    return StoredImage(
        image=embedded_image(image_id, _floats(embedding), views),
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


def verdict_of(outcome: ImageOutcome) -> Verdict:
    return Verdict(
        decision=outcome.decision,
        violated=frozenset(p.policy.id for p in outcome.policies if p.violated),
        evaluated=frozenset(p.policy.id for p in outcome.policies),
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


# -- what changed ----------------------------------------------------------------------------


@dataclass
class PolicyChange:
    before: int = 0  # images it flagged before
    after: int = 0
    newly_flagged: int = 0
    cleared: int = 0


@dataclass
class ChangeSummary:
    """Decision transitions and per-policy flag counts, added to one image at a time."""

    listed: int = 20  # ids of changed images kept for the report
    images: int = 0
    decisions: Counter[tuple[Decision, Decision]] = field(default_factory=Counter)
    policies: dict[str, PolicyChange] = field(default_factory=dict)
    before_policies: set[str] = field(default_factory=set)
    after_policies: set[str] = field(default_factory=set)
    changed: int = 0
    changed_ids: list[str] = field(default_factory=list)  # the first `listed` changed images

    def add(self, image_id: str, before: Verdict, after: Verdict) -> None:
        self.images += 1
        self.decisions[(before.decision, after.decision)] += 1
        if before.decision != after.decision:
            self.changed += 1
            if len(self.changed_ids) < self.listed:
                self.changed_ids.append(image_id)
        self.before_policies |= before.evaluated
        self.after_policies |= after.evaluated
        both = before.evaluated & after.evaluated
        for policy_id in before.evaluated | after.evaluated:
            change = self.policies.setdefault(policy_id, PolicyChange())
            was, now = policy_id in before.violated, policy_id in after.violated
            change.before += was
            change.after += now
            if policy_id in both:
                change.newly_flagged += now and not was
                change.cleared += was and not now

    def status(self, policy_id: str) -> str:
        """kept, added or removed: a policy only one side has is not counted as a change."""
        if policy_id not in self.after_policies:
            return "removed"
        return "kept" if policy_id in self.before_policies else "added"


def format_summary(summary: ChangeSummary, before: str, after: str) -> str:
    lines = [f"{summary.images} images: {before} -> {after}", "", "decisions:"]
    for (old, new), count in sorted(summary.decisions.items()):
        marker = "" if old == new else "  (changed)"
        lines.append(f"  {old.name:<6} -> {new.name:<6} {count:>8}{marker}")
    lines += ["", "policies:"]
    header = ("policy", "status", "flagged before", "flagged after", "newly flagged", "cleared")
    rows = [header] + [
        (
            pid,
            summary.status(pid),
            str(c.before),
            str(c.after),
            str(c.newly_flagged),
            str(c.cleared),
        )
        for pid, c in sorted(summary.policies.items())
    ]
    lines += aligned_rows(rows, indent="  ")
    lines += ["", f"{summary.changed} images changed decision"]
    if summary.changed:
        more = f" (first {summary.listed})" if summary.changed > summary.listed else ""
        lines.append(f"changed{more}: " + ", ".join(summary.changed_ids))
    return "\n".join(line.rstrip() for line in lines)

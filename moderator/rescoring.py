"""Rescoring stored image embeddings against a policy set, without the images.

`Moderate` with `include_embeddings` returns each image's embedding (and, for an image scored
on several views, every view). Scoring those against a policy index is the same matrix product
and reduction the live path runs, so a rescore equals what `Moderate` would return for the same
images and policies (to float32 rounding).

The embeddings file is JSON lines, one image per line, exactly what
`moderator check --json --embeddings` prints (an ImageResult in protobuf's JSON mapping plus
its response's `model` and `policy_version`):

    {"id": "a.jpg", "model": "ViT-B-32/laion2b_s34b_b79k", "policy_version": "3f2a...",
     "decision": "DECISION_BLOCK", "embedding": [0.0123, ...],
     "views": [{"values": [...]}, ...],            # only for multi-view images
     "policies": [{"policy_id": "weapons", "score": 0.061, "violated": true, ...}, ...]}

Only `id` and `embedding` are required; `decision` and `policies` are the stored results a
rescore is compared with.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from moderator.embeddings import PolicyIndex
from moderator.errors import ImageErrorCode, InvalidImage
from moderator.outcomes import ImageOutcome
from moderator.scoring import Decision, ViewScores, score_views

# A stored embedding is L2-normalised; allow for float32 rounding and JSON round trips.
NORM_TOLERANCE = 1e-3


@dataclass(frozen=True, eq=False)
class EmbeddedImage:
    """A stored image: one embedding per view, the whole image first."""

    id: str
    views: tuple[npt.NDArray[np.float32], ...]


def embedded_image(
    image_id: str, embedding: Iterable[float], views: Sequence[Iterable[float]] = ()
) -> EmbeddedImage:
    """The image as Moderate returned it: `views` when it had several, else `embedding`."""
    rows = views if views else [embedding]
    return EmbeddedImage(image_id, tuple(np.asarray(row, dtype=np.float32) for row in rows))


def score_embedded(
    images: Sequence[EmbeddedImage], index: PolicyIndex
) -> list[ViewScores | InvalidImage]:
    """Per-view scores of every image against `index`; an invalid embedding fails alone."""
    dim = int(index.text_matrix.shape[1])
    failed: dict[int, InvalidImage] = {}
    rows: list[npt.NDArray[np.float32]] = []
    owners: list[int] = []  # the image of each row
    for i, image in enumerate(images):
        shapes = {view.shape for view in image.views}
        if shapes == {(dim,)}:
            rows.extend(image.views)
            owners.extend([i] * len(image.views))
        else:
            found = ", ".join(str(n) for n in sorted({view.size for view in image.views}))
            failed[i] = _invalid(f"embedding has {found} values; this model's have {dim}")
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
    policy_version: str
    verdict: Verdict | None  # the stored result, when the line has one


@dataclass(frozen=True)
class EmbeddingsFile:
    images: list[StoredImage]
    problems: list[str]  # "FILE:LINE: reason" for each line that could not be used
    without_embedding: int  # lines for images that failed at moderation time


def read_embeddings_file(path: Path) -> EmbeddingsFile:
    images: list[StoredImage] = []
    problems: list[str] = []
    without_embedding = 0
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                stored = _stored_image(record)
            except KeyError as exc:
                problems.append(f"{path}:{number}: missing key {exc}")
                continue
            except (ValueError, TypeError, AttributeError) as exc:
                problems.append(f"{path}:{number}: {exc}")
                continue
            if stored is None:
                without_embedding += 1
            else:
                images.append(stored)
    return EmbeddingsFile(images, problems, without_embedding)


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
        policy_version=str(record.get("policy_version", "")),
        verdict=_stored_verdict(record),
    )


def _floats(values: Any) -> list[float]:
    if not isinstance(values, list) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in values
    ):
        raise ValueError("an embedding must be a list of numbers")
    return [float(v) for v in values]


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


# -- what changed ----------------------------------------------------------------------------


@dataclass
class PolicyChange:
    before: int = 0  # images it flagged before
    after: int = 0
    newly_flagged: int = 0
    cleared: int = 0
    status: str = "kept"  # kept, added or removed


@dataclass
class ChangeSummary:
    images: int = 0
    decisions: Counter[tuple[Decision, Decision]] = field(default_factory=Counter)
    policies: dict[str, PolicyChange] = field(default_factory=dict)
    changed_ids: list[str] = field(default_factory=list)  # images whose decision changed


def summarise_changes(
    pairs: Sequence[tuple[str, Verdict, Verdict]],
    before_policies: Sequence[str],
    after_policies: Sequence[str],
) -> ChangeSummary:
    """(image id, before, after) for each image -> counts per decision change and per policy.

    A policy only one side evaluated is counted as added or removed, not as a change.
    """
    summary = ChangeSummary(images=len(pairs))
    before_set, after_set = set(before_policies), set(after_policies)
    for policy_id in sorted(before_set | after_set):
        status = "kept" if policy_id in before_set and policy_id in after_set else "added"
        summary.policies[policy_id] = PolicyChange(
            status="removed" if policy_id not in after_set else status
        )
    for image_id, before, after in pairs:
        summary.decisions[(before.decision, after.decision)] += 1
        if before.decision != after.decision:
            summary.changed_ids.append(image_id)
        for policy_id, change in summary.policies.items():
            was = policy_id in before.violated
            now = policy_id in after.violated
            change.before += was
            change.after += now
            if policy_id in before.evaluated and policy_id in after.evaluated:
                change.newly_flagged += now and not was
                change.cleared += was and not now
    return summary


def format_summary(summary: ChangeSummary, before: str, after: str, listed: int = 20) -> str:
    lines = [f"{summary.images} images: {before} -> {after}", "", "decisions:"]
    for (old, new), count in sorted(summary.decisions.items()):
        marker = "" if old == new else "  (changed)"
        lines.append(f"  {old.name:<6} -> {new.name:<6} {count:>8}{marker}")
    lines += ["", "policies:"]
    header = ("policy", "status", "flagged before", "flagged after", "newly flagged", "cleared")
    rows = [header] + [
        (pid, c.status, str(c.before), str(c.after), str(c.newly_flagged), str(c.cleared))
        for pid, c in summary.policies.items()
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    changed = len(summary.changed_ids)
    lines += ["", f"{changed} images changed decision"]
    if changed:
        shown = summary.changed_ids[:listed]
        more = f" (first {listed})" if changed > listed else ""
        lines.append(f"changed{more}: " + ", ".join(shown))
    return "\n".join(line.rstrip() for line in lines)


def check_same_model(images: Sequence[StoredImage], model_id: str) -> str | None:
    """A message naming the other models the stored embeddings came from, if any."""
    others = sorted({s.model for s in images if s.model and s.model != model_id})
    if not others:
        return None
    return (
        f"the embeddings were made by {', '.join(others)}, but the loaded model is {model_id}: "
        "scores would be meaningless (use the same --model/--pretrained)"
    )

"""What flows through the model pipeline (serving/batching.py): one image's work item, a batch,
and the steps on a batch that need no thread of their own (scoring, failing, completion)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from moderator.core.clip import OnHost, copy_to_host
from moderator.core.embeddings import PolicyIndex
from moderator.core.hash_index import ImageHashes
from moderator.core.scoring import ScoredImage, score_views
from moderator.serving.tracing import BatchTimes

log = logging.getLogger(__name__)


@dataclass
class WorkItem:
    pixels: torch.Tensor  # uint8 [V, 3, S, S]
    index: PolicyIndex
    deadline: float | None  # time.monotonic() seconds
    enqueued: float = field(default_factory=time.monotonic)
    future: Future[ScoredImage] = field(default_factory=Future)
    on_done: Callable[[], None] | None = None  # called once the item has left the worker
    on_timed: Callable[[BatchTimes], None] | None = None  # its forward pass's times (tracing)
    hashes: ImageHashes | None = None  # matched against the index's hash lists

    @property
    def views(self) -> int:
        return int(self.pixels.shape[0])


@dataclass(eq=False)  # compared by identity
class Batch:
    """A batch on its way through the pipeline."""

    items: list[WorkItem]
    pixels: Any  # what stage_images made of the items' views
    started: float = 0.0  # when its forward pass began (clock)
    started_ns: int = 0
    encoded_ns: int = 0
    embeddings: torch.Tensor | None = None  # [V, E], on the device
    read_back: float = 0.0  # when its results were back on the host (clock)

    @property
    def views(self) -> int:
        return sum(item.views for item in self.items)


END = Batch(items=[], pixels=None)  # staged after the last batch: the pipeline stops


def score_batch(batch: Batch) -> list[tuple[PolicyIndex, list[int], OnHost]]:
    """Score the batch's embeddings (on their device) and start reading the results back.

    Items normally share one policy index; during a policy reload a batch can hold two, and
    each image is scored against the set its request started with.
    """
    embeddings = batch.embeddings
    assert embeddings is not None
    groups = _group_by_index(batch.items)
    scored = []
    for index, positions in groups.items():
        group = embeddings
        if len(groups) > 1:
            group = embeddings[_rows_of(batch.items, positions).to(embeddings.device)]
        scores, matched = score_views(group, index)
        scored.append((index, positions, copy_to_host(group, scores, matched)))
    return scored


def fail(items: list[WorkItem], error: Exception) -> None:
    for item in items:
        done(item)
        if item.future.running() or item.future.set_running_or_notify_cancel():
            item.future.set_exception(error)


def done(item: WorkItem) -> None:
    """The item's completion callback, once: items are done before their futures resolve."""
    on_done, item.on_done = item.on_done, None
    if on_done is not None:
        try:
            on_done()
        except Exception:  # a caller's callback must not stop the worker
            log.exception("a work item's completion callback failed")


def report_times(item: WorkItem, times: BatchTimes) -> None:
    if item.on_timed is not None:
        try:
            item.on_timed(times)
        except Exception:  # tracing must not fail an image
            log.exception("recording a batch's times failed")


def _rows_of(items: list[WorkItem], positions: list[int]) -> torch.Tensor:
    """The rows of the batch's views that belong to the items at `positions`, in order."""
    starts = []
    offset = 0
    for item in items:
        starts.append(offset)
        offset += item.views
    return torch.cat([torch.arange(starts[i], starts[i] + items[i].views) for i in positions])


def _group_by_index(items: list[WorkItem]) -> dict[PolicyIndex, list[int]]:
    groups: dict[PolicyIndex, list[int]] = {}
    for position, item in enumerate(items):
        groups.setdefault(item.index, []).append(position)
    return groups

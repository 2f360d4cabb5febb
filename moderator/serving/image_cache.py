"""The cache for repeated uploads: the same bytes are not decoded or embedded twice.

Keyed by the SHA-256 of an image's bytes (one cache per model: a process serves one), it keeps
what the model made of the image (every view's embedding) and its PDQ hash, never a decision:
a hit is scored against the policies of its request like a fresh image, so every policy change
applies, and its scores equal a fresh computation's. Bounded in bytes, least recently used out
first; 0 turns it off.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from moderator.core.embeddings import PolicyIndex
from moderator.core.hash_index import ImageHashes
from moderator.core.pdq import Pdq
from moderator.core.rescoring import score_stored
from moderator.core.scoring import ScoredImage
from moderator.serving.metrics import Metrics

# Below this many bytes hashing on the event loop costs less than handing it to a thread.
HASH_INLINE_BYTES = 256 * 1024
ENTRY_OVERHEAD_BYTES = 1024  # the key, the entry, the tensor and its allocation, measured


@dataclass(frozen=True)
class CachedImage:
    embeddings: torch.Tensor  # [V, E] float32, CPU, L2-normalised: every view
    pdq: Pdq | None  # None where the decode made none

    @property
    def size(self) -> int:
        return self.embeddings.numel() * self.embeddings.element_size() + ENTRY_OVERHEAD_BYTES


async def sha256_of(data: bytes) -> str:
    """The bytes' SHA-256, off the event loop when they are many (hashlib frees the GIL)."""
    if len(data) <= HASH_INLINE_BYTES:
        return hashlib.sha256(data).hexdigest()
    return await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())


class ImageCache:
    def __init__(self, max_bytes: int, metrics: Metrics) -> None:
        self.max_bytes = max_bytes
        self._metrics = metrics
        self._entries: collections.OrderedDict[str, CachedImage] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        metrics.image_cache_max_bytes.set(max_bytes)

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def hits(self, digests: Sequence[str]) -> dict[int, tuple[str, CachedImage]]:
        """The positions of `digests` the cache holds, with what it holds for each."""
        found = {}
        for i, digest in enumerate(digests):
            entry = self.get(digest)
            if entry is not None:
                found[i] = (digest, entry)
        return found

    def get(self, sha256: str) -> CachedImage | None:
        if not self.enabled:
            return None
        with self._lock:
            entry = self._entries.get(sha256)
            if entry is not None:
                self._entries.move_to_end(sha256)
        self._metrics.image_cache_requests.labels(result="miss" if entry is None else "hit").inc()
        return entry

    def keep(self, sha256: str, scored: ScoredImage) -> None:
        """Keep what the model made of a freshly scored image: its rows copied out of its
        batch's tensor (a slice would keep the whole batch alive)."""
        if self.enabled:
            pdq = scored.hashes.pdq if scored.hashes is not None else None
            self.put(sha256, CachedImage(scored.embeddings.clone(), pdq))

    def put(self, sha256: str, entry: CachedImage) -> None:
        if entry.size > self.max_bytes:
            return
        with self._lock:
            previous = self._entries.pop(sha256, None)
            if previous is not None:
                self._bytes -= previous.size
            self._entries[sha256] = entry
            self._bytes += entry.size
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.size
            self._metrics.image_cache_bytes.set(self._bytes)
            self._metrics.image_cache_entries.set(len(self._entries))

    def __len__(self) -> int:
        return len(self._entries)


def score_cached(
    hits: Mapping[int, tuple[str, CachedImage]], index: PolicyIndex
) -> dict[int, ScoredImage]:
    """Cache hits (position -> digest and entry) scored against `index`, all in one pass, as
    a fresh image is scored."""
    positions = list(hits)
    views = [hits[i][1].embeddings for i in positions]
    hashes = [ImageHashes(digest, entry.pdq) for digest, entry in (hits[i] for i in positions)]
    return dict(zip(positions, score_stored(views, index, hashes), strict=True))

"""Matching an image's hashes against every hash list of a policy set at once.

PDQ: the Hamming distance to every listed hash of every policy in one pass (core.pdq.distances,
3 ms a million entries), a match being within the owning policy's `pdq_max_distance`; the
closest entry names the match, for images whose PDQ quality is at least MIN_PDQ_QUALITY.
SHA-256: one dict lookup. A match violates its policy whatever
the scores (core/scoring.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import numpy as np

from moderator.core.pdq import Pdq, distances, pdq_bytes
from moderator.core.policies import Policy

# Below this quality (a flat or tiny picture) a PDQ hash is mostly noise: ThreatExchange
# discards such hashes, and they are not matched here either (SHA-256 still is).
MIN_PDQ_QUALITY = 50


@dataclass(frozen=True)
class ImageHashes:
    """What is known of an image's bytes and picture, whatever the model makes of it."""

    sha256: str  # of the bytes as received; '' when not known (a stored embedding without it)
    pdq: Pdq | None = None

    @classmethod
    def of_bytes(cls, data: bytes, pdq: Pdq | None) -> ImageHashes:
        return cls(hashlib.sha256(data).hexdigest(), pdq)


@dataclass(frozen=True, eq=False)  # compared by identity: holds arrays
class HashIndex:
    """Every policy's hash lists. `pdq_rows` (core.pdq.hash_rows, uint64 [4, N]) with, per
    hash, its policy position (`pdq_owner`) and entry name; `pdq_limit` [N]: the owner's
    pdq_max_distance."""

    pdq_rows: np.ndarray
    pdq_owner: np.ndarray  # int32 [N]
    pdq_limit: np.ndarray  # int32 [N]
    pdq_entries: tuple[str, ...]
    sha256: dict[str, tuple[tuple[int, str], ...]]  # hex -> (policy position, entry name)

    @property
    def empty(self) -> bool:
        return not self.pdq_entries and not self.sha256

    def match(self, hashes: ImageHashes | None) -> dict[int, str]:
        """Policy position -> the entry the image matches (the closest, for PDQ)."""
        if hashes is None or self.empty:
            return {}
        found: dict[int, str] = {}
        for position, entry in self.sha256.get(hashes.sha256, ()):
            found.setdefault(position, entry)
        if hashes.pdq is not None and hashes.pdq.quality >= MIN_PDQ_QUALITY and self.pdq_entries:
            found.update(self._pdq_matches(hashes.pdq, exclude=found.keys()))
        return found

    def _pdq_matches(self, pdq: Pdq, exclude: AbstractSet[int]) -> dict[int, str]:
        """Each owner's closest entry within its limit: vectorised, however many match."""
        distance = distances(self.pdq_rows, pdq_bytes(pdq.hex))
        hits = np.flatnonzero(distance <= self.pdq_limit)
        if not len(hits):
            return {}
        owners = self.pdq_owner[hits]
        ordered = hits[np.lexsort((distance[hits], owners))]  # by owner, then distance
        _, firsts = np.unique(self.pdq_owner[ordered], return_index=True)
        closest = ordered[firsts].tolist()
        return {
            owner: self.pdq_entries[row]
            for row in closest
            if (owner := int(self.pdq_owner[row])) not in exclude
        }


def build_hash_index(policies: Sequence[Policy]) -> HashIndex:
    rows: list[np.ndarray] = []
    owners: list[int] = []
    limits: list[int] = []
    entries: list[str] = []
    sha256: dict[str, list[tuple[int, str]]] = {}
    for position, policy in enumerate(policies):
        known = policy.known
        for pdq_list in known.hash_lists:
            rows.append(pdq_list.rows)
            owners += [position] * len(pdq_list.entries)
            limits += [known.pdq_max_distance] * len(pdq_list.entries)
            entries += pdq_list.entries
        for sha_list in known.sha256_lists:
            for hex_digits, name in zip(sha_list.hexes, sha_list.entries, strict=True):
                sha256.setdefault(hex_digits, []).append((position, name))
    return HashIndex(
        pdq_rows=np.concatenate(rows, axis=1) if rows else np.zeros((4, 0), np.uint64),
        pdq_owner=np.asarray(owners, dtype=np.int32),
        pdq_limit=np.asarray(limits, dtype=np.int32),
        pdq_entries=tuple(entries),
        sha256={hex_digits: tuple(found) for hex_digits, found in sha256.items()},
    )

"""serving/image_cache.py: the cache for repeated uploads, bounded in bytes, least recently used
out first, and what it exports."""

from __future__ import annotations

import asyncio
import hashlib

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest

from moderator.core.hash_index import ImageHashes
from moderator.core.pdq import Pdq
from moderator.core.scoring import ScoredImage
from moderator.serving.image_cache import (
    ENTRY_OVERHEAD_BYTES,
    HASH_INLINE_BYTES,
    CachedImage,
    ImageCache,
    sha256_of,
)
from moderator.serving.metrics import Metrics

WIDTH = 64  # values per view: 256 bytes of float32


def entry(views: int = 1, fill: float = 0.0) -> CachedImage:
    return CachedImage(torch.full((views, WIDTH), fill), Pdq("0" * 64, 100))


ONE_VIEW = 4 * WIDTH + ENTRY_OVERHEAD_BYTES  # bytes one one-view entry counts for


def key(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    assert value is not None, name
    return value


def requests(metrics: Metrics) -> tuple[float, float]:
    """(hits, misses) counted so far."""
    name = "moderator_image_cache_requests_total"
    return sample(metrics, name, result="hit"), sample(metrics, name, result="miss")


def held(metrics: Metrics) -> tuple[float, float]:
    """(bytes, entries) the gauges say the cache holds."""
    return (
        sample(metrics, "moderator_image_cache_bytes"),
        sample(metrics, "moderator_image_cache_entries"),
    )


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


def test_an_entry_counts_its_embeddings_and_an_overhead() -> None:
    assert entry().size == ONE_VIEW
    assert entry(views=3).size == 3 * 4 * WIDTH + ENTRY_OVERHEAD_BYTES
    half = CachedImage(torch.zeros(2, WIDTH, dtype=torch.float16), Pdq("0" * 64, 0))
    assert half.size == 2 * 2 * WIDTH + ENTRY_OVERHEAD_BYTES


def test_a_hit_returns_what_was_put_and_a_miss_none(metrics: Metrics) -> None:
    cache = ImageCache(10 * ONE_VIEW, metrics)
    assert cache.enabled
    assert requests(metrics) == (0, 0)  # both series exported before the first lookup
    stored = entry(fill=0.5)
    cache.put(key("a"), stored)
    assert cache.get(key("a")) is stored
    assert cache.get(key("b")) is None
    assert cache.get(key("a")) is stored
    assert requests(metrics) == (2, 1)
    assert held(metrics) == (ONE_VIEW, 1)
    assert sample(metrics, "moderator_image_cache_max_bytes") == 10 * ONE_VIEW
    exported = generate_latest(metrics.registry).decode()
    assert 'moderator_image_cache_requests_total{result="hit"} 2.0' in exported
    assert 'moderator_image_cache_requests_total{result="miss"} 1.0' in exported


def test_the_least_recently_used_leave_first_when_bytes_run_out(metrics: Metrics) -> None:
    cache = ImageCache(3 * ONE_VIEW, metrics)
    for name in "abc":
        cache.put(key(name), entry())
    assert len(cache) == 3
    assert held(metrics) == (3 * ONE_VIEW, 3)
    cache.put(key("d"), entry())
    assert [cache.get(key(n)) is not None for n in "abcd"] == [False, True, True, True]
    assert held(metrics) == (3 * ONE_VIEW, 3)


def test_a_get_moves_an_entry_to_the_front(metrics: Metrics) -> None:
    cache = ImageCache(3 * ONE_VIEW, metrics)
    for name in "abc":
        cache.put(key(name), entry())
    assert cache.get(key("a")) is not None  # now b is the least recently used
    cache.put(key("d"), entry())
    assert cache.get(key("b")) is None
    assert all(cache.get(key(n)) is not None for n in "acd")


def test_a_miss_does_not_change_the_order(metrics: Metrics) -> None:
    cache = ImageCache(2 * ONE_VIEW, metrics)
    cache.put(key("a"), entry())
    cache.put(key("b"), entry())
    assert cache.get(key("nothing")) is None
    cache.put(key("c"), entry())
    assert cache.get(key("a")) is None
    assert cache.get(key("b")) is not None


def test_a_large_entry_evicts_as_many_as_it_needs(metrics: Metrics) -> None:
    cache = ImageCache(4 * ONE_VIEW, metrics)
    for name in "abcd":
        cache.put(key(name), entry())
    big = entry(views=ENTRY_OVERHEAD_BYTES // (4 * WIDTH) + 2)
    assert ONE_VIEW < big.size <= 2 * ONE_VIEW  # the bytes of more than one entry: two leave
    cache.put(key("big"), big)
    assert [cache.get(key(n)) is not None for n in "abcd"] == [False, False, True, True]
    assert cache.get(key("big")) is big
    assert held(metrics) == (2 * ONE_VIEW + big.size, 3)
    assert held(metrics)[0] <= cache.max_bytes


def test_putting_a_key_again_replaces_its_entry_and_its_bytes(metrics: Metrics) -> None:
    cache = ImageCache(10 * ONE_VIEW, metrics)
    cache.put(key("a"), entry())
    replacement = entry(views=2, fill=1.0)
    cache.put(key("a"), replacement)
    assert len(cache) == 1
    assert cache.get(key("a")) is replacement
    assert held(metrics) == (replacement.size, 1)


def test_putting_a_key_again_makes_it_the_most_recent(metrics: Metrics) -> None:
    cache = ImageCache(2 * ONE_VIEW, metrics)
    cache.put(key("a"), entry())
    cache.put(key("b"), entry())
    cache.put(key("a"), entry())
    cache.put(key("c"), entry())
    assert cache.get(key("b")) is None
    assert cache.get(key("a")) is not None


def test_an_entry_larger_than_the_bound_is_not_stored(metrics: Metrics) -> None:
    cache = ImageCache(2 * ONE_VIEW, metrics)
    cache.put(key("a"), entry())
    huge = entry(views=ENTRY_OVERHEAD_BYTES // (4 * WIDTH) + 3)
    assert huge.size > cache.max_bytes == 2 * ONE_VIEW
    cache.put(key("huge"), huge)
    assert cache.get(key("huge")) is None
    assert cache.get(key("a")) is not None  # and nothing was evicted for it
    assert held(metrics) == (ONE_VIEW, 1)
    exact = ImageCache(ONE_VIEW, metrics)
    exact.put(key("fits"), entry())  # exactly the bound: kept
    assert exact.get(key("fits")) is not None


def test_size_zero_turns_the_cache_off(metrics: Metrics) -> None:
    cache = ImageCache(0, metrics)
    assert not cache.enabled
    cache.put(key("a"), entry())
    assert len(cache) == 0
    assert cache.get(key("a")) is None
    assert cache.get(key("b")) is None
    assert requests(metrics) == (0, 0)  # an off cache is never looked up: nothing counted
    assert held(metrics) == (0, 0)
    assert sample(metrics, "moderator_image_cache_max_bytes") == 0


def scored(embeddings: torch.Tensor, hashes: ImageHashes | None) -> ScoredImage:
    """A freshly scored image of no policy: what the engine hands `keep`."""
    return ScoredImage(embeddings, [], [], [], [], (), {}, {}, {}, hashes)


def test_keep_copies_an_image_s_rows_out_of_its_batch(metrics: Metrics) -> None:
    cache = ImageCache(10 * ONE_VIEW, metrics)
    batch = torch.randn(8, WIDTH)  # a batch of eight one-view images
    pdq = Pdq("ab" * 32, 90)
    cache.keep(key("third"), scored(batch[2:3], ImageHashes(key("third"), pdq)))
    kept = cache.get(key("third"))
    assert kept is not None
    assert kept.pdq == pdq
    assert torch.equal(kept.embeddings, batch[2:3])
    assert kept.embeddings.untyped_storage().nbytes() == 4 * WIDTH  # not the batch's 8 rows
    batch.zero_()  # the batch's tensor reused: the kept rows stay as they were
    assert not torch.equal(kept.embeddings, batch[2:3])
    assert held(metrics) == (ONE_VIEW, 1)


def test_keep_needs_a_cache_that_is_on(metrics: Metrics) -> None:
    off = ImageCache(0, metrics)
    off.keep(key("c"), scored(torch.randn(1, WIDTH), ImageHashes(key("c"), Pdq("ab" * 32, 90))))
    assert len(off) == 0


def test_keep_keeps_an_image_without_a_pdq_as_it_was_computed(metrics: Metrics) -> None:
    cache = ImageCache(10 * ONE_VIEW, metrics)
    cache.keep(key("a"), scored(torch.randn(1, WIDTH), None))
    cache.keep(key("b"), scored(torch.randn(1, WIDTH), ImageHashes(key("b"), None)))
    kept = [cache.get(key("a")), cache.get(key("b"))]
    assert [entry.pdq if entry else "missing" for entry in kept] == [None, None]


def test_keep_keeps_a_pdq_of_any_quality(metrics: Metrics) -> None:
    """A hit is matched like a fresh image: the hash index, not the cache, skips a PDQ of low
    quality, so the cache keeps it as it was computed."""
    cache = ImageCache(10 * ONE_VIEW, metrics)
    flat = Pdq("00" * 32, 0)
    cache.keep(key("flat"), scored(torch.randn(1, WIDTH), ImageHashes(key("flat"), flat)))
    kept = cache.get(key("flat"))
    assert kept is not None
    assert kept.pdq == flat


def test_sha256_of_is_hashlib_s_for_small_and_large_inputs() -> None:
    for data in (
        b"",
        b"small",
        bytes(HASH_INLINE_BYTES),  # the largest hashed on the event loop
        bytes(HASH_INLINE_BYTES + 1),  # the smallest handed to a thread
        bytes(range(256)) * 40_000,  # 10 MB
    ):
        assert asyncio.run(sha256_of(data)) == hashlib.sha256(data).hexdigest()


def test_large_inputs_are_hashed_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    handed: list[int] = []
    to_thread = asyncio.to_thread

    async def counting(function: object, *args: object) -> object:
        handed.append(1)
        return await to_thread(function, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(asyncio, "to_thread", counting)
    small, large = bytes(HASH_INLINE_BYTES), bytes(HASH_INLINE_BYTES + 1)
    assert asyncio.run(sha256_of(small)) == hashlib.sha256(small).hexdigest()
    assert handed == []
    assert asyncio.run(sha256_of(large)) == hashlib.sha256(large).hexdigest()
    assert handed == [1]

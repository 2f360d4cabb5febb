"""Repeated uploads within and across requests: computed once, shared, and computed again by
a waiting request when the first computation is given up."""

from __future__ import annotations

import asyncio

import torch
from prometheus_client import CollectorRegistry

from moderator.core.hash_index import ImageHashes
from moderator.core.rescoring import score_stored
from moderator.core.scoring import ScoredImage
from moderator.errors import ImageErrorCode, InvalidImage
from moderator.serving.image_cache import ImageCache
from moderator.serving.metrics import Metrics
from moderator.serving.repeats import RepeatedUploads, Scored
from tests.helpers import make_index, policy_doc

INDEX = make_index(("a", policy_doc("block", ["x"])))
BROKEN = InvalidImage(ImageErrorCode.CORRUPT, "the same bytes fail the same way")


def repeats(cache_mb: int = 1) -> RepeatedUploads:
    return RepeatedUploads(ImageCache(cache_mb * 1024 * 1024, Metrics(CollectorRegistry())))


def fresh_image(digest: str) -> ScoredImage:
    """An image as the model would have scored it against INDEX (cacheable, unlike BROKEN)."""
    generator = torch.Generator().manual_seed(int(digest[:8], 16))
    view = torch.nn.functional.normalize(torch.randn(1, INDEX.matrix.shape[1], generator=generator))
    return score_stored([view], INDEX, [ImageHashes(digest, None)])[0]


class Computing:
    """A compute function that counts its calls and, while `held`, waits to be let go.
    It answers BROKEN, or with `fresh`, an image the cache can keep."""

    def __init__(self, fresh: bool = False) -> None:
        self.calls: list[int] = []
        self.held = asyncio.Event()
        self.held.set()
        self.fresh = fresh

    async def __call__(self, i: int, digest: str) -> Scored:
        self.calls.append(i)
        await self.held.wait()
        return fresh_image(digest) if self.fresh else BROKEN


def test_the_same_bytes_twice_in_a_request_are_computed_once() -> None:
    async def run() -> tuple[list[Scored], list[int]]:
        compute = Computing()
        results = await repeats().scored([b"same", b"other", b"same"], INDEX, compute)
        return results, compute.calls

    results, calls = asyncio.run(run())
    assert results == [BROKEN, BROKEN, BROKEN]
    assert calls == [0, 1]  # the third image waited for the first


def test_concurrent_requests_share_one_computation() -> None:
    async def run() -> list[int]:
        shared, compute = repeats(), Computing()
        compute.held.clear()
        requests = [asyncio.create_task(shared.scored([b"new"], INDEX, compute)) for _ in "abc"]
        await asyncio.sleep(0.01)
        compute.held.set()
        assert [await r for r in requests] == [[BROKEN]] * 3
        return compute.calls

    assert asyncio.run(run()) == [0]


def test_a_waiting_request_computes_itself_when_the_first_is_cancelled() -> None:
    async def run() -> tuple[list[Scored], list[int]]:
        shared, compute = repeats(), Computing()
        compute.held.clear()
        first = asyncio.create_task(shared.scored([b"new"], INDEX, compute))
        await asyncio.sleep(0.01)
        second = asyncio.create_task(shared.scored([b"new"], INDEX, compute))
        await asyncio.sleep(0.01)
        first.cancel()  # its caller gave up
        await asyncio.sleep(0.01)
        compute.held.set()
        return await second, compute.calls

    result, calls = asyncio.run(run())
    assert result == [BROKEN]
    assert calls == [0, 0]  # once for the first request, again for the second


def test_a_cancelled_waiter_stays_cancelled() -> None:
    async def run() -> bool:
        shared, compute = repeats(), Computing()
        compute.held.clear()
        first = asyncio.create_task(shared.scored([b"new"], INDEX, compute))
        await asyncio.sleep(0.01)
        second = asyncio.create_task(shared.scored([b"new"], INDEX, compute))
        await asyncio.sleep(0.01)
        second.cancel()
        await asyncio.gather(second, return_exceptions=True)
        compute.held.set()
        assert await first == [BROKEN]
        return second.cancelled()

    assert asyncio.run(run())


def test_with_the_cache_off_every_image_is_computed() -> None:
    async def run() -> list[int]:
        compute = Computing()
        await repeats(cache_mb=0).scored([b"same", b"same"], INDEX, compute)
        return compute.calls

    assert asyncio.run(run()) == [0, 1]


def test_when_the_first_is_given_up_one_waiter_computes_for_all_and_it_is_cached() -> None:
    """A viral image whose first uploader hangs up: one more computation, not one a copy."""

    async def run() -> tuple[int, list[list[Scored]], list[Scored], RepeatedUploads, int]:
        shared, compute = repeats(), Computing(fresh=True)
        compute.held.clear()
        first = asyncio.create_task(shared.scored([b"viral"], INDEX, compute))
        await asyncio.sleep(0.01)
        waiters = [asyncio.create_task(shared.scored([b"viral"], INDEX, compute)) for _ in "abcde"]
        await asyncio.sleep(0.01)
        first.cancel()
        await asyncio.sleep(0.01)
        computed = len(compute.calls)
        compute.held.set()
        results = await asyncio.gather(*waiters)
        later = await shared.scored([b"viral"], INDEX, compute)
        return computed, results, later, shared, len(compute.calls)

    computed, results, later, shared, calls = asyncio.run(run())
    assert computed == 2  # the cancelled computation and one in its place
    assert calls == 2  # the later upload was a hit
    assert len(shared.cache) == 1
    assert not shared._computing
    scores = [result.scores for [result] in [*results, later] if isinstance(result, ScoredImage)]
    assert len(scores) == 6
    assert all(score == scores[0] for score in scores)


def test_a_waiter_cancelled_while_computing_in_place_of_the_first_hands_over_again() -> None:
    async def run() -> tuple[list[Scored], list[int], int]:
        shared, compute = repeats(), Computing(fresh=True)
        compute.held.clear()
        requests = []
        for _ in "abc":
            requests.append(asyncio.create_task(shared.scored([b"new"], INDEX, compute)))
            await asyncio.sleep(0.01)
        for request in requests[:2]:  # the first, then the waiter that took over from it
            request.cancel()
            await asyncio.sleep(0.01)
        compute.held.set()
        return await requests[2], compute.calls, len(shared.cache)

    result, calls, cached = asyncio.run(run())
    assert isinstance(result[0], ScoredImage)
    assert calls == [0, 0, 0]
    assert cached == 1

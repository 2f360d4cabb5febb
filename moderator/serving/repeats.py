"""Repeated uploads: answered from the cache when their bytes were seen before, and computed
once when the same new bytes arrive several times at once (twice in a request, or in
concurrent requests: a meme going viral).

A request's images are hashed, its cache hits scored together in one thread call, and each
other image either computed (decoded and through the model) or, when the same bytes are being
computed already, taken from that computation and scored against this request's own policies,
as a hit is. If the first computation is given up (its caller cancelled, its deadline passed)
or fails, one waiting request computes the image in its place and the others wait for that.
Only with the cache on: off, every image is computed (and no caller can time another's uploads).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from moderator.core.embeddings import PolicyIndex
from moderator.core.scoring import ScoredImage
from moderator.errors import InvalidImage
from moderator.serving.image_cache import CachedImage, ImageCache, score_cached, sha256_of

Scored = ScoredImage | InvalidImage
Compute = Callable[[int, str], Awaitable[Scored]]  # (position, SHA-256) -> a fresh result


class RepeatedUploads:
    def __init__(self, cache: ImageCache) -> None:
        self.cache = cache
        self._computing: dict[str, asyncio.Future[Scored]] = {}  # on the event loop only

    async def scored(
        self, images: Sequence[bytes], index: PolicyIndex, compute: Compute
    ) -> list[Scored]:
        """Each image's result against `index`, in order; `compute` makes a fresh one."""
        digests = list(await asyncio.gather(*(sha256_of(data) for data in images)))
        hits = self.cache.hits(digests)
        pending: dict[int, asyncio.Future[Scored]] = {}
        for i, digest in enumerate(digests):
            if i in hits:
                continue
            twin = self._computing.get(digest)
            if twin is not None:
                pending[i] = asyncio.ensure_future(self._from_twin(twin, i, digest, index, compute))
            else:
                pending[i] = self._start(i, digest, compute)
        try:
            cached = await asyncio.to_thread(score_cached, hits, index) if hits else {}
            fresh = dict(zip(pending, await asyncio.gather(*pending.values()), strict=True))
        except BaseException:
            for task in pending.values():
                task.cancel()
            # Their views are released before the request's images and bytes are.
            await asyncio.gather(*pending.values(), return_exceptions=True)
            raise
        return [cached[i] if i in cached else fresh[i] for i in range(len(images))]

    def _start(self, i: int, digest: str, compute: Compute) -> asyncio.Future[Scored]:
        task = asyncio.ensure_future(compute(i, digest))
        if self.cache.enabled:
            self._computing[digest] = task
            task.add_done_callback(lambda done: self._finished(digest, done))
        return task

    def _finished(self, digest: str, task: asyncio.Future[Scored]) -> None:
        if self._computing.get(digest) is task:
            del self._computing[digest]
        if not task.cancelled() and task.exception() is None:
            result = task.result()
            if isinstance(result, ScoredImage):
                self.cache.keep(digest, result)

    async def _from_twin(
        self,
        twin: asyncio.Future[Scored],
        i: int,
        digest: str,
        index: PolicyIndex,
        compute: Compute,
    ) -> Scored:
        """The result of the computation running for these bytes, scored against `index`.
        When that one is given up or fails, the first waiter to notice computes the image in
        its place (shared and cached like the first), and the others wait for that."""
        while True:
            try:
                result = await asyncio.shield(twin)
                break
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not twin.cancelled() or (task is not None and task.cancelling()):
                    raise  # this request was cancelled (too)
            except Exception:  # its deadline passed, its batch failed: this request tries
                pass
            # `_finished` (the first done callback) has removed the given-up computation.
            retry = self._computing.get(digest)
            if retry is None:
                return await self._start(i, digest, compute)
            twin = retry
        if isinstance(result, InvalidImage):
            return result
        pdq = result.hashes.pdq if result.hashes is not None else None
        shared = CachedImage(result.embeddings, pdq)
        return (await asyncio.to_thread(score_cached, {i: (digest, shared)}, index))[i]

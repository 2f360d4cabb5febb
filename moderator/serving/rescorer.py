"""ScoreEmbeddings off the live path: stored embeddings are scored on the CPU copy of the
policy index in a thread of their own, so rescoring never takes the model device or the event
loop from live traffic; at most --max-rescore-requests run at once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from moderator.config import Config
from moderator.core.embeddings import PolicyIndex
from moderator.core.outcomes import ImageOutcome, Report, Selection
from moderator.core.rescoring import EmbeddedImage, rescore_images
from moderator.errors import Disabled, InvalidRequest
from moderator.serving.admission import Budgets
from moderator.serving.metrics import Metrics


class Rescorer:
    def __init__(self, config: Config, budgets: Budgets, metrics: Metrics) -> None:
        self._config = config
        self._budgets = budgets
        self._metrics = metrics
        self._pool: ThreadPoolExecutor | None = None

    def start(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rescore")

    def stop(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def slot(self) -> contextlib.AbstractContextManager[None]:
        """One of --max-rescore-requests: Disabled when that is 0, Overloaded at once when
        none is free. Every rescoring holds one."""
        if self._config.server.max_rescore_requests == 0:
            raise Disabled("ScoreEmbeddings is turned off here (--max-rescore-requests 0)")
        return self._budgets.rescore_slot()

    async def score(
        self,
        images: Sequence[EmbeddedImage],
        index: PolicyIndex,
        selected: Selection,
        report: Report,
        model_ids: tuple[str, str],
    ) -> tuple[ImageOutcome, ...]:
        """The outcomes of `images` against `index`. `model_ids`: the model the embeddings
        name (may be empty) and this server's: they must agree. The precision may differ
        (policy text is always embedded in fp32, so the scores do not depend on it). The
        caller holds a `slot()`."""
        theirs, ours = model_ids
        if theirs and theirs != ours:
            raise InvalidRequest(
                f"the embeddings come from model {theirs}, this server runs {ours}: "
                "embeddings of another model cannot be scored"
            )
        check_count(len(images), self._config.server.max_embeddings_per_request, "embeddings")
        if self._pool is None:
            raise RuntimeError("the rescorer is not started")
        results = await asyncio.get_running_loop().run_in_executor(
            self._pool,
            rescore_images,
            images,
            index,
            selected,
            self._config.images.max_views,
            report,
        )
        invalid = sum(outcome.error is not None for outcome in results)
        self._metrics.embeddings_scored.labels(result="scored").inc(len(results) - invalid)
        self._metrics.embeddings_scored.labels(result="invalid").inc(invalid)
        return results


def check_count(count: int, limit: int, what: str) -> None:
    if count > limit:
        raise InvalidRequest(f"request has {count} {what}; at most {limit} are allowed")

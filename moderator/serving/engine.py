"""ModerationEngine: images in, decisions out. Knows nothing of gRPC.

Each image is decoded in a decode worker process (serving/decode_pool.py), then queued for the
batcher as soon as it is ready, so decoding overlaps the forward passes of earlier images. A
request snapshots the policy index when it starts and is scored against that set to the end.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from moderator.config import Config, ModelConfig
from moderator.core.clip import TEXT_PRECISION, ClipModel, load_clip
from moderator.core.embeddings import EmbeddingCache, PolicyIndex, build_policy_index
from moderator.core.outcomes import (
    ImageOutcome,
    ModerationResult,
    build_outcomes,
    selected_policies,
)
from moderator.core.policies import Mode, PolicySet, ReloadStatus, load_policy_dir
from moderator.core.rescoring import EmbeddedImage, rescore_images
from moderator.core.scoring import ViewScores
from moderator.errors import Disabled, InvalidImage, InvalidRequest, NotReady
from moderator.serving.admission import Admission
from moderator.serving.batching import Batcher
from moderator.serving.decode_pool import DecodePool
from moderator.serving.metrics import Metrics
from moderator.serving.reload import PolicyReloader

log = logging.getLogger(__name__)

WARMUP_TIMEOUT_SECONDS = 300.0


@dataclass(frozen=True)
class ImageInput:
    id: str
    data: bytes


class ModerationEngine:
    def __init__(
        self,
        config: Config,
        metrics: Metrics,
        load_model: Callable[[ModelConfig], ClipModel] = load_clip,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self._load_model = load_model
        self._clip: ClipModel | None = None
        self._index: PolicyIndex | None = None
        self._batcher: Batcher | None = None
        self._decode_pool: DecodePool | None = None
        self._rescore_pool: ThreadPoolExecutor | None = None
        self._images_admission = Admission(config.batching.max_queue_images, "images", metrics)
        self._rescore_admission = Admission(
            config.server.max_rescore_requests, "ScoreEmbeddings requests", metrics
        )
        self._reloader = PolicyReloader(
            config.policies_dir, lambda: self.policies, self._install_policies, metrics
        )
        self._decoding_images = 0  # touched on the event loop thread only
        self._ready = False
        self.cache: EmbeddingCache | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Load the model and policies, embed the policies, start the worker, warm up.

        Blocking; raises ModelLoadError, PolicyError or ConfigError with a clear message.
        """
        clip = self._load_model(self.config.model)
        self._clip = clip
        self.metrics.model_info.labels(
            model=clip.info.name,
            pretrained=clip.info.pretrained,
            device=clip.info.device,
            precision=clip.info.precision,
        ).set(1)
        self.cache = EmbeddingCache.for_model(
            self.config.embedding_cache_dir, clip.info.weights_key, TEXT_PRECISION
        )
        self._reloader.last = self._install_policies(load_policy_dir(self.config.policies_dir))
        self._decode_pool = DecodePool(
            self.config.decode, self.config.images, clip.preprocessing, self.metrics
        )
        self._decode_pool.start()
        self._rescore_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rescore")
        self._batcher = Batcher(
            clip.encode_images,
            self.config.batching,
            self.metrics,
            expected=lambda: self._decoding_images,
        )
        self._batcher.start()
        self._warm_up()
        self._ready = True
        log.info("engine ready: %d policies, model %s", len(self.policies.policies), self.model_id)

    def stop(self) -> None:
        self._ready = False
        if self._batcher is not None:
            self._batcher.stop()
        if self._rescore_pool is not None:
            self._rescore_pool.shutdown(wait=True, cancel_futures=True)
        if self._decode_pool is not None:
            self._decode_pool.stop()

    @property
    def decode_worker_pids(self) -> list[int]:
        return self._decode_pool.worker_pids() if self._decode_pool is not None else []

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def clip(self) -> ClipModel:
        if self._clip is None:
            raise NotReady("the model is not loaded yet")
        return self._clip

    @property
    def index(self) -> PolicyIndex:
        if self._index is None:
            raise NotReady("the policies are not loaded yet")
        return self._index

    @property
    def policies(self) -> PolicySet:
        return self.index.policy_set

    @property
    def model_id(self) -> str:
        return self.clip.info.model_id

    @property
    def last_reload(self) -> ReloadStatus:
        return self._reloader.last

    async def reload(self) -> ReloadStatus:
        """Re-read the policy directory and swap in what changed (see serving.reload): text
        encoding runs off the event loop; a failure keeps the running set."""
        return await self._reloader.reload()

    def _install_policies(self, policy_set: PolicySet) -> ReloadStatus:
        """Embed `policy_set` (only new prompts are encoded) and swap it in atomically."""
        assert self.cache is not None
        clip = self.clip
        encoded_before = self.cache.encoded_total
        index = build_policy_index(policy_set, clip.encode_texts, self.cache, clip.device)
        previous = self._index
        self._index = index  # the swap: one reference assignment
        encoded = self.cache.encoded_total - encoded_before
        self.metrics.text_embeddings_encoded.inc(encoded)
        now = time.time()
        message = (
            f"loaded {len(policy_set.policies)} policies (version {policy_set.version}) "
            f"from {self.config.policies_dir}; encoded {encoded} new prompts"
        )
        self._export_policy_metrics(policy_set, previous, now)
        log.info(message)
        return ReloadStatus(ok=True, message=message, unix_time=now)

    def _export_policy_metrics(
        self, policy_set: PolicySet, previous: PolicyIndex | None, now: float
    ) -> None:
        self.metrics.policy_reloads.labels(result="success").inc()
        self.metrics.policy_last_reload.set(now)
        if previous is not None:
            self.metrics.policy_set_info.remove(previous.policy_set.version)
        self.metrics.policy_set_info.labels(version=policy_set.version).set(1)
        for mode in (Mode.ENFORCE, Mode.SHADOW):
            count = sum(p.mode is mode for p in policy_set.policies)
            self.metrics.policies_loaded.labels(mode=mode.value).set(count)

    def _warm_up(self) -> None:
        assert self._batcher is not None
        size = self.clip.preprocessing.size
        blank = torch.zeros(1, 3, size, size, dtype=torch.uint8)
        self._batcher.submit(blank, self.index, deadline=None).result(WARMUP_TIMEOUT_SECONDS)

    # -- requests ----------------------------------------------------------------------------

    async def moderate(
        self,
        images: Sequence[ImageInput],
        policy_ids: Sequence[str] = (),
        include_embeddings: bool = False,
        deadline: float | None = None,
    ) -> ModerationResult:
        """Moderate `images` in order. `deadline` is in time.monotonic() seconds."""
        if not self._ready:
            raise NotReady("the service is still loading its model and policies")
        index = self.index
        selected = selected_policies(index.policy_set, policy_ids)
        _check_request_size(len(images), self.config.server.max_images_per_request, "images")
        with self._images_admission.admitted(len(images)):
            views = await self._embed_all(images, index, deadline)
        ids = [image.id for image in images]
        results = build_outcomes(ids, views, index, selected, include_embeddings)
        self._count(results)
        return self._result(results, index)

    async def score_embeddings(
        self,
        images: Sequence[EmbeddedImage],
        policy_ids: Sequence[str] = (),
        model_id: str = "",
    ) -> ModerationResult:
        """Score stored embeddings against the current policies, as `moderate` would have.

        Runs on the CPU copy of the policy index in a thread of its own, so rescoring never
        takes the model device or the event loop from live traffic. `model_id`, when given,
        must be this model's; the precision may differ (policy text is always embedded in
        fp32, so the scores do not depend on it).
        """
        if not self._ready:
            raise NotReady("the service is still loading its model and policies")
        if self.config.server.max_rescore_requests == 0:
            raise Disabled("ScoreEmbeddings is turned off here (--max-rescore-requests 0)")
        if model_id and model_id != self.model_id:
            raise InvalidRequest(
                f"the embeddings come from model {model_id}, this server runs {self.model_id}: "
                "embeddings of another model cannot be scored"
            )
        _check_request_size(
            len(images), self.config.server.max_embeddings_per_request, "embeddings"
        )
        index = self.index
        selected = selected_policies(index.policy_set, policy_ids)
        assert self._rescore_pool is not None
        with self._rescore_admission.admitted():
            results = await asyncio.get_running_loop().run_in_executor(
                self._rescore_pool,
                rescore_images,
                images,
                index,
                selected,
                self.config.images.max_views,
            )
        invalid = sum(outcome.error is not None for outcome in results)
        self.metrics.embeddings_scored.labels(result="scored").inc(len(results) - invalid)
        self.metrics.embeddings_scored.labels(result="invalid").inc(invalid)
        return self._result(results, index)

    def _result(self, results: tuple[ImageOutcome, ...], index: PolicyIndex) -> ModerationResult:
        return ModerationResult(
            results=results,
            policy_version=index.policy_set.version,
            model_id=self.model_id,
            precision=self.clip.info.precision,
        )

    async def _embed_all(
        self, images: Sequence[ImageInput], index: PolicyIndex, deadline: float | None
    ) -> list[ViewScores | InvalidImage]:
        tasks = [asyncio.ensure_future(self._embed_one(image, index, deadline)) for image in images]
        try:
            return await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            raise

    async def _embed_one(
        self, image: ImageInput, index: PolicyIndex, deadline: float | None
    ) -> ViewScores | InvalidImage:
        assert self._decode_pool is not None
        assert self._batcher is not None
        self._decoding_images += 1
        try:
            pixels = torch.from_numpy(await self._decode_pool.decode(image.data, deadline))
            future = self._batcher.submit(pixels, index, deadline)
        except InvalidImage as exc:
            return exc
        finally:
            # Counted down only once queued, so the worker never closes a batch just before
            # an image it was waiting for arrives.
            self._decoding_images -= 1
            if self._decoding_images == 0:
                self._batcher.notify()
        return await asyncio.wrap_future(future)

    def _count(self, results: tuple[ImageOutcome, ...]) -> None:
        for outcome in results:
            self.metrics.images.labels(decision=outcome.decision.name.lower()).inc()
            if outcome.error is not None:
                self.metrics.image_errors.labels(code=outcome.error.code.value).inc()
            for p in outcome.policies:
                if p.violated:
                    self.metrics.policy_violations.labels(
                        policy=p.policy.id, mode=p.policy.mode.value
                    ).inc()


def _check_request_size(count: int, limit: int, what: str) -> None:
    if count > limit:
        raise InvalidRequest(f"request has {count} {what}; at most {limit} are allowed")

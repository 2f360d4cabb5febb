"""ModerationEngine: images in, decisions out. Knows nothing of gRPC.

Each image is decoded (serving/decoding.py: in a decode worker process, or on the device for
plain JPEGs with --gpu-decode), then queued for the batcher as soon as it is ready, so decoding
overlaps the forward passes of earlier images. A request snapshots the policy index when it
starts and is scored against that set to the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from moderator.config import MIB, Config, ModelConfig
from moderator.core.clip import TEXT_PRECISION, ClipModel, load_clip
from moderator.core.embeddings import EmbeddingCache, PolicyIndex, build_policy_index
from moderator.core.examples import ExampleEmbedder
from moderator.core.hash_index import ImageHashes
from moderator.core.outcomes import (
    ImageOutcome,
    ModerationResult,
    Report,
    build_outcomes,
    selected_policies,
)
from moderator.core.policies import PolicySet, ReloadStatus, load_policy_dir
from moderator.core.rescoring import EmbeddedImage
from moderator.core.scoring import ScoredImage
from moderator.errors import InvalidImage, NotReady
from moderator.serving.admission import Budgets, Ticket
from moderator.serving.batching import Batcher
from moderator.serving.decoding import ImageDecoder
from moderator.serving.health import WorkerState
from moderator.serving.image_cache import ImageCache
from moderator.serving.metrics import Metrics
from moderator.serving.reload import PolicyReloader
from moderator.serving.repeats import RepeatedUploads
from moderator.serving.rescorer import Rescorer, check_count
from moderator.serving.tracing import Tracing

log = logging.getLogger(__name__)

WARMUP_TIMEOUT_SECONDS = 300.0
MODEL_STOP_SECONDS = 5.0


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
        tracing: Tracing | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.tracing = tracing or Tracing(None)
        self._load_model = load_model
        self._clip: ClipModel | None = None
        self._index: PolicyIndex | None = None
        self._batcher: Batcher | None = None
        self._decoder: ImageDecoder | None = None
        self.budgets = Budgets(config.batching, config.server.max_rescore_requests, metrics)
        self.rescorer = Rescorer(config, self.budgets, metrics)
        self._reloader = PolicyReloader(
            config.policies_dir, lambda: self.policies, self._install_policies, metrics
        )
        self._decoding_images = 0  # touched on the event loop thread only
        self._ready = False
        self.cache: EmbeddingCache | None = None
        self._examples: ExampleEmbedder | None = None
        self.image_cache = ImageCache(config.image_cache_mb * MIB, metrics)
        self.repeats = RepeatedUploads(self.image_cache)

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
        self._decoder = ImageDecoder(self.config, clip.preprocessing, clip.device, self.metrics)
        self._decoder.start()  # before the policies: their example images are decoded too
        self._examples = ExampleEmbedder.for_model(
            clip, self._decoder.decode_pixels, self.config.embedding_cache_dir, self.config.images
        )
        self._reloader.last = self._install_policies(load_policy_dir(self.config.policies_dir))
        self.rescorer.start()
        batching = self.config.batching
        pipelined = batching.pipelined_on(clip.device.type)
        self._batcher = Batcher(
            clip.encode_images,
            dataclasses.replace(batching, pipelined=pipelined),
            self.metrics,
            expected=lambda: self._decoding_images,
            stage_images=clip.stage_images,
        )
        self._batcher.start()
        self._warm_up()
        self._ready = True
        log.info(
            "engine ready: %d policies, model %s, model pipeline %s",
            len(self.policies.policies),
            self.model_id,
            "on" if pipelined else "off",
        )

    def stop(self, model_timeout: float = MODEL_STOP_SECONDS) -> None:
        """Stop the model worker, the rescoring thread and the decode workers. A forward pass
        still running after `model_timeout` seconds (a hung device) is left behind: by now
        every call has finished or been cancelled, so no one waits for its result."""
        self._ready = False
        if self._batcher is not None:
            self._batcher.stop(timeout=model_timeout)
        self.rescorer.stop()
        if self._decoder is not None:
            self._decoder.stop()

    @property
    def decode_worker_pids(self) -> list[int]:
        return self._decoder.worker_pids() if self._decoder is not None else []

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
        examples = self._examples
        assert examples is not None
        embedded_before = examples.embedded_total
        index = build_policy_index(
            policy_set, clip.encode_texts, self.cache, clip.device, embed_example=examples
        )
        previous = self._index
        self._index = index  # the swap: one reference assignment
        encoded = self.cache.encoded_total - encoded_before
        self.metrics.text_embeddings_encoded.inc(encoded)
        now = time.time()
        message = (
            f"loaded {len(policy_set.policies)} policies (version {policy_set.version}) "
            f"from {self.config.policies_dir}; encoded {encoded} new prompts and "
            f"{examples.embedded_total - embedded_before} new example images"
        )
        self.metrics.count_policy_set(policy_set, previous.policy_set if previous else None, now)
        log.info(message)
        return ReloadStatus(ok=True, message=message, unix_time=now)

    def _warm_up(self) -> None:
        self._submit_blank().result(WARMUP_TIMEOUT_SECONDS)

    def _submit_blank(self) -> Future[ScoredImage]:
        assert self._batcher is not None
        size = self.clip.preprocessing.size
        blank = torch.zeros(1, 3, size, size, dtype=torch.uint8)
        return self._batcher.submit(blank, self.index, deadline=None)

    def worker_state(self) -> WorkerState:
        """The model worker's health (serving/health.py)."""
        if self._batcher is None:
            return WorkerState(0, None)
        return self._batcher.state()

    async def probe(self) -> None:
        """One blank image through the model: does it work again?"""
        await asyncio.wrap_future(self._submit_blank())

    # -- requests ----------------------------------------------------------------------------

    def check_ready(self) -> None:
        if not self._ready:
            raise NotReady("the service is still loading its model and policies")

    def check_policy_ids(self, policy_ids: Sequence[str]) -> None:
        """InvalidRequest unless every id names a loaded policy."""
        selected_policies(self.index.policy_set, policy_ids)

    @contextlib.asynccontextmanager
    async def admitted(
        self, images: int, image_bytes: int, *, wait: bool = False, deadline: float | None = None
    ) -> AsyncIterator[Ticket]:
        """Hold room for a request of `images` images and `image_bytes` encoded bytes.

        Without `wait` a request that does not fit is refused at once (Overloaded); with it,
        the request waits its turn (oldest first) until `deadline`.
        """
        self.check_ready()
        check_count(images, self.config.server.max_images_per_request, "images")
        async with self.budgets.request(
            images, image_bytes, wait=wait, deadline=deadline
        ) as ticket:
            yield ticket

    async def moderate(
        self,
        images: Sequence[ImageInput],
        policy_ids: Sequence[str] = (),
        *,
        include_embeddings: bool = False,
        deadline: float | None = None,
        ticket: Ticket | None = None,
        report: Report = Report.ALL_POLICIES,
    ) -> ModerationResult:
        """Moderate `images` in order. `deadline` is in time.monotonic() seconds; `report`:
        which policies each outcome lists.

        `ticket`: the request's admission (`admitted`), taken here when not given."""
        if ticket is None:
            size = sum(len(image.data) for image in images)
            async with self.admitted(len(images), size, deadline=deadline) as taken:
                return await self.moderate(
                    images,
                    policy_ids,
                    include_embeddings=include_embeddings,
                    deadline=deadline,
                    ticket=taken,
                    report=report,
                )
        self.check_ready()
        index = self.index
        selected = selected_policies(index.policy_set, policy_ids)
        views = await self._embed_all(images, index, deadline, ticket)
        ids = [image.id for image in images]
        results = build_outcomes(
            ids,
            views,
            index.policy_set,
            selected=selected,
            report=report,
            include_embeddings=include_embeddings,
        )
        self.metrics.count_outcomes(results)
        return self._result(results, index)

    async def score_embeddings(
        self,
        images: Sequence[EmbeddedImage],
        policy_ids: Sequence[str] = (),
        model_id: str = "",
        *,
        report: Report = Report.ALL_POLICIES,
        slot_taken: bool = False,
    ) -> ModerationResult:
        """Score stored embeddings against the current policies, as `moderate` would have
        (serving.rescorer). `slot_taken`: the caller holds a `rescorer.slot()` already."""
        self.check_ready()
        if not slot_taken:
            with self.rescorer.slot():
                return await self.score_embeddings(
                    images, policy_ids, model_id, report=report, slot_taken=True
                )
        self.check_ready()
        index = self.index
        selected = selected_policies(index.policy_set, policy_ids)
        ids = (model_id, self.model_id)
        return self._result(await self.rescorer.score(images, index, selected, report, ids), index)

    def _result(self, results: tuple[ImageOutcome, ...], index: PolicyIndex) -> ModerationResult:
        return ModerationResult(
            results=results,
            policy_version=index.policy_set.version,
            model_id=self.model_id,
            precision=self.clip.info.precision,
        )

    async def _embed_all(
        self,
        images: Sequence[ImageInput],
        index: PolicyIndex,
        deadline: float | None,
        ticket: Ticket,
    ) -> list[ScoredImage | InvalidImage]:
        """Each image scored against `index`: repeated uploads from the cache or from the
        computation already running for their bytes (serving/repeats.py), the others decoded
        and through the model."""

        def compute(i: int, sha256: str) -> Awaitable[ScoredImage | InvalidImage]:
            return self._embed_new(images[i], sha256, index, deadline, ticket)

        return await self.repeats.scored([image.data for image in images], index, compute)

    async def _embed_new(
        self,
        image: ImageInput,
        sha256: str,
        index: PolicyIndex,
        deadline: float | None,
        ticket: Ticket,
    ) -> ScoredImage | InvalidImage:
        assert self._decoder is not None
        assert self._batcher is not None
        # Room for one view before decoding, the rest once decoding says how many: pixels
        # waiting for the model stay within the views budget, plus at most one image's views
        # per decode worker.
        await self.budgets.view_before_decoding(ticket, deadline)
        held = 1
        try:
            self._decoding_images += 1
            try:
                with self.tracing.span("decode", **{"image.bytes": len(image.data)}):
                    decoded = await self._decoder.decode(image.data, deadline)
                held = decoded.pixels.shape[0]
                self.budgets.more_views(ticket, held)
                # The views stay held until the image leaves the model's queue, even when
                # this request is cancelled first: its pixels are there until then.
                future = self._batcher.submit(
                    decoded.pixels,
                    index,
                    deadline,
                    on_done=self.budgets.views_released_later(held),
                    on_timed=self.tracing.batch_recorder(),
                    hashes=ImageHashes(sha256, decoded.pdq),
                )
                held = 0
            except InvalidImage as exc:
                return exc
            finally:
                # Counted down only once queued, so the worker never closes a batch just
                # before an image it was waiting for arrives.
                self._decoding_images -= 1
                if self._decoding_images == 0:
                    self._batcher.notify()
            return await asyncio.wrap_future(future)
        finally:
            if held:
                self.budgets.release_views(held)

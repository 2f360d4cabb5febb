"""Every Prometheus metric of the service, registered on an injected registry.

Label values are bounded: methods and codes come from the API, decisions and error codes
from enums, policy ids from the loaded configuration. Nothing per request.
"""

from __future__ import annotations

import logging
import threading
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Metric,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from moderator.errors import ImageErrorCode

if TYPE_CHECKING:  # the supervisor imports this module, and never torch
    from moderator.core.outcomes import ImageOutcome
    from moderator.core.policies import PolicySet
    from moderator.core.scoring import Decision

log = logging.getLogger(__name__)

NAMESPACE = "moderator"
# Model batches take milliseconds to seconds: finer than the web defaults at the low end,
# and up to 30 s for big batches on a CPU.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15,
    0.25, 0.4, 0.6, 1.0, 1.5, 2.5, 4.0, 7.0, 12.0, 30.0
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)
REJECTION_REASONS = ("overload", "request_limit", "deadline", "cancelled")
RESTART_REASONS = ("timeout", "crash")
RESULTS = ("success", "error")


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        # process_* (memory, CPU seconds, open files) and python_info, on this registry too
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        self.requests = self._counter(
            "requests",
            "RPCs by method, gRPC status code and caller (a name from the token file, "
            "'anonymous' without one, 'unauthenticated' for calls without a known token).",
            ["method", "code", "caller"],
        )
        self.request_duration = self._histogram(
            "request_duration_seconds",
            "RPC wall time.",
            ["method"],
        )
        self.images = self._counter(
            "images",
            "Images moderated, by decision (allow, review, block, error).",
            ["decision"],
        )
        self.image_errors = self._counter(
            "image_errors",
            "Images that could not be moderated, by error code.",
            ["code"],
        )
        self.policy_violations = self._counter(
            "policy_violations",
            "Policy violations, shadow ones included.",
            ["policy", "mode"],
        )
        self.batch_images = self._histogram(
            "batch_images",
            "Image views per forward pass.",
            buckets=BATCH_BUCKETS,
        )
        self.queue_images = self._gauge(
            "queue_images",
            "Images waiting for the model.",
        )
        self.queue_wait = self._histogram(
            "queue_wait_seconds",
            "Time from an image entering the queue to its forward pass.",
        )
        self.decode_duration = self._histogram(
            "decode_duration_seconds",
            "Time to decode one image into its views in a decode worker, refusals included.",
        )
        self.decode_workers = self._gauge(
            "decode_workers",
            "Decode worker processes.",
        )
        self.decode_worker_restarts = self._counter(
            "decode_worker_restarts",
            "Decode workers killed and replaced: 'timeout' (an image ran past the decode budget) "
            "or 'crash' (the worker died).",
            ["reason"],
        )
        self.device_decodes = self._counter(
            "device_decodes",
            "Images offered to the device's JPEG decoder (--gpu-decode), by where they were "
            "decoded: device, or cpu (not a plain JPEG, or the device failed on it).",
            ["path"],
        )
        self.inference_duration = self._histogram(
            "inference_duration_seconds",
            "Forward pass plus scoring time per batch.",
        )
        self.rejected_requests = self._counter(
            "rejected_requests",
            "Work kept from the model: 'overload' (a budget full), 'request_limit' (one request "
            "needs more than it may), 'deadline' and 'cancelled' (queued or waiting work dropped).",
            ["reason"],
        )
        self.admission_in_flight = self._gauge(
            "admission_in_flight",
            "Work admitted and not finished, by resource (images, views, bytes, rescore_requests).",
            ["resource"],
        )
        self.admission_limit = self._gauge(
            "admission_limit",
            "The most work admitted at once, by resource.",
            ["resource"],
        )
        self.auth_reloads = self._counter(
            "auth_reloads",
            "Token file (re)loads by result (success or error; an error keeps the previous file).",
            ["result"],
        )
        self.auth_file_info = self._gauge(
            "auth_file_info",
            "The token file in force: a hash of its content (always 1; one series at a time).",
            ["version"],
        )
        self.healthy = self._gauge(
            "healthy",
            "1 while health reports SERVING because the model works, 0 otherwise.",
        )
        self.health_problem = self._gauge(
            "health_problem",
            "1 while this problem holds health at NOT_SERVING: 'failed_batches' (forward passes "
            "failing in a row) or 'stuck_batch' (one forward pass running too long).",
            ["reason"],
        )
        self.policies_loaded = self._gauge(
            "policies_loaded",
            "Active policies by mode.",
            ["mode"],
        )
        self.policy_reloads = self._counter(
            "policy_reloads",
            "Policy (re)loads by result (success or error).",
            ["result"],
        )
        self.policy_last_reload = self._gauge(
            "policy_last_reload_timestamp_seconds",
            "Unix time of the last successful policy (re)load.",
        )
        self.policy_last_reload_success = self._gauge(
            "policy_last_reload_success",
            "1 if the last policy (re)load attempt succeeded, 0 while the running set is older "
            "than a directory that failed to load (and before the first load).",
        )
        self.policy_set_info = self._gauge(
            "policy_set_info",
            "The active policy-set version (always 1; one series at a time).",
            ["version"],
        )
        self.model_info = self._gauge(
            "model_info",
            "The model being served (always 1).",
            ["model", "pretrained", "device", "precision"],
        )
        self.text_embeddings_encoded = self._counter(
            "text_embeddings_encoded",
            "Policy prompts run through the text encoder (cache misses).",
        )
        self.embeddings_scored = self._counter(
            "embeddings_scored",
            "Stored image embeddings scored by ScoreEmbeddings (not counted in images_total).",
            ["result"],
        )
        self.image_cache_requests = self._counter(
            "image_cache_requests",
            "Moderated images looked up in the cache for repeated uploads (--image-cache-mb), "
            "by result: hit (decode and model skipped) or miss.",
            ["result"],
        )
        self.image_cache_bytes = self._gauge(
            "image_cache_bytes", "Bytes held by the cache for repeated uploads."
        )
        self.image_cache_entries = self._gauge(
            "image_cache_entries", "Images held by the cache for repeated uploads."
        )
        self.image_cache_max_bytes = self._gauge(
            "image_cache_max_bytes", "The cache's bound (--image-cache-mb; 0: off)."
        )
        self.known_content_matches = self._counter(
            "known_content_matches",
            "Policy decisions made by known content, shadow policies included: 'example' (an "
            "example image matched), 'hash' (a hash list entry matched), 'allow' (an allow "
            "example kept the policy from being violated).",
            ["policy", "rule"],
        )
        self.start_known_series_at_zero()

    def _counter(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Counter:
        return Counter(name, documentation, labels, namespace=NAMESPACE, registry=self.registry)

    def _gauge(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Gauge:
        return Gauge(name, documentation, labels, namespace=NAMESPACE, registry=self.registry)

    def _histogram(
        self,
        name: str,
        documentation: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> Histogram:
        return Histogram(
            name,
            documentation,
            labels,
            namespace=NAMESPACE,
            registry=self.registry,
            buckets=buckets,
        )

    def start_known_series_at_zero(self) -> None:
        """Every known label value exported from the start: rate() and increase() cannot see
        a counter's first event when its series appears with it (the first failed reload, the
        first overload of a pod would be invisible to alerts). The per-image series are kept,
        so counting a request's images needs no label lookup."""
        from moderator.core.scoring import Decision

        self._by_decision = {d: self.images.labels(decision=d.name.lower()) for d in Decision}
        self._by_error = {c: self.image_errors.labels(code=c.value) for c in ImageErrorCode}
        for reason in REJECTION_REASONS:
            self.rejected_requests.labels(reason=reason)
        for reason in RESTART_REASONS:
            self.decode_worker_restarts.labels(reason=reason)
        for path in ("device", "cpu"):
            self.device_decodes.labels(path=path)
        for result in ("hit", "miss"):
            self.image_cache_requests.labels(result=result)
        for result in RESULTS:
            self.policy_reloads.labels(result=result)
            self.auth_reloads.labels(result=result)

    def count_policy_set(
        self, policy_set: PolicySet, previous: PolicySet | None, unix_time: float
    ) -> None:
        """A policy set swapped in (replacing `previous`) at `unix_time`."""
        self.policy_reloads.labels(result="success").inc()
        self.policy_last_reload.set(unix_time)
        self.policy_last_reload_success.set(1)
        if previous is not None:
            self.policy_set_info.remove(previous.version)
        self.policy_set_info.labels(version=policy_set.version).set(1)
        for mode in ("enforce", "shadow"):
            count = sum(p.mode.value == mode for p in policy_set.policies)
            self.policies_loaded.labels(mode=mode).set(count)

    def count_outcomes(self, outcomes: Iterable[ImageOutcome]) -> None:
        """Images by decision and error code, and policy violations, of moderated images:
        tallied per request, one increment per series (not one label lookup per image)."""
        decisions: dict[Decision, int] = {}
        errors: dict[ImageErrorCode, int] = {}
        violations: dict[tuple[str, str], int] = {}
        known: dict[tuple[str, str], int] = {}
        for outcome in outcomes:
            decisions[outcome.decision] = decisions.get(outcome.decision, 0) + 1
            if outcome.error is not None:
                errors[outcome.error.code] = errors.get(outcome.error.code, 0) + 1
            for policy in outcome.violated:
                key = (policy.id, policy.mode.value)
                violations[key] = violations.get(key, 0) + 1
            for policy_id, rule in outcome.known_rules:
                known[policy_id, rule] = known.get((policy_id, rule), 0) + 1
        for decision, count in decisions.items():
            self._by_decision[decision].inc(count)
        for code, count in errors.items():
            self._by_error[code].inc(count)
        for (policy_id, mode), count in violations.items():
            self.policy_violations.labels(policy=policy_id, mode=mode).inc(count)
        for (policy_id, rule), count in known.items():
            self.known_content_matches.labels(policy=policy_id, rule=rule).inc(count)


WORKER_SCRAPE_SECONDS = 2.0
MAX_WORKER_METRICS_BYTES = 16 * 1024 * 1024


class SupervisorMetrics:
    """The supervisor's own metrics (--workers > 1), beside its workers' (WorkersCollector)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.workers = Gauge(
            "workers",
            "Server worker processes serving (--workers).",
            namespace=NAMESPACE,
            registry=registry,
        )
        self.worker_restarts = Counter(
            "worker_restarts",
            "Server worker processes started again after they exited on their own.",
            namespace=NAMESPACE,
            registry=registry,
        )


class WorkersCollector(Collector):
    """Every worker's metrics, read from its endpoint on localhost at each scrape, each sample
    labelled with the worker's number: counters add up with sum(), and one worker stuck or
    restarted shows as its own series."""

    def __init__(
        self,
        endpoints: Callable[[], Sequence[tuple[str, int]]],
        timeout: float = WORKER_SCRAPE_SECONDS,
    ) -> None:
        self._endpoints = endpoints  # (worker label, metrics port) of the workers serving now
        self._timeout = timeout
        self._failures = 0
        self._lock = threading.Lock()  # scrapes may run at once

    def collect(self) -> Iterator[Metric]:
        """Each worker read in a thread of its own, all within one timeout: a worker that is
        stuck, slow or answers garbage costs its own series, not the scrape."""
        endpoints = list(self._endpoints())
        texts: list[str | None] = []
        if endpoints:
            pool = ThreadPoolExecutor(len(endpoints), thread_name_prefix="worker-metrics")
            reads = [pool.submit(self._scrape, port) for _, port in endpoints]
            done, _ = wait(reads, self._timeout)
            texts = [r.result() if r in done else None for r in reads]
            pool.shutdown(wait=False)  # a read still dripping ends at its own socket timeout
        families: dict[str, Metric] = {}
        for (worker, _), text in zip(endpoints, texts, strict=True):
            if text is None or not self._merge(worker, text, families):
                with self._lock:
                    self._failures += 1
                log.warning("metrics of worker %s unreadable", worker)
        yield from families.values()
        yield CounterMetricFamily(
            f"{NAMESPACE}_worker_scrape_failures",
            "Reads of a worker's metrics that failed (its series are missing from that scrape).",
            value=self._failures,
        )

    def _scrape(self, port: int) -> str | None:
        url = f"http://127.0.0.1:{port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=self._timeout) as response:
                body: bytes = response.read(MAX_WORKER_METRICS_BYTES + 1)
            return body.decode() if len(body) <= MAX_WORKER_METRICS_BYTES else None
        except Exception:  # refused, reset, half an answer: this worker's series are missing
            return None

    @staticmethod
    def _merge(worker: str, text: str, families: dict[str, Metric]) -> bool:
        """Add one worker's families, each sample labelled; False if its text does not parse
        (nothing of it is added then). The text format shows a counter's creation time as a
        gauge family of its own (X_created), which OpenMetrics forbids beside counter X: those
        are left out."""
        try:
            parsed = list(text_string_to_metric_families(text))
        except Exception:
            return False
        parsed = [family for family in parsed if not family.name.endswith("_created")]
        for family in parsed:
            merged = families.setdefault(
                family.name, Metric(family.name, family.documentation, family.type)
            )
            for sample in family.samples:
                merged.samples.append(sample._replace(labels={**sample.labels, "worker": worker}))
        return True

"""The grpc.aio server: Moderator service, health, reflection, metrics, graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from moderator.config import Config, ModelConfig, ServerConfig
from moderator.core.clip import ClipModel, load_clip
from moderator.core.policies import ReloadStatus
from moderator.errors import ConfigError
from moderator.serving.auth import AccessControl, AuthInterceptor
from moderator.serving.engine import MODEL_STOP_SECONDS, ModerationEngine
from moderator.serving.health import HealthMonitor
from moderator.serving.metrics import Metrics
from moderator.serving.metrics_endpoint import start_metrics_endpoint
from moderator.serving.request_limits import RequestLimits
from moderator.serving.servicer import (
    ADMIN_PORT_METHODS,
    ALL_METHODS,
    SERVICE_NAME,
    ModeratorServicer,
)
from moderator.serving.tls import TlsFiles, server_credentials
from moderator.serving.tracing import Tracing, otlp_tracing
from moderator.serving.watcher import PolicyWatcher

log = logging.getLogger(__name__)

HEALTH_SERVICES = ("", SERVICE_NAME)
# Spans still buffered at shutdown get this long to reach the collector; the drain's budget is
# the pod's termination grace period.
TRACE_FLUSH_SECONDS = 2.0
KEEPALIVE_TIME_MS = 60_000
KEEPALIVE_TIMEOUT_MS = 20_000
MIN_CLIENT_PING_INTERVAL_MS = 10_000
IDENTITY_ONLY = 1  # bit 0 of grpc_compression_algorithm: no compression


def create_servicer(
    config: Config, engine: ModerationEngine, metrics: Metrics
) -> ModeratorServicer:
    server_config = config.server
    limits = RequestLimits(
        max_images=server_config.max_images_per_request,
        max_embeddings=server_config.max_embeddings_per_request,
        max_views=config.images.max_views,
    )
    return ModeratorServicer(
        engine,
        metrics,
        limits,
        max_calls=server_config.max_concurrent_rpcs,
        stream_idle_seconds=server_config.stream_idle_seconds,
    )


def grpc_options(config: ServerConfig, max_message_bytes: int) -> list[tuple[str, int]]:
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        # Compressed requests are refused (UNIMPLEMENTED): 130 KB of gzip can be 128 MiB.
        ("grpc.compression_enabled_algorithms_bitset", IDENTITY_ONLY),
        ("grpc.max_concurrent_streams", config.max_streams_per_connection),
        # Dead peers are found by pings; clients may ping every 10 s (gRPC's keepalive
        # guidance), more often is a strike and two strikes close the connection.
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        # A port already in use is an error, not a second server sharing its connections;
        # only the workers of one supervisor share theirs (it holds the port for them).
        ("grpc.so_reuseport", 1 if config.reuse_port else 0),
    ]
    if config.max_connection_age_seconds > 0:
        # Behind a Kubernetes Service an HTTP/2 connection never moves: ageing connections
        # makes clients reconnect and reach pods added by a scale-out.
        options += [
            ("grpc.max_connection_age_ms", int(config.max_connection_age_seconds * 1000)),
            (
                "grpc.max_connection_age_grace_ms",
                int(config.max_connection_age_grace_seconds * 1000),
            ),
        ]
    return options


def create_server(
    config: ServerConfig,
    max_message_bytes: int,
    handler: grpc.GenericRpcHandler,  # type: ignore[type-arg]
    health_servicer: HealthServicer,
    *,
    interceptor: AuthInterceptor,
    address: tuple[str, int],
) -> tuple[grpc.aio.Server, int]:
    """Build a server for `handler` and bind `address` (port 0 picks a free one)."""
    server = grpc.aio.server(
        interceptors=[interceptor], options=grpc_options(config, max_message_bytes)
    )
    server.add_generic_rpc_handlers((handler,))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if config.reflection:
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
    host, port = address
    bind = f"{host}:{port}"
    try:
        if config.tls_cert is not None and config.tls_key is not None:
            files = TlsFiles(config.tls_cert, config.tls_key, config.tls_client_ca)
            bound = server.add_secure_port(bind, server_credentials(files))
        else:
            bound = server.add_insecure_port(bind)
    except RuntimeError as exc:  # grpcio raises this for a port it cannot bind
        raise ConfigError(f"cannot listen on {bind}: {exc}") from exc
    if bound == 0:
        raise ConfigError(f"cannot listen on {bind}")
    return server, bound


class Service:
    """The whole running service: metrics endpoint, gRPC server, engine."""

    def __init__(
        self,
        config: Config,
        registry: CollectorRegistry | None = None,
        load_model: Callable[[ModelConfig], ClipModel] = load_clip,
        tracing: Tracing | None = None,
    ) -> None:
        self.config = config
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.tracing = tracing or otlp_tracing(config.server.otlp_endpoint)
        self.engine = ModerationEngine(config, self.metrics, load_model, self.tracing)
        self.servicer = create_servicer(config, self.engine, self.metrics)
        # read now: a broken token file stops the start before the model loads
        self.access = AccessControl(config.server.auth_tokens, self.metrics)
        self.health = HealthServicer()
        self.monitor = HealthMonitor(
            self.health,
            HEALTH_SERVICES,
            worker_state=self.engine.worker_state,
            probe=self.engine.probe,
            config=config.batching,
            metrics=self.metrics,
        )
        self.server: grpc.aio.Server | None = None
        self.admin_server: grpc.aio.Server | None = None
        self.port = 0
        self.admin_port = 0
        self.metrics_port = 0
        self._metrics_server: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._hurry = asyncio.Event()

    async def start(self) -> None:
        """Serve NOT_SERVING at once, load the engine off the loop, then serve SERVING."""
        await self.monitor.accepting(False)
        try:
            self._start_metrics_endpoint()
            await self._start_grpc()
        except BaseException:
            await self._stop_servers()
            raise
        log.info(
            "gRPC listening on %s:%d (NOT_SERVING until loaded)", self.config.server.host, self.port
        )
        # Fingerprint before loading, so an edit made during start-up is picked up.
        watcher = PolicyWatcher(
            self.config.policies_dir, self.config.policy_poll_seconds, self.engine.reload
        )
        try:
            await run_in_daemon_thread(self.engine.start)
        except BaseException:  # what had started (decode workers, threads) stops too
            await asyncio.get_running_loop().run_in_executor(None, self.engine.stop, 0.0)
            await self._stop_servers()
            raise
        if self.config.policy_poll_seconds > 0:
            self._tasks.append(asyncio.ensure_future(watcher.run()))
            if self.access.enabled:
                self._tasks.append(asyncio.ensure_future(self._watch_tokens()))
        self._tasks.append(asyncio.ensure_future(self.monitor.run()))
        await self.monitor.accepting(True)
        log.info("SERVING on port %d; metrics on port %d", self.port, self.metrics_port)

    async def stop(self, drain: bool = True) -> None:
        """The drain: NOT_SERVING at once; keep accepting for --drain-seconds while load
        balancers catch up (unless `drain` is False); then stop accepting and give accepted
        requests --shutdown-grace-seconds to finish (the rest are cancelled, their pending
        decodes with them); then stop the model worker and the decode workers."""
        await self.monitor.accepting(False)
        if drain and self.server is not None and self.config.server.drain_seconds > 0:
            log.info("NOT_SERVING; still accepting for %.1f s", self.config.server.drain_seconds)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._hurry.wait(), self.config.server.drain_seconds)
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.servicer.stop_accepting()
        if self.server is not None:
            log.info(
                "no longer accepting; %.1f s for accepted requests to finish",
                self.config.server.shutdown_grace_seconds,
            )
            grace = self.config.server.shutdown_grace_seconds
            servers = [self.server] + ([self.admin_server] if self.admin_server else [])
            await asyncio.gather(*(server.stop(grace=grace) for server in servers))
        model_timeout = 0.0 if self._hurry.is_set() else MODEL_STOP_SECONDS
        await asyncio.get_running_loop().run_in_executor(None, self.engine.stop, model_timeout)
        self._stop_metrics_endpoint()
        self.tracing.shutdown(TRACE_FLUSH_SECONDS)
        log.info("stopped")

    async def _stop_servers(self) -> None:
        for server in (self.server, self.admin_server):
            if server is not None:
                await server.stop(grace=None)
        self._stop_metrics_endpoint()

    async def _start_grpc(self) -> None:
        """The public port; with --admin-port, a second one for the admin methods only."""
        config = self.config.server
        interceptor = AuthInterceptor(self.access, SERVICE_NAME, self.metrics)
        split = config.admin_port >= 0
        public = ALL_METHODS - ADMIN_PORT_METHODS if split else ALL_METHODS
        self.server, self.port = await self._serve(public, (config.host, config.port), interceptor)
        if split:
            self.admin_server, self.admin_port = await self._serve(
                ADMIN_PORT_METHODS, (config.admin_host, config.admin_port), interceptor
            )
            log.info("admin methods on %s:%d only", config.admin_host, self.admin_port)

    async def _serve(
        self, methods: frozenset[str], address: tuple[str, int], interceptor: AuthInterceptor
    ) -> tuple[grpc.aio.Server, int]:
        server, port = create_server(
            self.config.server,
            self.config.max_message_bytes,
            self.servicer.handler(methods),
            self.health,
            interceptor=interceptor,
            address=address,
        )
        try:
            await server.start()
        except BaseException:
            await server.stop(grace=None)
            raise
        return server, port

    async def _watch_tokens(self) -> None:
        while True:
            await asyncio.sleep(self.config.policy_poll_seconds)
            try:
                await asyncio.to_thread(self.access.reload_if_changed)
            except Exception:
                log.exception("token file check failed")

    async def hurry(self) -> None:
        """Cut a drain short: stop accepting now and cancel what is in flight."""
        self._hurry.set()
        for server in (self.server, self.admin_server):
            if server is not None:
                await server.stop(grace=None)

    def _start_metrics_endpoint(self) -> None:
        self._metrics_server = start_metrics_endpoint(self.registry, self.config.server)
        if self._metrics_server is not None:
            self.metrics_port = int(self._metrics_server.server_port)

    def _stop_metrics_endpoint(self) -> None:
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


async def run_until_signal(
    service: Service,
    on_serving: Callable[[Service], None] | None = None,
    hurry_on: tuple[signal.Signals, ...] = STOP_SIGNALS,
) -> None:
    """Start, serve until SIGTERM or SIGINT (SIGHUP reloads the policies), then drain; a
    second signal among `hurry_on` cuts the drain short. Signals a supervisor blocked while
    starting this process are let through once they have handlers."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: _reload_on_signal(service))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, (*STOP_SIGNALS, signal.SIGHUP))
    starting = asyncio.ensure_future(service.start())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        log.info("signal received while loading: exiting without serving")
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        return
    starting.result()  # start-up errors propagate to the CLI
    if on_serving is not None:
        on_serving(service)
    await stopping
    log.info("signal received: draining")
    stop.clear()
    for sig in STOP_SIGNALS:  # repeats of the others (a process group's, say) change nothing
        loop.add_signal_handler(sig, stop.set if sig in hurry_on else _ignore_repeat)
    draining = asyncio.ensure_future(service.stop())
    again = asyncio.ensure_future(stop.wait())
    await asyncio.wait({draining, again}, return_when=asyncio.FIRST_COMPLETED)
    if not draining.done():
        log.warning("second signal: stopping without waiting for requests in flight")
        await service.hurry()
    again.cancel()
    await draining


def _ignore_repeat() -> None:
    log.info("signal received again: still draining")


def run_in_daemon_thread(fn: Callable[[], None]) -> asyncio.Future[None]:
    """Run blocking `fn` on a daemon thread, so a signal during a long model load can still
    end the process (an executor thread would be joined at exit)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[None] = loop.create_future()

    def settle(error: BaseException | None) -> None:
        if future.done():
            return
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)

    def run() -> None:
        error: BaseException | None = None
        try:
            fn()
        except BaseException as exc:
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop may be closed by now
            loop.call_soon_threadsafe(settle, error)

    threading.Thread(target=run, name="engine-start", daemon=True).start()
    return future


def _reload_on_signal(service: Service) -> None:
    service.access.reload()  # the token file, even while the model loads
    if not service.engine.ready:
        log.warning("SIGHUP: token file re-read; policies not yet (still loading)")
        return
    log.info("SIGHUP: reloading policies")
    task = asyncio.ensure_future(service.engine.reload())
    _background.add(task)  # keep a reference until it is done
    task.add_done_callback(_background.discard)


_background: set[asyncio.Task[ReloadStatus]] = set()


async def serve(
    config: Config,
    on_serving: Callable[[Service], None] | None = None,
    load_model: Callable[[ModelConfig], ClipModel] = load_clip,
    hurry_on: tuple[signal.Signals, ...] = STOP_SIGNALS,
) -> None:
    await run_until_signal(Service(config, load_model=load_model), on_serving, hurry_on)

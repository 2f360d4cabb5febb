"""`--workers N`: N server processes sharing one port, under a supervisor.

One grpc.aio event loop does a request's protobuf, futures and results in one Python thread:
with small requests that thread is the limit long before a GPU is. Each worker is a whole
`moderator serve` (event loop, decode workers, model replica) binding the port with
SO_REUSEPORT, so the kernel spreads connections over them; DESIGN.md says why replicas rather
than front ends feeding one model process.

The supervisor imports no torch. It holds the ports (so nothing else takes them
between a worker's exit and its restart), gives each worker its share of the CPUs, serves the
workers' metrics as one endpoint with a `worker` label, forwards SIGTERM, SIGINT (the drain)
and SIGHUP (reload), and starts again a worker that exits on its own. A worker that exits
before it ever served stops the whole service instead: its configuration cannot work, and
restarting it forever would hide that.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from moderator.config import Config, ModelConfig
from moderator.core.cpus import usable_cpus
from moderator.errors import ConfigError
from moderator.logs import configure_logging
from moderator.serving.metrics import SupervisorMetrics, WorkersCollector
from moderator.serving.metrics_endpoint import start_metrics_endpoint
from moderator.serving.ports import hold_port

if TYPE_CHECKING:
    from moderator.core.clip import ClipModel
    from moderator.serving.server import Service

log = logging.getLogger(__name__)

POLL_SECONDS = 0.2
FIRST_RESTART_SECONDS = 1.0
LONGEST_RESTART_SECONDS = 30.0
# A worker that served this long before exiting restarts after the shortest wait again.
STABLE_SECONDS = 60.0
_PR_SET_PDEATHSIG = 1
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# After the drain's own budget (drain, grace, model stop, trace flush), a worker still running
# is stuck: it is killed.
STOP_MARGIN_SECONDS = 15.0


@dataclass(frozen=True)
class LogSettings:
    level: str = "INFO"
    log_format: str = "text"
    log_requests: bool = False


@dataclass
class Worker:
    number: int
    process: BaseProcess | None = None
    ready: Connection | None = None  # the worker's "serving" message arrives here
    metrics_port: int = 0  # 0 until it serves (or with metrics off)
    served: bool = False  # ever, in any of its lives
    serving: bool = False  # in this life
    started_at: float = 0.0
    restart_wait: float = FIRST_RESTART_SECONDS
    restart_at: float | None = None


def worker_config(config: Config, cpus: int) -> Config:
    """One worker's configuration: the ports the supervisor holds (shared), metrics on a free
    localhost port (the supervisor serves them), its share of the CPUs for torch's threads and
    for its decode workers where those were left to be sized from the CPUs."""
    share = max(1, cpus // config.server.workers)
    server = replace(
        config.server,
        workers=1,
        reuse_port=True,
        metrics_port=0 if config.server.metrics_port >= 0 else -1,
        metrics_host="127.0.0.1",
        metrics_tls_cert=None,
        metrics_tls_key=None,
        metrics_tls_client_ca=None,
    )
    return replace(
        config,
        server=server,
        model=replace(config.model, threads=config.model.threads or share),
        decode=replace(config.decode, workers=config.decode.workers or share),
    )


@dataclass(frozen=True)
class WorkerSetup:
    """What every worker process is started with (sent to it by multiprocessing)."""

    config: Config
    logs: LogSettings
    load_model: Callable[[ModelConfig], ClipModel] | None
    supervisor: int  # its pid


def run_worker(setup: WorkerSetup, number: int, ready: Connection) -> None:
    """A worker process's main: the service, with the supervisor told once it serves. It
    starts with SIGTERM, SIGINT and SIGHUP blocked (start_worker): they wait for its handlers.
    A repeated SIGTERM does not hurry its drain (the supervisor hurries it with SIGINT)."""
    os.setpgrp()  # a terminal's Ctrl-C reaches the supervisor only; it drains the workers
    _die_with_parent(setup.supervisor)
    logs = setup.logs
    configure_logging(logs.level, logs.log_format, logs.log_requests, worker=number)
    from moderator.core.clip import load_clip
    from moderator.serving.server import serve

    def serving(service: Service) -> None:
        ready.send({"metrics_port": service.metrics_port, "port": service.port})
        ready.close()

    load_model = setup.load_model or load_clip
    asyncio.run(serve(setup.config, serving, load_model, hurry_on=(signal.SIGINT,)))
    # Stopped, or stopped while loading: then the model still loads on a daemon thread, and
    # finalising the interpreter under it can abort. Nothing is left to clean up.
    logging.shutdown()
    os._exit(0)


def _die_with_parent(supervisor: int) -> None:
    """SIGTERM (a drain) when the supervisor dies, even by SIGKILL: no orphan keeps serving.
    (The supervisor may be PID 1, in a container.)"""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != supervisor:  # it died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


class Supervisor:
    """Starts, watches and stops the workers; serves their metrics."""

    def __init__(
        self,
        config: Config,
        logs: LogSettings = LogSettings(),
        load_model: Callable[[ModelConfig], ClipModel] | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.config = config
        self._logs = logs
        self._load_model = load_model
        self._context = multiprocessing.get_context("spawn")  # no fork of a threaded process
        self._held: list[socket.socket] = []
        self._workers = [Worker(number) for number in range(config.server.workers)]
        self._setup = WorkerSetup(config, logs, load_model, os.getpid())
        self.registry = registry or CollectorRegistry()
        self.metrics = SupervisorMetrics(self.registry)
        self.registry.register(WorkersCollector(self.metrics_endpoints))
        self._metrics_server: Any = None
        self.port = 0
        self.metrics_port = 0
        self.stopping = False

    def metrics_endpoints(self) -> list[tuple[str, int]]:
        return [(str(w.number), w.metrics_port) for w in self._workers if w.metrics_port]

    def worker_pids(self) -> list[int]:
        return [w.process.pid for w in self._workers if w.process and w.process.pid]

    def hold_ports(self) -> None:
        """Take the ports before any worker starts: a port in use stops the start here."""
        server = self.config.server
        main = hold_port(server.host, server.port)
        self._held += main
        self.port = main[0].getsockname()[1]
        admin_port = server.admin_port
        if admin_port >= 0:
            admin = hold_port(server.admin_host, admin_port)
            self._held += admin
            admin_port = admin[0].getsockname()[1]
        shared = replace(server, port=self.port, admin_port=admin_port)
        cpus = usable_cpus()
        if server.workers > cpus:
            log.warning(
                "--workers %d on %d CPUs: each worker gets 1 torch thread and 1 decode worker, "
                "and its own model and admission budgets",
                server.workers,
                cpus,
            )
        shared_config = worker_config(replace(self.config, server=shared), cpus)
        self._setup = WorkerSetup(shared_config, self._logs, self._load_model, os.getpid())

    def start_metrics_endpoint(self) -> None:
        self._metrics_server = start_metrics_endpoint(self.registry, self.config.server)
        if self._metrics_server is not None:
            self.metrics_port = int(self._metrics_server.server_port)

    def start_worker(self, worker: Worker) -> None:
        receiving, sending = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=run_worker,
            args=(self._setup, worker.number, sending),
            name=f"moderator-worker-{worker.number}",
        )
        # Blocked until the worker's handlers exist: a signal during its start-up is handled,
        # not fatal (the mask is inherited; the supervisor gets its own signals after this).
        # multiprocessing's resource tracker, started with the first process, unblocks SIGINT
        # and SIGTERM when it starts: started first.
        resource_tracker.ensure_running()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        sending.close()  # the worker's copy is its own; EOF here once it exits
        worker.process, worker.ready, worker.metrics_port = process, receiving, 0
        worker.started_at, worker.restart_at = time.monotonic(), None
        log.info("worker %d started (pid %d)", worker.number, process.pid)

    def check_workers(self) -> None:
        """Note workers that now serve; schedule a restart for one that exited; raise
        ConfigError for one that exited without ever serving."""
        now = time.monotonic()
        self._reap_orphans()
        for worker in self._workers:
            process = worker.process
            if process is None:
                if worker.restart_at is not None and now >= worker.restart_at:
                    self.start_worker(worker)
                    self.metrics.worker_restarts.inc()
                continue
            alive = process.is_alive()
            self._note_serving(worker)  # after is_alive: a message sent just before exit counts
            if alive or self.stopping:
                continue
            worker.process, worker.metrics_port, worker.serving = None, 0, False
            if not worker.served:
                raise ConfigError(
                    f"worker {worker.number} exited with status {process.exitcode} "
                    "before it served (its log above says why)"
                )
            if now - worker.started_at > STABLE_SECONDS:
                worker.restart_wait = FIRST_RESTART_SECONDS
            worker.restart_at = now + worker.restart_wait
            log.error(
                "worker %d exited with status %s; starting it again in %.0f s",
                worker.number,
                process.exitcode,
                worker.restart_wait,
            )
            worker.restart_wait = min(2 * worker.restart_wait, LONGEST_RESTART_SECONDS)
        self.metrics.workers.set(sum(1 for w in self._workers if w.serving))

    def _note_serving(self, worker: Worker) -> None:
        if worker.ready is None:
            return
        try:
            if not worker.ready.poll():
                return
            message = worker.ready.recv()
        except (EOFError, OSError):
            message = None
        worker.ready.close()
        worker.ready = None
        if isinstance(message, dict):
            worker.served = worker.serving = True
            worker.metrics_port = int(message.get("metrics_port") or 0)
            log.info("worker %d serving", worker.number)

    def signal_workers(self, sig: signal.Signals) -> None:
        for worker in self._workers:
            if worker.process is not None and worker.process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.process.pid, sig)

    async def wait_for_workers(self, seconds: float | None = None) -> int:
        """Wait until every worker has exited (killing those still running after `seconds`);
        0 if all exited cleanly."""
        deadline = None if seconds is None else time.monotonic() + seconds
        status = 0
        for worker in self._workers:
            process = worker.process
            if process is None:
                continue
            while process.is_alive():
                if deadline is not None and time.monotonic() > deadline:
                    log.error("worker %d did not stop: killed", worker.number)
                    process.kill()
                    deadline = None
                await asyncio.sleep(POLL_SECONDS)
            process.join()
            if process.exitcode != 0:
                log.error("worker %d exited with status %s", worker.number, process.exitcode)
            status = status or (0 if process.exitcode == 0 else 1)
            worker.process = None
        return status

    def _reap_orphans(self) -> None:
        """As PID 1 in a container, processes whose parent died (a killed worker's decode
        workers) become ours: reaped here, leaving the workers to multiprocessing."""
        ours = {w.process.pid for w in self._workers if w.process is not None}
        while True:
            try:
                found = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if found is None or found.si_pid in ours:
                return
            with contextlib.suppress(ChildProcessError):
                os.waitpid(found.si_pid, 0)

    def close(self) -> None:
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None
        for held in self._held:
            held.close()
        self._held.clear()
        self.metrics.workers.set(0)

    async def run(self, on_serving: Callable[[Supervisor], None] | None = None) -> int:
        """Serve until SIGTERM or SIGINT, then drain every worker (a second signal hurries
        them); SIGHUP is passed on. Returns the exit status."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.signal_workers, signal.SIGHUP)
        try:
            self.hold_ports()
            self.start_metrics_endpoint()
            for worker in self._workers:
                self.start_worker(worker)
            announced = False
            while not stop.is_set():
                self.check_workers()
                if not announced and all(w.served for w in self._workers):
                    announced = True
                    log.info(
                        "all %d workers SERVING on port %d; metrics on port %d",
                        len(self._workers),
                        self.port,
                        self.metrics_port,
                    )
                    if on_serving is not None:
                        on_serving(self)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), POLL_SECONDS)
            return await self.drain(stop)
        except Exception:
            self.stopping = True
            self.signal_workers(signal.SIGTERM)
            await self.wait_for_workers(self._stop_seconds())
            raise
        finally:
            self.close()

    def _stop_seconds(self) -> float:
        server = self.config.server
        return server.drain_seconds + server.shutdown_grace_seconds + STOP_MARGIN_SECONDS

    async def drain(self, stop: asyncio.Event) -> int:
        """SIGTERM to every worker (each drains); a second signal here sends SIGINT, which
        cuts their drains short; a worker still running after the drain's budget is killed."""
        log.info("signal received: draining %d workers", len(self._workers))
        self.stopping = True
        self.signal_workers(signal.SIGTERM)
        stop.clear()
        waiting = asyncio.ensure_future(self.wait_for_workers(self._stop_seconds()))
        again = asyncio.ensure_future(stop.wait())
        await asyncio.wait({waiting, again}, return_when=asyncio.FIRST_COMPLETED)
        if not waiting.done():
            log.warning("second signal: the workers stop without waiting for requests")
            self.signal_workers(signal.SIGINT)
        again.cancel()
        return await waiting

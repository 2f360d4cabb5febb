"""`moderator serve --workers 2`: two server processes on one port under a supervisor."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from moderator_client.v1 import moderator_pb2 as pb
from moderator_client.v1 import moderator_pb2_grpc as pb_grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import own_connection, shape_png, start_demo_server_process, wait_until

ALL_SERVING = r"workers SERVING on port"
CONNECTIONS = 16  # the kernel hashes each connection to a worker: all 16 on one is 1 in 32768


@dataclass
class Supervised:
    process: subprocess.Popen[str]
    port: int
    metrics_port: int
    log: list[str]

    def worker_pids(self) -> dict[int, int]:
        """Worker number -> pid of its latest start."""
        pids = {}
        for line in list(self.log):
            if match := re.search(r"worker (\d+) started \(pid (\d+)\)", line):
                pids[int(match.group(1))] = int(match.group(2))
        return pids

    def metrics(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        """Sample name -> (labels, value) of each of its samples, from the supervisor."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples.setdefault(sample.name, []).append((sample.labels, sample.value))
        return samples


def start_supervised(*flags: str) -> Supervised:
    log: list[str] = []
    process, port = start_demo_server_process(
        "--workers", "2", "--metrics-port", "0", *flags, log=log, serving=ALL_SERVING
    )
    line = next(line for line in log if re.search(ALL_SERVING, line))
    metrics_port = int(re.search(r"metrics on port (\d+)", line).group(1))  # type: ignore[union-attr]
    return Supervised(process, port, metrics_port, log)


@pytest.fixture(scope="module")
def supervised() -> Iterator[Supervised]:
    running = start_supervised("--drain-seconds", "0")
    yield running
    if running.process.poll() is None:
        running.process.kill()
        running.process.wait()


def moderate_on_many_connections(port: int) -> list[pb.ModerateResponse]:
    request = pb.ModerateRequest(images=[pb.Image(id="a", data=shape_png("red", "circle"))])
    answers = []
    for _ in range(CONNECTIONS):
        with own_connection(f"127.0.0.1:{port}") as channel:
            answers.append(pb_grpc.ModeratorStub(channel).Moderate(request, timeout=60))
    return answers


def images_by_worker(running: Supervised) -> dict[str, float]:
    samples = running.metrics()["moderator_images_total"]
    totals: dict[str, float] = {}
    for labels, value in samples:
        totals[labels["worker"]] = totals.get(labels["worker"], 0.0) + value
    return totals


def test_both_workers_answer_on_the_one_port_and_their_metrics_are_merged(
    supervised: Supervised,
) -> None:
    answers = moderate_on_many_connections(supervised.port)
    assert {a.results[0].decision for a in answers} == {pb.DECISION_BLOCK}
    assert len({a.policy_version for a in answers}) == 1
    by_worker = images_by_worker(supervised)
    assert set(by_worker) == {"0", "1"}
    assert sum(by_worker.values()) == CONNECTIONS
    assert min(by_worker.values()) > 0  # the kernel spread the connections
    assert supervised.metrics()["moderator_workers"] == [({}, 2.0)]


def test_a_worker_that_dies_is_started_again_and_the_port_keeps_answering(
    supervised: Supervised,
) -> None:
    before = supervised.worker_pids()
    os.kill(before[1], signal.SIGKILL)
    # Connections the kernel gave the dying worker before it closed its socket are reset
    # (clients retry UNAVAILABLE); once it is gone, worker 0 takes every new one.
    wait_until(lambda: any("worker 1 exited" in line for line in supervised.log), timeout=30)
    moderate_on_many_connections(supervised.port)
    wait_until(lambda: supervised.worker_pids().get(1, before[1]) != before[1], timeout=30)
    wait_until(lambda: supervised.metrics()["moderator_workers"] == [({}, 2.0)], timeout=60)
    assert supervised.metrics()["moderator_worker_restarts_total"] == [({}, 1.0)]
    assert supervised.worker_pids()[0] == before[0]
    moderate_on_many_connections(supervised.port)


def test_sigterm_drains_every_worker_and_exits_cleanly(supervised: Supervised) -> None:
    pids = supervised.worker_pids().values()
    supervised.process.send_signal(signal.SIGTERM)
    assert supervised.process.wait(timeout=60) == 0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert sum("stopped" in line for line in supervised.log) >= 2


def test_a_worker_that_cannot_start_stops_the_service_with_the_reason(tmp_path: Path) -> None:
    broken = f"{tmp_path}/policies"
    os.makedirs(broken)
    with open(f"{broken}/bad.yaml", "w") as file:
        file.write("id: bad\nthreshold: 7\n")
    process = subprocess.run(
        [sys.executable, "-m", "moderator", "serve", "--demo", "--workers", "2",
         "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1", "--policies", broken],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert process.returncode == 2
    assert "before it served" in process.stderr


def serve_command(*flags: str) -> list[str]:
    return [
        sys.executable, "-m", "moderator", "serve", "--demo", "--workers", "2",
        "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1", "--drain-seconds", "0",
        "--policy-poll-seconds", "0", *flags,
    ]  # fmt: skip


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM])
def test_signals_while_the_workers_load_are_handled_not_fatal(sig: signal.Signals) -> None:
    log: list[str] = []
    process = subprocess.Popen(serve_command(), stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    for line in process.stderr:
        log.append(line)
        if "worker 1 started" in line:
            break
    process.send_signal(sig)  # the workers are importing torch and loading the model
    if sig == signal.SIGHUP:
        for line in process.stderr:
            log.append(line)
            if re.search(ALL_SERVING, line):
                break
        process.send_signal(signal.SIGTERM)
    log += process.stderr.readlines()
    assert process.wait(timeout=120) == 0, "".join(log[-20:])


def test_the_supervisor_as_pid_1_starts_and_drains_its_workers() -> None:
    """In a container without an init the supervisor is PID 1 (its workers' parent pid is 1)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare here")
    if subprocess.run([unshare, "--pid", "--fork", "true"], check=False).returncode:
        pytest.skip("no PID namespaces here (unshare needs privileges)")
    command = [unshare, "--pid", "--fork", "--kill-child", *serve_command()]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    log = []
    for line in process.stderr:
        log.append(line)
        if re.search(ALL_SERVING, line) or "error" in line:
            break
    assert re.search(ALL_SERVING, log[-1]), "".join(log[-20:])
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
    os.kill(int(children[0]), signal.SIGTERM)  # the supervisor: unshare passes nothing on
    log += process.stderr.readlines()
    assert process.wait(timeout=120) == 0, "".join(log[-20:])


def test_a_worker_that_does_not_stop_is_killed_after_the_drain_budget() -> None:
    running = start_supervised("--drain-seconds", "0", "--shutdown-grace-seconds", "0")
    stuck = running.worker_pids()[0]
    os.kill(stuck, signal.SIGSTOP)
    started = time.monotonic()
    running.process.send_signal(signal.SIGTERM)
    status = running.process.wait(timeout=120)
    assert time.monotonic() - started < 60
    assert status == 1  # a worker had to be killed
    assert any("worker 0 did not stop: killed" in line for line in running.log)

"""Fixtures of the deployment tests: the command-line tools they run for real, and a real
Prometheus to scrape a server with the alert rules loaded."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
import yaml

from tests.helpers import wait_until

# Set by CI, which installs the tools: a missing tool is then a failure, not a skip.
REQUIRE_TOOLS = "MODERATOR_REQUIRE_DEPLOY_TOOLS"
# Where each tool comes from, for the skip message.
HINTS = {
    "prometheus": "Debian: apt-get install prometheus",
    "promtool": "Debian: apt-get install prometheus",
    "kubectl": "1.27 or newer from kubernetes.io; Debian's kubernetes-client is too old",
}


def find_tool(name: str) -> Path:
    """The path of `name` on PATH; when it is missing, skip the test, or fail it when
    MODERATOR_REQUIRE_DEPLOY_TOOLS=1."""
    found = shutil.which(name)
    if found is not None:
        return Path(found)
    hint = f" ({HINTS[name]})" if name in HINTS else ""
    if os.environ.get(REQUIRE_TOOLS) == "1":
        pytest.fail(f"{name} is not on PATH{hint}, and {REQUIRE_TOOLS}=1 requires it")
    pytest.skip(f"{name} is not on PATH{hint}; set {REQUIRE_TOOLS}=1 to fail instead of skipping")


@pytest.fixture(scope="session")
def require_tool() -> Callable[[str], Path]:
    """`require_tool("kubectl")`: the tool's path, or the test skipped (failed with
    MODERATOR_REQUIRE_DEPLOY_TOOLS=1). Session-scoped, so module fixtures can use it too."""
    return find_tool


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free on 127.0.0.1 just now."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class Prometheus:
    url: str
    log: Path
    at: float | None = None  # when queries are evaluated; None: now

    def api(self, path: str, **params: str | float) -> Any:
        """The `data` of a successful /api/v1 answer (an error answer fails the test)."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                answer = json.load(response)
        except urllib.error.HTTPError as exc:  # a bad query: its JSON says why
            answer = json.loads(exc.read() or b"{}")
        assert answer.get("status") == "success", f"{path} {params}: {answer}"
        return answer["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        at = time.time() if self.at is None else self.at
        return cast(list[dict[str, Any]], self.api("query", query=promql, time=at)["result"])

    def log_tail(self) -> str:
        return self.log.read_text()[-4000:]


def stop(process: subprocess.Popen[Any]) -> None:
    process.terminate()
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def run_prometheus(
    binary: Path, directory: Path, *, target: str, job: str, labels: dict[str, str], rules: Path
) -> Iterator[Prometheus]:
    """Prometheus on a free port scraping `target` every second as `job` (with `labels` added
    to its series, as Kubernetes service discovery would), evaluating the `rules` file every
    second; its config, data and log in `directory`. Stopped on exit."""
    [port] = free_ports(1)
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": [target], "labels": labels}]}
        ],
    }
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
    prometheus = Prometheus(f"http://127.0.0.1:{port}", directory / "prometheus.log")
    with prometheus.log.open("w") as log:
        process = subprocess.Popen(
            [
                str(binary),
                f"--config.file={directory / 'prometheus.yml'}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:

        def ready() -> bool:
            assert process.poll() is None, f"prometheus exited:\n{prometheus.log_tail()}"
            try:
                with urllib.request.urlopen(f"{prometheus.url}/-/ready", timeout=1) as answer:
                    return bool(answer.status == 200)
            except OSError:  # not listening yet, or 503 while it starts
                return False

        wait_until(ready)
        yield prometheus
    finally:
        stop(process)

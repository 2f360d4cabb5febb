"""The alert rules (deploy/prometheus) and the Grafana dashboard (deploy/grafana): promtool
checks and unit-tests the rules; every query names metrics the service exports; and against a
real demo server scraped by a real Prometheus, every dashboard query shows data and every alert
expression evaluates."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
import yaml
from moderator_client.v1 import moderator_pb2 as pb
from moderator_client.v1 import moderator_pb2_grpc as pb_grpc
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from moderator.demo.hostile import gif_of_tiny_frames
from moderator.serving.metrics import Metrics, SupervisorMetrics, WorkersCollector
from tests.deploy.conftest import Prometheus, free_ports, run_prometheus, stop
from tests.helpers import (
    code_of,
    copy_demo_policies,
    shape_png,
    start_demo_server_process,
    wait_until,
)

REPO = Path(__file__).resolve().parents[2]
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yaml"
ALERT_TESTS = REPO / "deploy" / "prometheus" / "alerts_test.yaml"
DASHBOARD = REPO / "deploy" / "grafana" / "moderator.json"
Tool = Callable[[str], Path]
Json = dict[str, Any]

ALERT_NAMES = {
    "ModeratorDown",
    "ModeratorHighErrorRatio",
    "ModeratorQueueWaitHigh",
    "ModeratorRejectingWork",
    "ModeratorPolicyReloadFailing",
    "ModeratorPolicyVersionSkew",
    "ModeratorNoTraffic",
    "ModeratorNotHealthy",
}
# Exported but on no panel, and why.
NOT_ON_DASHBOARD = {
    "moderator_auth_reloads": "token-file reloads: only with --auth-tokens; audited in the log",
    "moderator_auth_file_info": "the token file's hash: only with --auth-tokens",
    "process_virtual_memory_bytes": "address space reserved, not used (CUDA and torch map tens "
    "of GiB they never touch); resident memory is the panel",
    "moderator_worker_scrape_failures": "the supervisor failed to read a worker's metrics "
    "(--workers): that worker's series have a gap, and the log says why",
    "moderator_workers": "the supervisor's (--workers > 1), which the live dashboard test does "
    "not run; each worker's own series are on every panel, summed",
    "moderator_worker_restarts": "the supervisor's (--workers > 1), as moderator_workers",
    "python_info": "the interpreter's version, fixed by the image tag; joined to the model table "
    "it would hide the pods of a server that lacks it",
}
# The service's own metrics and the process_* and python_info of prometheus_client's
# collectors, all on its registry.
METRIC = r"\b(?:moderator_\w+|process_\w+|python_info)\b"
# The live test's scrape adds these target labels, as Kubernetes service discovery would.
JOB, NAMESPACE, POD = "moderator", "moderation", "moderator-0"
CHOSEN = {"job": JOB, "namespace": NAMESPACE, "pod": POD}  # in the dashboard's variables
# Grafana's $__rate_interval, long enough to hold all of the live test's traffic.
RATE_INTERVAL = "30s"
IMAGES = "moderator_images"
RELOAD_SUCCESS = "moderator_policy_last_reload_success"
RELOAD_ALERT = "ModeratorPolicyReloadFailing"
# Label values the live traffic must put on these panels (besides each query having data).
EXPECTED_ON_PANELS = {
    "Throughput by decision": {"decision": {"allow", "review", "block", "error"}},
    "RPCs by method and status code": {
        "method": {"Moderate", "ModerateStream", "ModerateStream/request", "ReloadPolicies"},
        "code": {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"},
    },
    "Violations by policy and mode": {"policy": {"red", "stars", "green_squares"}},
    "Rejected work by reason": {"reason": {"overload"}},
    "Image errors by code": {"code": {"corrupt", "too_complex"}},
    "Decode workers, restarts, and where images are decoded": {"reason": {"timeout"}},
    "Policy reloads by result": {"result": {"success", "error"}},
    "Rescoring and text encoding": {"result": {"scored"}},
    "Repeated uploads: cache lookups by result": {"result": {"hit", "miss"}},
    "Decisions by known content, by policy and rule": {"policy": {"known_red"}, "rule": {"hash"}},
}
# Decoding takes Pillow about a second: past the live server's 400 ms budget, so its worker is
# killed and replaced (tests/end_to_end/test_hostile_images.py).
SLOW_GIF = gif_of_tiny_frames(frames=13, canvas=6000)


def panels() -> list[Json]:
    """Every panel but rows (layout only), those inside collapsed rows included."""
    found: list[Json] = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        found.extend([panel, *panel.get("panels", [])])
    return [p for p in found if p["type"] != "row"]


def variables() -> dict[str, Json]:
    dashboard = json.loads(DASHBOARD.read_text())
    return {v["name"]: v for v in dashboard["templating"]["list"]}


def alert_rules() -> list[Json]:
    [group] = yaml.safe_load(ALERTS.read_text())["groups"]
    assert group["name"] == "moderator"
    return cast(list[Json], group["rules"])


def exported_names() -> dict[str, str]:
    """Each sample name the service can export -> its metric family, from a real registry."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    service, supervisor = Metrics(CollectorRegistry()).registry, CollectorRegistry()
    SupervisorMetrics(supervisor)
    supervisor.register(WorkersCollector(list))  # its own counter, with no workers to read
    return {
        family.name + suffix: family.name
        for registry in (service, supervisor)
        for family in registry.collect()
        for suffix in suffixes[family.type]
    }


def run(*command: str | Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in command],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_promtool_checks_the_rules(require_tool: Tool) -> None:
    done = run(require_tool("promtool"), "check", "rules", ALERTS)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(ALERT_NAMES)} rules found" in done.stdout


def test_promtool_rule_unit_tests_pass(require_tool: Tool) -> None:
    done = run(require_tool("promtool"), "test", "rules", ALERT_TESTS)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_each_alert_is_unit_tested_firing_and_quiet() -> None:
    cases = [
        case
        for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
        for case in test["alert_rule_test"]
    ]
    fires = {c["alertname"] for c in cases if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert fires == quiet == ALERT_NAMES


def test_alerts_are_routable_explained_and_grouped_by_job_and_namespace() -> None:
    rules = alert_rules()
    assert {r["alert"] for r in rules} == ALERT_NAMES
    for rule in rules:
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert set(rule["annotations"]) == {"summary", "description"}, rule["alert"]
        assert len(rule["annotations"]["description"]) > 150, f"{rule['alert']}: no runbook"
        for grouping in re.findall(r"\bby \(([^)]*)\)", rule["expr"]):
            assert {"job", "namespace"} <= {g.strip() for g in grouping.split(",")}, rule["expr"]


def test_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36
    everything = [p for top in dashboard["panels"] for p in [top, *top.get("panels", [])]]
    ids = [p["id"] for p in everything]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    source = {"type": "prometheus", "uid": "${datasource}"}
    declared = variables()
    assert declared["datasource"]["type"] == "datasource"
    assert declared["datasource"]["query"] == "prometheus"
    for name in ("job", "namespace", "pod"):
        assert declared[name]["datasource"] == source
        assert declared[name]["definition"].startswith("label_values(")
    for panel in panels():
        title = panel["title"]
        assert panel["datasource"] == source, title
        assert panel["targets"], f"{title}: no query"
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), title
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, title
        for target in panel["targets"]:
            expr = target["expr"]
            assert target["datasource"] == source, title
            assert expr.strip(), f"{title}: empty query"
            assert set(re.findall(r"\[([^\]]+)\]", expr)) <= {"$__rate_interval"}, expr
            selectors = re.findall(rf"(?:{METRIC}|\bup\b)(\{{[^}}]*\}})?", expr)
            for selector in selectors:
                for name in ("job", "namespace", "pod"):
                    assert f'{name}=~"${name}"' in selector, f"{title}: {expr}"


def test_every_metric_named_is_exported_and_every_metric_is_shown() -> None:
    def named(texts: list[str]) -> set[str]:
        return {name for text in texts for name in re.findall(METRIC, text)}

    dashboard = [t["expr"] for p in panels() for t in p["targets"]]
    dashboard += [v["definition"] for v in variables().values() if "definition" in v]
    exported = exported_names()
    queried = named(dashboard + [r["expr"] for r in alert_rules()])
    assert queried - exported.keys() == set(), "not exported by moderator/serving/metrics.py"
    prose = named([text for r in alert_rules() for text in r["annotations"].values()])
    assert prose - exported.keys() - set(exported.values()) == set()  # family names too
    shown = {exported[n] for n in named(dashboard)}
    assert set(exported.values()) - shown == NOT_ON_DASHBOARD.keys()


def substitute(expr: str, values: Mapping[str, str]) -> str:
    """Grafana's variables replaced: $__rate_interval and the dashboard's own."""
    values = {**values, "__rate_interval": RATE_INTERVAL}
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values[str(m.group(1) or m.group(2))], expr)


def label_values(prometheus: Prometheus, definition: str, chosen: Mapping[str, str]) -> list[str]:
    """A variable's `label_values(selector, label)` query, as Grafana runs it."""
    match = re.fullmatch(r"label_values\((.+), *(\w+)\)", definition)
    assert match, definition
    selector = {"match[]": substitute(match.group(1), chosen)}
    return cast(list[str], prometheus.api(f"label/{match.group(2)}/values", **selector))


def traffic(stub: pb_grpc.ModeratorStub) -> None:
    """Every decision, a corrupt image, a refused request, a stream, a rescore, an overload."""
    shapes = {"red": ("red", "circle"), "star": ("yellow", "star"), "green": ("green", "square")}
    images = [pb.Image(id=name, data=shape_png(*shape)) for name, shape in shapes.items()]
    images.append(pb.Image(id="corrupt", data=shape_png("blue", "circle")[:100]))
    request = pb.ModerateRequest(images=images, include_embeddings=True)
    response = stub.Moderate(request, timeout=30)
    assert [r.decision for r in response.results] == [
        pb.DECISION_BLOCK,
        pb.DECISION_REVIEW,
        pb.DECISION_ALLOW,  # green squares: a shadow policy, violated and counted
        pb.DECISION_ERROR,
    ]
    unknown = pb.ModerateRequest(images=images[:1], policy_ids=["no_such_policy"])
    assert code_of(stub.Moderate, unknown, timeout=30) == grpc.StatusCode.INVALID_ARGUMENT
    assert len(list(stub.ModerateStream(iter([request, request]), timeout=30))) == 2
    stored = pb.EmbeddedImage(id="red", embedding=response.results[0].embedding)
    stub.ScoreEmbeddings(pb.ScoreEmbeddingsRequest(images=[stored]), timeout=30)
    wait_until(lambda: refused_while_decoding(stub))


def refused_while_decoding(stub: pb_grpc.ModeratorStub) -> bool:
    """With --max-concurrent-rpcs 1, a call made while SLOW_GIF holds the only slot is refused
    (overload) until its decode runs out of time (TOO_COMPLEX, its worker replaced)."""
    slow = stub.Moderate.future(
        pb.ModerateRequest(images=[pb.Image(id="slow", data=SLOW_GIF)]), timeout=30
    )
    refused = False
    while not slow.done() and not refused:
        code = code_of(stub.ListPolicies, pb.ListPoliciesRequest(), timeout=10)
        refused = code == grpc.StatusCode.RESOURCE_EXHAUSTED
    return refused and code_of(slow.result) == grpc.StatusCode.OK


def alert_states(prometheus: Prometheus) -> dict[str, str]:
    """Each pending or firing alert's name -> its state."""
    return {a["labels"]["alertname"]: a["state"] for a in prometheus.api("alerts")["alerts"]}


def exported(metrics: str, name: str) -> float:
    """The value of the unlabelled sample `name` in a /metrics text."""
    [value] = [
        sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == name and not sample.labels
    ]
    return value


@dataclass
class Reloads:
    policy_version: str  # served after the successful reload
    gauge_while_failing: float  # RELOAD_SUCCESS on /metrics after the failed reload
    alerts_while_failing: dict[str, str]  # once Prometheus had scraped that gauge


def reload_failing_then_fixed(
    stub: pb_grpc.ModeratorStub, policies: Path, metrics_url: str, prometheus: Prometheus
) -> Reloads:
    """A reload that fails (a broken file, the old set stays), then one that loads a changed
    threshold; each time, waits until Prometheus has scraped the new RELOAD_SUCCESS (so every
    series made so far is scraped before the next traffic) and the alert rules have seen it."""
    red = policies / "red.yaml"
    text = red.read_text()
    red.write_text("descriptions: [unclosed\n")
    assert not stub.ReloadPolicies(pb.ReloadPoliciesRequest(), timeout=60).status.ok
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        gauge = exported(response.read().decode(), RELOAD_SUCCESS)
    wait_until(lambda: bool(prometheus.query(f"{RELOAD_SUCCESS} == 0")))
    with contextlib.suppress(AssertionError):  # judged by the test, not here
        wait_until(lambda: RELOAD_ALERT in alert_states(prometheus), timeout=10)
    alerts = alert_states(prometheus)
    red.write_text(text.replace("threshold: 0.71", "threshold: 0.72"))
    reloaded = stub.ReloadPolicies(pb.ReloadPoliciesRequest(), timeout=60)
    assert reloaded.status.ok, reloaded.status
    wait_until(lambda: bool(prometheus.query(f"{RELOAD_SUCCESS} == 1")))
    return Reloads(str(reloaded.policy_version), gauge, alerts)


@dataclass
class Live:
    """A demo server that has seen every kind of traffic, and a Prometheus that scraped all
    of it, with the alert rules loaded. Queries are evaluated just after the last scrape."""

    prometheus: Prometheus
    metrics: str  # the server's /metrics text after the traffic
    reloads: Reloads


@pytest.fixture(scope="module")
def live(require_tool: Tool, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    binary = require_tool("prometheus")
    base = tmp_path_factory.mktemp("prometheus")
    policies = copy_demo_policies(base / "policies")
    add_known_red(policies)
    [metrics_port] = free_ports(1)
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    target, labels = f"127.0.0.1:{metrics_port}", {"namespace": NAMESPACE, "pod": POD}
    scraping = run_prometheus(binary, base, target=target, job=JOB, labels=labels, rules=ALERTS)
    with scraping as prometheus:
        server, port = start_demo_server_process(
            *("--metrics-port", str(metrics_port), "--policies", str(policies)),
            *("--decode-timeout-ms", "400", "--max-concurrent-rpcs", "1", "--drain-seconds", "0"),
        )
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.ModeratorStub(channel)
                traffic(stub)
                # scraped between the two rounds, so every counter the traffic made moves
                reloads = reload_failing_then_fixed(stub, policies, metrics_url, prometheus)
                traffic(stub)
            with urllib.request.urlopen(metrics_url, timeout=10) as response:
                metrics = response.read().decode()
            [images] = [f for f in text_string_to_metric_families(metrics) if f.name == IMAGES]
            moderated = sum(sample.value for sample in images.samples)
            query = f"sum({IMAGES}_total) == {moderated}"  # scraped since the last image
            wait_until(lambda: bool(prometheus.query(query)))
            prometheus.at = time.time()
            yield Live(prometheus, metrics, reloads)
        finally:
            stop(server)


def add_known_red(policies: Path) -> None:
    """A policy whose only signal is a SHA-256 list holding the traffic's red circle."""
    (policies / "lists").mkdir()
    digest = hashlib.sha256(shape_png("red", "circle")).hexdigest()
    (policies / "lists" / "known.csv").write_text(f"{digest},red-circle\n")
    (policies / "known_red.yaml").write_text(
        "title: Known red circle\naction: block\nsha256_lists: [lists/known.csv]\n"
    )


def test_live_metrics_pass_promtool_lint(live: Live, require_tool: Tool) -> None:
    done = run(require_tool("promtool"), "check", "metrics", stdin=live.metrics)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "", f"promtool check metrics found problems:\n{done.stdout}"


def test_dashboard_variables_list_the_scraped_targets(live: Live) -> None:
    chosen: dict[str, str] = {}
    for name, expected in CHOSEN.items():  # each variable's query uses the ones before it
        assert label_values(live.prometheus, variables()[name]["definition"], chosen) == [expected]
        chosen[name] = expected


def test_every_dashboard_query_shows_data(live: Live) -> None:
    """Each query with one job, namespace and pod chosen, and with "All" (.*) chosen: every
    query has data, and every label its legend names is on every series."""
    every = {name: variables()[name].get("allValue", ".*") for name in CHOSEN}
    without_data = []
    for panel in panels():
        seen: dict[str, set[str]] = {}
        for target in panel["targets"]:
            for chosen in (CHOSEN, every):
                series = live.prometheus.query(substitute(target["expr"], chosen))
                if not series:
                    without_data.append(f"{panel['title']}: {target['expr']}")
                for labels in (s["metric"] for s in series):
                    for name in re.findall(r"\{\{ *(\w+) *\}\}", target["legendFormat"]):
                        assert labels.get(name), f"{panel['title']}: no {name} in {labels}"
                    for name, value in labels.items():
                        seen.setdefault(name, set()).add(value)
        for name, values in EXPECTED_ON_PANELS.get(panel["title"], {}).items():
            assert values <= seen.get(name, set()), f"{panel['title']}: {name} {seen.get(name)}"
    assert without_data == []
    assert EXPECTED_ON_PANELS.keys() <= {p["title"] for p in panels()}


def test_dashboard_tables_show_the_policy_set_and_the_model(live: Live) -> None:
    queries = {
        (p["title"], t["refId"]): t["expr"]
        for p in panels()
        if p["type"] == "table"
        for t in p["targets"]
    }
    [policy_set] = live.prometheus.query(
        substitute(queries["Policy-set version per pod", "A"], CHOSEN)
    )
    expected = {"namespace": NAMESPACE, "pod": POD, "version": live.reloads.policy_version}
    assert policy_set["metric"] == expected
    assert 0 <= float(policy_set["value"][1]) < 120  # seconds since the last successful load
    [reload_ok] = live.prometheus.query(
        substitute(queries["Policy-set version per pod", "B"], CHOSEN)
    )
    assert reload_ok["metric"] == {"namespace": NAMESPACE, "pod": POD}
    assert float(reload_ok["value"][1]) == exported(live.metrics, RELOAD_SUCCESS) == 1
    [model] = live.prometheus.query(substitute(queries["Model and precision per pod", "A"], CHOSEN))
    assert model["metric"]["model"] == "moderator-shapes-demo"
    assert model["metric"]["precision"] in {"fp32", "bf16", "fp16"}


def test_every_alert_expression_evaluates_and_prometheus_loaded_the_rules(live: Live) -> None:
    for rule in alert_rules():
        live.prometheus.query(rule["expr"])  # parses and runs: firing or not

    def loaded_and_evaluated() -> bool:
        [group] = live.prometheus.api("rules")["groups"]
        assert group["name"] == "moderator"
        assert {r["name"] for r in group["rules"]} == ALERT_NAMES
        failing = [(r["name"], r.get("lastError")) for r in group["rules"] if r["health"] == "err"]
        assert failing == [], live.prometheus.log_tail()
        return all(r["health"] == "ok" for r in group["rules"])

    wait_until(loaded_and_evaluated)


def test_the_failed_reload_made_its_alert_pending_until_the_next_one(live: Live) -> None:
    """After the failed reload the server exported RELOAD_SUCCESS 0 and the rule went pending
    (its `for` is longer than this test); the successful reload put the gauge back to 1, and
    the alert is gone."""
    assert live.reloads.gauge_while_failing == 0
    assert live.reloads.alerts_while_failing.get(RELOAD_ALERT) == "pending"
    assert exported(live.metrics, RELOAD_SUCCESS) == 1
    [scraped] = live.prometheus.query(RELOAD_SUCCESS)
    assert float(scraped["value"][1]) == 1
    wait_until(lambda: RELOAD_ALERT not in alert_states(live.prometheus))


def test_the_live_traffic_trips_the_alerts_it_should(live: Live) -> None:
    """The overload refusals make their alert pending (its `for` is longer than this test);
    the server is up and healthy, so those alerts stay quiet."""
    expected = {"ModeratorRejectingWork": "pending"}
    wait_until(lambda: expected.items() <= alert_states(live.prometheus).items())
    quiet = {"ModeratorDown", "ModeratorNotHealthy", "ModeratorNoTraffic", RELOAD_ALERT}
    assert quiet.isdisjoint(alert_states(live.prometheus))

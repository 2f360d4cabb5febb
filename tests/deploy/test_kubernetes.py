"""The Kubernetes manifests (deploy/k8s) as kustomize renders both overlays: they pass the
Kubernetes schemas in strict mode and agree with the server that runs in them (its flags and
Config, its health services, its drain, its policy loader), and every selector finds the pods.
"""

from __future__ import annotations

import functools
import importlib
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from prometheus_client import CollectorRegistry

from moderator.cli.flags import ENV_PREFIX
from moderator.cli.main import build_parser
from moderator.cli.options import config_from_args, serve_variables
from moderator.config import Config
from moderator.core.policies import POLICY_SUFFIXES, load_policy_dir
from moderator.serving import server
from moderator.serving.engine import MODEL_STOP_SECONDS
from moderator.serving.health import LIVENESS_SERVICE
from moderator.serving.metrics import Metrics

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
ADAPTER_RULES = REPO / "deploy" / "prometheus" / "prometheus-adapter.yaml"
KEDA_EXAMPLE = K8S / "keda-scaledobject.example.yaml"
OVERLAYS = ("cpu", "gpu")
OLDEST_KUBERNETES = "1.29"  # the manifests use nothing newer (gRPC probes, matchLabelKeys)
IMAGE_UID = 10001  # the image's user and group
# CRD kinds have no schema in kubernetes-validate: test_servicemonitor_scrapes_each_pod_once
# checks this one against an explicit expectation instead.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
KINDS = {
    *(("v1", kind) for kind in ("Namespace", "ServiceAccount", "ConfigMap", "Service")),
    *(("apps/v1", "Deployment"), ("policy/v1", "PodDisruptionBudget")),
    *(("autoscaling/v2", "HorizontalPodAutoscaler"), ("networking.k8s.io/v1", "NetworkPolicy")),
    *CRD_KINDS,
}
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
PROBE_HANDLERS = {"grpc", "httpGet", "tcpSocket", "exec"}
GPU = "nvidia.com/gpu"
CACHE_VARIABLES = {"XDG_CACHE_HOME", "HF_HOME", "TORCH_HOME", "CUDA_CACHE_PATH"}
QUANTITY_SUFFIXES = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
SERIES = "moderator_admission_in_flight"  # what both autoscaler setups read
Obj = dict[str, Any]
Objects = tuple[Obj, ...]
Tool = Callable[[str], Path]  # tests/deploy/conftest.py: require_tool
# A dev dependency without type information (hence not a plain import).
kubernetes_validate = importlib.import_module("kubernetes_validate")


@functools.cache
def rendered(overlay: str, kubectl: str) -> Objects:
    command = [kubectl, "kustomize", str(K8S / "overlays" / overlay)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"kubectl kustomize {overlay} failed:\n{done.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return cast(str, request.param)


@pytest.fixture
def objects(overlay: str, require_tool: Tool) -> Objects:
    return rendered(overlay, str(require_tool("kubectl")))


def the(objects: Objects, kind: str, name: str | None = None) -> Obj:
    found = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_spec(objects: Objects) -> Obj:
    return cast(Obj, the(objects, "Deployment")["spec"]["template"]["spec"])


def container(objects: Objects) -> Obj:
    [only] = pod_spec(objects)["containers"]
    return cast(Obj, only)


def env_of(objects: Objects) -> dict[str, str]:
    variables = container(objects)["env"]
    names = [variable["name"] for variable in variables]
    assert len(names) == len(set(names)), f"a variable is set twice: {sorted(names)}"
    return {variable["name"]: variable.get("value", "") for variable in variables}


def selects(selector: Obj, labels: dict[str, str]) -> bool:
    """Whether a (non-empty) label selector selects these labels."""
    assert set(selector) == {"matchLabels"}, f"only matchLabels is read here: {selector}"
    wanted: dict[str, str] = selector["matchLabels"]
    return bool(wanted) and labels.items() >= wanted.items()


def container_port(objects: Objects, port: int | str) -> int:
    """A container port given by number or name, as Services and NetworkPolicies give it."""
    ports = {p["name"]: p["containerPort"] for p in container(objects)["ports"]}
    assert port in ports or port in ports.values(), f"no container port {port!r}: {ports}"
    return ports[port] if isinstance(port, str) else port


def quantity(text: str | int) -> float:
    """A Kubernetes resource quantity ("4", "500m", "6Gi") as a number."""
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text))
    assert match, f"cannot read quantity {text!r}"
    return float(match[1]) * QUANTITY_SUFFIXES.get(match[2], 1)


def served_config(objects: Objects) -> Config:
    """The Config `moderator serve` builds from the container's environment, as it builds it."""
    try:
        args = build_parser(env_of(objects)).parse_args(["serve"])
    except SystemExit:
        pytest.fail("moderator serve refuses the container's MODERATOR_* values (see stderr)")
    return config_from_args(args)  # raises ConfigError naming the flag


def test_renders_and_passes_the_kubernetes_schemas(objects: Objects) -> None:
    assert {(o["apiVersion"], o["kind"]) for o in objects} == KINDS
    builtin = [o for o in objects if (o["apiVersion"], o["kind"]) not in CRD_KINDS]
    for version in (OLDEST_KUBERNETES, kubernetes_validate.latest_version()):
        for obj in builtin:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                where = ".".join(map(str, exc.path))
                name = f"{obj['kind']}/{obj['metadata']['name']}"
                pytest.fail(f"{name}, Kubernetes {version}: {where}: {exc.message}")
    # Everything lands in the one namespace (a component's objects too).
    namespaces = {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"}
    assert namespaces == {the(objects, "Namespace")["metadata"]["name"]}


def test_moderator_variables_are_serve_flags_and_build_a_config(objects: Objects) -> None:
    variables = container(objects)["env"]
    ours = {v["name"] for v in variables if v["name"].startswith(ENV_PREFIX)}
    assert ours <= serve_variables(), f"not flags of moderator serve: {ours - serve_variables()}"
    assert all("value" in v for v in variables if v["name"] in ours), "values this test can read"
    config = served_config(objects)
    assert config.server.port == container_port(objects, "grpc")
    assert config.server.metrics_port == container_port(objects, "metrics")
    assert config.policy_poll_seconds > 0, "hot reload of the ConfigMap needs the watcher"
    # Service links would set {SERVICE}_PORT=tcp://... for each Service: MODERATOR_PORT for the
    # one named moderator, which the server would read as --port.
    links = {
        service["metadata"]["name"].upper().replace("-", "_") + suffix
        for service in objects
        if service["kind"] == "Service"
        for suffix in ("_PORT", "_SERVICE_HOST", "_SERVICE_PORT")
    }
    clash = links & serve_variables()
    assert not clash or pod_spec(objects)["enableServiceLinks"] is False, clash


def test_probes_ask_the_servers_health_services(objects: Objects) -> None:
    config = served_config(objects)
    probes = {name: container(objects)[name] for name in PROBES}
    for name, probe in probes.items():
        assert set(probe) & PROBE_HANDLERS == {"grpc"}, f"{name}: native gRPC probes only"
        assert probe["grpc"]["port"] == config.server.port, name
    service = {name: probe["grpc"].get("service", "") for name, probe in probes.items()}
    # "" (the whole server): NOT_SERVING while loading, draining, or while forward passes fail.
    assert service["startupProbe"] == service["readinessProbe"] == "" in server.HEALTH_SERVICES
    assert service["livenessProbe"] == LIVENESS_SERVICE
    assert config.server.tls_cert is None, "the kubelet's gRPC probe cannot speak TLS"
    startup = probes["startupProbe"]
    budget = startup["periodSeconds"] * startup["failureThreshold"]
    assert budget >= 300, "room to download the weights and load the model"
    assert the(objects, "Deployment")["spec"]["progressDeadlineSeconds"] > budget


def test_security_context(objects: Objects) -> None:
    pod = pod_spec(objects)
    context = pod["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] == context["runAsGroup"] == context["fsGroup"] == IMAGE_UID
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    context = container(objects)["securityContext"]
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert not context.get("privileged", False)
    account = the(objects, "ServiceAccount", pod["serviceAccountName"])
    assert account["automountServiceAccountToken"] is False
    assert pod["automountServiceAccountToken"] is False


def test_grace_period_covers_the_drain(objects: Objects) -> None:
    # Set explicitly, so a change of the server's defaults cannot silently outgrow the period.
    assert {"MODERATOR_DRAIN_SECONDS", "MODERATOR_SHUTDOWN_GRACE_SECONDS"} <= set(env_of(objects))
    config = served_config(objects).server
    # After the grace, a running forward pass gets MODEL_STOP_SECONDS and traces a flush.
    after_grace = MODEL_STOP_SECONDS + server.TRACE_FLUSH_SECONDS
    needed = config.drain_seconds + config.shutdown_grace_seconds + after_grace
    assert pod_spec(objects)["terminationGracePeriodSeconds"] >= needed


def test_writable_paths_are_bounded_volumes(objects: Objects) -> None:
    mounts = container(objects)["volumeMounts"]
    volumes: dict[str, Obj] = {volume["name"]: volume for volume in pod_spec(objects)["volumes"]}

    def volume_at(path: str) -> Obj:
        holders = [m for m in mounts if Path(path).is_relative_to(m["mountPath"])]
        assert holders, f"{path} is on the read-only root filesystem"
        mount = max(holders, key=lambda m: len(m["mountPath"]))
        assert not mount.get("readOnly", False), f"{path} is mounted read-only"
        return volumes[mount["name"]]

    caches = [value for name, value in env_of(objects).items() if name in CACHE_VARIABLES]
    for path in [str(served_config(objects).embedding_cache_dir), *caches, "/tmp"]:
        volume = volume_at(path)
        assert "persistentVolumeClaim" in volume or volume["emptyDir"]["sizeLimit"], path
    shm = volume_at("/dev/shm")["emptyDir"]
    assert shm["medium"] == "Memory"
    assert quantity(shm["sizeLimit"]) > 64 * 2**20, "more than the runtime's 64 MB default"


def write_like_kubelet(directory: Path, data: dict[str, str]) -> None:
    """A ConfigMap volume as the kubelet writes it: a link per key through `..data`."""
    version = directory / "..2026_01_01_00_00_00.000000001"
    version.mkdir()
    for key, text in data.items():
        (version / key).write_text(text, encoding="utf-8")
    (directory / "..data").symlink_to(version.name)
    for key in data:
        (directory / key).symlink_to(f"..data/{key}")


def test_policies_mount_as_a_directory_the_loader_accepts(objects: Objects, tmp_path: Path) -> None:
    policies_dir = served_config(objects).policies_dir
    mounts = container(objects)["volumeMounts"]
    [mount] = [m for m in mounts if Path(m["mountPath"]) == policies_dir]
    assert "subPath" not in mount, "a subPath mount is never updated: no hot reload"
    assert mount["readOnly"] is True
    [volume] = [v for v in pod_spec(objects)["volumes"] if v["name"] == mount["name"]]
    assert "items" not in volume["configMap"], "every key of the ConfigMap is a policy"
    configmap = the(objects, "ConfigMap", volume["configMap"]["name"])
    # No hash suffix: an edit updates the mounted files of running pods, which reload them.
    assert configmap["metadata"]["name"] == "moderator-policies"
    write_like_kubelet(tmp_path, configmap["data"])
    policies = load_policy_dir(tmp_path)  # raises PolicyError listing every problem
    loaded = set(policies.ids) | set(policies.disabled)
    assert loaded == {Path(key).stem for key in configmap["data"]}


def test_configmap_holds_the_repository_policies(objects: Objects) -> None:
    shipped = the(objects, "ConfigMap", "moderator-policies")["data"]
    repository = {
        path.name: path.read_text(encoding="utf-8")
        for path in (REPO / "policies").iterdir()
        if path.name.endswith(POLICY_SUFFIXES)
    }
    assert shipped == repository, "copy policies/ into deploy/k8s/base (and its kustomization)"


def test_selectors_find_the_pods(objects: Objects) -> None:
    deployment = the(objects, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"], labels)
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"
    for service in [o for o in objects if o["kind"] == "Service"]:
        assert selects({"matchLabels": service["spec"]["selector"]}, labels)
        for port in service["spec"]["ports"]:
            container_port(objects, port["targetPort"])
    assert the(objects, "Service", "moderator-headless")["spec"]["clusterIP"] == "None"
    assert selects(the(objects, "PodDisruptionBudget")["spec"]["selector"], labels)
    assert selects(the(objects, "NetworkPolicy")["spec"]["podSelector"], labels)
    spread = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert "kubernetes.io/hostname" in {rule["topologyKey"] for rule in spread}
    assert all(selects(rule["labelSelector"], labels) for rule in spread)
    hpa = the(objects, "HorizontalPodAutoscaler")["spec"]
    name = deployment["metadata"]["name"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
    min_available = the(objects, "PodDisruptionBudget")["spec"]["minAvailable"]
    assert hpa["minReplicas"] >= 2
    assert hpa["minReplicas"] > min_available, "a node drain must be able to evict a pod"


def test_servicemonitor_scrapes_each_pod_once(objects: Objects) -> None:
    monitor = the(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(monitor["spec"]) == {"selector", "endpoints"}  # its own namespace only
    [endpoint] = monitor["spec"]["endpoints"]
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}
    assert endpoint.get("path", "/metrics") == "/metrics"
    selector = monitor["spec"]["selector"]
    services = [o for o in objects if o["kind"] == "Service"]
    scraped = [s for s in services if selects(selector, s["metadata"].get("labels", {}))]
    assert len(scraped) == 1, "two Services selected would scrape every pod twice"
    [port] = [p for p in scraped[0]["spec"]["ports"] if p["name"] == endpoint["port"]]
    assert container_port(objects, port["targetPort"]) == served_config(objects).server.metrics_port


def test_network_policy_admits_clients_and_prometheus_only(objects: Objects) -> None:
    spec = the(objects, "NetworkPolicy")["spec"]
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"}
    config = served_config(objects).server
    sources = {}
    for rule in spec["ingress"]:
        for port in rule["ports"]:
            sources[container_port(objects, port["port"])] = rule["from"]
    assert set(sources) == {config.port, config.metrics_port}
    assert {"podSelector": {}} in sources[config.port], "gRPC from the whole namespace"
    monitoring = {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    assert sources[config.metrics_port] == [{"namespaceSelector": monitoring}]
    egress = {(p["port"], p["protocol"]) for rule in spec["egress"] for p in rule["ports"]}
    assert egress == {(53, "UDP"), (53, "TCP"), (443, "TCP")}


def test_autoscaler_metric_is_served_by_the_adapter_rule(objects: Objects) -> None:
    hpa = the(objects, "HorizontalPodAutoscaler")["spec"]
    [metric] = hpa["metrics"]
    assert (metric["type"], metric["pods"]["target"]["type"]) == ("Pods", "AverageValue")
    rules = yaml.safe_load(ADAPTER_RULES.read_text(encoding="utf-8"))["rules"]["custom"]
    [rule] = [r for r in rules if r["name"]["as"] == metric["pods"]["metric"]["name"]]
    series = rule["seriesQuery"].split("{")[0]
    assert re.fullmatch(rule["name"]["matches"], series)
    Metrics(registry := CollectorRegistry())
    assert series in {family.name for family in registry.collect()}, "a metric the server has"
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300


def test_scaling_queries_count_images_in_flight(require_tool: Tool, tmp_path: Path) -> None:
    """promtool runs the adapter's query (filled in as the adapter fills it) and the KEDA
    example's on two pods' series: per pod and in sum, their images in flight, nothing else."""
    [rule] = yaml.safe_load(ADAPTER_RULES.read_text(encoding="utf-8"))["rules"]["custom"]
    holes = {"Series": SERIES, "LabelMatchers": 'pod=~"a|b"', "GroupBy": "pod"}
    adapter = re.sub(r"<<\.(\w+)>>", lambda hole: holes[hole[1]], rule["metricsQuery"])
    scaled = yaml.safe_load(KEDA_EXAMPLE.read_text(encoding="utf-8"))
    assert scaled["spec"]["scaleTargetRef"]["name"] == "moderator"
    assert all(KEDA_EXAMPLE.name not in k.read_text() for k in K8S.rglob("kustomization.yaml"))
    keda = scaled["spec"]["triggers"][0]["metadata"]["query"]
    labels = 'namespace="moderator",pod="{}",resource="{}"'
    series = [
        {"series": f"{SERIES}{{{labels.format(pod, kind)}}}", "values": f"{n}x8"}
        for pod, kind, n in [("a", "images", 8), ("b", "images", 40), ("a", "views", 999)]
    ]
    per_pod = [{"labels": f'{{pod="{pod}"}}', "value": n} for pod, n in [("a", 8), ("b", 40)]]
    checks = [
        {"expr": adapter, "eval_time": "2m", "exp_samples": per_pod},
        {"expr": keda, "eval_time": "2m", "exp_samples": [{"labels": "{}", "value": 48}]},
    ]
    tests = [{"interval": "15s", "input_series": series, "promql_expr_test": checks}]
    (tmp_path / "scaling.yaml").write_text(yaml.safe_dump({"rule_files": [], "tests": tests}))
    command = [str(require_tool("promtool")), "test", "rules", str(tmp_path / "scaling.yaml")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hardware_of_each_overlay(overlay: str, objects: Objects) -> None:
    spec = container(objects)
    requests, limits = spec["resources"]["requests"], spec["resources"]["limits"]
    # The server sizes torch threads and decode workers from the cgroup CPU quota.
    assert quantity(limits["cpu"]) == quantity(requests["cpu"])
    config = served_config(objects)
    # Admitted request bytes sit beside the model, the decode workers and gRPC's own copies.
    assert config.batching.max_queue_bytes <= quantity(limits["memory"]) / 4
    tolerated = {t["key"]: t for t in pod_spec(objects).get("tolerations", [])}
    # Every node a pod tolerates is a spread domain, fitting or not: a hard rule strands pods.
    spread = pod_spec(objects)["topologySpreadConstraints"]
    assert {c["whenUnsatisfiable"] for c in spread} == {"ScheduleAnyway"}
    surge = the(objects, "Deployment")["spec"]["strategy"]["rollingUpdate"]
    if overlay == "gpu":
        assert (surge["maxSurge"], surge["maxUnavailable"]) == (0, 1), "no spare GPU to surge to"
        assert limits[GPU] == requests[GPU] == "1"
        assert tolerated[GPU]["effect"] == "NoSchedule"
        assert (config.model.device, config.model.precision) == ("cuda", "fp16")
        assert config.batching.max_batch_size >= 128
        assert config.batching.max_queue_views >= 2 * config.batching.max_batch_size
        assert quantity(limits["cpu"]) >= 8, "decoding for a GPU needs CPUs"
        assert spec["image"].endswith(":cuda")
    else:
        assert GPU not in requests | limits | tolerated
        assert config.model.device == "cpu"
        assert spec["image"].endswith(":cpu")

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from moderator_client.v1 import moderator_pb2 as pb
from moderator_client.v1 import moderator_pb2_grpc as pb_grpc

from moderator.cli.main import build_parser, main
from moderator.cli.options import config_from_args
from moderator.config import DEMO_CHECKPOINT_PATH, DEMO_POLICIES_DIR, Config
from moderator.serving.access import Role, load_access_file
from tests.helpers import copy_demo_policies, edit, shape_png, start_demo_server_process

SERVE_TIMEOUT = 120


@dataclass
class DemoServer:
    process: subprocess.Popen[str]
    port: int
    policies: Path


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "moderator", *args],
        capture_output=True,
        text=True,
        timeout=SERVE_TIMEOUT,
        check=False,
    )


def test_flags_mirror_environment_variables() -> None:
    env = {"MODERATOR_PORT": "6000", "MODERATOR_MAX_WAIT_MS": "2.5", "MODERATOR_DEMO": "true"}
    args = build_parser(env).parse_args(["serve"])
    assert args.port == 6000
    assert args.max_wait_ms == 2.5
    assert args.demo
    assert build_parser(env).parse_args(["serve", "--port", "7000"]).port == 7000
    pipelines = {
        word: build_parser({}).parse_args(["serve", "--pipeline", word]).pipeline
        for word in ("auto", "on", "off")
    }
    assert pipelines == {"auto": None, "on": True, "off": False}
    assert build_parser({"MODERATOR_PIPELINE": "off"}).parse_args(["serve"]).pipeline is False


def test_bad_environment_values_get_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser({"MODERATOR_PORT": "fifty"}).parse_args(["serve"])
    assert info.value.code == 2
    assert "--port" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--pipeline", "maybe"])
    assert "'maybe': use auto, on or off" in capsys.readouterr().err
    for flag, value in (("--log-level", "loud"), ("--log-format", "xml")):
        with pytest.raises(SystemExit) as info:
            main(["serve", flag, value])
        assert info.value.code == 2
        assert f"{value!r}: use one of" in capsys.readouterr().err


def test_a_misspelt_setting_is_named_not_silently_lost() -> None:
    env = {
        "MODERATOR_MAX_BATCHSIZE": "64",  # misspelt
        "MODERATOR_MAX_BATCH_SIZE": "64",
        "MODERATOR_TOKEN": "t",  # the client commands' own
        "HOME": "/root",
        # the rest of a Service's links (with enableServiceLinks left on)
        "MODERATOR_SERVICE_HOST": "10.96.0.12",
        "MODERATOR_SERVICE_PORT_GRPC": "50051",
        "MODERATOR_PORT_50051_TCP_ADDR": "10.96.0.12",
        "MODERATOR_METRICS_SERVICE_PORT": "9090",
    }
    args = build_parser(env).parse_args(["serve"])
    assert args.unknown_variables == ["MODERATOR_MAX_BATCHSIZE"]
    assert args.max_batch_size == 64


def test_log_choices_take_any_case() -> None:
    args = build_parser({"MODERATOR_LOG_FORMAT": "JSON"}).parse_args(
        ["serve", "--log-level", "debug"]
    )
    assert (args.log_format, args.log_level) == ("json", "DEBUG")


def test_a_kubernetes_service_link_is_named_as_such(capsys: pytest.CaptureFixture[str]) -> None:
    """A Service named `moderator` gives every pod MODERATOR_PORT=tcp://IP:PORT."""
    env = {"MODERATOR_PORT": "tcp://10.96.0.12:50051"}
    with pytest.raises(SystemExit):
        build_parser(env).parse_args(["serve"])
    error = capsys.readouterr().err
    assert "Kubernetes service link (from a Service named moderator)" in error
    assert "enableServiceLinks: false" in error


def test_gpu_decode_and_workers_reach_the_config() -> None:
    def config(*flags: str, env: dict[str, str] | None = None) -> Config:
        return config_from_args(build_parser(env or {}).parse_args(["serve", *flags]))

    assert [config("--gpu-decode", w).decode.on_device for w in ("auto", "on", "off")] == [
        None,
        True,
        False,
    ]
    assert config(env={"MODERATOR_GPU_DECODE": "off"}).decode.on_device is False
    assert config().server.workers == 1
    assert config("--workers", "4").server.workers == 4
    assert config(env={"MODERATOR_WORKERS": "3"}).server.workers == 3


def test_demo_flag_selects_the_bundled_model_and_policies() -> None:
    config = config_from_args(build_parser({}).parse_args(["serve", "--demo"]))
    assert config.model.pretrained == str(DEMO_CHECKPOINT_PATH)
    assert config.policies_dir == DEMO_POLICIES_DIR
    default = config_from_args(build_parser({}).parse_args(["serve"]))
    assert default.model.name == "ViT-B-32"
    assert default.model.pretrained == "laion2b_s34b_b79k"
    assert (
        config_from_args(
            build_parser({}).parse_args(["serve", "--pretrained", "none"])
        ).model.pretrained
        is None
    )


def test_validate_accepts_good_policies(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policies", "validate", str(DEMO_POLICIES_DIR)]) == 0
    assert "ok: 3 active policies" in capsys.readouterr().out


def test_validate_lists_every_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.yaml").write_text("title: A\naction: nuke\nthreshold: 0.2\ndescriptions: [x]\n")
    (tmp_path / "b.yaml").write_text("title: B\naction: block\nthreshold: 0.2\ndescriptions: []\n")
    assert main(["policies", "validate", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "a.yaml:2: key 'action'" in out
    assert "b.yaml:4: key 'descriptions'" in out
    assert "2 problem(s)" in out


def test_random_weights_are_refused_without_the_flag() -> None:
    done = run_cli("serve", "--pretrained", "none", "--port", "0", "--metrics-port", "-1")
    assert done.returncode == 2
    assert "--allow-random-weights" in done.stderr
    assert "Traceback" not in done.stderr


def test_missing_weights_fail_with_one_clear_message(tmp_path: Path) -> None:
    done = run_cli(
        "serve", "--pretrained", str(tmp_path / "missing.pt"), "--port", "0", "--metrics-port", "-1"
    )
    assert done.returncode == 2
    assert "--pretrained PATH" in done.stderr
    assert "--demo" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.fixture(scope="module")
def demo_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[DemoServer]:
    cache = tmp_path_factory.mktemp("cli-cache")
    policies = copy_demo_policies(tmp_path_factory.mktemp("cli") / "policies")
    process, port = start_demo_server_process(
        "--cache-dir", str(cache), "--policies", str(policies)
    )
    yield DemoServer(process, port, policies)
    if process.poll() is None:
        process.kill()
        process.wait()


def test_check_prints_one_line_per_image(demo_server: DemoServer, tmp_path: Path) -> None:
    port = demo_server.port
    red = tmp_path / "red.png"
    red.write_bytes(shape_png("red", "circle"))
    blue = tmp_path / "blue.png"
    blue.write_bytes(shape_png("blue", "square"))
    done = run_cli("check", "--server", f"127.0.0.1:{port}", str(red), str(blue))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{red}\tBLOCK\tred=")
    assert lines[1] == f"{blue}\tALLOW\t-"

    done = run_cli("check", "--json", "--server", f"127.0.0.1:{port}", str(red))
    record = json.loads(done.stdout)
    assert record["decision"] == "DECISION_BLOCK"
    assert record["model"] == "moderator-shapes-demo/moderator-shapes-demo.pt"
    assert {p["policy_id"] for p in record["policies"]} == {"red", "stars", "green_squares"}
    assert "embedding" not in record


def test_check_embeddings_writes_the_file_rescore_reads(
    demo_server: DemoServer, tmp_path: Path
) -> None:
    red = tmp_path / "red.png"
    red.write_bytes(shape_png("red", "circle"))
    done = run_cli("check", "--embeddings", "--server", f"127.0.0.1:{demo_server.port}", str(red))
    assert done.returncode == 0, done.stderr
    stored = tmp_path / "stored.jsonl"
    stored.write_text(done.stdout)
    done = run_cli(
        "rescore",
        str(stored),
        "--policies",
        str(demo_server.policies),
        "--demo",
        "--cache-dir",
        str(tmp_path / "cache"),
    )
    assert done.returncode == 0, done.stderr
    assert "BLOCK  -> BLOCK         1" in done.stdout
    assert "0 images changed decision" in done.stdout


def test_sighup_reloads_the_policies(demo_server: DemoServer) -> None:
    process, port = demo_server.process, demo_server.port
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ModeratorStub(channel)
        listed = stub.ListPolicies(pb.ListPoliciesRequest(), timeout=10)
        edit(demo_server.policies / "stars.yaml", "threshold: 0.74", "threshold: 0.79")
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while stub.ListPolicies(pb.ListPoliciesRequest(), timeout=10).policy_version == (
            listed.policy_version
        ):
            assert time.monotonic() < deadline, "SIGHUP did not reload"
            time.sleep(0.05)
        assert process.poll() is None


def test_health_exits_zero_when_serving_and_one_otherwise(demo_server: DemoServer) -> None:
    done = run_cli("health", "--server", f"127.0.0.1:{demo_server.port}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("SERVING")
    alive = run_cli("health", "--server", f"127.0.0.1:{demo_server.port}", "--service", "liveness")
    assert alive.returncode == 0, alive.stderr
    unknown = run_cli("health", "--server", f"127.0.0.1:{demo_server.port}", "--service", "nope")
    assert unknown.returncode == 1
    assert "NOT_FOUND" in unknown.stderr
    nobody = run_cli("health", "--server", "127.0.0.1:1", "--timeout", "2")
    assert nobody.returncode == 1
    assert "UNAVAILABLE" in nobody.stderr


def test_sigterm_drains_and_exits_zero(demo_server: DemoServer) -> None:
    process = demo_server.process
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0


def test_token_prints_a_new_token_and_the_entry_that_matches_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["token", "--name", "upload", "--role", "moderate", "--role", "rescore"]) == 0
    out = capsys.readouterr().out
    token = out.splitlines()[0].rsplit(" ", 1)[1]
    entry = out.split("under 'tokens:':\n", 1)[1]
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text("tokens:\n" + entry)
    caller = load_access_file(tokens).caller_for_token(token)
    assert caller is not None
    assert caller.name == "upload"
    assert caller.roles == frozenset({Role.MODERATE, Role.RESCORE})
    assert main(["token"]) == 0
    assert capsys.readouterr().out.splitlines()[0].rsplit(" ", 1)[1] != token  # random


def test_check_refuses_a_client_certificate_without_its_key(tmp_path: Path) -> None:
    image = tmp_path / "red.png"
    image.write_bytes(shape_png("red", "circle"))
    cert = tmp_path / "client.pem"
    cert.write_text("not used")
    done = run_cli("check", "--server", "127.0.0.1:1", "--tls-cert", str(cert), str(image))
    assert done.returncode == 2
    assert "--tls-cert and --tls-key go together" in done.stderr


def test_rescore_refuses_to_write_through_a_planted_link(tmp_path: Path) -> None:
    victim = tmp_path / "bashrc"
    victim.write_text("original\n")
    shared = tmp_path / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    (shared / "new.jsonl").symlink_to(victim)
    stored = tmp_path / "stored.jsonl"
    stored.write_text('{"id": "a", "embedding": [1.0], "model": "m"}\n')
    done = run_cli(
        "rescore", str(stored), "--policies", str(DEMO_POLICIES_DIR), "--demo",
        "--out", str(shared / "new.jsonl"),
    )  # fmt: skip
    assert done.returncode == 2
    assert "shared sticky directory" in done.stderr
    assert victim.read_text() == "original\n"


def test_serve_with_weights_of_another_digest_stops_with_the_reason(tmp_path: Path) -> None:
    weights = tmp_path / "model.pt"
    weights.write_bytes(DEMO_CHECKPOINT_PATH.read_bytes())
    done = run_cli(
        "serve", "--model", "moderator-shapes-demo", "--pretrained", str(weights),
        "--port", "0", "--metrics-port", "-1", "--pretrained-sha256", "F" * 64,
    )  # fmt: skip
    assert done.returncode == 2
    assert f"not the {'f' * 64} expected; refusing to load it" in done.stderr


def test_the_demo_ignores_a_digest_meant_for_production_weights() -> None:
    args = build_parser({"MODERATOR_PRETRAINED_SHA256": "ab" * 32}).parse_args(["serve", "--demo"])
    assert config_from_args(args).model.pretrained_sha256 == ""

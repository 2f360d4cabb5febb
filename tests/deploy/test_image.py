"""The image definition: stages the build arguments select, a fixed non-root user, an
environment of real flags, checked baked weights, and the container's command run with the
image's environment on a read-only root filesystem, nothing writable but the cache and /tmp.
(That it runs as uid 10001 is checked on the Dockerfile and, in a pod, by runAsNonRoot.)"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from moderator.cli.main import build_parser
from moderator.cli.options import config_from_args, serve_variables
from moderator.config import REPO_ROOT

DOCKERFILE = REPO_ROOT / "Dockerfile"
USER_ID = 10001
BAKED_WEIGHTS = "/opt/moderator/weights/model.safetensors"


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for args in self.all("ENV"):
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                values[key] = value
        return values


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: dict[str, Stage]
    last: Stage


def parse_dockerfile(text: str) -> Dockerfile:
    """Instructions (continuation lines joined, comments dropped) grouped into stages."""
    logical = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")),
    )
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in logical.splitlines():
        if not line.strip():
            continue
        keyword, _, args = line.strip().partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            base, _, name = args.partition(" AS ")
            current = Stage(name.strip() or f"stage-{len(stages)}", base.strip())
            stages[current.name] = current
        elif current is None:
            assert keyword == "ARG", f"only ARG may precede the first FROM, not {keyword}"
            key, _, value = args.partition("=")
            global_args[key] = value
        else:
            current.instructions.append((keyword, args))
    assert current is not None
    return Dockerfile(global_args, stages, current)


@pytest.fixture(scope="module")
def image() -> Dockerfile:
    return parse_dockerfile(DOCKERFILE.read_text())


def chain(image: Dockerfile, stage: Stage) -> list[Stage]:
    """`stage` and the stages it is built on, nearest first."""
    found = [stage]
    while found[-1].base in image.stages:
        found.append(image.stages[found[-1].base])
    return found


def final_stage(image: Dockerfile, weights: str) -> list[Stage]:
    return chain(image, image.stages[image.last.base.replace("${WEIGHTS}", weights)])


def image_env(image: Dockerfile, weights: str = "none") -> dict[str, str]:
    env: dict[str, str] = {}
    for stage in reversed(final_stage(image, weights)):
        env.update(stage.env())
    return env


def test_the_build_arguments_select_existing_stages(image: Dockerfile) -> None:
    assert image.global_args["VARIANT"] == "cpu"
    assert image.global_args["WEIGHTS"] == "none"
    assert image.stages["build"].base == "torch-${VARIANT}"
    for variant in ("cpu", "cuda"):
        assert f"torch-{variant}" in image.stages
    assert image.last.base == "runtime-${WEIGHTS}"
    for weights in ("none", "baked"):
        assert "runtime" in [s.name for s in final_stage(image, weights)]
    cpu_torch = " ".join(image.stages["torch-cpu"].all("RUN"))
    assert "download.pytorch.org/whl/cpu" in cpu_torch  # no CUDA libraries in the CPU image


def test_the_runtime_runs_as_a_fixed_non_root_user_to_the_end(image: Dockerfile) -> None:
    for weights in ("none", "baked"):
        users = [u for stage in reversed(final_stage(image, weights)) for u in stage.all("USER")]
        assert users, "the image would run as root"
        assert users[-1] == f"{USER_ID}:{USER_ID}"  # numeric: runAsNonRoot can verify it
    useradd = " ".join(image.stages["runtime"].all("RUN"))
    assert f"--uid {USER_ID}" in useradd
    assert f"--gid {USER_ID}" in useradd


def test_the_image_environment_is_real_flags_with_working_values(image: Dockerfile) -> None:
    for weights in ("none", "baked"):
        # the baked weights' digest is the build argument's value, checked again at start-up
        env = {
            k: v.replace("${WEIGHTS_SHA256}", "0" * 64)
            for k, v in image_env(image, weights).items()
        }
        flags = {k: v for k, v in env.items() if k.startswith("MODERATOR_")}
        parser = build_parser(flags)
        known = serve_variables()
        assert set(flags) <= known, f"not flags of moderator serve: {set(flags) - known}"
        config = config_from_args(parser.parse_args(["serve"]))
        assert str(config.policies_dir) == env["MODERATOR_POLICIES"]
        assert str(config.embedding_cache_dir).startswith(env["XDG_CACHE_HOME"])
    assert image_env(image, "baked")["MODERATOR_PRETRAINED"] == BAKED_WEIGHTS
    assert image_env(image, "baked")["MODERATOR_PRETRAINED_SHA256"] == "${WEIGHTS_SHA256}"
    assert "MODERATOR_PRETRAINED" not in image_env(image, "none")


def test_every_file_the_build_copies_is_in_the_repository_and_the_context(
    image: Dockerfile,
) -> None:
    ignored = (REPO_ROOT / ".dockerignore").read_text().split()
    for stage in image.stages.values():
        for args in stage.all("COPY"):
            words = [w for w in args.split() if not w.startswith("--")]
            if "--from=" in args:
                continue
            for source in words[:-1]:
                top = source.split("/")[0]
                assert top not in ignored, f"{source} is excluded by .dockerignore"
                if source != "weights/model.safetensors":  # the baked weights: the builder's
                    assert (REPO_ROOT / source).exists(), source
    assert "model.safetensors" in (REPO_ROOT / "weights" / "README.md").read_text()


def baked_weights_check(image: Dockerfile) -> str:
    [check] = image.stages["runtime-baked"].all("RUN")
    return check


@pytest.mark.parametrize(
    ("digest", "passes"),
    [("right", True), ("wrong", False), ("", False)],
)
def test_the_baked_weights_must_match_their_checksum(
    image: Dockerfile, tmp_path: Path, digest: str, passes: bool
) -> None:
    """The build's own check, run as the build runs it, on a stand-in weights file."""
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights" * 1000)
    real = hashlib.sha256(weights.read_bytes()).hexdigest()
    given = {"right": real, "wrong": "0" * 64, "": ""}[digest]
    script = baked_weights_check(image).replace(BAKED_WEIGHTS, str(weights))
    done = subprocess.run(
        ["/bin/sh", "-c", script],
        check=False,
        env={**os.environ, "WEIGHTS_SHA256": given},
        capture_output=True,
        text=True,
    )
    assert (done.returncode == 0) is passes, done.stdout + done.stderr


def test_the_health_check_is_moderator_health(image: Dockerfile) -> None:
    [health] = image.stages["runtime"].all("HEALTHCHECK")
    command = health.split(" CMD ", 1)[1]
    argv = [word.strip(' "') for word in command.strip("[] ").split(",")]
    assert argv[:2] == ["moderator", "health"]
    args = build_parser({}).parse_args(argv[1:])
    assert args.server == "localhost:50051"
    assert args.timeout < 3  # inside the check's --timeout=3s


def require_mount_namespaces(unshare: Path) -> None:
    """Skip where this process may not make mount namespaces (not root, or a container without
    CAP_SYS_ADMIN): a property of where the tests run, not a missing tool."""
    probe = [str(unshare), "--mount", "--propagation", "private", "--", "true"]
    if os.geteuid() != 0 or subprocess.run(probe, capture_output=True, check=False).returncode:
        pytest.skip("needs root with CAP_SYS_ADMIN (mount namespaces) to make a read-only root")


# In a private mount namespace: the cache directory bound on /mnt (the image's /cache volume)
# and /tmp bound on itself (the pod's emptyDir; a mount of its own stays writable), then "/"
# remounted read-only (the image's readOnlyRootFilesystem). /tmp keeps its content: a checkout
# (and its venv) may live there. /dev/shm stays the writable tmpfs it is.
READ_ONLY_ROOT = (
    'mount --bind "$MOUNT_CACHE" /mnt && mount --bind /tmp /tmp '
    '&& mount -o remount,bind,ro / && exec "$@"'
)
CACHE_MOUNT = "/mnt"


@pytest.fixture
def read_only_root(require_tool: Callable[[str], Path]) -> Callable[..., list[str]]:
    """argv -> the same command run with a read-only root filesystem."""
    unshare = require_tool("unshare")
    require_mount_namespaces(unshare)

    def command(*argv: str) -> list[str]:
        namespace = [str(unshare), "--mount", "--propagation", "private", "--"]
        return [*namespace, "/bin/sh", "-c", READ_ONLY_ROOT, "sh", *argv]

    return command


def container_env(image: Dockerfile, cache: Path) -> dict[str, str]:
    """The image's environment, its paths moved to where this machine has them."""
    mapped = {
        "/cache": CACHE_MOUNT,
        "/home/moderator": "/",  # read-only, like every directory but the volumes
        "/etc/moderator/policies": str(REPO_ROOT / "policies"),
    }
    env = {}
    for key, value in image_env(image).items():
        prefix = next((p for p in mapped if value.startswith(p)), None)
        env[key] = value.replace(prefix, mapped[prefix], 1) if prefix else value
    env["PATH"] = f"{Path(sys.executable).parent}:/usr/bin:/bin"
    env["MOUNT_CACHE"] = str(cache)
    return env


def test_the_container_command_needs_nothing_writable_but_cache_and_tmp(
    image: Dockerfile, read_only_root: Callable[..., list[str]], tmp_path: Path
) -> None:
    """`moderator serve --demo` with the image's environment on a read-only root filesystem,
    only the cache volume and /tmp writable: it must reach SERVING, pass the image's own health
    check (run the same way), drain on SIGTERM and exit 0, with its caches on the volume."""
    cache = tmp_path / "cache"
    cache.mkdir()
    env = container_env(image, cache)
    demo_policies = f"{env['MODERATOR_POLICIES']}/demo"  # as deploy/README.md runs the demo
    serve = [sys.executable, "-m", "moderator", "serve", "--demo", "--policies", demo_policies]
    process = subprocess.Popen(
        read_only_root(*serve, "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"),
        cwd="/",
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    log: list[str] = []
    try:
        assert process.stderr is not None
        port = 0
        for line in process.stderr:
            log.append(line)
            if match := re.search(r"SERVING on port (\d+)", line):
                port = int(match.group(1))
                break
        assert port, "never SERVING:\n" + "".join(log[-30:])
        health = read_only_root(sys.executable, "-m", "moderator", "health")
        done = subprocess.run(
            [*health, "--server", f"127.0.0.1:{port}", "--timeout", "10"],
            check=False,
            env=env,
            cwd="/",
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
        if process.stderr is not None:
            log.extend(process.stderr)
    assert code == 0, "".join(log[-30:])
    assert not [line for line in log if "Read-only file system" in line], "".join(log)
    assert list((cache / "moderator").glob("text-embeddings-*")), "the cache went elsewhere"

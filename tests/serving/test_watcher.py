from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from moderator.config import DEMO_POLICIES_DIR
from moderator.core.policies import load_policy_dir
from moderator.core.policy_files import directory_fingerprint as fingerprint
from moderator.errors import PolicyError
from moderator.serving.watcher import PolicyWatcher
from tests.helpers import copy_demo_policies, edit


def test_fingerprint_follows_what_a_load_reads(tmp_path: Path) -> None:
    policies = copy_demo_policies(tmp_path / "p")
    first = fingerprint(policies)
    assert fingerprint(policies) == first
    (policies / ".notes.txt").write_text("hidden: not read")
    (policies / ".git").mkdir()
    (policies / ".git" / "HEAD").write_text("a hidden folder: not watched")
    assert fingerprint(policies) == first
    (policies / "known").mkdir()
    (policies / "known" / "example.png").write_bytes(b"an example image policies may name")
    assert fingerprint(policies) != first  # watched by name, size, mtime and inode
    first = fingerprint(policies)
    stars = policies / "stars.yaml"
    stars.write_text(stars.read_text().replace("threshold: 0.74", "threshold: 0.75"))
    second = fingerprint(policies)
    assert second != first
    (policies / "README.txt").write_text("a stray file fails the next load")
    assert fingerprint(policies) != second
    assert fingerprint(tmp_path / "missing") == ""


def configmap_revision(root: Path, name: str, threshold: str) -> Path:
    revision = root / name
    shutil.copytree(DEMO_POLICIES_DIR, revision)
    stars = revision / "stars.yaml"
    stars.write_text(stars.read_text().replace("threshold: 0.74", f"threshold: {threshold}"))
    return revision


def test_a_configmap_style_symlink_swap_triggers_one_reload(tmp_path: Path) -> None:
    """Kubernetes mounts files as links into ..data, itself a link swapped on update."""
    mount = tmp_path / "mount"
    mount.mkdir()
    configmap_revision(mount, "..2026_11_23_1", "0.74")
    os.symlink("..2026_11_23_1", mount / "..data")
    for name in ("red.yaml", "stars.yaml", "green_squares.yaml"):
        os.symlink(f"..data/{name}", mount / name)
    reloads: list[int] = []

    async def reload() -> None:
        reloads.append(1)

    async def scenario() -> tuple[bool, bool, bool]:
        watcher = PolicyWatcher(mount, interval=60, reload=reload)
        unchanged = await watcher.check()
        configmap_revision(mount, "..2026_11_23_2", "0.80")
        os.symlink("..2026_11_23_2", mount / "..data_tmp")
        os.replace(mount / "..data_tmp", mount / "..data")  # the atomic swap kubelet does
        changed = await watcher.check()
        settled = await watcher.check()
        return unchanged, changed, settled

    assert asyncio.run(scenario()) == (False, True, False)
    assert reloads == [1]
    assert "threshold: 0.80" in (mount / "stars.yaml").read_text()


class LoadingReloader:
    """Stands in for the server's reload: loads the directory and records how it went."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.outcomes: list[str] = []

    async def reload(self) -> None:
        try:
            self.outcomes.append(load_policy_dir(self.directory).version)
        except PolicyError as exc:
            self.outcomes.append("failed: " + "; ".join(exc.problems))


def test_a_failed_reload_is_retried_when_the_fix_lands(tmp_path: Path) -> None:
    policies = copy_demo_policies(tmp_path / "p")
    reloader = LoadingReloader(policies)
    good = load_policy_dir(policies).version

    async def scenario() -> list[bool]:
        watcher = PolicyWatcher(policies, interval=60, reload=reloader.reload)
        checks = [await watcher.check()]
        os.mkfifo(policies / "pipe.yaml")
        edit(policies / "red.yaml", "threshold: 0.71", "threshold: " + "9" * 5000)
        checks += [await watcher.check(), await watcher.check()]  # fails once, then waits
        (policies / "pipe.yaml").unlink()
        checks.append(await watcher.check())  # half fixed: tried again, fails again
        edit(policies / "red.yaml", "threshold: " + "9" * 5000, "threshold: 0.71")
        checks += [await watcher.check(), await watcher.check()]
        return checks

    assert asyncio.run(asyncio.wait_for(scenario(), 30)) == [False, True, False, True, True, False]
    assert [outcome.split(":")[0] for outcome in reloader.outcomes] == ["failed", "failed", good]
    assert "pipe.yaml: is a FIFO" in reloader.outcomes[0]
    assert "red.yaml:8:12: key 'threshold'" in reloader.outcomes[0]
    assert "pipe.yaml" not in reloader.outcomes[1]
    assert "red.yaml:8:12: key 'threshold'" in reloader.outcomes[1]


def test_a_reload_that_raises_is_tried_again_at_the_next_check(tmp_path: Path) -> None:
    policies = copy_demo_policies(tmp_path / "p")
    calls: list[int] = []

    async def reload() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("the first reload breaks")

    async def scenario() -> list[bool]:
        watcher = PolicyWatcher(policies, interval=60, reload=reload)
        edit(policies / "red.yaml", "threshold: 0.71", "threshold: 0.72")
        with pytest.raises(RuntimeError):
            await watcher.check()
        return [await watcher.check(), await watcher.check()]

    assert asyncio.run(scenario()) == [True, False]
    assert len(calls) == 2

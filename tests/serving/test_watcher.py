from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

from moderator.config import DEMO_POLICIES_DIR
from moderator.core.policies import directory_fingerprint as fingerprint
from moderator.serving.watcher import PolicyWatcher
from tests.helpers import copy_demo_policies


def test_fingerprint_follows_policy_content_only(tmp_path: Path) -> None:
    policies = copy_demo_policies(tmp_path / "p")
    first = fingerprint(policies)
    assert fingerprint(policies) == first
    (policies / "README.txt").write_text("not a policy")
    assert fingerprint(policies) == first
    stars = policies / "stars.yaml"
    stars.write_text(stars.read_text().replace("threshold: 0.74", "threshold: 0.75"))
    assert fingerprint(policies) != first
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

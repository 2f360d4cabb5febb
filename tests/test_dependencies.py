"""The installed libraries meet pyproject.toml's floors: those sit above the known advisories of
what parses untrusted bytes or loads weights, and an environment built another way (a base
image, a pinned lock file) must not slip under them."""

from __future__ import annotations

import importlib.metadata
import tomllib

from packaging.requirements import Requirement

from moderator.config import REPO_ROOT

SECURITY_FLOORS = {
    "torch": "2.11",
    "torchvision": "0.26",
    "pillow": "12.2.0",
    "protobuf": "7.35.1",
    "pyyaml": "6.0",
}


def requirements(pyproject: str) -> list[Requirement]:
    project = tomllib.loads((REPO_ROOT / pyproject).read_text())["project"]
    return [Requirement(line) for line in project["dependencies"]]


def test_every_installed_dependency_is_within_its_declared_range() -> None:
    outside = [
        f"{r.name} {importlib.metadata.version(r.name)} (wants {r.specifier})"
        for pyproject in ("pyproject.toml", "clients/python/pyproject.toml")
        for r in requirements(pyproject)
        if not r.specifier.contains(importlib.metadata.version(r.name), prereleases=True)
    ]
    assert outside == []


def test_the_floors_stay_above_the_advisories() -> None:
    declared = {r.name.lower(): r.specifier for r in requirements("pyproject.toml")}
    for name, floor in SECURITY_FLOORS.items():
        assert f">={floor}" in {str(s) for s in declared[name]}, name

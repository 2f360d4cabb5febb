"""The package's seams: the live service never loads the offline tools, and the reverse."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from moderator.config import REPO_ROOT

PACKAGE = REPO_ROOT / "moderator"
MAX_MODULE_LINES = 400


AUDIENCES = ("moderator.serving", "moderator.tools", "moderator.cli")


def modules_loaded_by(*modules: str) -> set[str]:
    """Every moderator module that importing `modules` loads, in a fresh interpreter."""
    code = (
        f"import sys, {', '.join(modules)}; "
        "print(' '.join(m for m in sys.modules if m.startswith('moderator')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    return set(out.stdout.split())


def package_modules(folder: str) -> list[str]:
    return sorted(
        f"moderator.{folder}.{path.stem}"
        for path in (PACKAGE / folder).glob("*.py")
        if path.stem != "__init__"
    )


def test_the_server_loads_no_offline_tool_and_no_cli() -> None:
    loaded = modules_loaded_by("moderator.serving.server")
    assert "moderator.serving.engine" in loaded
    assert not {m for m in loaded if m.startswith(("moderator.tools", "moderator.cli"))}


def test_the_decode_worker_loads_no_torch() -> None:
    """Workers start in a fraction of a second and are replaced after every runaway decode."""
    code = "import sys, moderator.serving.decode_worker; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_tools_load_nothing_of_the_live_service() -> None:
    tools = package_modules("tools")
    loaded = modules_loaded_by(*tools)
    assert set(tools) <= loaded
    assert not {m for m in loaded if m.startswith("moderator.serving")}


@pytest.mark.parametrize(
    ("folder", "forbidden"),
    [
        ("core", AUDIENCES),
        ("serving", ("moderator.tools", "moderator.cli")),
        ("tools", ("moderator.serving", "moderator.cli")),
    ],
)
def test_no_module_imports_across_the_seams(folder: str, forbidden: tuple[str, ...]) -> None:
    """Every import in the source, including those inside functions."""
    for path in (PACKAGE / folder).glob("*.py"):
        assert not {m for m in imports_of(path) if m.startswith(forbidden)}, path


def test_no_module_is_over_the_size_limit() -> None:
    too_long = {
        str(path.relative_to(REPO_ROOT)): lines
        for path in PACKAGE.rglob("*.py")
        if "v1" not in path.parts
        and (lines := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not too_long


def test_no_test_module_imports_another() -> None:
    tests = REPO_ROOT / "tests"
    for path in tests.rglob("*.py"):
        modules = {m for m in imports_of(path) if m == "tests" or m.startswith("tests.")}
        assert not {m for m in modules if "test_" in m}, path


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):  # a relative import counts as its package's
            base = node.module or ""
            if node.level:
                base = f"tests.{base}".rstrip(".")
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found

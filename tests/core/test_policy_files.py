"""Policy files on disk: what a directory may hold, read without hanging or reading unbounded."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from moderator.config import DEMO_POLICIES_DIR
from moderator.core.policies import load_policy_dir
from moderator.core.policy_files import (
    MAX_POLICY_FILE_BYTES,
    MAX_WATCHED_DEPTH,
    directory_fingerprint,
    read_policy_bytes,
)
from moderator.errors import PolicyError
from tests.helpers import copy_demo_policies, policy_doc

SECONDS = 10.0  # a hang fails the test after this long instead of stalling the suite
GUN = policy_doc("block", ["a gun"])
_T = TypeVar("_T")


def within_seconds(call: Callable[[], _T]) -> _T:
    """`call()` in a daemon thread; fails if it has not returned in SECONDS (a blocked open of a
    FIFO or an endless read would otherwise hang the suite, not fail it)."""
    outcome: list[_T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:  # handed to the test below
            failure.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(SECONDS)
    assert not thread.is_alive(), f"still running after {SECONDS}s"
    if failure:
        raise failure[0]
    return outcome[0]


def load_problems(directory: Path) -> list[str]:
    with pytest.raises(PolicyError) as info:
        within_seconds(lambda: load_policy_dir(directory))
    return info.value.problems


@pytest.fixture
def policies(tmp_path: Path) -> Path:
    return copy_demo_policies(tmp_path / "policies")


@pytest.fixture
def fifo(policies: Path) -> Iterator[Path]:
    """A FIFO named like a policy. Cleanup opens its writing end once, which releases a
    reader stuck in open() should a regression block there."""
    path = policies / "pipe.yaml"
    os.mkfifo(path)
    yield path
    with contextlib.suppress(OSError):  # ENXIO: no reader is waiting, the good case
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


def test_a_fifo_is_a_problem_not_a_hang(policies: Path, fifo: Path) -> None:
    assert load_problems(policies) == ["pipe.yaml: is a FIFO, not a regular file"]


def test_a_link_to_a_fifo_inside_the_directory_is_a_problem(policies: Path, fifo: Path) -> None:
    os.rename(fifo, policies / ".pipe")
    os.symlink(".pipe", policies / "weapons.yaml")
    assert load_problems(policies) == ["weapons.yaml: links to a FIFO, not a regular file"]
    os.rename(policies / ".pipe", fifo)  # for the fixture's cleanup


def test_a_link_to_dev_zero_is_a_problem_not_an_endless_read(policies: Path) -> None:
    os.symlink("/dev/zero", policies / "zero.yaml")
    assert load_problems(policies) == [
        "zero.yaml: links outside the policy directory (to /dev/zero); "
        "only files inside it are read"
    ]


def test_a_link_outside_the_directory_is_a_problem_even_to_a_good_policy(
    policies: Path, tmp_path: Path
) -> None:
    (tmp_path / "elsewhere.yaml").write_text(GUN)
    os.symlink(tmp_path / "elsewhere.yaml", policies / "gun.yaml")
    os.symlink("../elsewhere.yaml", policies / "relative.yaml")
    problems = load_problems(policies)
    assert [p.split(":")[0] for p in problems] == ["gun.yaml", "relative.yaml"]
    assert all("links outside the policy directory" in p for p in problems)
    assert str(tmp_path / "elsewhere.yaml") in problems[0]


def test_a_link_to_a_directory_inside_is_skipped_like_a_subdirectory(policies: Path) -> None:
    expected = load_policy_dir(policies)
    fingerprint = directory_fingerprint(policies)
    (policies / "sub").mkdir()
    (policies / "sub" / "broken.yaml").write_text("title: [unclosed\n")  # never read
    os.symlink("sub", policies / "weapons.yaml")
    os.symlink(policies / "examples", policies / "pictures")  # absolute, still inside
    os.symlink(".", policies / "itself.yaml")
    os.mkfifo(policies / "sub" / "pipe.png")  # the watcher never opens what is in there
    assert within_seconds(lambda: load_policy_dir(policies)) == expected
    watched = within_seconds(lambda: directory_fingerprint(policies))
    assert watched != fingerprint  # subfolders hold examples and lists: watched by status
    (policies / "sub" / "broken.yaml").write_text("title: [still unclosed, and longer\n")
    assert directory_fingerprint(policies) not in (fingerprint, watched)


def test_a_link_to_a_directory_outside_is_a_problem(policies: Path, tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", policies / "extra")
    os.symlink("..", policies / "parent")
    assert load_problems(policies) == [
        f"extra: links outside the policy directory (to {tmp_path / 'elsewhere'}); "
        "only files inside it are read",
        f"parent: links outside the policy directory (to {tmp_path}); "
        "only files inside it are read",
    ]


def test_a_link_moved_from_a_directory_inside_to_one_outside_changes_the_fingerprint(
    policies: Path, tmp_path: Path
) -> None:
    (tmp_path / "elsewhere").mkdir()
    os.symlink("examples", policies / "extra")
    skipped = directory_fingerprint(policies)
    (policies / "extra").unlink()
    os.symlink(tmp_path / "elsewhere", policies / "extra")
    assert directory_fingerprint(policies) != skipped


def test_a_dangling_link_and_a_socket_are_problems(policies: Path) -> None:
    os.symlink("nowhere.yaml", policies / "dangling.yaml")
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(policies / "sock.yaml"))
        assert load_problems(policies) == [
            "dangling.yaml: cannot read: No such file or directory",
            "sock.yaml: is a socket, not a regular file",
        ]
    finally:
        server.close()


def test_an_oversized_file_is_a_problem_and_is_read_no_further(policies: Path) -> None:
    big = policies / "big.yaml"
    big.write_bytes(GUN.encode() + b"#" * MAX_POLICY_FILE_BYTES)
    assert load_problems(policies) == [
        "big.yaml: larger than 1048576 bytes (1 MiB), the limit for a policy file"
    ]
    big.write_bytes(GUN.encode().ljust(MAX_POLICY_FILE_BYTES, b"#"))  # exactly at the limit
    assert len(read_policy_bytes(big, policies)) == MAX_POLICY_FILE_BYTES
    assert "big" in load_policy_dir(policies).ids


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("weapons.YAML", "weapons.YAML: policy files must end in .yaml or .yml (lower case)"),
        ("weapons.Yml", "weapons.Yml: policy files must end in .yaml or .yml (lower case)"),
        ("notes.txt", "notes.txt: policy files must end in .yaml or .yml (lower case)"),
        ("weapons.yaml~", "weapons.yaml~: policy files must end in .yaml or .yml (lower case)"),
        ("README", "README: policy files must end in .yaml or .yml (lower case)"),
    ],
)
def test_other_names_are_problems_not_silently_ignored(
    policies: Path, name: str, expected: str
) -> None:
    (policies / name).write_text(GUN)
    [problem] = load_problems(policies)
    assert problem == expected + "; rename it, or move it out of the policy directory"


def test_a_link_with_another_suffix_to_a_policy_is_a_problem(policies: Path) -> None:
    os.symlink("red.yaml", policies / "red.YAML")
    [problem] = load_problems(policies)
    assert problem.startswith("red.YAML: policy files must end in .yaml or .yml")


def test_hidden_entries_and_subdirectories_are_not_policies(policies: Path) -> None:
    expected = load_policy_dir(policies)
    (policies / ".notes.txt").write_text("not a policy")
    os.mkfifo(policies / ".pipe")
    assert (policies / "examples").is_dir()  # the demo set's example images
    (policies / "drafts").mkdir()
    (policies / "drafts" / "notes.txt").write_text("not a policy")
    (policies / "drafts" / "broken.yaml").write_text("title: [unclosed\n")
    assert within_seconds(lambda: load_policy_dir(policies)) == expected


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"\xff\xfe" + GUN.encode("utf-16-le"), "bin.yaml: not UTF-8 text (byte 0xff at offset 0)"),
        (
            GUN.encode() + b"\x89PNG\r\n",
            f"bin.yaml: not UTF-8 text (byte 0x89 at offset {len(GUN)})",
        ),
        (GUN.encode() + b"\x00\x01", "bin.yaml: not valid YAML: unacceptable character #x0000"),
    ],
)
def test_binary_files_are_problems(policies: Path, data: bytes, expected: str) -> None:
    (policies / "bin.yaml").write_bytes(data)
    [problem] = load_problems(policies)
    assert problem.startswith(expected), problem


def test_an_undecodable_file_name_is_shown_escaped(policies: Path) -> None:
    os.close(os.open(os.fsencode(policies) + b"/\xff.yaml", os.O_CREAT | os.O_WRONLY, 0o644))
    [problem] = load_problems(policies)
    assert problem.startswith("\\udcff.yaml: file name must be a policy id")
    problem.encode("utf-8")  # a message gRPC can send


def test_every_hostile_entry_at_once_is_one_problem_each(policies: Path, fifo: Path) -> None:
    os.symlink("/dev/zero", policies / "zero.yaml")
    (policies / "huge.yaml").write_text(GUN.replace("threshold: 0.5", "threshold: " + "9" * 5000))
    (policies / "deep.yaml").write_text(GUN + "benign: " + "[" * 10000 + "]" * 10000 + "\n")
    (policies / "Weapons.YAML").write_text(GUN)
    problems = load_problems(policies)
    assert [p.split(":")[0] for p in problems] == [
        "Weapons.YAML",
        "pipe.yaml",
        "zero.yaml",
        "deep.yaml",
        "huge.yaml",
    ]


def configmap_mount(tmp_path: Path) -> Path:
    """The layout a Kubernetes ConfigMap volume has: links into `..data`, itself a link to a
    timestamped directory."""
    mount = tmp_path / "mount"
    mount.mkdir()
    shutil.copytree(DEMO_POLICIES_DIR, mount / "..2024_01_01_00_00_00.123456789", symlinks=True)
    shutil.rmtree(mount / "..2024_01_01_00_00_00.123456789" / "examples")
    os.symlink("..2024_01_01_00_00_00.123456789", mount / "..data")
    for name in ("red.yaml", "stars.yaml", "green_squares.yaml"):
        os.symlink(f"..data/{name}", mount / name)
    return mount


def test_a_configmap_mount_loads(tmp_path: Path) -> None:
    mount = configmap_mount(tmp_path)
    assert load_policy_dir(mount) == load_policy_dir(DEMO_POLICIES_DIR)
    assert directory_fingerprint(mount) != ""


def test_a_configmap_item_with_a_nested_path_loads(tmp_path: Path) -> None:
    """A ConfigMap item with `path: extra/x.jpg` puts the file in `..<timestamp>/extra/` and
    makes a top-level link `extra -> ..data/extra` to that directory: skipped, like a plain
    subdirectory, so the mount loads."""
    mount = tmp_path / "mount"
    data = mount / "..2024_x"
    (data / "extra").mkdir(parents=True)
    (data / "extra" / "x.jpg").write_bytes(b"\xff\xd8\xff not a policy")
    (data / "weapons.yaml").write_text(GUN)
    os.symlink("..2024_x", mount / "..data")
    os.symlink("..data/extra", mount / "extra")
    os.symlink("..data/weapons.yaml", mount / "weapons.yaml")
    assert within_seconds(lambda: load_policy_dir(mount)).ids == ("weapons",)
    fingerprint = directory_fingerprint(mount)
    (data / "extra" / "x.jpg").write_bytes(b"another picture")  # not read by loading
    assert directory_fingerprint(mount) != fingerprint  # an example image may have changed
    fingerprint = directory_fingerprint(mount)
    (data / "weapons.yaml").write_text(GUN.replace("a gun", "a rifle"))
    assert directory_fingerprint(mount) != fingerprint


def test_a_configmap_mount_through_a_linked_directory_loads(tmp_path: Path) -> None:
    mount = configmap_mount(tmp_path)
    os.symlink(mount, tmp_path / "policies")
    assert load_policy_dir(tmp_path / "policies").ids == ("green_squares", "red", "stars")


# -- the fingerprint the watcher polls -------------------------------------------------------


def test_the_fingerprint_never_blocks_or_raises_on_hostile_entries(
    policies: Path, fifo: Path
) -> None:
    os.symlink("/dev/zero", policies / "zero.yaml")
    os.symlink("nowhere", policies / "dangling.yaml")
    (policies / "big.yaml").write_bytes(b"#" * (MAX_POLICY_FILE_BYTES * 4))
    first = within_seconds(lambda: directory_fingerprint(policies))
    assert first != ""
    assert within_seconds(lambda: directory_fingerprint(policies)) == first


@pytest.mark.parametrize(
    "fix",
    [
        lambda p: (p / "big.yaml").write_text(GUN),  # an oversized file cut down
        lambda p: (p / "bad.YAML").rename(p / "bad.yaml"),  # a file renamed
        lambda p: (p / "zero.yaml").unlink(),  # a link removed
        lambda p: os.replace(p / "pipe.yaml", p / ".pipe"),  # a FIFO moved away
    ],
)
def test_fixing_a_bad_entry_changes_the_fingerprint(
    policies: Path, fifo: Path, fix: Callable[[Path], object]
) -> None:
    (policies / "big.yaml").write_bytes(b"#" * (MAX_POLICY_FILE_BYTES + 1))
    (policies / "bad.YAML").write_text(GUN)
    os.symlink("/dev/zero", policies / "zero.yaml")
    broken = directory_fingerprint(policies)
    fix(policies)
    assert directory_fingerprint(policies) != broken


def test_the_fingerprint_follows_bytes_past_the_limit_of_an_oversized_file(
    policies: Path,
) -> None:
    big = policies / "big.yaml"
    big.write_bytes(b"#" * (MAX_POLICY_FILE_BYTES + 10))
    before = directory_fingerprint(policies)
    big.write_bytes(b"#" * (MAX_POLICY_FILE_BYTES + 20))
    assert directory_fingerprint(policies) != before


def test_a_fifo_swapped_in_after_the_check_is_refused_without_blocking(
    policies: Path, fifo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The entry is checked by stat, then opened: a FIFO that takes a checked file's place in
    between must neither block the open nor be read."""
    monkeypatch.setattr(
        "moderator.core.policy_files._target_problem", lambda path, root: (str(path), "")
    )
    with pytest.raises(PolicyError) as info:
        within_seconds(lambda: read_policy_bytes(fifo, policies))
    assert info.value.problems == ["pipe.yaml: is a FIFO, not a regular file"]


def test_a_file_named_on_its_own_may_link_outside_but_must_be_a_small_regular_file(
    policies: Path, tmp_path: Path, fifo: Path
) -> None:
    (tmp_path / "elsewhere.yaml").write_text(GUN)
    os.symlink(tmp_path / "elsewhere.yaml", policies / "gun.yaml")
    assert read_policy_bytes(policies / "gun.yaml", None) == GUN.encode()
    os.symlink("/dev/zero", policies / "zero.yaml")
    with pytest.raises(PolicyError, match=r"zero\.yaml: links to a character device"):
        within_seconds(lambda: read_policy_bytes(policies / "zero.yaml", None))
    with pytest.raises(PolicyError, match=r"pipe\.yaml: is a FIFO"):
        within_seconds(lambda: read_policy_bytes(fifo, None))


def test_the_fingerprint_walks_subfolders_only_so_deep(policies: Path) -> None:
    before = directory_fingerprint(policies)
    deep = policies / "deep"
    deep.mkdir()
    for _ in range(MAX_WATCHED_DEPTH + 8):  # os.walk recurses: 1,100 levels crashed it
        deep = deep / "d"
        deep.mkdir()
    (deep / "x.png").write_bytes(b"never seen: below the watched depth")
    assert directory_fingerprint(policies) == before  # not walked that deep
    (policies / "deep" / "near.png").write_bytes(b"seen")
    assert directory_fingerprint(policies) not in ("", before)

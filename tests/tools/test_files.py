"""Files the tools write: links followed only where that is safe, replaced whole or not at all."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from moderator.errors import ConfigError
from moderator.tools.files import write_target, written_on_success


def shared_sticky(folder: Path) -> Path:
    """A directory like /tmp: everyone may write, only owners may remove."""
    folder.mkdir()
    folder.chmod(0o1777)
    return folder


def test_a_link_in_a_shared_sticky_directory_is_refused_and_its_target_untouched(
    tmp_path: Path,
) -> None:
    victim = tmp_path / "bashrc"
    victim.write_text("original\n")
    planted = shared_sticky(tmp_path / "tmp") / "new.jsonl"
    planted.symlink_to(victim)
    with pytest.raises(ConfigError, match="shared sticky directory"), written_on_success(planted):
        pass
    assert victim.read_text() == "original\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="planting another user's link needs root")
def test_a_link_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    victim = tmp_path / "policy.yaml"
    victim.write_text("original\n")
    planted = tmp_path / "out.jsonl"
    planted.symlink_to(victim)
    os.lchown(planted, 4242, 4242)
    with pytest.raises(ConfigError, match="owned by another user"):
        write_target(planted)
    assert victim.read_text() == "original\n"


def test_the_callers_own_link_elsewhere_is_followed_and_kept(tmp_path: Path) -> None:
    target = tmp_path / "results" / "out.jsonl"
    target.parent.mkdir()
    target.write_text("old\n")
    link = tmp_path / "latest.jsonl"
    link.symlink_to(target)
    with written_on_success(link) as out:
        out.write("new\n")
    assert link.is_symlink()
    assert target.read_text() == "new\n"


def test_a_plain_file_in_a_shared_sticky_directory_is_written(tmp_path: Path) -> None:
    out = shared_sticky(tmp_path / "tmp") / "report.html"
    with written_on_success(out) as handle:
        handle.write("<html>")
    assert out.read_text() == "<html>"


def test_a_link_loop_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(ConfigError, match="links, refused"):
        write_target(tmp_path / "a")


def test_a_link_among_the_folders_above_the_file_is_checked_too(tmp_path: Path) -> None:
    victim = tmp_path / "home"
    victim.mkdir()
    (victim / "out.jsonl").write_text("original\n")
    planted = shared_sticky(tmp_path / "tmp") / "dir"
    planted.symlink_to(victim)
    with pytest.raises(ConfigError, match="shared sticky directory"):
        write_target(planted / "out.jsonl")
    assert (victim / "out.jsonl").read_text() == "original\n"


def test_links_are_resolved_as_the_kernel_resolves_them(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "a" / "linkdir").symlink_to("../real/sub")
    (tmp_path / "real" / "sub" / "out").symlink_to("../x")  # .. of the link's real folder
    through = tmp_path / "a" / "linkdir" / "out"
    assert write_target(through) == Path(os.path.realpath(through)) == tmp_path / "real" / "x"


def test_what_is_not_a_regular_file_is_written_as_named(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert write_target(Path("/dev/null")) == Path("/dev/null")
    assert write_target(fifo) == fifo
    with written_on_success(Path("/dev/null")) as out:
        out.write("nothing")

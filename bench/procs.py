"""A server's process tree and its CPU time, read from /proc (Linux), for the benchmarks."""

from __future__ import annotations

import os
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def read_stat(path: Path) -> tuple[str, list[str]] | None:
    """(comm, the fields after comm, from field 3 on) of a /proc stat file; None once the
    process is gone."""
    try:
        text = path.read_text()
    except OSError:
        return None
    head, _, tail = text.rpartition(")")
    return head.partition("(")[2], tail.split()


def cpu_seconds(fields: list[str], reaped: bool = False) -> float:
    """User + system time of a stat's fields; `reaped`: with its reaped children's too."""
    # fields[0] is field 3 (state) of proc(5): utime 14, stime 15, cutime 16, cstime 17
    ticks = int(fields[11]) + int(fields[12])
    if reaped:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / TICKS


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (all its threads); 0 once it is gone."""
    stat = read_stat(Path(f"/proc/{pid}/stat"))
    return 0.0 if stat is None else cpu_seconds(stat[1])


def descendants(pid: int) -> list[int]:
    """Live processes below `pid` (a server's decode workers), from every /proc/N/stat."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = read_stat(entry / "stat")
        if stat is not None:
            children.setdefault(int(stat[1][1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found

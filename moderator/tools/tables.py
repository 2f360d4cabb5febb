"""Plain-text tables for the command-line tools."""

from __future__ import annotations

from collections.abc import Sequence


def aligned_rows(rows: Sequence[Sequence[str]], indent: str = "") -> list[str]:
    """Each row as one line, its cells padded to their column's widest and two spaces apart."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        (indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))).rstrip()
        for row in rows
    ]

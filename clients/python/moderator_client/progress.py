"""moderator-scan's progress: a bar on a terminal, a plain line now and then elsewhere (a log),
and the summary at the end."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any, TextIO

BAR_WIDTH = 24
TERMINAL_REFRESH_SECONDS = 0.5
DECISIONS = ("allow", "review", "block", "error")


class Progress:
    def __init__(self, total: int, stream: TextIO, every_seconds: float, skipped: int = 0) -> None:
        self.total = total
        self.stream = stream
        self.terminal = stream.isatty()
        self.every = TERMINAL_REFRESH_SECONDS if self.terminal else every_seconds
        self.skipped = skipped
        self.decisions: Counter[str] = Counter()
        self.error_codes: Counter[str] = Counter()  # images errored, by code
        self.not_sent = 0  # images that got no result (written nowhere: a resume retries them)
        self.started = time.monotonic()

    @property
    def done(self) -> int:
        return sum(self.decisions.values()) + self.not_sent

    @property
    def errors(self) -> int:
        return sum(self.error_codes.values())

    def decided(self, decision: str, error_code: str | None) -> None:
        self.decisions[decision] += 1
        if error_code is not None:
            self.error_codes[error_code] += 1

    def failed(self, code: str, count: int = 1) -> None:
        self.not_sent += count
        self.error_codes[code] += count

    def note(self, message: str) -> None:
        self._print(f"moderator-scan: {message}")

    async def tick_until(self, task: asyncio.Future[Any]) -> None:
        if self.skipped:
            self.note(f"{self.skipped:,} images already in the output: skipped")
        while not task.done():
            self._show()
            await asyncio.sleep(self.every)

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.done / elapsed
        left = self.total - self.done
        eta = _duration(left / rate) if rate > 0 else "?"
        share = self.done / self.total if self.total else 1.0
        filled = round(share * BAR_WIDTH)
        counts = " · ".join(f"{d} {self.decisions[d]:,}" for d in DECISIONS)
        return (
            f"[{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {share:4.0%} "
            f"{self.done:,}/{self.total:,} · {rate:,.1f} img/s · ETA {eta} · {counts}"
        )

    def summary(self) -> None:
        elapsed = time.monotonic() - self.started
        self._show(final=True)
        lines = [
            f"moderated {sum(self.decisions.values()):,} of {self.total:,} images in "
            f"{_duration(elapsed)} ({self.done / max(elapsed, 1e-9):,.1f} img/s)"
            + (f"; {self.skipped:,} skipped, already in the output" if self.skipped else ""),
            "decisions: " + ", ".join(f"{d} {self.decisions[d]:,}" for d in DECISIONS),
        ]
        if self.error_codes:
            codes = ", ".join(f"{c} {n:,}" for c, n in sorted(self.error_codes.items()))
            lines.append(f"errors by code: {codes}")
        if self.not_sent:
            lines.append(f"{self.not_sent:,} images got no result: --resume tries them again")
        for line in lines:
            self._print(line)

    def _show(self, final: bool = False) -> None:
        if self.terminal:
            self.stream.write("\r" + self.line() + ("\n" if final else ""))
            self.stream.flush()
        elif not final:
            self._print(self.line())

    def _print(self, text: str) -> None:
        if self.terminal:
            self.stream.write("\r\033[K")  # over the bar; the next tick draws it again
        self.stream.write(text + "\n")
        self.stream.flush()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"

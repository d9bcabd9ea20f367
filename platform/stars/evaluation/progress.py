"""Progress of a long evaluation (a math benchmark generating up to 2,048 tokens at 16 depths can take
hours): a bar redrawn in place on a terminal, or, in logs, a line now and then, each with the rate and
an ETA."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TextIO

__all__ = ["Progress"]

BAR_WIDTH = 24


class Progress:
    """`update(done, total)` after each batch. With `stream` (a terminal), one line redrawn in place and
    ended when done; otherwise `console` gets a line for the first update, then at most one every
    `every_s` seconds, and always the last, so a log shows the job is alive without a line per batch."""

    def __init__(self, label: str, unit: str = "prompts", *, console: Callable[[str], None] | None = None,
                 stream: TextIO | None = None, every_s: float = 30.0,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.label, self.unit, self.console, self.stream, self.every_s = label, unit, console, stream, every_s
        self.clock = clock
        self.start = clock()
        self._last_line = -math.inf

    def text(self, done: int, total: int) -> str:
        elapsed = max(self.clock() - self.start, 1e-9)
        rate = done / elapsed
        eta = f"ETA {(total - done) / rate:.0f} s" if rate > 0 else "ETA unknown"
        return f"{done}/{total} {self.unit} ({rate:.2f} {self.unit}/s, {eta})"

    def update(self, done: int, total: int) -> None:
        finished = done >= total
        if self.stream is not None:
            filled = BAR_WIDTH * done // max(total, 1)
            bar = "#" * filled + "-" * (BAR_WIDTH - filled)
            self.stream.write(f"\r{self.label} [{bar}] {self.text(done, total)}")
            self.stream.write("\n" if finished else "")
            self.stream.flush()
            return
        now = self.clock()
        if self.console is not None and (finished or now - self._last_line >= self.every_s):
            self._last_line = now
            self.console(f"{self.label} {self.text(done, total)}")

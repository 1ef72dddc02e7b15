"""A one-line progress bar on stderr for long mnist-client jobs, and nothing when not a TTY.

    progress = Progress(total, enabled=sys.stderr.isatty())
    progress.advance(len(batch))    # redraws at most 10 times a second
    progress.clear()                # before writing result lines to the same terminal
    progress.close()                # erase the bar

A few lines instead of a dependency (tqdm, rich): all it needs is `\\r` and the erase-line escape.
"""

from __future__ import annotations

import time
from typing import TextIO

WIDTH = 24
REDRAW_S = 0.1


class Progress:
    def __init__(self, total: int | None, stream: TextIO, *, enabled: bool,
                 unit: str = "images") -> None:
        self.total = total
        self.stream = stream
        self.enabled = enabled
        self.unit = unit
        self.done = 0
        self._started = time.monotonic()
        self._drawn_at = 0.0
        self._shown = False

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self._drawn_at >= REDRAW_S or self.done == self.total):
            self._draw(now)

    def _draw(self, now: float) -> None:
        rate = self.done / max(now - self._started, 1e-9)
        if self.total:
            share = min(self.done / self.total, 1.0)
            bar = "#" * round(share * WIDTH)
            text = (f"[{bar:<{WIDTH}}] {self.done}/{self.total} {self.unit} {share:4.0%}  "
                    f"{rate:,.0f}/s")
        else:
            text = f"{self.done} {self.unit}  {rate:,.0f}/s"
        self.stream.write(f"\r\x1b[K{text}")
        self.stream.flush()
        self._drawn_at = now
        self._shown = True

    def clear(self) -> None:
        """Erase the bar (it is redrawn by the next advance)."""
        if self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False
            self._drawn_at = 0.0

    def close(self) -> None:
        self.clear()

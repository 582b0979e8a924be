"""Progress bars for long commands, drawn on stderr only when stderr is a terminal.

Use:

    from vdiskfs.progress import progress_bar

    with progress_bar(total_bytes, "committing") as bar:
        for chunk in chunks:
            ...
            bar.advance(len(chunk))

A command with a quiet option calls set_quiet(True) before its work starts. Output that is
not a terminal (a pipe, a log file, a test) never receives a bar, so no caller needs to check.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterator, Optional, TextIO

from vdiskfs.sizes import format_size

BAR_WIDTH = 30
# Seconds between two redraws, so that small steps do not flood the terminal.
REDRAW_INTERVAL = 0.1

_quiet = False


def set_quiet(quiet: bool) -> None:
    """Turn all progress bars of this process off (True) or back on (False)."""
    global _quiet
    _quiet = quiet


class ProgressBar:
    """A bar that shows how many of `total` bytes are done; silent when not enabled."""

    def __init__(self, total: int, label: str, stream: TextIO, enabled: bool) -> None:
        self.total = max(total, 0)
        self.label = label
        self.stream = stream
        self.enabled = enabled
        self.done = 0
        self._last_draw = 0.0

    def advance(self, amount: int) -> None:
        """Add `amount` bytes to the done count and redraw if the last draw is old enough."""
        self.update(self.done + amount)

    def update(self, done: int) -> None:
        """Set the done count to `done` bytes and redraw if the last draw is old enough."""
        self.done = min(max(done, 0), self.total)
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last_draw >= REDRAW_INTERVAL or self.done == self.total:
            self._last_draw = now
            self._draw()

    def finish(self) -> None:
        """Draw the final state and end the line."""
        if self.enabled:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self) -> None:
        fraction = self.done / self.total if self.total else 1.0
        filled = int(fraction * BAR_WIDTH)
        bar = "#" * filled + " " * (BAR_WIDTH - filled)
        self.stream.write(f"\r{self.label} {fraction * 100:3.0f}% [{bar}] "
                          f"{format_size(self.done)} / {format_size(self.total)}")
        self.stream.flush()


@contextlib.contextmanager
def progress_bar(total: int, label: str,
                 stream: Optional[TextIO] = None) -> Iterator[ProgressBar]:
    """Yield a ProgressBar over `total` bytes on `stream` (default: stderr).

    The bar is drawn only when the stream is a terminal and set_quiet(True) was not called.
    It is finished when the body ends normally, and left as it is when the body raises.
    """
    stream = sys.stderr if stream is None else stream
    enabled = not _quiet and _is_terminal(stream)
    bar = ProgressBar(total, label, stream, enabled)
    yield bar
    bar.finish()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False

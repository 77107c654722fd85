"""Progress of the long phases of a command (building or loading a model, a benchmark) on stderr.

stdout keeps only the command's results. On a terminal the progress is a live rich bar, removed when
the phase ends; anywhere else (a pipe, a log file, a test capturing stderr) it is plain lines, the first
once the phase has run FIRST_LINE_AFTER seconds (a quick phase, or one that fails at once, prints
nothing), then at most one every LINE_INTERVAL seconds: a heartbeat, not a stream of redraws.
"""

from __future__ import annotations

import math
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

FIRST_LINE_AFTER = 1.0  # seconds of silence before the first plain progress line
LINE_INTERVAL = 5.0  # seconds between plain progress lines


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}"


class StderrProgress:
    """with StderrProgress(total, eta=...) as shown: shown.update(description, completed, total=None).

    `total` (None: unknown, the bar pulses) and `completed` are in any unit; `eta` adds the time left."""

    def __init__(self, total: float | None = None, *, eta: bool = False):
        self.console = Console(stderr=True)
        self.total, self.eta = total, eta
        self.completed = 0.0
        self._bar: Progress | None = None
        self._task = None
        self._start = self._last_line = 0.0
        self._lines = 0

    def __enter__(self) -> "StderrProgress":
        self._start = time.monotonic()
        if self.console.is_terminal:
            columns = [TextColumn("{task.description:<40}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                       TimeElapsedColumn()]
            if self.eta:
                columns += [TextColumn("left"), TimeRemainingColumn()]
            self._bar = Progress(*columns, console=self.console, transient=True)
            self._bar.__enter__()
            self._task = self._bar.add_task("", total=self.total)
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def update(self, description: str, completed: float | None = None, total: float | None = None) -> None:
        if total is not None:
            self.total = total
        if completed is not None:
            self.completed = completed
        if self._bar is not None:
            self._bar.update(self._task, description=description, completed=self.completed, total=self.total)
            return
        now = time.monotonic()
        if now - self._start < FIRST_LINE_AFTER or (self._lines and now - self._last_line < LINE_INTERVAL):
            return
        self._last_line, self._lines = now, self._lines + 1
        elapsed = now - self._start
        line = description
        if self.total:
            fraction = min(max(self.completed / self.total, 0.0), 1.0)
            line += f"  {100 * fraction:3.0f}%"
            if self.eta and fraction > 0:
                left = elapsed * (1 - fraction) / fraction
                line += f"  {_clock(elapsed)} elapsed, ~{_clock(left) if math.isfinite(left) else '?'} left"
            else:
                line += f"  {_clock(elapsed)}"
        else:
            line += f"  {_clock(elapsed)}"
        print(line, file=sys.stderr, flush=True)

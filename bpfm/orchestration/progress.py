"""A one-line progress bar on stderr for the grid's stages (what the demo shows instead of Ray's
and Tune's own output, which `-v` brings back). On a terminal the line redraws in place; in a
log file each stage writes its start and its end only."""

from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 24


class Progress:
    def __init__(self, stream: TextIO | None = None):
        self._stream = stream
        self.tty = self.stream.isatty()
        self.stage, self.total, self.done, self.started = "", 0, 0, time.monotonic()

    @property
    def stream(self) -> TextIO:
        # sys.stderr when drawn, not when made: a caller may swap it (pytest's capture does)
        return self._stream or sys.stderr

    def start(self, stage: str, total: int) -> None:
        self.finish()
        self.stage, self.total, self.done, self.started = stage, total, 0, time.monotonic()
        self._draw(force=True)

    def advance(self, count: int = 1) -> None:
        self.done = min(self.total, self.done + count)
        self._draw()

    def finish(self) -> None:
        if self.stage:
            self.done = self.total
            self._draw(force=True)
            if self.tty:
                self.stream.write("\n")
            self.stream.flush()
        self.stage = ""

    def line(self) -> str:
        filled = WIDTH * self.done // max(self.total, 1)
        elapsed = time.monotonic() - self.started
        return (f"{self.stage:<28} [{'#' * filled}{'.' * (WIDTH - filled)}] "
                f"{self.done}/{self.total}  {elapsed:4.0f} s")

    def _draw(self, force: bool = False) -> None:
        if self.tty:
            self.stream.write("\r" + self.line())
            self.stream.flush()
        elif force and (self.done == 0 or self.done == self.total):
            self.stream.write(self.line() + "\n")
            self.stream.flush()


_current: Progress | None = None


def use(bar: Progress | None) -> None:
    """The bar the grid's stages advance in this process (None: no bar, e.g. with -v)."""
    global _current
    _current = bar


def start(stage: str, total: int) -> None:
    if _current is not None:
        _current.start(stage, total)


def advance(count: int = 1) -> None:
    if _current is not None:
        _current.advance(count)


def finish() -> None:
    if _current is not None:
        _current.finish()

"""Progress for long deploy steps, on stderr: a byte bar for uploads, a ticker for waits.

On a terminal both redraw one line in place. Anywhere else (CI logs, pipes,
tests) they print plain lines, few enough to read: the bar every
``line_every`` fraction of the total, the ticker when the status changes and
then every ``line_every_s`` seconds. Both are safe to update from several
threads (boto3's transfer callbacks arrive from its worker threads).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def human_bytes(n: float) -> str:
    for unit in _UNITS:
        if abs(n) < 1024 or unit == _UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class ByteProgress:
    """``[#####.....]  42%  1.2 GiB / 2.9 GiB  85.3 MiB/s  label``; ``update(n)`` adds n bytes."""

    def __init__(self, total: int, label: str = "", *, stream: TextIO | None = None,
                 tty: bool | None = None, width: int = 30, line_every: float = 0.25,
                 clock: Callable[[], float] = time.monotonic):
        self.total = max(0, int(total))
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.tty = _is_tty(self.stream) if tty is None else tty
        self.width = width
        self.line_every = line_every
        self.clock = clock
        self.done = 0
        self._start = clock()
        self._last_draw = -1.0
        self._next_line = line_every
        self._lock = threading.Lock()
        self._closed = False

    def __call__(self, n: int) -> None:  # boto3 Callback signature
        self.update(n)

    def update(self, n: int) -> None:
        with self._lock:
            self.done += n
            if self.tty:
                now = self.clock()
                if now - self._last_draw >= 0.1:
                    self._last_draw = now
                    self._draw_tty()
            elif self.total and self.done < self.total and self.done / self.total >= self._next_line:
                while self.done / self.total >= self._next_line:
                    self._next_line += self.line_every
                self._line()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self.tty:
                self._draw_tty()
                self.stream.write("\n")
            else:
                self._line()
            self.stream.flush()

    def __enter__(self) -> ByteProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _text(self) -> str:
        elapsed = max(self.clock() - self._start, 1e-9)
        fraction = min(1.0, self.done / self.total) if self.total else 1.0
        rate = human_bytes(self.done / elapsed) + "/s"
        return (f"{fraction:4.0%}  {human_bytes(self.done)} / {human_bytes(self.total)}  {rate}"
                + (f"  {self.label}" if self.label else ""))

    def _draw_tty(self) -> None:
        fraction = min(1.0, self.done / self.total) if self.total else 1.0
        filled = round(fraction * self.width)
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\r[{bar}] {self._text()}\x1b[K")
        self.stream.flush()

    def _line(self) -> None:
        self.stream.write(self._text() + "\n")
        self.stream.flush()


class StatusTicker:
    """For polling loops: ``tick(status)`` once per poll. Prints on change, and as time passes."""

    SPINNER = "|/-\\"

    def __init__(self, label: str, *, stream: TextIO | None = None, tty: bool | None = None,
                 line_every_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.tty = _is_tty(self.stream) if tty is None else tty
        self.line_every_s = line_every_s
        self.clock = clock
        self._start = clock()
        self._status: str | None = None
        self._last_line = self._start
        self._ticks = 0

    @property
    def elapsed(self) -> float:
        return self.clock() - self._start

    def tick(self, status: str) -> None:
        now = self.clock()
        text = f"{self.label}: {status} ({human_seconds(now - self._start)})"
        if self.tty:
            if status != self._status and self._status is not None:
                self.stream.write("\n")
            spin = self.SPINNER[self._ticks % len(self.SPINNER)]
            self.stream.write(f"\r{spin} {text}\x1b[K")
        elif status != self._status or now - self._last_line >= self.line_every_s:
            self._last_line = now
            self.stream.write(text + "\n")
        self._ticks += 1
        self._status = status
        self.stream.flush()

    def close(self, final: str | None = None) -> None:
        if self.tty and self._status is not None:
            self.stream.write("\n")
        if final:
            self.stream.write(f"{self.label}: {final} ({human_seconds(self.elapsed)})\n")
        self.stream.flush()

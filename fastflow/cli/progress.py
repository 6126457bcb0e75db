"""A dependency-free progress bar on stderr with throughput and ETA.

On a terminal it redraws one line (``\\r``); in a batch log (stderr not a TTY) it prints a plain
line at most every ``log_interval`` seconds so SLURM logs stay readable.
"""

from __future__ import annotations

import sys
import time


def _fmt_time(s: float) -> str:
    if s != s or s == float("inf"):
        return "?"
    s = int(s)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


class Progress:
    def __init__(self, total: int, desc: str = "", unit: str = "it", disable: bool = False, initial: int = 0,
                 stream=None, log_interval: float = 10.0):
        self.total = max(int(total), 0)
        self.desc = desc
        self.unit = unit
        self.disable = disable
        self.n = initial
        self._start_n = initial
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = 0.1 if self.tty else log_interval
        self.t0 = time.perf_counter()
        self._last = 0.0
        self.postfix = ""
        self._drawn_n = None

    def rate(self) -> float:
        dt = time.perf_counter() - self.t0
        return (self.n - self._start_n) / dt if dt > 0 else 0.0

    def update(self, k: int = 1, postfix: str | None = None) -> None:
        self.n += k
        if postfix is not None:
            self.postfix = postfix
        now = time.perf_counter()
        if not self.disable and (now - self._last >= self.interval or self.n >= self.total):
            self._last = now
            self._drawn_n = self.n
            self._draw()

    def _draw(self, final: bool = False) -> None:
        rate = self.rate()
        frac = self.n / self.total if self.total else 1.0
        width = 24
        fill = int(width * min(frac, 1.0))
        eta = (self.total - self.n) / rate if rate > 0 else float("inf")
        elapsed = time.perf_counter() - self.t0
        line = (f"{self.desc} {100 * frac:5.1f}% |{'#' * fill}{'.' * (width - fill)}| {self.n}/{self.total} "
                f"[{_fmt_time(elapsed)}<{_fmt_time(eta)}, {rate:,.1f} {self.unit}/s]"
                + (f" {self.postfix}" if self.postfix else ""))
        if self.tty:
            self.stream.write("\r" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.disable:
            return
        if self.tty:
            self._draw(final=True)
        elif self._drawn_n != self.n:
            self._draw()

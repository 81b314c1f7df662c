"""Progress of a long job: a tqdm bar on a terminal; in a log file (a batch job, a pipe) a bar's
carriage returns are noise, so there a plain line now and then instead."""

from __future__ import annotations

import sys
import time


class Progress:
    """Counts ``unit``s done (``update``), shown on ``stream`` (stderr) as a tqdm bar when it is
    a terminal, else as a line ``desc: N unit (R unit/s)`` at most every ``every`` seconds and
    once at ``close``; nothing at all when not ``show``."""

    def __init__(self, desc: str, unit: str, show: bool = True, every: float = 30.0, stream=None):
        self.desc, self.unit, self.every = desc, unit, every
        self.stream = stream or sys.stderr
        self.show, self.done = show, 0
        self.start = self.last = time.perf_counter()
        self.bar = None
        if show and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(desc=desc, unit=unit, file=self.stream)

    def update(self, count: int) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
        elif self.show and time.perf_counter() - self.last >= self.every:
            self.line()

    def line(self, note: str = "") -> None:
        """One plain line now: the count, the rate, ``note``."""
        self.last = time.perf_counter()
        rate = self.done / max(self.last - self.start, 1e-9)
        print(f"{self.desc}: {self.done} {self.unit} ({rate:.1f} {self.unit}/s){note}", file=self.stream,
              flush=True)

    def close(self, note: str = "") -> None:
        if self.bar is not None:
            self.bar.close()
        if self.show:
            self.line(note)

"""Progress and events of a long job on stderr: the one place ``train``, ``sample``, ``eval``,
``shards`` and ``bench`` show them.

On a terminal a tqdm bar shows the progress. In a log file (a batch job, a pipe) a bar's
carriage returns are noise (10 KB per 100 steps), so there a plain line comes instead: when
the job ``report``s (the trainer: every ``log_every`` steps, with step, loss, images/s and
ETA), every ``every`` seconds, and once at the end. ``bar=False`` (``--no-progress``) draws
no bar anywhere and keeps those lines. Events (resumed from, checkpoint saved, finished) are
``say``-ed, one line each whatever the settings, above an open bar rather than through it;
``show_warnings`` sends the warnings of cfkit's loggers (skipped records, a corrupt
checkpoint) the same way.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

from tqdm import tqdm

LOGGERS = ("cfkit", "cfkit_plugins")  # whose warnings show_warnings shows


def say(text: str) -> None:
    """One event line on stderr, written above any open bar."""
    tqdm.write(text, file=sys.stderr)
    sys.stderr.flush()


class _Events(logging.Handler):
    """Log records as ``say`` lines: ``warning: ...``."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            say(f"{record.levelname.lower()}: {self.format(record)}")
        except Exception:  # a handler must not raise (logging's own rule)
            self.handleError(record)


def show_warnings() -> None:
    """Show the warnings of cfkit's loggers as ``say`` lines (once, however often called)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(handler, _Events) for handler in logger.handlers):
            logger.addHandler(_Events(logging.WARNING))


class Progress:
    """Counts ``unit``s done (``update``) out of ``total`` (None: unknown), from ``done`` (a
    resumed job). Shown on ``stream`` (stderr) as a tqdm bar when ``bar`` and it is a
    terminal, else as lines ``desc: done/total unit, fields..., rate, ETA`` at each ``report``
    and at most every ``every`` seconds (None: only when reported) of ``update``s; nothing at
    all when not ``show`` (a process other than rank 0)."""

    def __init__(self, desc: str, unit: str, total: int | None = None, *, done: int = 0,
                 bar: bool = True, show: bool = True, every: float | None = 30.0, stream=None):
        self.desc, self.unit, self.total, self.every = desc, unit, total, every
        self.show, self.done, self.first, self.closed = show, done, done, False
        self.shown_at: int | None = None  # the count of the last line
        self.start = self.last = time.perf_counter()
        self.stream = stream or sys.stderr
        self.bar = None
        if show and bar and self.stream.isatty():
            self.bar = tqdm(desc=desc, unit=unit, total=total, initial=done, file=self.stream,
                            dynamic_ncols=True)

    def update(self, count: int = 1) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
        elif self.every is not None and time.perf_counter() - self.last >= self.every:
            self.line()

    def set_total(self, total: int) -> None:
        """A total learnt as the job goes (generation: the steps of each drawn schedule)."""
        self.total = total
        if self.bar is not None:
            self.bar.total = total

    def report(self, *fields: str) -> None:
        """Show ``fields`` (e.g. ``"loss 0.1234"``) now: on the bar, or as a line."""
        if self.bar is not None:
            self.bar.set_postfix_str(", ".join(fields))
        else:
            self.line(*fields)

    def line(self, *fields: str) -> None:
        """One plain line now: the count, ``fields``, the rate and the time left (or taken)."""
        if not self.show:
            return
        self.last, self.shown_at = time.perf_counter(), self.done
        elapsed = self.last - self.start
        rate = (self.done - self.first) / max(elapsed, 1e-9)
        count = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
        parts = [f"{self.desc}: {count} {self.unit}", *fields, f"{_number(rate)} {self.unit}/s"]
        if self.closed or (self.total is not None and self.done >= self.total):
            parts.append(f"in {tqdm.format_interval(elapsed)}")
        elif self.total is not None and rate > 0:
            parts.append(f"ETA {tqdm.format_interval((self.total - self.done) / rate)}")
        print(", ".join(parts), file=self.stream, flush=True)

    def close(self, *fields: str, failed: bool = False) -> None:
        """Close the bar and show the last line (with ``fields``) unless a line just showed
        this count (the job's last ``report``) or the job ``failed`` (its error says what
        happened); again does nothing."""
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        if not failed and (fields or self.shown_at != self.done):
            self.line(*fields)


def _number(value: float) -> str:
    """A rate to three significant digits or so, never in exponent notation."""
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def counter(desc: str, unit: str, total: int, bar: bool = True) -> Callable[[int], None]:
    """``update(n)`` of a ``Progress`` over ``total`` that closes when full (the progress of
    ``cfkit.metrics.extract`` and of sampling in ``cfkit.evaluate``)."""
    progress = Progress(desc, unit, total, bar=bar)

    def update(count: int) -> None:
        progress.update(count)
        if progress.done >= total:
            progress.close()

    return update


def of_steps(desc: str, unit: str, bar: bool = True) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` callback (``cfkit.generate``'s) showing a ``Progress`` from
    its first call, so that bad options fail before any output, closed when done."""
    made: list[Progress] = []

    def progress(done: int, total: int) -> None:
        if not made:
            made.append(Progress(desc, unit, total, bar=bar))
        made[0].set_total(total)  # batches of a drawn schedule differ in steps
        made[0].update(done - made[0].done)
        if done == total:
            made[0].close()

    return progress

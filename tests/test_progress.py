"""Progress and events on stderr: a bar on a terminal only; in a log, plain lines with the
count, the reported fields, the rate and the time left, and the events whatever the settings.
(The commands' logs: tests/test_train.py, test_sample_cli.py, test_eval.py, test_data_encode.py.)"""

from __future__ import annotations

import io
import logging
import re

from cfkit import progress
from cfkit.progress import Progress


class Log(io.StringIO):
    """A stream that is a terminal or not."""

    def __init__(self, terminal: bool):
        super().__init__()
        self.terminal = terminal

    def isatty(self):
        return self.terminal


def test_progress_is_a_bar_on_a_terminal_and_plain_lines_in_a_log():
    log = Log(False)
    shown = Progress("encode", "images", every=0.0, stream=log)
    assert shown.bar is None
    shown.update(3)
    shown.update(4)
    shown.close("done")
    lines = log.getvalue().splitlines()
    assert [line.split(", ")[0] for line in lines] == ["encode: 3 images", "encode: 7 images",
                                                        "encode: 7 images"]
    assert re.fullmatch(r"encode: 7 images, done, [\d.]+ images/s, in 00:00", lines[-1])
    assert "\r" not in log.getvalue()
    quiet = Log(False)
    Progress("encode", "images", every=3600.0, stream=quiet).update(5)  # not yet due: no line
    assert quiet.getvalue() == ""
    terminal = Log(True)
    bar = Progress("encode", "images", stream=terminal)
    bar.update(2)
    bar.bar.close()
    assert bar.bar is not None and "\r" in terminal.getvalue()


def test_no_bar_on_a_terminal_either_without_bar_and_nothing_without_show():
    terminal = Log(True)
    lines = Progress("train", "steps", 4, bar=False, every=None, stream=terminal)
    assert lines.bar is None
    lines.update(2)
    lines.report("loss 0.5")
    assert terminal.getvalue().startswith("train: 2/4 steps, loss 0.5, ")
    hidden = Log(True)
    rank_one = Progress("train", "steps", 4, show=False, stream=hidden)
    rank_one.update(4)
    rank_one.report("loss 0.5")
    rank_one.close("done")
    assert rank_one.bar is None and hidden.getvalue() == ""


def test_a_reported_line_has_the_count_fields_rate_and_eta_and_is_not_repeated_at_close():
    log = Log(False)
    steps = Progress("train", "steps", 10, done=4, every=None, stream=log)  # resumed at step 4
    steps.update(3)  # no line: only reports show one (every=None)
    assert log.getvalue() == ""
    steps.report("loss 0.1234", "51.2 images/s")
    steps.update(3)
    steps.report("loss 0.1000", "50.0 images/s")
    steps.close()  # the last report showed step 10 already
    first, last = log.getvalue().splitlines()
    assert re.fullmatch(r"train: 7/10 steps, loss 0.1234, 51.2 images/s, [\d.]+ steps/s, ETA \d\d:\d\d",
                        first)
    assert re.fullmatch(r"train: 10/10 steps, loss 0.1000, 50.0 images/s, [\d.]+ steps/s, in \d\d:\d\d",
                        last)
    steps.close()
    assert len(log.getvalue().splitlines()) == 2  # closing again shows nothing


def test_a_bar_carries_the_reported_fields():
    terminal = Log(True)
    steps = Progress("train", "steps", 10, stream=terminal)
    steps.update(5)
    steps.report("loss 0.1234")
    steps.close()
    assert "loss 0.1234" in terminal.getvalue() and "5/10" in terminal.getvalue()


def test_counter_and_of_steps_close_when_full(capfd):
    update = progress.counter("features", "images", 5)
    update(2)
    update(3)
    of_steps = progress.of_steps("diffusion steps", "steps")
    for done in (2, 4, 6):  # a batch of 6 steps ...
        of_steps(done, 12)
    for done in (9, 10):  # ... then one of 4 (a drawn schedule): 10 in all
        of_steps(done, 10)
    err = capfd.readouterr().err
    assert re.search(r"^features: 5/5 images, [\d.]+ images/s, in 00:00$", err, re.M), err
    assert re.search(r"^diffusion steps: 10/10 steps, [\d.]+ steps/s, in 00:00$", err, re.M), err
    assert "\r" not in err and len(err.splitlines()) == 2


def test_events_and_cfkit_warnings_are_lines_on_stderr_once(capfd):
    progress.show_warnings()
    progress.show_warnings()  # the CLI calls it each time: still one line per warning
    progress.say("saved checkpoint run/checkpoints/step-0000010")
    logging.getLogger("cfkit.data").warning("skipped corrupt sample a of b.tar")
    logging.getLogger("cfkit_plugins.datasets").warning("imagefolder: skipped x.png")
    logging.getLogger("cfkit.data").info("not an event")
    assert capfd.readouterr().err.splitlines() == [
        "saved checkpoint run/checkpoints/step-0000010",
        "warning: skipped corrupt sample a of b.tar",
        "warning: imagefolder: skipped x.png",
    ]


def test_a_failed_job_closes_its_bar_without_a_last_line():
    log, terminal = Log(False), Log(True)
    for stream in (log, terminal):
        steps = Progress("train", "steps", 10, stream=stream)
        steps.update(3)
        steps.close(failed=True)
    assert log.getvalue() == "" and "train: 3/10 steps" not in terminal.getvalue()
    assert terminal.getvalue().endswith("\n")  # the bar closed: what follows starts a line

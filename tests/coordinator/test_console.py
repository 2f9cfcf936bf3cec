"""The console: phase lines carry the elapsed time; live progress within a round rewrites one status line on a
terminal and degrades to plain, rate-limited lines (through the log) when stdout is a file or a pipe."""

from __future__ import annotations

import logging

from fedlora.coordinator.observers import ConsoleObserver
from fedlora.env import ConsoleFormatter


def test_progress_on_a_terminal_rewrites_one_line(capsys):
    lines: list[str] = []
    c = ConsoleObserver(rounds=3, privacy=False, echo=lines.append, tty=True)
    c.on_progress("train", 1, 4, 2.0)
    c.on_progress("train", 3, 4, 5.0)
    out = capsys.readouterr().out
    assert out.count("\r\033[K") == 2 and out.endswith("round 1/3: training, 3/4 clients answered, 5s")
    assert lines == []  # nothing permanent until the round ends
    c.on_start("4 clients ready")
    assert capsys.readouterr().out == "\r\033[K"  # the status line is cleared before a permanent line
    assert lines[0].startswith("4 clients ready (+") and lines[0].endswith("s)")


def test_progress_into_a_file_is_plain_and_rate_limited(capsys):
    lines: list[str] = []
    c = ConsoleObserver(rounds=2, privacy=False, echo=lines.append, tty=False, every_s=30.0)
    c.on_progress("train", 1, 5, 3.0)  # too early in the round: silent
    c.on_progress("evaluate", 2, 5, 31.0)
    c.on_progress("evaluate", 4, 5, 32.0)  # within 30 s of the last line: silent
    assert lines == ["round 1/2: evaluating, 2/5 clients answered, 31s"]
    assert "\033" not in capsys.readouterr().out  # no control codes into files
    resumed = ConsoleObserver(rounds=3, privacy=False, echo=lines.append, tty=False, every_s=30.0)
    resumed.on_progress("train", 0, 2, 31.0, 3)  # a resumed run's first round is the message's, not round 1
    assert lines[-1] == "round 3/3: training, 0/2 clients answered, 31s"


def test_console_format_keeps_fedlora_lines_bare_and_names_everything_else():
    f = ConsoleFormatter()
    mine = logging.LogRecord("fedlora.console", logging.INFO, __file__, 1, "round 1/4 | ...", None, None)
    other = logging.LogRecord("ray", logging.WARNING, __file__, 1, "slow node", None, None)
    assert f.format(mine) == "round 1/4 | ..."
    assert f.format(other) == "WARNING ray: slow node"

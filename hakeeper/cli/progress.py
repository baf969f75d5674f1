"""Progress of long commands (issue 16, item 5): backup create, restore, verify, dump
create/restore, backup copy, upgrade.

The backup code reports through a ``ProgressFn``: ``progress(phase, done, total)`` (``total``
None when unknown).  :func:`progress_display` turns those calls into one of three things, all
on stderr so that stdout keeps only the command's result:

- on a terminal (``rich``): a live display per phase with the phase's name, bytes (or segments,
  objects) done and total, the average rate and the ETA;
- off a terminal (``lines``, for logs and CI): one compact line when a phase ends
  (``restore: fetch 2.3 GiB in 3.1 s (742 MiB/s)``) and one every :data:`LINE_EVERY` seconds
  while a long phase runs;
- nothing (``none``): ``--quiet``, or ``-o json``/``yaml`` off a terminal (a script reads
  stdout and wants nothing else; on a terminal the live display goes to stderr anyway).

A phase begins with its first report and ends when another phase begins (the operations report
their phases one after the other) or when the command ends; its time is from its first report to
its last.  Reaching its total does not end it: some totals are estimates (a backup's size before
the copy) that the bytes pass.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TaskID, TextColumn
from rich.text import Text

from hakeeper.backup.phases import PhaseStats
from hakeeper.backup.phases import describe as phases_text
from hakeeper.cli.app import err

ProgressFn = Callable[[str, int, int | None], None]
Mode = Literal["rich", "lines", "none"]
Unit = Literal["bytes", "segments", "objects", "time"]  # time: a phase with nothing to count
LINE_EVERY = 10.0  # seconds between two lines of a phase that runs long (off a terminal)

QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress display (the result is still printed).")
]


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@dataclass(frozen=True, slots=True)
class Label:
    """How a phase is shown: its name for the user and what ``done``/``total`` count."""

    text: str
    unit: Unit = "bytes"


def amount(n: float, unit: Unit) -> str:
    if unit == "time":
        return ""
    return human_bytes(n) if unit == "bytes" else f"{n:.0f} {unit}"


def rate_text(n: float, seconds: float, unit: Unit) -> str | None:
    if seconds <= 0 or unit == "time":
        return None
    r = n / seconds
    return f"{human_bytes(r)}/s" if unit == "bytes" else f"{r:.1f} {unit}/s"


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(seconds + 0.5), 60)
    return f"{m}m{s:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m"


def phase_line(command: str, label: Label, done: float, seconds: float) -> str:
    """The line that closes a phase off a terminal: ``restore: fetch 2.3 GiB in 3.1 s (742 MiB/s)``."""
    r = rate_text(done, seconds, label.unit)
    what = amount(done, label.unit)
    text = f"{command}: {label.text}{' ' + what if what else ''} in {duration(seconds)}"
    return text + (f" ({r})" if r else "")


def running_line(command: str, label: Label, done: float, total: float | None, seconds: float) -> str:
    """A line while a long phase runs: how far, the average rate and the ETA."""
    what = amount(done, label.unit)
    text = f"{command}: {label.text}{' ' + what if what else ''}"
    if total and label.unit != "time":
        text += f" of {amount(total, label.unit)} ({100 * done / total:.0f}%)"
    r = rate_text(done, seconds, label.unit)
    if r:
        text += f", {r}"
    if total and done and seconds > 0 and done < total:
        text += f", ETA {duration((total - done) * seconds / done)}"
    return text + f", {duration(seconds)} so far"


def choose_mode(output: str, quiet: bool, terminal: bool) -> Mode:
    if quiet:
        return "none"
    if terminal:
        return "rich"
    return "lines" if output == "table" else "none"


# ------------------------------------------------------------------------------------ rich columns


class _Amount(ProgressColumn):
    def render(self, task: Task) -> Text:
        unit: Unit = task.fields.get("unit", "bytes")
        done = amount(task.completed, unit)
        return Text(f"{done} / {amount(task.total, unit)}" if task.total else done)


class _Rate(ProgressColumn):
    """The phase's average rate since it began (steadier than a moving window, and shown at
    once, where rich's own speed column needs several samples)."""

    def render(self, task: Task) -> Text:
        r = rate_text(task.completed, task.elapsed or 0.0, task.fields.get("unit", "bytes"))
        return Text(r or "")


class _Eta(ProgressColumn):
    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0.0
        if task.finished:
            return Text(f"done in {duration(elapsed)}")
        if task.total and task.completed and elapsed > 0:
            return Text(f"ETA {duration((task.total - task.completed) * elapsed / task.completed)}")
        return Text(f"{duration(elapsed)}")


# ------------------------------------------------------------------------------------ the reporter


@dataclass
class _Phase:
    label: Label
    started: float
    last: float
    done: int = 0
    total: int | None = None
    base: int = 0  # done of the earlier rounds (a chain's links report the same phase anew)
    round_base: int = 0  # base when this stretch began (what its end line does not count)
    ended: bool = False
    line_at: float = 0.0
    task: TaskID | None = None


@dataclass
class Reporter:
    """The ProgressFn of one command (see the module docstring)."""

    command: str
    labels: Mapping[str, Label]
    mode: Mode
    write: Callable[[str], None]
    bars: Progress | None = None
    clock: Callable[[], float] = time.monotonic
    every: float = LINE_EVERY
    phases: dict[str, _Phase] = field(default_factory=dict)

    def label(self, name: str) -> Label:
        return self.labels.get(name) or Label(name.replace("_", " "))

    def __call__(self, name: str, done: int, total: int | None) -> None:
        if self.mode == "none":
            return
        now = self.clock()
        ph = self.phases.get(name)
        if ph is None or (ph.ended and done < ph.done):
            for other in self.phases.values():  # a new phase: the ones before it are over
                if other is not ph and not other.ended:
                    self._end(other)
            if ph is None:
                ph = self.phases[name] = _Phase(self.label(name), now, now, line_at=now)
            else:  # reported again from zero after it ended: a stretch of its own, its own line
                ph.base += ph.done
                ph.round_base = ph.base
                ph.started, ph.ended, ph.line_at = now, False, now
        elif ph.ended:
            return
        elif done < ph.done:
            ph.base += ph.done
        ph.done, ph.total, ph.last = done, total, now
        self._show(ph, now)

    def _show(self, ph: _Phase, now: float) -> None:
        if self.bars is not None:
            total = ph.total if ph.total is not None and ph.done <= ph.total else None
            if ph.task is None:
                ph.task = self.bars.add_task(ph.label.text, total=total, unit=ph.label.unit)
            self.bars.update(ph.task, completed=ph.done, total=total)
        elif self.mode == "lines" and now - ph.line_at >= self.every:
            ph.line_at = now
            earlier = ph.base - ph.round_base  # earlier rounds in this stretch: their total is gone
            total = ph.total if not earlier else None
            self.write(running_line(self.command, ph.label, earlier + ph.done, total, now - ph.started))

    def _end(self, ph: _Phase) -> None:
        ph.ended = True
        if self.bars is not None and ph.task is not None:
            # finished: the ETA column says "done in", the bar is full
            self.bars.update(ph.task, completed=ph.done, total=ph.done)
            self.bars.stop_task(ph.task)
        elif self.mode == "lines":
            done = ph.base - ph.round_base + ph.done
            self.write(phase_line(self.command, ph.label, done, ph.last - ph.started))

    def close(self) -> None:
        for ph in self.phases.values():
            if not ph.ended:
                self._end(ph)

    def observed(self) -> dict[str, PhaseStats]:
        """What the display saw of each phase (for commands whose result has no timings)."""
        return {
            name: PhaseStats(
                seconds=round(ph.last - ph.started, 3),
                bytes=ph.base + ph.done if ph.label.unit == "bytes" else None,
            )
            for name, ph in self.phases.items()
        }


def _stderr_line(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


@contextlib.contextmanager
def progress_display(
    command: str,
    labels: Mapping[str, Label],
    *,
    output: str = "table",
    quiet: bool = False,
    console: Console | None = None,
) -> Iterator[Reporter]:
    """A :class:`Reporter` for ``command`` (``backup create``, ``restore``, ...), closed (every
    open phase ended) when the block ends, also on an error."""
    console = console or err
    mode = choose_mode(output, quiet, console.is_terminal)
    if mode != "rich":
        rep = Reporter(command, labels, mode, _stderr_line)
        try:
            yield rep
        finally:
            rep.close()
        return
    columns = (
        TextColumn("{task.description:<20}"),
        BarColumn(),
        _Amount(),
        _Rate(),
        _Eta(),
    )
    with Progress(*columns, console=console, transient=False) as bars:
        rep = Reporter(command, labels, mode, _stderr_line, bars)
        try:
            yield rep
        finally:
            rep.close()


__all__ = [
    "LINE_EVERY",
    "Label",
    "ProgressFn",
    "QuietOpt",
    "Reporter",
    "choose_mode",
    "human_bytes",
    "phase_line",
    "phases_text",
    "progress_display",
    "running_line",
]

"""The one progress display of every command: Rich bars on stderr, nothing when off.

The library never sees Rich: it calls plain callbacks (`progress(done, total)`) or a small
protocol (pdscli.sample.loop.SampleProgress). A command opens `Progress(enabled)` (off with
--quiet, and on every torchrun rank but 0), adds a `Lane` per bar and feeds the lanes from those
callbacks. When stderr is not a terminal (a log file), `log_lines=True` prints one plain line
per percent instead of a bar, so a background run's log shows how far it got.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress

from pdscli.console import err_console


class Lane:
    """One bar: `update(completed=, total=, advance=, text=)`; `text` is shown after the counts."""

    def __init__(self, owner: Progress, label: str, total: int | None, completed: int):
        self.owner, self.label = owner, label
        self.total, self.completed, self.text, self._pct = total, completed, "", -1
        bars = owner.bars
        self.task = bars.add_task(label, total=total, completed=completed, extra="") if bars is not None else None

    def update(self, *, completed: int | None = None, total: int | None = None, advance: int = 0,
               text: str | None = None) -> None:
        if not self.owner.enabled:
            return
        if total is not None:
            self.total = total
        if completed is not None:
            self.completed = completed
        self.completed += advance
        if text is not None:
            self.text = text
        if self.task is not None:
            self.owner.bars.update(self.task, completed=self.completed, total=self.total, extra=self.text)
        elif self.owner.log_lines and self.total:
            pct = 100 * self.completed // self.total
            if pct != self._pct:
                self._pct = pct
                self.owner.console.print(f"{self.label} {self.completed}/{self.total} {self.text}".rstrip(),
                                         highlight=False, markup=False)

    def reset(self, *, total: int | None = None, text: str = "") -> None:
        """Start the bar over (e.g. the steps of the next batch)."""
        self._pct = -1
        if self.task is not None:
            self.owner.bars.reset(self.task, total=total if total is not None else self.total, extra=text)
        self.update(completed=0, total=total, text=text)


class Progress:
    """Context manager holding the bars; `lane(label, total)` adds one. Disabled: every call does nothing."""

    def __init__(self, enabled: bool = True, *, console: Console | None = None, log_lines: bool = False):
        self.enabled = enabled
        self.console = console or err_console
        self.log_lines = log_lines
        self._started = False
        live = enabled and (self.console.is_terminal or not log_lines)
        self.bars = RichProgress(
            TextColumn("{task.description:>7}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[extra]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
        ) if live else None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        if self._started:
            self.bars.stop()
        return False

    def lane(self, label: str, total: int | None = None, completed: int = 0) -> Lane:
        # The display starts with its first bar: a command that fails before any bar prints nothing
        # (no empty line ahead of its error message).
        if self.bars is not None and not self._started:
            self.bars.start()
            self._started = True
        return Lane(self, label, total, completed)

    def counter(self, label: str):
        """A `progress(done, total)` callback (pds filters' images) drawn as one bar."""
        lane = None

        def update(done: int, total: int) -> None:
            nonlocal lane
            lane = lane or self.lane(label, total)
            lane.update(completed=done, total=total)

        return update


class SampleBars:
    """pdscli.sample.loop.SampleProgress drawn as two bars: images (with ETA) and the steps of the
    current batch (with NFE/s)."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.images = self.steps = None

    def start(self, total: int, done: int, steps: int) -> None:
        self.images = self.progress.lane("images", total, done)
        self.steps = self.progress.lane("steps", steps)

    def batch(self, first: int, last: int) -> None:
        self.steps.reset(text=f"#{first}" if first == last else f"#{first}..{last}")

    def step(self, i: int, n: int, nfe_rate: float) -> None:
        self.steps.update(completed=i + 1, total=n, text=f"{nfe_rate:.1f} NFE/s")

    def batch_done(self, count: int) -> None:
        self.images.update(advance=count)

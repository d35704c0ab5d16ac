"""pdscli.cli.progress: the one progress display (bars, plain log lines, off)."""

from __future__ import annotations

import io

from rich.console import Console

from pdscli.cli.progress import Progress, SampleBars


def console(terminal: bool) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=terminal, width=100), buf


def test_off_prints_nothing():
    con, buf = console(terminal=True)
    with Progress(enabled=False, console=con) as bars:
        lane = bars.lane("images", 10)
        lane.update(advance=5, text="x")
        bars.counter("files")(3, 4)
        samples = SampleBars(bars)
        samples.start(8, 2, 5)
        samples.batch(2, 3)
        samples.step(0, 5, 1.0)
        samples.batch_done(2)
    assert buf.getvalue() == ""


def test_log_lines_when_not_a_terminal_one_per_percent():
    con, buf = console(terminal=False)
    with Progress(console=con, log_lines=True) as bars:
        lane = bars.lane("train", 200)
        for step in range(1, 201):
            lane.update(completed=step, text=f"loss {1 / step:.3f}")
    lines = buf.getvalue().splitlines()
    assert len(lines) == 101  # 0%..100%, each once
    assert lines[-1] == "train 200/200 loss 0.005"


def test_sample_bars_count_images_and_steps():
    con, buf = console(terminal=True)
    with Progress(console=con) as bars:
        samples = SampleBars(bars)
        samples.start(total=6, done=2, steps=3)
        samples.batch(2, 3)
        for i in range(3):
            samples.step(i, 3, 12.5)
        samples.batch_done(2)
        assert samples.images.completed == 4 and samples.steps.completed == 3
        assert samples.steps.text == "12.5 NFE/s"
        samples.batch(4, 4)
        assert samples.steps.completed == 0 and samples.steps.text == "#4"
    out = buf.getvalue()
    assert "images" in out and "steps" in out and "4/6" in out  # the bars' last frame


def test_nothing_is_drawn_before_the_first_bar():
    """A command that fails before any bar leaves stderr to its one-line error (no empty line first)."""
    import io

    from rich.console import Console

    from pdscli.cli.progress import Progress

    quiet_fail = io.StringIO()
    with Progress(True, console=Console(file=quiet_fail, force_terminal=False)):
        pass
    assert quiet_fail.getvalue() == ""
    drawn = io.StringIO()
    with Progress(True, console=Console(file=drawn, force_terminal=False)) as bars:
        bars.lane("images", 2).update(completed=2)
    assert "images" in drawn.getvalue()

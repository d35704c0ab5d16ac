"""The Typer app every command module registers on, and the root options (--version)."""

from __future__ import annotations

import contextlib

import typer
from typer.core import TyperCommand

from pdscli import __version__
from pdscli.cli.choices import fill
from pdscli.console import err_console, ignore_further_interrupts

app = typer.Typer(
    name="pds",
    help=(
        "Fast sampling for score-based diffusion models (NCSN++ / score_sde checkpoints): "
        "preconditioned diffusion sampling (PDS), accelerated samplers, ONNX Runtime and TensorRT engines.\n\n"
        "Examples:\n\n"
        "  pds sample --model gaussian --steps 30 --out out/\n\n"
        "  pds info checkpoint.pth --preset cifar10\n\n"
        "  pds export --checkpoint checkpoint.pth --preset cifar10 --format onnx\n\n"
        "  pds filters ~/data/ffhq --size 256\n\n"
        "  pds bench --quick"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool):
    if value:
        typer.echo(f"pds {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
):
    pass


class Command(TyperCommand):
    """Every pds command: its help names the choices of its flags from the registries (cli.choices)."""

    def format_help(self, ctx, formatter) -> None:
        self.help, self.epilog = fill(self.help), fill(self.epilog)
        for param in self.params:
            param.help = fill(getattr(param, "help", None))
        return super().format_help(ctx, formatter)


_interruption = {"reported": False}


def report_interruption(message: str = "interrupted") -> None:
    """The one line a Ctrl-C gets (once per command), with further Ctrl-C ignored while the
    command ends. Typer turns a Ctrl-C it sees into a silent exit 130; `main` then says it here."""
    ignore_further_interrupts()
    if not _interruption["reported"]:
        err_console.print(message, highlight=False, soft_wrap=True, markup=False)
        _interruption["reported"] = True


def interruption_reported(reset: bool = False) -> bool:
    reported = _interruption["reported"]
    if reset:
        _interruption["reported"] = False
    return reported


@contextlib.contextmanager
def interruptible(hint: str = ""):
    """Ctrl-C inside a command: "interrupted" (and `hint`) on stderr and exit code 130."""
    try:
        yield
    except KeyboardInterrupt:
        report_interruption(f"interrupted{'; ' + hint if hint else ''}")
        raise typer.Exit(130) from None

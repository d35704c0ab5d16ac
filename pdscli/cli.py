"""The `pds` command. Commands are thin: each lives in pdscli/commands/<name>.py and calls the library."""

from __future__ import annotations

import importlib
import sys

import typer
from rich.markup import escape

from pdscli import __version__
from pdscli.console import err_console
from pdscli.errors import PdsError

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

# Each module registers its command(s) on `app` when imported.
COMMAND_MODULES = ("info", "sample", "filters", "export", "bench", "train")


def _version(value: bool):
    if value:
        typer.echo(f"pds {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
):
    pass


def _register_commands() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(f"pdscli.commands.{name}")


_register_commands()


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    try:
        # Standalone mode: Typer prints usage errors itself (exit 2) and calls sys.exit.
        app(args=argv, prog_name="pds")
    except PdsError as e:
        # escape: messages quote user text and brackets (`pip install "pds[trt]"`, `x [B,C,H,W]`), never markup.
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True, markup=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted", highlight=False)
        sys.exit(130)

"""The `pds` command line: the Typer app, shared option blocks, and one thin module per command.

May import anything in the package; nothing imports it (it is the top of the graph)."""

from __future__ import annotations

import importlib
import sys

from rich.markup import escape

from pdscli.cli.app import app
from pdscli.console import err_console
from pdscli.errors import PdsError

# Each module registers its command(s) on `app` when imported.
COMMAND_MODULES = ("info", "sample", "filters", "export", "bench", "train", "fid")


def _register_commands() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(f"pdscli.cli.{name}")


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

"""The `pds` command line: the Typer app, shared option blocks, and one thin module per command.

May import anything in the package; nothing imports it (it is the top of the graph)."""

from __future__ import annotations

import sys

try:  # Ctrl-C while the command line starts (torch alone takes seconds to import): one line, no traceback
    import importlib
    import signal
    import threading

    import typer
    from rich.markup import escape

    from pdscli.cli.app import app, interruption_reported, report_interruption
    from pdscli.console import err_console
    from pdscli.errors import PdsError, first_line, is_out_of_memory

    try:  # recent Typer carries its own copy of click
        from typer._click import exceptions as click_errors
    except ImportError:  # pragma: no cover - older Typer uses click itself
        from click import exceptions as click_errors

    # Each module registers its command(s) on `app` when imported.
    COMMAND_MODULES = ("info", "sample", "filters", "export", "bench", "train", "fid")

    for _name in COMMAND_MODULES:
        importlib.import_module(f"pdscli.cli.{_name}")
except KeyboardInterrupt:
    sys.stderr.write("interrupted\n")
    raise SystemExit(130) from None


# What to make smaller when a command runs out of memory.
SMALLER = {"filters": "a smaller --size (or fewer images, --limit)", "train": "a smaller --batch-size",
           "bench": "smaller --batch-sizes", "fid": "a smaller --batch-size", "sample": "a smaller --batch-size",
           "export": "a smaller --max-batch"}


def out_of_memory_line(argv: list[str] | None, error: BaseException) -> str:
    command = next((a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")), "")
    detail = first_line(error, 120) if str(error) else type(error).__name__
    hint = SMALLER.get(command, "smaller sizes")
    return f"out of memory in pds {command} ({detail}); pass {hint}"


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors (ours and Typer's usage errors) become one line on stderr and exit code 2."""
    handler = signal.getsignal(signal.SIGINT)
    interruption_reported(reset=True)
    try:
        # Not standalone: usage errors come here as exceptions, to be printed as one line like ours.
        code = app(args=argv, prog_name="pds", standalone_mode=False)
    except click_errors.NoArgsIsHelpError as e:
        err_console.print(e.ctx.get_help() if e.ctx else str(e), highlight=False, soft_wrap=True, markup=False)
        sys.exit(e.exit_code)
    except click_errors.UsageError as e:
        command = e.ctx.command_path if e.ctx else "pds"
        err_console.print(f"[bold red]error:[/] {escape(e.format_message())} (see `{escape(command)} --help`)",
                          highlight=False, soft_wrap=True, markup=True)
        sys.exit(e.exit_code)
    except click_errors.ClickException as e:
        err_console.print(f"[bold red]error:[/] {escape(e.format_message())}", highlight=False, soft_wrap=True, markup=True)
        sys.exit(e.exit_code)
    except typer.Abort:
        report_interruption()
        sys.exit(130)
    except PdsError as e:
        # escape: messages quote user text and brackets (`pip install "pds[trt]"`, `x [B,C,H,W]`), never markup.
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True, markup=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        report_interruption()
        sys.exit(130)
    except (MemoryError, RuntimeError) as e:  # out of memory anywhere a command did not say so itself
        if not is_out_of_memory(e):
            raise
        err_console.print(f"[bold red]error:[/] {escape(out_of_memory_line(argv, e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    finally:
        if handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, handler)
    if code == 130:  # Typer's silent exit for a Ctrl-C no command reported
        report_interruption()
    if isinstance(code, int) and code:
        sys.exit(code)

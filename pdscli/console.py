"""Shared Rich consoles: results on stdout, messages and progress on stderr."""

from rich.console import Console

console = Console()
err_console = Console(stderr=True)

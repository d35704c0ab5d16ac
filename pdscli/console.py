"""Shared Rich consoles: results on stdout, messages and progress on stderr."""

import signal
import threading

from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def ignore_further_interrupts():
    """After a first Ctrl-C: ignore the next ones while the command reports and ends, so that a
    second Ctrl-C cannot turn the cleanup into a traceback. Returns the handler to restore (None
    where signals cannot be set: not the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGINT, signal.SIG_IGN)

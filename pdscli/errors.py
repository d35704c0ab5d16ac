"""User-facing errors: a one-line message and exit code 2, never a traceback."""

import re

# Terminal escape sequences (colours, cursor moves) that other libraries put in their messages.
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-_]")


class PdsError(Exception):
    """Bad input or an environment the user must fix. `str(err)` is the whole message.

    Messages often quote other libraries' errors: their escape codes are removed (they would
    show raw in a log or a pipe) and so is surrounding blank space (no message starts with a
    blank line)."""

    exit_code = 2

    def __init__(self, message: object = ""):
        super().__init__(_ANSI.sub("", str(message)).strip())


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (cut at `limit`), or its type's name if it has none:
    other libraries' errors quoted inside a one-line PdsError or a report."""
    lines = str(e).strip().splitlines()
    return lines[0][:limit] if lines else type(e).__name__


def is_out_of_memory(error: BaseException) -> bool:
    """An allocation failed: MemoryError, torch's OutOfMemoryError (told by name, so that the command
    line need not import torch to recognise it), or the CPU allocator's plain RuntimeError."""
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)

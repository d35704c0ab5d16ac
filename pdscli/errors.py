"""User-facing errors: a one-line message and exit code 2, never a traceback."""


class PdsError(Exception):
    """Bad input or an environment the user must fix. `str(err)` is the whole message."""

    exit_code = 2

"""User-facing errors.

An `AdarouteError` carries one line that says what was wrong and what to do. The CLI prints it
without a traceback and exits with code 2; library callers can catch it like any exception.
"""


class AdarouteError(Exception):
    """Bad input from the user (file, model spec, option). The message is shown as-is."""

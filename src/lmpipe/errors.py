"""The one exception type for mistakes a user can fix; entry points print it as one line."""


class LmpipeError(Exception):
    """A bad recipe, flag or data file: shown as `error: <message>` with exit code 2, never a traceback."""

    exit_code = 2

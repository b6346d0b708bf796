"""The one exception type for mistakes a user can fix; entry points print it as one line."""

from __future__ import annotations

from pathlib import Path


class LmpipeError(Exception):
    """A bad recipe, flag or data file: shown as `error: <message>` with exit code 2, never a traceback."""

    exit_code = 2


def where_relative(path: str) -> str:
    """For a relative path that was not found: where it pointed, since recipes resolve paths from the working
    directory, not from the recipe's own folder."""
    if Path(path).is_absolute():
        return ""
    return f" (resolved to {Path(path).absolute()} from the working directory {Path.cwd()})"


def not_found(path: str, what: str) -> LmpipeError:
    """`PATH: WHAT not found (resolved to ... from the working directory ...)`."""
    return LmpipeError(f"{path}: {what} not found{where_relative(path)}")


def not_a_directory_hint(name: str) -> str:
    """Appended when a model or tokenizer failed to load: a Hub id and a relative directory look alike."""
    return "" if Path(name).exists() else f"; no such local directory{where_relative(name)}"

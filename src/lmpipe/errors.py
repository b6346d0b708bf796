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


def cannot_load(name: str, what: str, error: Exception) -> LmpipeError:
    """`NAME: cannot load WHAT (the loader's first line)`; when NAME is no local path, the line leads with that:
    a Hub id and a relative directory look alike, and the Hub's message about repository ids would hide a
    mistyped or missing directory."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if Path(name).exists():
        return LmpipeError(f"{name}: cannot load {what} ({reason})")
    return LmpipeError(f"{name}: no such local directory{where_relative(name)}; nor {what} on the Hub ({reason})")

"""A disk that fills up while a run writes: one line that says so and names the path, and no torn checkpoint left.

torch reports a failed write as `RuntimeError: [enforce fail at inline_container.cc...]` with no errno (its
message varies: "file write failed", "unexpected pos ..."), so besides ENOSPC / EDQUOT anywhere in the error's
chain, a failed write is taken for a full disk when the disk of `output_dir` is (nearly) full afterwards.
The checkpoint being written is removed: a rerun would skip it anyway (lmpipe.run.checkpoints verifies every file),
and removing it gives back the space it took.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Iterator
from pathlib import Path

from transformers.trainer_utils import sort_checkpoints

from lmpipe.errors import LmpipeError
from lmpipe.run.checkpoints import checkpoint_problem, newest_complete_checkpoint

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
NEARLY_FULL_BYTES = 64 << 20  # or 1% of the disk, whichever is smaller


class DiskFullError(LmpipeError):
    """The run stopped because it could not write; what was saved before stays resumable."""

    exit_code = 3


def _disk_usage(path: Path):
    """shutil.disk_usage of the nearest existing directory at or above `path`."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate)
    return None


def _disk_is_full(path: Path) -> bool:
    usage = _disk_usage(path)
    return usage is not None and usage.free < min(NEARLY_FULL_BYTES, usage.total // 100)


def full_disk_path(error: BaseException, output_dir: Path) -> Path | None:
    """The path the failed write was for when `error` means a full disk (`output_dir` when it does not say)."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in FULL_ERRNOS:
            return Path(seen.filename) if seen.filename else output_dir
        seen = seen.__cause__ or seen.__context__
    if isinstance(error, (OSError, RuntimeError)) and _disk_is_full(output_dir):
        return output_dir
    return None


def remove_torn_checkpoints(output_dir: Path) -> list[str]:
    """Delete the checkpoints newer than the newest complete one (those the failed save left); their names."""
    good = newest_complete_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    checkpoints = sort_checkpoints(str(output_dir)) if output_dir.is_dir() else []
    torn = [c for c in checkpoints[checkpoints.index(good) + 1 if good else 0 :] if checkpoint_problem(c)]
    for checkpoint in torn:
        shutil.rmtree(checkpoint, ignore_errors=True)
    return torn


@contextlib.contextmanager
def full_disk_is_one_line(output_dir: str, is_main_process: bool) -> Iterator[None]:
    """Turn a write that failed for lack of space into a DiskFullError, after removing the torn checkpoint."""
    try:
        yield
    except LmpipeError:
        raise
    except (OSError, RuntimeError) as error:
        directory = Path(output_dir)
        path = full_disk_path(error, directory)
        if path is None:
            raise
        torn = remove_torn_checkpoints(directory) if is_main_process else []
        if len(torn) == 1 and path == directory:
            path = Path(torn[0])
        good = newest_complete_checkpoint(output_dir)
        usage = _disk_usage(directory)
        raise DiskFullError(
            f"disk full: cannot write {path} "
            f"({'unknown' if usage is None else f'{usage.free:,} bytes'} free on its disk)"
            + (f"; removed the unfinished {', '.join(torn)}" if torn else "")
            + f"; free some space, then rerun to {f'resume from {good}' if good else 'start over'}"
        ) from None

"""One run per output directory: an exclusive OS lock (`flock`) on `OUTPUT_DIR/.lmpipe.lock` for the whole run.

The kernel drops the lock when its process ends, however it ends (SIGKILL and out-of-memory included), so a lock
left by a crash never blocks. The file records the holder's PID and host for the refusal message. On NFS, Linux
emulates `flock` with a POSIX byte-range lock, which NFSv4 shares between hosts; Lustre needs its `flock` mount
option. The standard library has what this needs (`fcntl.flock`); a lock package would add a dependency only.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from transformers import TrainingArguments

from lmpipe.errors import LmpipeError
from lmpipe.run.distributed import on_main_process

LOCK_NAME = ".lmpipe.lock"


def _holder(lock_file: Path) -> str:
    try:
        recorded = lock_file.read_text(encoding="utf-8").split()
    except OSError:
        recorded = []
    return (
        f"PID {recorded[0]} on host {recorded[1]}" if len(recorded) == 2 else "another process (PID not recorded yet)"
    )


def _open_output_dir(output_dir: Path) -> bool:
    """Create the directory if needed; True when this call created it. A file in its place is one line."""
    if output_dir.exists() and not output_dir.is_dir():
        raise LmpipeError(f"output_dir {output_dir}: is a file, not a directory")
    try:
        output_dir.mkdir(parents=True)
        return True
    except FileExistsError:
        return False
    except (NotADirectoryError, PermissionError, OSError) as e:
        raise LmpipeError(f"output_dir {output_dir}: cannot create it ({e.strerror or e})") from None


class OutputDirLock:
    """The held lock: an open file descriptor with `flock(LOCK_EX)` on it."""

    def __init__(self, output_dir: str):
        self.output_dir = Path(output_dir)
        self.lock_file = self.output_dir / LOCK_NAME
        self.created_dir = _open_output_dir(self.output_dir)
        self.fd = self._acquire()

    def _acquire(self) -> int:
        while True:  # the file we locked must still be the one at the path (a holder unlinks it on release)
            try:
                fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
            except IsADirectoryError:
                raise LmpipeError(
                    f"{self.lock_file}: is a directory, where lmpipe keeps its lock file: remove it, then rerun"
                ) from None
            except OSError as e:
                raise LmpipeError(f"{self.lock_file}: cannot open the lock file ({e.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise LmpipeError(f"{self.lock_file}: cannot lock ({e.strerror})") from None
                raise LmpipeError(
                    f"output_dir {self.output_dir} is in use by another run ({_holder(self.lock_file)}); wait for it"
                    " to finish or stop it, or use another output_dir"
                ) from None
            try:
                same_file = os.stat(self.lock_file).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same_file = False
            if same_file:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        return fd

    def release(self) -> None:
        """Remove the file while still holding the lock, then close; an output_dir this run created and left
        empty (it stopped before writing anything) is removed too."""
        with contextlib.suppress(OSError):
            self.lock_file.unlink()
        os.close(self.fd)
        if self.created_dir:
            with contextlib.suppress(OSError):  # not empty: the run wrote something, which stays
                self.output_dir.rmdir()


@contextlib.contextmanager
def exclusive_output_dir(training: TrainingArguments) -> Iterator[None]:
    """Hold `output_dir` for the body: the global main process takes the lock and every rank gets its refusal.

    The other ranks of the same run share the directory by design (they write their RNG states there).
    """
    held: list[OutputDirLock] = []
    on_main_process(training, lambda: held.append(OutputDirLock(training.output_dir)))
    try:
        yield
    finally:
        for lock in held:
            lock.release()

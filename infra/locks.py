"""Exclusive locks as files on the services root, held with the kernel's `flock`.

The kernel drops a lock when its holder's file descriptor closes, so a holder that dies (SIGKILL included)
never leaves a stale lock behind: there is nothing to break, and no two waiters can ever both believe they
hold it. The file keeps the last holder's `host:pid` and time, for the error a waiter gives up with.

    with file_lock(root / "locks" / "defectops-cookie.gate.lock", timeout_s=900):
        ...  # one process at a time among those sharing `root` (one host, or a filesystem with flock)
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class LockTimeout(TimeoutError):
    """The lock stayed held for the whole timeout; the message names the lock file and its holder."""


def holder_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def read_holder(path: Path) -> str:
    """What the lock file says about its (last) holder: 'host:pid since <unix time>', or 'unknown'."""
    try:
        return Path(path).read_text(encoding="utf-8").strip() or "unknown"
    except OSError:
        return "unknown"


class HeldLock:
    """A lock this process holds; `release()` (idempotent) drops it."""

    def __init__(self, path: Path, fd: int, holder: str) -> None:
        self.path, self.holder, self._fd = path, holder, fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)


def acquire(path: str | Path, timeout_s: float = 900.0, poll_s: float = 0.2) -> HeldLock:
    """Take an exclusive flock on `path` (created, with its folder, mode 0600), waiting up to `timeout_s`.
    LockTimeout naming the file and the holder when it stays held."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
            if time.monotonic() > deadline:
                raise LockTimeout(f"{path}: still held by {read_holder(path)} after {timeout_s:.0f} s") from None
            time.sleep(poll_s)
        holder = holder_id()
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{holder} since {time.time():.3f}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return HeldLock(path, fd, holder)


def is_held(path: str | Path) -> bool:
    """True when some process holds the lock on `path` now (a missing file: False)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


@contextmanager
def file_lock(path: str | Path, timeout_s: float = 900.0, poll_s: float = 0.2) -> Iterator[str]:
    """Hold the lock on `path` for the `with` block (see `acquire`); yields this holder's id."""
    held = acquire(path, timeout_s, poll_s)
    try:
        yield held.holder
    finally:
        held.release()

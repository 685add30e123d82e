"""
One process per data directory.

A node's store and the master's state each live in a directory that one
process must own: LMDB lets several processes write one environment, so two
nodes (or two masters) given the same C{--data-dir} would both run and
interleave their batches, logs and configurations, corrupting all of them.
Opening a directory takes an exclusive C{flock} on its lock file, held
until it is closed.  The kernel drops the lock with the process however it
ends (a SIGKILL included), so a crash never leaves a directory locked; the
pid written in the file only names the holder in the error.
"""

from __future__ import annotations

import errno
import fcntl
import os

LOCK_FILE = "ckv.lock"


class DirectoryInUse(Exception):
    """Another process (or another open store in this one) holds the directory."""


def lock_directory(path: str) -> int:
    """
    Take the lock of directory C{path} (which must exist) for this process.

    @return: the lock's file descriptor; close it (L{unlock_directory}) to
        let the directory go.
    @raise DirectoryInUse: someone holds it.
    """
    fd = os.open(os.path.join(path, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        raise DirectoryInUse(
            f"data directory {path} is in use by another process (pid {holder}); "
            "every ckv process needs a data directory of its own"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        os.close(fd)  # and with it the lock
        raise
    return fd


def unlock_directory(fd: int | None) -> None:
    """Let the directory go (C{None}: nothing held)."""
    if fd is not None:
        os.close(fd)

"""One run per ``out_dir``: an exclusive ``flock`` on ``<out_dir>/.lock``, which holds the owner's pid.

The kernel drops a ``flock`` when its process dies (``kill -9`` included), so a lock file left by a dead
run is stale by construction and is simply taken over; the pid in it only names the owner in messages.
The file itself is never deleted (deleting a locked file would let a third run lock a new one).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os

LOCK_NAME = ".lock"


class OutDirInUseError(RuntimeError):
    """Another live process is running in this ``out_dir``."""


def _holder(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read().strip() or "unknown"
    except OSError:
        return "unknown"


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


@contextlib.contextmanager
def out_dir_lock(out_dir: str, warn=None):
    """Hold ``<out_dir>/.lock`` for the block; raise :class:`OutDirInUseError` at once if a live process
    holds it. ``warn(msg)`` is told when a stale lock (its pid dead) is taken over."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise OutDirInUseError(
            f"out_dir {out_dir} is in use by another run (pid {_holder(path)}, lock file {path}): "
            f"wait for it to finish, stop it, or use another out_dir") from None
    try:
        previous = _holder(path)
        if warn is not None and previous != "unknown" and previous != str(os.getpid()) and not _pid_alive(previous):
            warn(f"taking over the stale lock {path} of pid {previous} (no longer running)")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # releases the flock


def is_locked(out_dir: str) -> bool:
    """Whether a live process holds ``<out_dir>/.lock`` (a run is writing there now)."""
    path = os.path.join(out_dir, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)

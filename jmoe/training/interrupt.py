"""Ctrl-C during training: the first SIGINT asks the loop to stop after the current step (the save in flight
finishes, the checkpoint manager closes, then :class:`KeyboardInterrupt` is raised); a second one has the
default action, an exit at once (orbax writes a step to a temporary directory and renames it when complete,
so the last complete checkpoint is kept either way).

A ``KeyboardInterrupt`` raised inside orbax (its save waits for the previous one on the main thread) leaves
its writer threads behind and an interpreter shutting down under them could hang: hence a flag, not an
exception, while the loop runs.
"""

from __future__ import annotations

import signal
import threading


class StopOnSigint:
    """Context manager: while inside, the first SIGINT sets :attr:`requested` (the loop checks it after each
    step) and restores the default action for the next one. Installed only in the main thread and only over
    Python's default handler (a caller's own SIGINT handler is left alone)."""

    def __init__(self):
        self.requested = False
        self.installed = False
        self.previous = None

    def _handle(self, signum, frame):  # no printing here: a signal can land inside another print
        self.requested = True
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    def __enter__(self) -> StopOnSigint:
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self.previous = signal.signal(signal.SIGINT, self._handle)
            self.installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self.installed:
            signal.signal(signal.SIGINT, self.previous)
            self.installed = False


def default_sigint_while(fn):
    """``fn()`` with SIGINT at its default action (exit at once) when called in the main thread: for waits that
    must not be cut by a ``KeyboardInterrupt`` halfway (closing the checkpoint manager)."""
    if threading.current_thread() is not threading.main_thread():
        return fn()
    previous = signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        return fn()
    finally:
        signal.signal(signal.SIGINT, previous)

"""SIGTERM handled like Ctrl-C, and worker processes that die with their parent.

``kill PID`` (SIGTERM, what schedulers, ``timeout`` and ``docker stop`` send) used to end a command
at once: exit 143 with nothing on stderr, temporary files and run folders left behind, and decode
workers orphaned for seconds. Under ``sigterm_as_interrupt`` SIGTERM raises ``Terminated`` in the
main thread instead; it is a KeyboardInterrupt, so every cleanup that runs for Ctrl-C (atomic
temporaries, the journal parts already computed, the cache lock) runs for it too, and the CLI
prints one line and exits 143 (130 for Ctrl-C), as a shell reports a process killed by the signal.
"""
from __future__ import annotations

import ctypes
import os
import signal
import threading
from contextlib import contextmanager
from typing import Iterator

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived; raised in the main thread where a Ctrl-C would be."""


_requested = False  # a SIGTERM arrived in this block (raise_if_terminated re-raises it)


def _raise_terminated(signum, frame) -> None:
    # Once: a second SIGTERM during cleanup is ignored, so the cleanup the first one started finishes.
    global _requested
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _requested = True
    if frame is not None and _finalizer(frame):  # Python would print and drop it there
        return  # the next raise_if_terminated (every pass or epoch of fit-head) raises it instead
    raise Terminated()


def _finalizer(frame) -> bool:
    """Whether ``frame`` runs a finalizer (``__del__``, a weakref callback), where a raised exception
    is printed as "Exception ignored in ..." and dropped."""
    code = frame.f_code
    return code.co_name == "__del__" or code.co_filename.endswith(("weakref.py", "_weakrefset.py"))


def raise_if_terminated() -> None:
    """Raise ``Terminated`` again if a SIGTERM arrived. Long loops call it (heads/progress.tick, per
    pass or epoch): a signal handled while the interpreter ran a finalizer (``__del__``, a weakref
    callback) has its exception printed and dropped by Python, and the loop would run on."""
    if _requested:
        raise Terminated()


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises ``Terminated`` (only the main thread can take signals;
    elsewhere this does nothing). The previous handler is restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    global _requested
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        _requested = False


def interrupt_status(exc: BaseException | None) -> int:
    """The exit status for an interruption: 143 (128 + SIGTERM) or 130 (128 + SIGINT)."""
    while exc is not None:
        if isinstance(exc, Terminated):
            return 128 + signal.SIGTERM
        exc = exc.__cause__ or exc.__context__
    return 128 + signal.SIGINT


def die_with_parent(parent_pid: int) -> None:
    """In a child process: be killed (SIGKILL) as soon as the parent dies, on Linux.

    Decode workers otherwise outlive an interrupted or killed extract until their own watchdog
    notices (seconds), using the CPU for nothing. Elsewhere (no prctl) this does nothing.

    Args:
        parent_pid: the parent's pid as the parent saw it before forking; if the parent is already
            gone when this runs, the child exits at once.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died between the fork and the prctl
        os._exit(1)

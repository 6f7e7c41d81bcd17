"""Ctrl-C held back while the weights are being restored.

A restore writes the weights in several steps (several kernel launches, or block after block on the torch
path). Python raises ``KeyboardInterrupt`` between any two bytecodes, so a Ctrl-C landing in the middle
would leave a layer half restored, and running the same restore again would not mend it: it would undo
the noise a second time from the half-restored values. :func:`interrupts_deferred` therefore lets a restore
finish and delivers the interrupt right after it, as the handler in place would have (``KeyboardInterrupt``
with Python's default one). SIGINT is only ever handled in the main thread, so elsewhere it changes nothing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any, Iterator, List

__all__ = ["interrupts_deferred"]


_depth = 0  # nesting of interrupts_deferred in the main thread (a nested block has nothing more to do)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold back SIGINT for the body; afterwards hand a received one to the handler that was in place."""
    global _depth
    if threading.current_thread() is not threading.main_thread() or _depth or signal.getsignal(signal.SIGINT) is None:
        # elsewhere Python never sees SIGINT; inside another such block it is held back already; a handler
        # installed from outside Python (an embedding host) could not be put back afterwards (signal.signal
        # refuses None), so it is left alone
        yield
        return
    received: List[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    except ValueError:  # not the main interpreter, or signals unavailable: nothing to hold back
        yield
        return
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        signal.signal(signal.SIGINT, previous)
        if received:
            _deliver(previous)


def _deliver(handler: Any) -> None:
    """What SIGINT would have done under ``handler``."""
    if callable(handler):
        handler(signal.SIGINT, None)  # Python's default handler raises KeyboardInterrupt
    elif handler == signal.SIG_DFL:
        os.kill(os.getpid(), signal.SIGINT)  # the default action: the process ends
    # SIG_IGN: ignored, as it would have been

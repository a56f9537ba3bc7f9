"""Stopping on a signal: SIGTERM and SIGHUP raised like Ctrl-C's KeyboardInterrupt, so that
every cluster that is up is torn down on the way out, and teardown that a second Ctrl-C
cannot cut short."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Stop(BaseException):
    """SIGTERM or SIGHUP, raised where the process is, like KeyboardInterrupt for SIGINT."""


_OWNER_PID = os.getpid()


def raise_stop(signum, _frame):
    # Libraries fork helpers (pyroute2 makes one per namespace it enters) that inherit this
    # handler; a helper told to stop must just exit, not tear down its parent's fabric.
    if os.getpid() != _OWNER_PID:
        os._exit(0)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Stop(signal.Signals(signum).name)


def run_interruptible(what: str, run: Callable[[], int | None]) -> int:
    """`run()`, whose clusters tear themselves down on the way out: Ctrl-C or SIGTERM stops
    it, says so and gives 130; else its own exit code (None: 0). Ctrl-C is raised where the
    process is too: left to Python's default, `asyncio.run` would take it as a request to
    cancel its main task, which a run that waits on its agents with `return_exceptions`
    absorbs, and the run, or a bench's next one, would go on."""
    signal.signal(signal.SIGINT, raise_stop)
    signal.signal(signal.SIGTERM, raise_stop)
    try:
        return run() or 0
    except (KeyboardInterrupt, Stop):
        print(f"\n{what} interrupted; its cluster was torn down", file=sys.stderr)
        return 130


@contextmanager
def deferred_signals(signals=(signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """SIGINT and SIGTERM arriving inside the block are held and delivered once it ends, so
    a teardown finishes before the interrupt takes effect. (Only the main thread may set
    handlers; elsewhere the block runs as is.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _frame: received.append(signum))
                for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if received:
            signal.raise_signal(received[0])

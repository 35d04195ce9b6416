"""Interrupts that reach every process of a run: SIGTERM from a scheduler, `timeout` or a container runtime, and
Ctrl-C, are often sent to the whole process group, workers included.

The rule: worker processes (DataLoader workers, the shard builder's pool) leave SIGTERM and SIGINT to the main
process, which decides. Training turns either signal into a request to stop at the next optimizer-step boundary,
agreed by every rank, where it writes ``last.ckpt`` (:class:`realisid.callbacks.SaveOnInterrupt`); other commands
turn SIGTERM into the same ``KeyboardInterrupt`` Ctrl-C raises, so their cleanup (finished shards kept, unfinished
ones removed) runs either way.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Callable, Iterator

log = logging.getLogger(__name__)

INTERRUPTED_EXIT = 3  # the exit status of a command that was interrupted and can be resumed


def leave_interrupts_to_parent(*_args) -> None:
    """A worker's initializer (DataLoader ``worker_init_fn``, a pool ``initializer``): ignore SIGTERM and SIGINT.

    The main process receives them too when the whole group is signalled, and stops the workers itself.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class StopRequest:
    """In the main process: SIGTERM or a first Ctrl-C set :attr:`reason`; a second Ctrl-C raises KeyboardInterrupt.

    The handlers only set a flag (no I/O, no collectives), so a signal arriving in the middle of a step is safe;
    whoever owns the loop checks the flag at a boundary. :meth:`install` / :meth:`restore` swap the handlers (main
    thread only; elsewhere they do nothing).
    """

    def __init__(self, on_request: Callable[[str], None] | None = None):
        self.reason: str | None = None
        self._previous: dict[int, object] = {}
        self._on_request = on_request

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.reason is not None:
            raise KeyboardInterrupt
        if self.reason is None:
            self.reason = "SIGTERM" if signum == signal.SIGTERM else "SIGINT"
            if self._on_request is not None:
                self._on_request(self.reason)

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._previous[s] = signal.getsignal(s)
                signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Inside: SIGTERM raises KeyboardInterrupt in the main thread, as Ctrl-C does, so cleanup code runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_interrupt(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

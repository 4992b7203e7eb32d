"""SIGINT / SIGTERM as a request to stop, honoured at known points (`bpfm data shard`).

Python's default SIGINT raises KeyboardInterrupt wherever the main thread happens to be; raised
inside a weakref callback or a `__del__` (h5py and pyarrow run many) it is printed and
swallowed, and the work went on to publish. Here the first signal only records the request;
long loops poll `requested()` (a conversion checks it every chunk, worker processes through
their shared abort event) and `check()` raises `Interrupted` before anything is published. A
second signal raises at once."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_received: list[int] = []


class Interrupted(KeyboardInterrupt):
    """Stopped by a signal; the CLI exits with 128 + its number (130 SIGINT, 143 SIGTERM)."""

    def __init__(self, signum: int):
        self.signum = signum
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(f"interrupted by {name}: stopped, nothing published")


def _handle(signum: int, frame) -> None:
    first = not _received
    _received.append(signum)
    if not first:
        raise Interrupted(signum)
    name = signal.Signals(signum).name
    os.write(2, f"bpfm: {name}: stopping (send it again to stop at once)\n".encode())


def requested() -> bool:
    return bool(_received)


def check() -> None:
    """Raise `Interrupted` when a signal asked to stop."""
    if _received:
        raise Interrupted(_received[0])


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM request a stop while inside (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handle) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _received.clear()

"""Reading ahead: an iterator run in a background thread, a few items ahead of its consumer.
Parquet decoding and S3 reads release the GIL, so the next item's reading overlaps with the
consumer's own work (the loader's shuffling and batching)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from queue import Empty, Queue
from typing import TypeVar

T = TypeVar("T")


def ahead(items: Iterator[T], depth: int = 2, name: str = "bpfm-read-ahead") -> Iterator[T]:
    """The items of `items`, read up to `depth` ahead in a thread; its errors are raised here.
    When the consumer stops early (close, an error), the thread is stopped and joined before
    this generator returns, so whatever `items` reads from can be closed right after."""
    queue: Queue = Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                queue.put((item, None))
            queue.put((done, None))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
            queue.put((done, err))

    thread = threading.Thread(target=produce, daemon=True, name=name)
    thread.start()
    try:
        while True:
            item, error = queue.get()
            if item is done:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                queue.get(timeout=0.05)
            except Empty:
                pass

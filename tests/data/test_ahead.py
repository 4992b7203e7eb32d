"""bpfm.io.ahead: the loader's and the cache's read-ahead thread."""

import threading

import pytest

from bpfm.io.ahead import ahead


def _threads(name: str) -> int:
    return sum(t.name == name for t in threading.enumerate())


def test_items_arrive_in_order_and_a_producer_error_reaches_the_consumer():
    assert list(ahead(iter(range(50)), depth=3)) == list(range(50))

    def failing():
        yield 1
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(ahead(failing()))


def test_closing_early_stops_the_thread_before_returning():
    read = []

    def source():
        for i in range(1000):
            read.append(i)
            yield i

    items = ahead(source(), depth=2, name="bpfm-test-ahead")
    assert next(items) == 0
    items.close()
    assert _threads("bpfm-test-ahead") == 0  # joined: the source may be closed now
    assert len(read) < 10  # it stopped reading, not ran to the end

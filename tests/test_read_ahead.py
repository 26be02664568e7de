"""read_ahead: items in order, made on another thread, at most `depth` beyond the caller's; an
error raised at its item after every item before it; an early close stops the reader and
closes the source."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from stabledrl_cli.replay.read_ahead import read_ahead


def test_items_come_in_order_from_another_thread_at_most_depth_ahead():
    made: list[int] = []
    threads: set[str] = set()

    def source() -> Iterator[int]:
        for i in range(6):
            threads.add(threading.current_thread().name)
            made.append(i)
            yield i

    seen = []
    for item in read_ahead(source(), depth=2):
        seen.append(item)
        # The reader starts an item only once the caller has taken the one depth before it.
        assert len(made) <= item + 1 + 2
    assert seen == list(range(6))
    assert threads == {"stabledrl-read-ahead"}


def test_an_error_is_raised_at_its_item_after_the_items_before_it():
    def source() -> Iterator[int]:
        yield 1
        yield 2
        raise ValueError("step 3 is corrupt")

    seen = []
    with pytest.raises(ValueError, match="step 3 is corrupt"):
        for item in read_ahead(source()):
            seen.append(item)
    assert seen == [1, 2]


def test_closing_early_stops_the_reader_and_closes_the_source():
    closed = threading.Event()
    made: list[int] = []

    def source() -> Iterator[int]:
        try:
            for i in range(1000):
                made.append(i)
                yield i
        finally:
            closed.set()

    ahead = read_ahead(source(), depth=1)
    assert next(ahead) == 0
    ahead.close()
    assert closed.is_set()  # closed on return: the reader has stopped and cleaned up
    assert len(made) <= 2
    assert not any(t.name == "stabledrl-read-ahead" for t in threading.enumerate())


def test_an_error_in_the_caller_stops_the_reader():
    def source() -> Iterator[int]:
        yield from range(1000)

    with pytest.raises(RuntimeError):
        for item in read_ahead(source()):
            if item == 2:
                raise RuntimeError("the caller failed")
    assert not any(t.name == "stabledrl-read-ahead" for t in threading.enumerate())

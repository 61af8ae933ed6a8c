"""parallel.thread_map: input order, errors surface, and stopping early drops the calls not started."""

from __future__ import annotations

import threading
import time

import pytest

from moeplace import parallel


def test_results_in_input_order_whatever_finishes_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel, "available_cpus", lambda: 4)
    delays = [0.2, 0.0, 0.1, 0.0]
    assert list(parallel.thread_map(lambda i: time.sleep(delays[i]) or i * i, range(4))) == [0, 1, 4, 9]


def test_an_error_surfaces_and_the_calls_not_started_are_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel, "available_cpus", lambda: 1)
    started: list[int] = []

    def work(i: int) -> int:
        started.append(i)
        if i == 1:
            raise ValueError("bad item")
        time.sleep(0.02)
        return i

    with pytest.raises(ValueError, match="bad item"):
        list(parallel.thread_map(work, range(50)))
    time.sleep(0.05)
    assert started[:2] == [0, 1] and len(started) <= 4  # one worker: the rest were cancelled


def test_threads_used_up_to_the_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel, "available_cpus", lambda: 3)
    names: set[str] = set()
    barrier = threading.Barrier(3, timeout=5)

    def work(i: int) -> int:
        names.add(threading.current_thread().name)
        barrier.wait()  # three calls at once, or a BrokenBarrierError
        return i

    assert list(parallel.thread_map(work, range(3))) == [0, 1, 2]
    assert len(names) == 3

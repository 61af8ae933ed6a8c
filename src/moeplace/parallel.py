"""Independent numpy passes on threads: np.bincount and np.add.at release the GIL, so counting
over tokens scales with the CPUs while each pass gives what it gives alone, in input order."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def thread_map(fn: Callable[[T], R], items: Sequence[T]) -> Iterator[R]:
    """fn over items on up to one thread per CPU, results in input order. Stopping early (an
    error, Ctrl-C) drops the calls not yet started instead of running them first."""
    pool = ThreadPoolExecutor(max(1, min(len(items), available_cpus())))
    try:
        yield from pool.map(fn, items)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)

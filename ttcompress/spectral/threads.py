"""Chunks of work on a pool of threads, each running single-threaded BLAS/LAPACK.

Batched LAPACK calls on CPU (``svdvals``, ``eigvalsh`` of many small matrices) scale poorly with torch's own
threads; a few Python threads, each with a one-thread OpenMP team, working through chunks of frequencies in order
scale much better.  Used by the exact spectra (:mod:`~ttcompress.spectral.periodic`, :mod:`~ttcompress.spectral.ndim`)
and by the benchmarks.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

__all__ = ["imap", "pmap", "workers_for"]

T = TypeVar("T")
R = TypeVar("R")


def workers_for(device: torch.device) -> int:
    """How many worker threads to use on ``device``: torch's thread count on CPU, one elsewhere."""
    return max(1, torch.get_num_threads()) if device.type == "cpu" else 1


_threads_lock = threading.Lock()
_threads_saved = {"depth": 0, "outer": 1}


@contextmanager
def _single_threaded_blas() -> Iterator[None]:
    """torch (OpenMP, MKL) at one thread while any worker pool runs; the caller's count is restored by the last
    pool to finish, so concurrent callers cannot leave it at one."""
    with _threads_lock:
        if _threads_saved["depth"] == 0:
            _threads_saved["outer"] = torch.get_num_threads()
            torch.set_num_threads(1)
        _threads_saved["depth"] += 1
    try:
        yield
    finally:
        with _threads_lock:
            _threads_saved["depth"] -= 1
            if _threads_saved["depth"] == 0:
                torch.set_num_threads(_threads_saved["outer"])


def imap(fn: Callable[[T], R], items: Sequence[T], workers: int) -> Iterator[R]:
    """``fn(x) for x in items``, in order, computed on ``workers`` threads each running single-threaded
    BLAS/LAPACK.  Results are handed over as they come, so a caller that reduces them holds only a few at a time."""
    workers = min(workers, len(items))
    if workers <= 1:
        yield from (fn(x) for x in items)
        return

    def run(x: T) -> R:
        torch.set_num_threads(1)  # this thread's OpenMP team (MKL's count is global)
        return fn(x)

    with _single_threaded_blas(), ThreadPoolExecutor(workers, thread_name_prefix="ttcompress-spectral") as pool:
        yield from pool.map(run, items)


def pmap(fn: Callable[[T], R], items: Sequence[T], workers: int) -> list[R]:
    return list(imap(fn, items, workers))

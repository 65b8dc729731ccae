"""Offline work over many videos on all cores: an ordered map over worker processes.

Videos are independent (each gets a fresh pipeline, or its own features), so
`evaluate` and `train` hand them to `ordered_map`. On Linux workers are forked
(no re-import of the caller's main module, so a script needs no ``__main__``
guard, and the compiled kernels come along); elsewhere they are spawned and
load the kernels from Numba's cache. Results come back in input order. With
one worker, or one item, everything runs in this process.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from lhtstream.base.errors import LhtstreamError


class WorkersError(LhtstreamError, ValueError):
    """A worker count that cannot be used."""


def default_workers() -> int:
    """The cores this process may run on (the default for ``--workers``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def resolve_workers(workers: int | None) -> int:
    """`workers`, or all cores when None; a `WorkersError` below 1."""
    if workers is None:
        return default_workers()
    if int(workers) < 1:
        raise WorkersError(f"workers must be >= 1, got {workers}")
    return int(workers)


def ordered_map(fn: Callable[[Any], Any], items: Sequence[Any], workers: int | None = None,
                initializer: Callable[..., None] | None = None,
                initargs: tuple = ()) -> Iterator[Any]:
    """``fn(item)`` for every item, in order, on up to `workers` processes (all cores
    when None). `fn` and `initializer` must be module-level functions (they are
    pickled by name); each worker runs ``initializer(*initargs)`` once first."""
    n = min(resolve_workers(workers), len(items))
    if n <= 1:
        if initializer is not None:
            initializer(*initargs)
        yield from map(fn, items)
        return
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux")
                                          else "spawn")
    with ProcessPoolExecutor(max_workers=n, mp_context=context, initializer=initializer,
                             initargs=initargs) as pool:
        yield from pool.map(fn, items, chunksize=1)



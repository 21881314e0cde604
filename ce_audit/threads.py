"""Row ranges of one array worked on by a small pool of threads (NumPy releases the GIL in its loops).

The work of each range must depend on that range alone, so that the result is the same for any number
of threads. ``set_threads(1)`` (e.g. in worker processes that already use every core) runs inline.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

MAX_THREADS = 8
# Below this many logits per case, torch runs on one thread (``torch_threads_for``).
SMALL_CASE_ELEMENTS = 1 << 20
_threads: int | None = None
_pool: ThreadPoolExecutor | None = None
_pool_pid = 0  # a forked child has the parent's pool object but none of its threads: it makes its own


def default_threads() -> int:
    """The cores this process may use, at most MAX_THREADS."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return max(1, min(MAX_THREADS, cores))


def threads() -> int:
    return _threads if _threads is not None else default_threads()


def set_threads(count: int | None) -> None:
    """Use ``count`` threads from now on (None: ``default_threads()``)."""
    global _threads, _pool
    _threads = None if count is None else max(1, int(count))
    if _pool is not None and _pool_pid == os.getpid():
        _pool.shutdown(wait=True)
    _pool = None


def _share_heap_arenas() -> None:
    """On glibc, let the pool's threads share two malloc arenas (M_ARENA_MAX = 2) instead of one each:
    with an arena per thread the blocks' freed buffers fragment and the resident memory of a long sweep
    creeps up with its rows (1M → 16M rows: +12 % measured with an arena per thread, +7 % with two)."""
    if not sys.platform.startswith("linux"):
        return
    # not glibc (musl has no mallopt arenas): nothing to tune
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(-8, 2)  # M_ARENA_MAX, in the process's own C library (no ldconfig run)


def map_ranges(work: Callable[[int, int], None], stop: int, step: int) -> None:
    """Call ``work(first, last)`` for the ranges [0, step), [step, 2·step), … up to ``stop``; in parallel
    where there are several ranges and threads. The first exception raised by any range is re-raised.
    ``work`` must not call ``map_ranges`` itself (the pool's threads would wait on one another)."""
    global _pool, _pool_pid
    ranges = [(first, min(first + step, stop)) for first in range(0, stop, max(step, 1))]
    count = min(threads(), len(ranges))
    if count <= 1:
        for first, last in ranges:
            work(first, last)
        return
    if _pool is None or _pool_pid != os.getpid():
        _share_heap_arenas()
        _pool = ThreadPoolExecutor(max_workers=threads(), thread_name_prefix="ce-audit")
        _pool_pid = os.getpid()
    for future in [_pool.submit(work, first, last) for first, last in ranges]:
        future.result()


@contextlib.contextmanager
def torch_on_one_thread() -> Iterator[None]:
    """Torch (where it is imported) on one thread inside the block, its thread count given back after."""
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else 1
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def torch_threads_for(largest_case: int) -> Iterator[None]:
    """Torch on one thread inside the block when the largest case has fewer than ``SMALL_CASE_ELEMENTS``
    logits (and torch is imported): its ops on so few elements gain little from more threads, which wake
    and spin for every op, and lose much where the cores are busy (the float16 default sweep in this
    process on 2 busy cores: 1.6 s of CPU, 2.4 s wall on one thread; 16–20 s of CPU, 24–39 s wall on
    two). Results do not depend on it: a --jobs worker process runs on one thread already."""
    if largest_case >= SMALL_CASE_ELEMENTS:
        yield
        return
    with torch_on_one_thread():
        yield

"""Process-wide tuning shared by the feeder and the workers."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys

M_ARENA_MAX = -8  # glibc's mallopt parameter number
MALLOC_ARENAS = 2


def limit_malloc_arenas() -> bool:
    """Cap glibc's malloc arenas (as MALLOC_ARENA_MAX=2 would) before the drain threads start.

    Each thread that allocates gets an arena of its own by default (up to 8 per core); the drain threads
    build multi-megabyte COPY payloads, and the freed space stayed mapped in their arenas: a worker's peak
    RSS measured 256 MB with the default and 205 MB with two arenas, at the same speed
    (bench/compare.py --records 1000000 --only si1). Returns False where there is no glibc mallopt.
    """
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): their allocators have no arenas to cap
        return False
    return bool(mallopt(M_ARENA_MAX, MALLOC_ARENAS))


GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc() -> None:
    """Collect cyclic garbage less often than CPython's default (700, 10, 10).

    A worker keeps tens of thousands of parsed records alive in its open batches; with the default
    thresholds the collector walks them again and again while new ones are parsed: parsing and keeping
    the 100,000 records of a generated input took 5.6 us a record with the defaults and 3.4 us with these
    (a measurement of ``parse_line`` alone). Records and rows hold no reference cycles; the collector
    still runs, only less often. ``gc.freeze`` first moves what the imports made out of its way.
    """
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


SWITCH_INTERVAL_SECONDS = 0.0005


def shorten_switch_interval() -> None:
    """Hand the interpreter lock over after 0.5 ms instead of CPython's 5 ms.

    A worker's main thread reads Redis while its drain threads encode batches. Each time it comes back
    from the socket it waits for the lock, and with the default interval that wait is up to 5 ms behind
    a drain thread: a worker that reads, acknowledges and renews over Redis dozens of times a second
    spent a fifth of its main thread waiting so. Over 1,000,000 records (one worker, alternating runs in
    one sitting) the default gave 70,123 / 72,660 / 71,441 records/s and 0.5 ms 78,487 / 74,072 / 82,285.
    """
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)

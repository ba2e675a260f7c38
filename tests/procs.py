"""Processes seen through /proc (Linux): descendants, peak memory, killing a whole tree.

Used by the fault tests (rq gives each work horse a process group of its own, so killing a worker's
process group leaves its horse running) and by the benchmarks."""

from __future__ import annotations

import os


def hwm_kb(pid: int) -> int:
    """Peak resident set size (VmHWM) of one process, in kB; 0 once it is gone."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return 0
    return 0


def descendants(pid: int) -> list[int]:
    try:
        kids = [int(c) for c in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    except OSError:
        return []
    return kids + [d for k in kids for d in descendants(k)]


def tree_peak_kb(pid: int) -> int:
    """Largest VmHWM among a process and its descendants (rq forks a work horse per job)."""
    return max([hwm_kb(pid)] + [hwm_kb(d) for d in descendants(pid)])


def kill_tree(pid: int, sig: int) -> None:
    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass  # already gone

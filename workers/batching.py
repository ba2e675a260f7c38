"""Pure batching logic: when a sink flushes, and which rows a keyed batch keeps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

ROWS = "rows"
BYTES = "bytes"
AGE = "age"


@dataclass(frozen=True)
class FlushPolicy:
    batch_size_rows: int
    max_batch_bytes: int
    max_record_age_seconds: float


def flush_reason(policy: FlushPolicy, rows: int, nbytes: int, oldest_at: float | None, now: float) -> str | None:
    """Why a batch of ``rows`` records (``nbytes`` of input, oldest added at ``oldest_at``) must flush now."""
    if rows <= 0:
        return None
    if rows >= policy.batch_size_rows:
        return ROWS
    if nbytes >= policy.max_batch_bytes:
        return BYTES
    if oldest_at is not None and now - oldest_at >= policy.max_record_age_seconds:
        return AGE
    return None


def seconds_until_due(policy: FlushPolicy, rows: int, oldest_at: float | None, now: float) -> float | None:
    """How long until the age trigger fires for this batch (None: no rows, nothing to wait for)."""
    if rows <= 0 or oldest_at is None:
        return None
    return max(0.0, oldest_at + policy.max_record_age_seconds - now)


def last_by_key(rows: list[tuple], lines: list[int], key_index: Iterable[int]) -> tuple[list[tuple], list[int]]:
    """Keep, for every key, only the last row (rows arrive in input order, so last = highest sequence).

    The survivors keep their relative order; ``lines`` is filtered alongside ``rows``.
    """
    idx = tuple(key_index)
    if not idx:
        return rows, lines
    if len(idx) == 1:
        k = idx[0]
        last = {row[k]: i for i, row in enumerate(rows)}
    else:
        last = {tuple(row[i] for i in idx): j for j, row in enumerate(rows)}
    if len(last) == len(rows):
        return rows, lines
    keep = sorted(last.values())
    return [rows[i] for i in keep], [lines[i] for i in keep]

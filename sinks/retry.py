"""Retry with exponential backoff for transient destination errors."""

from __future__ import annotations

import logging
import random
import time
from typing import Callable, TypeVar

from ingest import metrics
from ingest.errors import DestinationError

logger = logging.getLogger(__name__)
T = TypeVar("T")


def with_retries(op: Callable[[], T], *, what: str, deadline_seconds: float = 300.0,
                 first_delay: float = 0.05, max_delay: float = 5.0,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> T:
    """Run ``op``; on a transient ``DestinationError`` wait and try again until the deadline."""
    start = clock()
    delay = first_delay
    attempt = 0
    while True:
        attempt += 1
        try:
            return op()
        except DestinationError as exc:
            if not exc.transient:
                raise
            waited = clock() - start
            if waited + delay > deadline_seconds:
                raise DestinationError(f"{exc.what} (still failing after {attempt} attempts in {waited:.0f} s)",
                                       transient=False, stream=exc.stream, line=exc.line) from exc
            metrics.RETRIES.labels(exc.stream or "").inc()
            logger.warning("%s: transient destination error, retrying in %.2f s (attempt %d): %s",
                           what, delay, attempt, exc.what)
            sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, max_delay)

"""STATE watermarks (DESIGN rule 5), pure logic.

A STATE message at input line N is safe once, for every stream, everything the feeder had sent for that
stream before line N is committed. The feeder records, with each STATE, the last sequence it had sent
per stream (``required``); a STATE is safe when ``committed[stream] >= required[stream]`` for all of
them. States become safe in input order; ``pop_safe`` returns the newest safe one.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class PendingState:
    seq: int
    value: Any
    required: tuple[tuple[int, int], ...]  # (stream id, last sequence sent before this STATE)


def is_empty_state(value: Any) -> bool:
    return value is None or value == {} or value == []


class StateTracker:
    def __init__(self) -> None:
        self._pending: deque[PendingState] = deque()
        self.last_emitted: Any = None
        self._seen_real = False

    def add(self, seq: int, value: Any, last_sent: Mapping[int, int]) -> None:
        """Record a STATE seen at ``seq``. An empty STATE after a real one is ignored."""
        if is_empty_state(value):
            if self._seen_real:
                return
        else:
            self._seen_real = True
        required = tuple((sid, s) for sid, s in last_sent.items())
        self._pending.append(PendingState(seq, value, required))

    def pop_safe(self, committed: Mapping[int, int]) -> PendingState | None:
        """Remove and return the newest STATE whose data is all committed (None if none is new)."""
        newest = None
        while self._pending:
            head = self._pending[0]
            if all(committed.get(sid, 0) >= s for sid, s in head.required):
                newest = self._pending.popleft()
            else:
                break
        if newest is None or newest.value == self.last_emitted:
            return None
        self.last_emitted = newest.value
        return newest

    @property
    def pending(self) -> int:
        return len(self._pending)

"""Reading tap output: a background thread reads raw blocks, the feeder takes complete lines.

Reading in a thread lets the feeder keep its clock (flush partial chunks, print STATE, watch the
workers) while the tap is quiet. Memory is bounded: at most ``queue_blocks`` blocks wait, and a line
longer than ``max_line_bytes`` is an input error.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import BinaryIO

from .errors import InputError

BLOCK_BYTES = 1 << 20
_EOF = object()


class LineReader:
    def __init__(self, source: BinaryIO, max_line_bytes: int, *, block_bytes: int = BLOCK_BYTES,
                 queue_blocks: int = 8):
        self.max_line_bytes = max_line_bytes
        self._queue: queue.Queue = queue.Queue(maxsize=queue_blocks)
        self._carry = b""
        self._done = False
        self.lines_read = 0
        try:
            fd = source.fileno()
            self._read = lambda: os.read(fd, block_bytes)
        except (AttributeError, OSError, ValueError):
            self._read = lambda: source.read(block_bytes)
        self._thread = threading.Thread(target=self._pump, name="singer-ingest-reader", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        try:
            while True:
                data = self._read()
                if not data:
                    break
                self._queue.put(data)
        except OSError as exc:
            self._queue.put(exc)
        self._queue.put(_EOF)

    def next_lines(self, timeout: float) -> list[bytes] | None:
        """Complete lines read so far ([] if none within ``timeout``), or None at end of input."""
        if self._done:
            return None
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return []
        if isinstance(item, OSError):
            raise InputError(f"cannot read the input: {item.strerror or item}")
        if item is _EOF:
            self._done = True
            if self._carry:
                last, self._carry = self._carry, b""
                self._check(last, self.lines_read + 1)
                self.lines_read += 1
                return [last]
            return None
        lines = (self._carry + item).split(b"\n")
        self._carry = lines.pop()
        for n, line in enumerate(lines):
            if len(line) > self.max_line_bytes:
                self._check(line, self.lines_read + n + 1)
        if len(self._carry) > self.max_line_bytes:
            self._check(self._carry, self.lines_read + len(lines) + 1)
        self.lines_read += len(lines)
        return lines

    def _check(self, line: bytes, number: int) -> None:
        if len(line) > self.max_line_bytes:
            raise InputError(f"line longer than max_line_bytes ({self.max_line_bytes} bytes)", line=number,
                             hint="Raise max_line_bytes if such records are expected")

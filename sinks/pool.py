"""A bounded pool of a driver's connections, shared by a worker's drain threads (each drain takes one for its
transaction and gives it back). For the drivers that have no pool of their own (PyMySQL, the Snowflake connector)."""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

from ingest.errors import DestinationError

logger = logging.getLogger(__name__)


class ConnectionPool:
    def __init__(self, name: str, connect: Callable[[], Any], *, is_open: Callable[[Any], bool],
                 errors: type[BaseException] | tuple[type[BaseException], ...], max_connections: int = 10):
        self.name = name                 # the destination's name, for messages
        self._connect = connect
        self._is_open = is_open
        self._errors = errors            # what the driver raises when closing a connection that is gone
        self._max_connections = max_connections
        self._idle: list[Any] = []
        self._open = 0
        self._cond = threading.Condition()
        self.closed = False

    def get(self) -> Any:
        """An idle connection, or a new one while fewer than ``max_connections`` are open; else wait for one."""
        with self._cond:
            while True:
                if self.closed:
                    raise DestinationError(f"{self.name}: the destination is closed", transient=False)
                if self._idle:
                    return self._idle.pop()
                if self._open < self._max_connections:
                    self._open += 1
                    break
                self._cond.wait()
        try:
            return self._connect()
        except BaseException:
            with self._cond:
                self._open -= 1
                self._cond.notify()
            raise

    def put(self, conn: Any, *, broken: bool) -> None:
        """Give a connection back; a broken or closed one (or any, once the pool is closed) is closed instead."""
        with self._cond:
            close = broken or self.closed or not self._is_open(conn)
            if close:
                self._open -= 1
            else:
                self._idle.append(conn)
            self._cond.notify()
        if close:
            self._close(conn, "closing a failed connection failed as well")

    def close(self) -> None:
        with self._cond:
            self.closed = True
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._cond.notify_all()
        for conn in idle:
            self._close(conn, "a connection was already gone at close")

    def _close(self, conn: Any, what: str) -> None:
        try:
            conn.close()
        except self._errors:
            logger.debug("%s: %s", self.name, what)

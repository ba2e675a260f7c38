"""One error tree for the whole product.

- ``InputError``: the tap's output is wrong (malformed JSON, a record before its schema, a record
  failing its JSON schema, ...). Terminal; names the input line and the stream.
- ``ConfigError``: the user's configuration is wrong. Terminal.
- ``DestinationError``: the destination refused something. ``transient=True`` means retrying may
  succeed (connection lost, lock conflict, serialization failure); otherwise it is terminal.
- ``RunFailed``: the run failed in some process; the feeder reports it and exits non-zero.
- ``RunLost``: the run's bookkeeping vanished from Redis (Redis restarted without persistence).
- ``Fenced``: a worker lost its lease on a stream; its pending batch must not commit.
"""

from __future__ import annotations


class IngestError(Exception):
    """Base of every error this product raises on purpose."""

    def user_message(self) -> str:
        return str(self)


class ConfigError(IngestError):
    pass


class InputError(IngestError):
    def __init__(self, what: str, *, line: int | None = None, stream: str | None = None, hint: str = ""):
        self.what = what
        self.line = line
        self.stream = stream
        self.hint = hint
        super().__init__(self.user_message())

    def user_message(self) -> str:
        where = []
        if self.line is not None:
            where.append(f"input line {self.line}")
        if self.stream is not None:
            where.append(f"stream {self.stream!r}")
        text = f"{', '.join(where)}: {self.what}" if where else self.what
        return f"{text}. {self.hint}" if self.hint else text


class DestinationError(IngestError):
    def __init__(self, what: str, *, transient: bool, stream: str | None = None, line: int | None = None):
        self.what = what
        self.transient = transient
        self.stream = stream
        self.line = line
        super().__init__(self.user_message())

    def user_message(self) -> str:
        where = []
        if self.stream is not None:
            where.append(f"stream {self.stream!r}")
        if self.line is not None:
            where.append(f"input line {self.line}")
        prefix = f"destination error ({', '.join(where)})" if where else "destination error"
        return f"{prefix}: {self.what}"


class Fenced(IngestError):
    """The stream's lease now belongs to another worker; this worker must stop touching it."""


class RunFailed(IngestError):
    pass


class RunLost(IngestError):
    pass

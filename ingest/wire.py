"""The Redis wire format: every key name and entry encoding lives here and nowhere else.

Key map (``R`` is the run id; the braces are a Redis Cluster hash tag so one run lives in one slot)::

    si:runs                  ZSET    run id -> creation time (seconds)
    si:{R}:meta              HASH    status, created_at, settings (JSON), sequence_base, error, end_seq,
                                     feeder_seen (time of the feeder's last poll)
    si:{R}:streams           HASH    Singer stream name -> stream id (small integer, in order of appearance)
    si:{R}:sent              HASH    stream id -> last sequence the feeder added
    si:{R}:committed         HASH    stream id -> highest sequence committed in the destination
    si:{R}:rows              HASH    stream id -> rows committed
    si:{R}:undeclared        HASH    stream id -> records committed that carried properties their schema does
                                     not declare (not loaded); "<stream id>:<property>" -> input line where
                                     a worker first saw that property
    si:{R}:tables            HASH    table -> the one stream that loads it (two streams whose names normalise, or
                                     are mapped, to one table are refused)
    si:{R}:dead_letters      HASH    stream id -> records committed to the dead-letter table (bad_records=dead_letter)
    si:{R}:acked_bytes       STRING  input bytes acknowledged (sum over streams)
    si:{R}:sent_bytes        STRING  input bytes the feeder added (sum over streams)
    si:{R}:state             STRING  last committed Singer STATE value (JSON)
    si:{R}:data:<sid>        STREAM  chunks of one Singer stream; consumer group "sinks"
    si:{R}:schema:<sid>      STRING  the SCHEMA line in effect for the stream ("<line>\n<raw>"), for takeover
    si:{R}:lease:<sid>       STRING  owner token "<member>|<fence>", with a TTL
    si:{R}:fence             STRING  counter: each lease claim takes the next fencing token
    si:{R}:members           ZSET    worker member id -> lease expiry (ms)
    si:{R}:pressure          STRING  set (with a TTL) while the feeder waits on backpressure

A data entry is either a chunk ``{q: seqs (little-endian uint64), d: raw lines joined by \\n,
t: time received}`` or the end-of-pipe marker ``{end: last sequence of the run}``.
"""

from __future__ import annotations

import array
import sys
from dataclasses import dataclass

RUNS = "si:runs"
GROUP = "sinks"
QUEUE = "singer-ingest"

STATUS_RUNNING = "running"
STATUS_DONE = "done"
STATUS_FAILED = "failed"


@dataclass(frozen=True)
class RunKeys:
    run_id: str

    def _k(self, suffix: str) -> str:
        return f"si:{{{self.run_id}}}:{suffix}"

    @property
    def meta(self) -> str:
        return self._k("meta")

    @property
    def streams(self) -> str:
        return self._k("streams")

    @property
    def sent(self) -> str:
        return self._k("sent")

    @property
    def committed(self) -> str:
        return self._k("committed")

    @property
    def rows(self) -> str:
        return self._k("rows")

    @property
    def undeclared(self) -> str:
        return self._k("undeclared")

    @property
    def tables(self) -> str:
        return self._k("tables")

    @property
    def dead_letters(self) -> str:
        return self._k("dead_letters")

    @property
    def acked_bytes(self) -> str:
        return self._k("acked_bytes")

    @property
    def sent_bytes(self) -> str:
        return self._k("sent_bytes")

    @property
    def state(self) -> str:
        return self._k("state")

    @property
    def fence(self) -> str:
        return self._k("fence")

    @property
    def members(self) -> str:
        return self._k("members")

    @property
    def pressure(self) -> str:
        return self._k("pressure")

    def data(self, sid: int) -> str:
        return self._k(f"data:{sid}")

    def schema(self, sid: int) -> str:
        return self._k(f"schema:{sid}")

    def lease(self, sid: int) -> str:
        return self._k(f"lease:{sid}")

    def all_fixed(self) -> list[str]:
        return [self.meta, self.streams, self.sent, self.committed, self.rows, self.undeclared, self.dead_letters, self.tables,
                self.acked_bytes,
                self.sent_bytes, self.state, self.fence, self.members, self.pressure]


def encode_chunk(seqs: list[int], lines: list[bytes], received_at: float) -> dict[bytes, bytes]:
    q = array.array("Q", seqs)
    if sys.byteorder != "little":
        q.byteswap()
    return {b"q": q.tobytes(), b"d": b"\n".join(lines), b"t": repr(received_at).encode()}


def undeclared_field(sid: int, prop: str) -> str:
    """The field of ``RunKeys.undeclared`` that records where a stream's undeclared property was first seen."""
    return f"{sid}:{prop}"


def decode_undeclared(fields: dict[bytes, bytes]) -> tuple[dict[int, int], dict[int, list[str]]]:
    """``RunKeys.undeclared`` read back: records per stream id, and each stream id's undeclared properties in the
    order of the input lines they were first seen on."""
    counts: dict[int, int] = {}
    first: dict[int, list[tuple[int, str]]] = {}
    for key, value in fields.items():
        sid, sep, prop = key.decode("utf-8", "replace").partition(":")
        if sep:
            first.setdefault(int(sid), []).append((int(value), prop))
        else:
            counts[int(sid)] = int(value)
    return counts, {sid: [p for _, p in sorted(seen)] for sid, seen in first.items()}


def encode_end(last_seq: int) -> dict[bytes, bytes]:
    return {b"end": str(last_seq).encode()}


@dataclass(frozen=True, slots=True)
class Chunk:
    entry_id: bytes
    seqs: list[int]
    lines: list[bytes]
    received_at: float
    nbytes: int


@dataclass(frozen=True, slots=True)
class EndOfPipe:
    entry_id: bytes
    last_seq: int


def decode_entry(entry_id: bytes, fields: dict[bytes, bytes]) -> Chunk | EndOfPipe:
    if b"end" in fields:
        return EndOfPipe(entry_id, int(fields[b"end"]))
    q = array.array("Q")
    q.frombytes(fields[b"q"])
    if sys.byteorder != "little":
        q.byteswap()
    data = fields[b"d"]
    lines = data.split(b"\n")
    # nbytes counts the lines' bytes, as the feeder does when it sends them (not the separators).
    return Chunk(entry_id, q.tolist(), lines, float(fields[b"t"]), len(data) - len(lines) + 1)


def entry_id_next(entry_id: bytes) -> str:
    """The smallest stream id greater than ``entry_id`` (for XTRIM MINID after acknowledging it)."""
    ms, seq = entry_id.split(b"-")
    return f"{int(ms)}-{int(seq) + 1}"

"""The feeder: tap output in, chunks onto Redis Streams, committed STATE out.

It parses every line (framing checks: JSON, type, required fields, record before schema, line
length, UTF-8) except RECORD lines in the usual framing: those it routes by the stream name at their
head, and the worker parses and checks them (``messages.record_stream``). It gives each Singer stream
a Redis stream, sends messages in chunks, keeps STATE messages with their watermarks and prints each
one once everything before it is committed. It waits (backpressure) while too much input sits
unacknowledged in Redis, and it watches the run: a failure reported by a worker ends the feed with
that error.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass, field
from typing import BinaryIO

import orjson
import redis

from . import wire
from .config import TargetConfig
from .errors import ConfigError, InputError, RunFailed, RunLost
from .messages import Record, Schema, State, parse_line, record_stream
from .progress import Snapshot
from .reader import LineReader
from .watermark import StateTracker
from .wire import RunKeys

logger = logging.getLogger(__name__)

CHUNK_MAX_BYTES = 1 << 20
PIPELINE_MAX_BYTES = 4 << 20
PARTIAL_FLUSH_SECONDS = 0.2
POLL_SECONDS = 0.2
PRESSURE_TTL_MS = 3000


def sequence_base(now: float) -> int:
    """The run's base of ``_sdc_sequence`` (base + input line): its start in microseconds x 1000. A later run's
    sequences are all above an earlier run's as long as it starts after the earlier one ended (a run reads under
    a billion lines a second), even within the same second; the keyless documents of idempotent stores take
    their ids from it, and every store orders upserts by it. Above the seconds x 10**9 of earlier versions for
    any later start."""
    return int(now * 1_000_000) * 1000


@dataclass
class _Pending:
    seqs: list[int] = field(default_factory=list)
    lines: list[bytes] = field(default_factory=list)
    nbytes: int = 0
    started: float = 0.0


@dataclass
class Summary:
    run_id: str
    seconds: float
    lines: int
    rows: dict[str, int]
    last_state: object = None
    # per stream: records that carried properties the stream's schema does not declare (not loaded), and those
    # properties
    undeclared: dict[str, int] = field(default_factory=dict)
    undeclared_properties: dict[str, list[str]] = field(default_factory=dict)
    dead_letters: dict[str, int] = field(default_factory=dict)  # records set aside per stream (bad_records)


class Feeder:
    def __init__(self, conn: redis.Redis, run_id: str, config: TargetConfig, dispatcher, out: BinaryIO,
                 clock=time.monotonic, wall=time.time, progress=None):
        self.redis = conn
        self.run_id = run_id
        self.config = config
        self.dispatcher = dispatcher
        self.out = out
        self.clock = clock
        self.wall = wall
        self.keys = RunKeys(run_id)
        self.sids: dict[str, int] = {}
        self.names: dict[int, str] = {}
        self.last_sent: dict[int, int] = {}
        self.pending: dict[int, _Pending] = {}
        self.tracker = StateTracker()
        self.bytes_sent = 0
        self._acked = 0
        self.committed: dict[int, int] = {}
        self.live_members = 0
        self._pipe = conn.pipeline(transaction=False)
        self._pipe_bytes = 0
        self._last_poll = 0.0
        self.last_state = None
        self.last_state_line: int | None = None
        self.progress = progress
        self.received: dict[int, int] = {}
        self.loaded: dict[int, int] = {}
        self.lines_read = 0
        self._started = clock()

    # -- run bookkeeping ---------------------------------------------------------------------------
    def create_run(self) -> None:
        now = self.wall()
        created = self.redis.hsetnx(self.keys.meta, "status", wire.STATUS_RUNNING)
        if not created:
            raise ConfigError(f"run id {self.run_id!r} already exists in Redis; choose another --run-id")
        self.redis.hset(self.keys.meta, mapping={
            "created_at": repr(now), "settings": self.config.run.to_json(),
            "sequence_base": str(sequence_base(now)), "feeder_seen": repr(now),
            "feeder_host": socket.gethostname()})
        self.redis.zadd(wire.RUNS, {self.run_id: now})
        self.redis.zremrangebyscore(wire.RUNS, 0, now - self.config.feeder.run_ttl_seconds)

    def fail_run(self, message: str) -> None:
        try:
            pipe = self.redis.pipeline()
            pipe.hsetnx(self.keys.meta, "error", message)
            pipe.hset(self.keys.meta, "status", wire.STATUS_FAILED)
            pipe.execute()
            self._expire_run()
        except redis.RedisError as exc:
            logger.warning("run %s: could not record the failure in Redis: %s", self.run_id, exc)

    def _expire_run(self) -> None:
        ttl = self.config.feeder.run_ttl_seconds
        pipe = self.redis.pipeline(transaction=False)
        for key in self.keys.all_fixed():
            pipe.expire(key, ttl)
        for sid in self.names:
            pipe.delete(self.keys.data(sid), self.keys.lease(sid), self.keys.schema(sid))
        pipe.execute()

    # -- the feed ----------------------------------------------------------------------------------
    def run(self, source: BinaryIO) -> Summary:
        self._started = self.clock()
        self.create_run()
        reader = LineReader(source, self.config.feeder.max_line_bytes)
        allow_unknown = self.config.run.allow_unknown_message_types
        line_no = 0
        while True:
            lines = reader.next_lines(POLL_SECONDS)
            if lines is None:
                break
            for raw in lines:
                line_no += 1
                if not raw or raw.isspace():
                    continue
                stream = record_stream(raw)  # a plain RECORD line is routed by its head; the worker parses it
                if stream is None:
                    msg = parse_line(raw, line_no, allow_unknown)
                    if msg is None:
                        continue
                    if type(msg) is Record:
                        stream = msg.stream
                if stream is not None:
                    sid = self.sids.get(stream)
                    if sid is None:
                        raise InputError("RECORD before any SCHEMA for this stream", line=line_no, stream=stream,
                                         hint="The tap must send a SCHEMA message before the stream's records")
                    self.received[sid] += 1
                    self._append(sid, line_no, raw)
                elif type(msg) is State:
                    self.tracker.add(line_no, msg.value, self.last_sent)
                elif type(msg) is Schema:
                    sid = self.sids.get(msg.stream)
                    if sid is None:
                        sid = self._register(msg.stream)
                    self._append(sid, line_no, raw)
                else:
                    sid = self.sids.get(msg.stream)
                    if sid is None:
                        raise InputError(f"{type(msg).__name__} message before any SCHEMA for this stream",
                                         line=line_no, stream=msg.stream,
                                         hint="The tap must send a SCHEMA message first")
                    self._append(sid, line_no, raw)
            self.lines_read = line_no
            self._poll(final=False)
        self._finish(line_no)
        rows = self._rows()
        counts, props = wire.decode_undeclared(self.redis.hgetall(self.keys.undeclared))
        dead = {int(sid): int(n) for sid, n in self.redis.hgetall(self.keys.dead_letters).items()}
        return Summary(self.run_id, self.clock() - self._started, line_no, rows, self.last_state,
                       {self.names[sid]: n for sid, n in sorted(counts.items())},
                       {self.names[sid]: p for sid, p in sorted(props.items())},
                       {self.names[sid]: n for sid, n in sorted(dead.items())})

    def _register(self, stream: str) -> int:
        sid = len(self.sids)
        self.sids[stream] = sid
        self.names[sid] = stream
        self.pending[sid] = _Pending()
        self.last_sent[sid] = 0
        self.received[sid] = 0
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.keys.streams, stream, sid)
        pipe.xgroup_create(self.keys.data(sid), wire.GROUP, id="0", mkstream=True)
        pipe.execute()
        self.dispatcher.streams_known(len(self.sids))
        return sid

    def _append(self, sid: int, seq: int, raw: bytes) -> None:
        p = self.pending[sid]
        if not p.seqs:
            p.started = self.clock()
        p.seqs.append(seq)
        p.lines.append(raw)
        p.nbytes += len(raw)
        self.last_sent[sid] = seq
        if len(p.seqs) >= self.config.feeder.chunk_size_rows or p.nbytes >= CHUNK_MAX_BYTES:
            self._send(sid)

    def _send(self, sid: int) -> None:
        p = self.pending[sid]
        if not p.seqs:
            return
        self._pipe.xadd(self.keys.data(sid), wire.encode_chunk(p.seqs, p.lines, self.wall()))
        self._pipe.hset(self.keys.sent, str(sid), p.seqs[-1])
        self._pipe.incrby(self.keys.sent_bytes, p.nbytes)
        self.bytes_sent += p.nbytes
        self._pipe_bytes += p.nbytes
        self.pending[sid] = _Pending()
        if self._pipe_bytes >= PIPELINE_MAX_BYTES:  # Redis buffers a whole pipeline: keep it small
            self._execute()

    def _execute(self) -> list:
        self._pipe_bytes = 0
        return self._pipe.execute()

    # -- watching the run --------------------------------------------------------------------------
    def _poll(self, *, final: bool) -> None:
        now = self.clock()
        for sid, p in self.pending.items():
            if p.seqs and (final or now - p.started >= PARTIAL_FLUSH_SECONDS):
                self._send(sid)
        if not final and now - self._last_poll < 0.05:
            if len(self._pipe):
                self._execute()
            return
        self._last_poll = now
        self._refresh()
        self._emit_safe_state()
        while self.bytes_sent - self._acked > self.config.feeder.max_backlog_bytes:
            self.redis.set(self.keys.pressure, b"1", px=PRESSURE_TTL_MS)
            time.sleep(0.05)
            self._refresh()
            self._emit_safe_state()

    def _refresh(self) -> None:
        pipe = self._pipe
        pipe.hset(self.keys.meta, "feeder_seen", repr(self.wall()))
        pipe.hmget(self.keys.meta, "status", "error")
        pipe.hgetall(self.keys.committed)
        pipe.get(self.keys.acked_bytes)
        pipe.zcount(self.keys.members, int(self.wall() * 1000), "+inf")
        pipe.hgetall(self.keys.rows)
        try:
            results = self._execute()
        except redis.ConnectionError as exc:
            raise RunLost(f"lost the connection to Redis ({exc}); the run cannot go on. The last STATE printed "
                          f"is safe to resume from") from None
        except redis.ResponseError as exc:
            raise RunLost(f"Redis refused the run's commands ({exc}); it may have restarted and lost the run. "
                          f"The last STATE printed is safe to resume from") from None
        status, error = results[-5]
        if status is None:
            raise RunLost(f"run {self.run_id}: its metadata vanished from Redis (Redis restarted without "
                          f"persistence?). The last STATE printed is safe to resume from")
        if status == wire.STATUS_FAILED.encode():
            raise RunFailed((error or b"a worker failed the run").decode())
        self.committed = {int(k): int(v) for k, v in results[-4].items()}
        self._acked = int(results[-3] or 0)
        self.live_members = int(results[-2])
        self.loaded = {int(k): int(v) for k, v in results[-1].items()}
        self.dispatcher.supervise(self.live_members)
        if self.progress is not None:
            self.progress.update(self.snapshot())

    def snapshot(self) -> Snapshot:
        return Snapshot(run_id=self.run_id, elapsed=self.clock() - self._started, lines=self.lines_read,
                        received={self.names[sid]: n for sid, n in self.received.items()},
                        loaded={self.names[sid]: self.loaded.get(sid, 0) for sid in self.received},
                        backlog_bytes=max(0, self.bytes_sent - self._acked), live_workers=self.live_members,
                        state_line=self.last_state_line, state=self.last_state)

    def _emit_safe_state(self) -> None:
        safe = self.tracker.pop_safe(self.committed)
        if safe is None:
            return
        if self.config.feeder.state_output == "value":
            line = orjson.dumps(safe.value)
        else:
            line = orjson.dumps({"type": "STATE", "value": safe.value})
        self.redis.set(self.keys.state, orjson.dumps(safe.value))
        self.out.write(line + b"\n")
        self.out.flush()
        self.last_state = safe.value
        self.last_state_line = safe.seq
        logger.info("run %s: STATE of input line %d committed", self.run_id, safe.seq)

    def _finish(self, last_line: int) -> None:
        self._poll(final=True)
        for sid in self.names:
            self._pipe.xadd(self.keys.data(sid), wire.encode_end(last_line))
        self._pipe.hset(self.keys.meta, "end_seq", last_line)
        self._execute()
        while not all(self.committed.get(sid, 0) >= seq for sid, seq in self.last_sent.items()):
            time.sleep(0.05)
            self._refresh()
            self._emit_safe_state()
        self._emit_safe_state()
        self.redis.hset(self.keys.meta, "status", wire.STATUS_DONE)
        self._expire_run()

    def _rows(self) -> dict[str, int]:
        raw = self.redis.hgetall(self.keys.rows)
        return {self.names[int(k)]: int(v) for k, v in sorted(raw.items(), key=lambda kv: int(kv[0]))} | \
            {name: 0 for name, sid in self.sids.items() if str(sid).encode() not in raw}

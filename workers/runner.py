"""A run member: the loop one RQ job (or the embedded worker thread) runs for one run.

A heartbeat thread renews its presence and leases every third of the lease TTL, also while drains
run. Each tick of the main loop claims its share of unowned streams, reads new entries
of the streams it owns (XREADGROUP, fenced by the lease: ``Leases.read``), feeds them to their sinks,
hands each batch that is due to the drain thread (a joblib thread pool, one batch in flight per stream)
and goes on reading while it commits; for each commit that completed it records the offset in Redis and acknowledges the entries
(XACK, then XTRIM of what is acknowledged). It ends when the run is done or failed.
"""

from __future__ import annotations

import logging
import math
import queue
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import redis
from joblib import Parallel, delayed

from ingest import metrics, wire
from ingest.config import ConnectionSettings, RunSettings
from ingest.errors import Fenced, IngestError, RunLost
from ingest.wire import RunKeys
from sinks import open_destination
from sinks.base import Destination

from . import maps
from .leases import Lease, Leases
from .stream import Drained, StreamSink

logger = logging.getLogger(__name__)

READ_COUNT = 3           # entries per stream per read (each up to 500 messages); one more read may wait ahead
IDLE_SLEEP_SECONDS = 0.05


@dataclass
class _Owned:
    sink: StreamSink
    cursor: bytes  # b"0"-based id while re-reading pending entries, then b">"


class Member:
    def __init__(self, conn: redis.Redis, run_id: str, member_id: str, connection: ConnectionSettings, *,
                 embedded: bool = False, destination: Destination | None = None,
                 clock=time.monotonic, wall=time.time):
        self.redis = conn
        self.run_id = run_id
        self.member_id = member_id
        self.connection = connection
        self.embedded = embedded
        self.keys = RunKeys(run_id)
        self.clock = clock
        self.wall = wall
        self._destination = destination
        self.owned: dict[int, _Owned] = {}
        self.streams: dict[int, str] = {}
        self._next_housekeeping = 0.0
        self._pressure = False
        self._stop = False
        self._leases_snapshot: tuple[Lease, ...] = ()  # read by the heartbeat thread
        self._lost: set[int] = set()
        self._lost_lock = threading.Lock()
        self.host = socket.gethostname()
        self._reader: ThreadPoolExecutor | None = None  # reads ahead (``_read``); not in the embedded mode
        self._ahead: tuple[list[tuple[int, _Owned]], Future] | None = None

    # -- run metadata ------------------------------------------------------------------------------
    def _meta(self) -> dict[bytes, bytes]:
        meta = self.redis.hgetall(self.keys.meta)
        if not meta:
            raise RunLost(f"run {self.run_id}: no metadata in Redis (the run is unknown, expired or Redis lost it)")
        return meta

    def fail_run(self, message: str) -> None:
        """Mark the run failed with one clear message, unless it already failed."""
        pipe = self.redis.pipeline()
        pipe.hsetnx(self.keys.meta, "error", message)
        pipe.hset(self.keys.meta, "status", wire.STATUS_FAILED)
        pipe.execute()

    # -- main loop ---------------------------------------------------------------------------------
    def serve(self) -> None:
        meta = self._meta()
        if meta.get(b"status", b"").decode() != wire.STATUS_RUNNING:
            logger.info("run %s: not running (%s); nothing to do", self.run_id, meta.get(b"status"))
            return
        self.settings = RunSettings.from_json(meta[b"settings"])
        self.sequence_base = int(meta.get(b"sequence_base", b"0"))
        self.leases = Leases(self.redis, self.keys, self.member_id, self.settings.lease_ttl_seconds)
        self.abandon_seconds = max(60.0, 4 * self.settings.lease_ttl_seconds)
        logger.info("run %s: worker %s joined on host %s", self.run_id, self.member_id, self.host)
        metrics.serve(self.connection.metrics_port, self.connection.metrics_address)
        owns_destination = self._destination is None
        try:
            # singer-sdk missing on this host, a driver missing, a destination that refuses to connect
            maps.check(self.settings)
            if maps.wanted(self.settings):
                maps.Mapper(self.settings, self.connection)
            if owns_destination:
                self._destination = open_destination(self.settings, self.connection, embedded=self.embedded)
        except IngestError as exc:
            metrics.ERRORS.labels(type(exc).__name__).inc()
            message = f"worker {self.member_id} on host {self.host}: {exc.user_message()}"
            logger.error("run %s: %s", self.run_id, message)
            self.fail_run(message)
            raise
        beat_stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(beat_stop,), name="singer-ingest-heartbeat",
                                daemon=True)
        beat.start()
        try:
            self._drainer = Drainer(self.settings.max_parallelism)
            if not self.embedded:  # (the embedded broker runs in this process: reading ahead gains nothing)
                self._reader = ThreadPoolExecutor(1, thread_name_prefix="singer-ingest-read-ahead")
            try:
                while self._tick():
                    pass
            finally:
                if self._reader is not None:
                    self._reader.shutdown(wait=True)
                    self._reader, self._ahead = None, None
                self._report_late(self._drainer.close())
        except IngestError as exc:
            metrics.ERRORS.labels(type(exc).__name__).inc()
            if not isinstance(exc, RunLost):
                logger.error("run %s: %s", self.run_id, exc.user_message())
                self.fail_run(exc.user_message())
            raise
        except redis.RedisError:
            metrics.ERRORS.labels("RedisError").inc()
            raise
        except Exception as exc:
            metrics.ERRORS.labels("internal").inc()
            message = f"internal error in worker {self.member_id} ({type(exc).__name__}: {exc}); see the worker's log"
            logger.exception("run %s: %s", self.run_id, message)
            self.fail_run(message)
            raise
        finally:
            beat_stop.set()
            beat.join(timeout=10)
            self._leave()
            if owns_destination and self._destination is not None:
                self._destination.close()
                self._destination = None

    def _report_late(self, results: list) -> None:
        """Log what commits still in flight when the loop ended came to (the run is over or failed)."""
        for sink, result in results:
            if isinstance(result, Fenced):
                self._fenced(sink.name, result)
            elif isinstance(result, BaseException):
                logger.warning("run %s: stream %r: a commit in flight when the worker left failed: %s", self.run_id,
                               sink.name, result)

    def _fenced(self, stream: str, exc: Fenced) -> None:
        metrics.FENCED.labels(self.run_id, stream).inc()
        logger.warning("run %s: %s", self.run_id, exc)

    def _drop_fenced(self, sink: StreamSink, exc: Fenced) -> None:
        """Stop serving a stream whose commit the destination refused: a newer owner re-reads its entries."""
        self._fenced(sink.name, exc)
        if self.owned.get(sink.sid) is not None and self.owned[sink.sid].sink is sink:
            self._forget(sink.sid)
            self._publish_leases()

    def _leave(self) -> None:
        try:
            owned = list(self.owned.values())
            holders = self.leases.holders([o.sink.lease.sid for o in owned])
            for o in owned:
                holder = holders.get(o.sink.lease.sid)
                # (a lease gone altogether is the feeder clearing a finished run)
                if holder is not None and holder != o.sink.lease.token:
                    logger.warning("run %s: stream %r: another worker holds its lease now (%s)", self.run_id,
                                   o.sink.name, holder.decode(errors="replace"))
                self.leases.release(o.sink.lease)
            self.redis.zrem(self.keys.members, self.member_id)
        except redis.RedisError as exc:
            logger.warning("run %s: could not release leases on leaving: %s", self.run_id, exc)
        self.owned.clear()

    def _heartbeat(self, stop: threading.Event) -> None:
        interval = max(0.1, self.settings.lease_ttl_seconds / 3)
        ttl_ms = int(self.settings.lease_ttl_seconds * 1000)
        while not stop.wait(interval):
            try:
                self.redis.zadd(self.keys.members, {self.member_id: int(self.wall() * 1000) + ttl_ms})
                lost = self.leases.renew(list(self._leases_snapshot))
            except redis.RedisError as exc:
                logger.warning("run %s: heartbeat failed (%s); leases expire if this goes on", self.run_id, exc)
                continue
            if lost:
                with self._lost_lock:
                    self._lost.update(lease.sid for lease in lost)

    def _publish_leases(self) -> None:
        self._leases_snapshot = tuple(o.sink.lease for o in self.owned.values())
        metrics.STREAMS_OWNED.labels(self.run_id).set(len(self.owned))

    def _forget(self, sid: int) -> None:
        owned = self.owned.pop(sid, None)
        if owned is not None:
            metrics.forget_stream(self.run_id, owned.sink.name)

    def stop(self) -> None:
        """Ask the loop to leave at its next tick (the embedded feeder, once the run is over)."""
        self._stop = True

    def _tick(self) -> bool:
        if self._stop:
            return False
        now = self.clock()
        if now >= self._next_housekeeping:
            if not self._housekeeping():
                return False
            self._next_housekeeping = now + min(1.0, self.settings.lease_ttl_seconds / 5)
        got = self._resume_leftovers()
        got = self._read() or got
        self._drain_due()
        if not got and not any(o.sink.can_resume for o in self.owned.values()):
            # (a batch detached just now makes room for the rest of its stream's entry: feed on at once)
            self._drainer.wait(IDLE_SLEEP_SECONDS)
        return True

    # -- presence, leases and claims -----------------------------------------------------------------
    def _housekeeping(self) -> bool:
        meta = self._meta()
        status = meta.get(b"status", b"").decode()
        if status != wire.STATUS_RUNNING:
            logger.info("run %s: %s; worker %s leaves", self.run_id, status, self.member_id)
            return False
        seen = float(meta.get(b"feeder_seen", b"0") or 0)
        if seen and self.wall() - seen > self.abandon_seconds:
            self.fail_run(f"the feeder stopped reporting for {self.abandon_seconds:.0f} s (killed or cut off); "
                          f"start the run again from its last committed STATE")
            return False
        ttl_ms = int(self.settings.lease_ttl_seconds * 1000)
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(self.keys.members, {self.member_id: int(self.wall() * 1000) + ttl_ms})
        pipe.zremrangebyscore(self.keys.members, 0, int(self.wall() * 1000))
        pipe.zcard(self.keys.members)
        pipe.hgetall(self.keys.streams)
        pipe.exists(self.keys.pressure)
        pipe.get(self.keys.sent_bytes)
        pipe.get(self.keys.acked_bytes)
        owned = sorted(self.owned)
        for sid in owned:
            pipe.xlen(self.keys.data(sid))
        _, _, live, streams, pressure, sent, acked, *lengths = pipe.execute()
        self._pressure = bool(pressure)
        metrics.BACKLOG_BYTES.labels(self.run_id).set(int(sent or 0) - int(acked or 0))
        for sid, length in zip(owned, lengths):
            metrics.STREAM_ENTRIES.labels(self.run_id, self.owned[sid].sink.name).set(length)
        self.streams = {int(v): k.decode() for k, v in streams.items()}
        with self._lost_lock:
            lost, self._lost = self._lost, set()
        for sid in lost:
            logger.warning("run %s: stream %r: lease lost; dropping its open batch (another worker re-reads it)",
                           self.run_id, self.streams.get(sid))
            metrics.LEASES_LOST.labels(self.run_id, self.streams.get(sid, str(sid))).inc()
            self._forget(sid)
        self._claim(max(1, live))
        self._publish_leases()
        return True

    def _claim(self, live_members: int) -> None:
        share = math.ceil(len(self.streams) / live_members)
        self._rebalance(share)
        free = [sid for sid in sorted(self.streams) if sid not in self.owned]
        if not free:
            return
        holders = self.leases.holders(free)
        for sid in free:
            if len(self.owned) >= share:
                break
            if holders.get(sid) is not None:
                continue
            lease = self.leases.try_claim(sid)
            if lease is not None:
                self._take(sid, lease)

    def _table_owner(self, table: str, stream: str) -> str:
        """The stream that loads ``table`` in this run: the first to claim it (each table is one stream's)."""
        self.redis.hsetnx(self.keys.tables, table, stream)
        return self.redis.hget(self.keys.tables, table).decode()

    def _take(self, sid: int, lease: Lease) -> None:
        name = self.streams[sid]
        destination = self._destination
        assert destination is not None
        # The heartbeat renews the new lease from now on: claiming may wait on the destination's offset lock
        # (held by a cut-off owner until its session times out) for longer than the lease lives.
        self._leases_snapshot += (lease,)
        try:
            committed = destination.claim_stream(self.run_id, name, lease.fence)
        except Fenced as exc:
            self._fenced(name, exc)
            self.leases.release(lease)
            self._publish_leases()
            return
        sink = StreamSink(run_id=self.run_id, name=name, sid=sid, lease=lease, committed_seq=committed,
                          settings=self.settings, destination=destination, sequence_base=self.sequence_base,
                          clock=self.clock, wall=self.wall,
                          mapper=maps.Mapper(self.settings, self.connection) if maps.wanted(self.settings) else None,
                          table_owner=self._table_owner)
        stored = self.redis.get(self.keys.schema(sid))
        if stored:
            line, raw = stored.split(b"\n", 1)
            sink.restore_schema(raw, int(line))
        # Take over whatever the previous owner left unacknowledged, then re-read it in order.
        data = self.keys.data(sid)
        start = "0-0"
        claimed = 0
        while True:
            start, entries = self.redis.xautoclaim(data, wire.GROUP, self.member_id, 0, start_id=start,
                                                   count=1000)[:2]
            claimed += len(entries)
            if start in (b"0-0", "0-0"):
                break
        self.owned[sid] = _Owned(sink, b"0")
        self._publish_leases()
        metrics.CLAIMS.labels(self.run_id, name, "takeover" if committed or claimed else "new").inc()
        logger.info("run %s: stream %r: taken by worker %s (fence %d, committed up to input line %d)",
                    self.run_id, name, self.member_id, lease.fence, committed)

    def _rebalance(self, share: int) -> None:
        """Hand streams beyond this worker's share back: stop reading them, drain, acknowledge, release."""
        excess = len(self.owned) - share - sum(1 for o in self.owned.values() if o.sink.releasing)
        for sid in sorted(self.owned, reverse=True):
            if excess <= 0:
                break
            sink = self.owned[sid].sink
            if sink.ended or sink.releasing:
                continue
            sink.releasing = True
            excess -= 1

    def _release_drained(self) -> None:
        for sid, owned in list(self.owned.items()):
            sink = owned.sink
            if sink.releasing and not sink.in_flight and not sink.rows and not sink.pending \
                    and sink.committed_seq >= sink.upto_seq:
                self.leases.release(sink.lease)
                self._forget(sid)
                self._publish_leases()
                logger.info("run %s: stream %r: released to balance the run over its workers", self.run_id,
                            sink.name)

    # -- reading -----------------------------------------------------------------------------------
    def _resume_leftovers(self) -> bool:
        resumed = False
        for owned in list(self.owned.values()):
            sink = owned.sink
            if sink.can_resume:
                resumed = True
                try:
                    sink.resume()
                except Fenced as exc:  # a drain done inline (schema change, version switch) found a newer owner
                    self._drop_fenced(sink, exc)
                    continue
                if sink.schema_changed is not None:
                    self._publish_schema(sink)
        return resumed

    def _wanted(self) -> list[tuple[int, _Owned]]:
        return [(sid, o) for sid, o in self.owned.items()
                if not o.sink.ended and not o.sink.releasing and not o.sink.has_leftover]

    def _fetch(self, wanted: list[tuple[int, _Owned]]) -> list[list | None]:
        return self.leases.read(wire.GROUP, [(o.sink.lease, self.keys.data(sid), o.cursor) for sid, o in wanted],
                                READ_COUNT)

    def _read(self) -> bool:
        """Read new entries of the owned streams and feed them.

        Reads ahead: while the entries of one read are fed, the next read runs on a thread of its own, for the
        streams that wanted entries before this feeding began (a stream whose batch fills up keeps at most that
        one read waiting). Its reply is fed on the next call, entries of a stream that left this worker
        meanwhile excepted: they stay pending in Redis for the stream's next owner, as when a lease is lost.
        Only streams reading new entries read ahead; re-reading the pending entries after a takeover moves
        its cursor with each reply.
        """
        try:
            if self._ahead is not None:
                wanted, future = self._ahead
                self._ahead = None
                replies = future.result()
            else:
                wanted = self._wanted()
                if not wanted:
                    return False
                replies = self._fetch(wanted)
        except redis.ResponseError as exc:
            if "NOGROUP" in str(exc):
                raise RunLost(f"run {self.run_id}: its Redis streams are gone (Redis restarted or the run expired)") \
                    from None
            raise
        if self._reader is not None and any(replies):
            ahead = self._wanted()
            if ahead and all(o.cursor == b">" for _, o in ahead):
                self._ahead = (ahead, self._reader.submit(self._fetch, ahead))
        got = False
        for (sid, owned), entries in zip(wanted, replies):
            if self.owned.get(sid) is not owned:
                continue  # the stream left this worker after this read was sent; its next owner re-reads these
            if entries is None:
                with self._lost_lock:  # dropped at the next housekeeping, like a lease the heartbeat lost
                    self._lost.add(sid)
                continue
            if owned.cursor != b">" and not entries:
                owned.cursor = b">"  # done re-reading the entries left pending by an earlier owner
                continue
            for entry_id, fields in entries:
                got = True
                if owned.cursor != b">":
                    owned.cursor = entry_id
                try:
                    owned.sink.feed(wire.decode_entry(entry_id, fields))
                except Fenced as exc:
                    self._drop_fenced(owned.sink, exc)
                    break
                if owned.sink.schema_changed is not None:
                    self._publish_schema(owned.sink)
        return got

    def _publish_schema(self, sink: StreamSink) -> None:
        raw = sink.schema_changed
        sink.schema_changed = None
        assert sink.schema is not None
        self.redis.set(self.keys.schema(sink.sid), str(sink.schema.seq).encode() + b"\n" + raw)

    # -- draining ----------------------------------------------------------------------------------
    def _drain_due(self) -> None:
        for sink, result in self._drainer.completed():
            if self.owned.get(sink.sid) is None or self.owned[sink.sid].sink is not sink:
                continue  # the stream left this worker meanwhile (lease lost); its new owner re-reads it
            if isinstance(result, Fenced):
                self._drop_fenced(sink, result)
            elif isinstance(result, BaseException):
                raise result
            else:
                sink.committed(result)
        now = self.clock()
        for owned in self.owned.values():
            reason = owned.sink.due(now, self._pressure)
            if reason:
                logger.debug("run %s: stream %r: flush (%s), %d rows", self.run_id, owned.sink.name, reason,
                             len(owned.sink.rows))
                self._drainer.submit(owned.sink, owned.sink.detach())
        self._acknowledge()

    def _acknowledge(self) -> None:
        pipe = self.redis.pipeline(transaction=True)
        any_work = False
        for sid, owned in list(self.owned.items()):
            sink = owned.sink
            entries = sink.ackable()
            if not entries and not sink.rows_committed and not sink.undeclared_committed and not sink.undeclared_new \
                    and not sink.dead_committed:
                continue
            any_work = True
            data = self.keys.data(sid)
            pipe.hset(self.keys.committed, str(sid), sink.committed_seq)
            if sink.rows_committed:
                pipe.hincrby(self.keys.rows, str(sid), sink.rows_committed)
                sink.rows_committed = 0
            if sink.dead_committed:
                pipe.hincrby(self.keys.dead_letters, str(sid), sink.dead_committed)
                sink.dead_committed = 0
            if sink.undeclared_committed:
                pipe.hincrby(self.keys.undeclared, str(sid), sink.undeclared_committed)
                sink.undeclared_committed = 0
            for prop, line in sink.undeclared_new:
                pipe.hsetnx(self.keys.undeclared, wire.undeclared_field(sid, prop), line)
            sink.undeclared_new = []
            if entries:
                ids = [e.entry_id for e in entries]
                pipe.xack(data, wire.GROUP, *ids)
                pipe.xtrim(data, minid=wire.entry_id_next(ids[-1]), approximate=False)
                pipe.incrby(self.keys.acked_bytes, sum(e.nbytes for e in entries))
        if any_work:
            pipe.execute()
        self._release_drained()


class Drainer:
    """Commits detached batches in the joblib thread pool, on a thread of its own, so the worker's loop goes
    on reading and validating while batches commit. Up to ``max_parallelism`` batches commit at once; a
    stream has at most one batch in flight (``StreamSink.due``), so its commits stay in input order."""

    def __init__(self, max_parallelism: int):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._results: queue.SimpleQueue = queue.SimpleQueue()
        self._n_jobs = max_parallelism
        self._thread = threading.Thread(target=self._run, name="singer-ingest-drains", daemon=True)
        self._thread.start()

    def submit(self, sink: StreamSink, job: Callable[[], Drained]) -> None:
        self._jobs.put((sink, job))

    def completed(self) -> list[tuple[StreamSink, Drained | BaseException]]:
        out = []
        while True:
            try:
                out.append(self._results.get_nowait())
            except queue.Empty:
                return out

    def wait(self, seconds: float) -> None:
        """Sleep until a commit completes, at most ``seconds``; what completed stays for ``completed``."""
        try:
            item = self._results.get(timeout=seconds)
        except queue.Empty:
            return
        self._results.put(item)

    def close(self) -> list[tuple[StreamSink, Drained | BaseException]]:
        """Let the commits under way finish, stop the thread; return the results nobody collected."""
        for _ in range(self._n_jobs):
            self._jobs.put(None)
        self._thread.join()
        return self.completed()

    def _run(self) -> None:
        # One joblib call for the worker's life: each of its tasks is a lane that takes the next batch from
        # the queue as soon as its last commit ended. Batches are not dispatched in rounds, so one slow commit
        # (a big stream, a table lock) never holds up the commits of the other streams.
        Parallel(n_jobs=self._n_jobs, backend="threading")(delayed(self._lane)() for _ in range(self._n_jobs))

    def _lane(self) -> None:
        while (item := self._jobs.get()) is not None:
            sink, job = item
            self._results.put((sink, _attempt(job)))


def _attempt(job: Callable[[], Drained]) -> Drained | Exception:
    """Run a commit; its error goes back to the worker's loop, which fails the run or drops the stream."""
    try:
        return job()
    except Exception as exc:
        return exc

"""One Singer stream owned by this worker: its schema, table, open batch, offsets and acknowledgements.

Messages arrive in input order. A record is turned into a row of the stream's table (validated,
metadata added) and kept in the open batch; ``drain`` writes the batch and the stream's offset in one
destination transaction. A record's properties that the stream's schema does not declare are not loaded
(the Singer convention): each is logged the first time it is seen, and the records that carried any are
counted at commit; with ``undeclared_properties`` set to ``error`` the first such record fails the run.
Entries of the Redis stream are acknowledged only once every message they carry is at or below the
committed offset (DESIGN rules 3 and 4).
"""

from __future__ import annotations

import functools
import gzip
import logging
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable
from urllib.parse import unquote, urlparse

import msgspec
import orjson

from ingest import metrics
from ingest.config import RunSettings
from ingest.errors import DestinationError, InputError
from ingest.messages import ActivateVersion, BatchFiles, Record, Schema, parse_line
from ingest.wire import Chunk, EndOfPipe
from sinks import base
from sinks.base import Batch, Destination, TableSpec

from .batching import FlushPolicy, flush_reason, last_by_key
from .leases import Lease
from .maps import Mapper
from .typed import nameable, record_decoder
from .validation import check_schema, record_validator

logger = logging.getLogger(__name__)


# Plain RECORD lines the typed decoder refused (each then read again by orjson and the validator): past this
# many, and more than one for four it decoded, a stream's records go straight to the general path.
TYPED_REFUSALS_TOLERATED = 1000
TYPED_RUN = 100  # rows decoded typed between two rounds of checks
# Undeclared record keys the typed decoder of a stream learns to read past (beyond them, records carrying
# others go to the general path).
TYPED_UNDECLARED_MAX = 64
# Under bad_records=dead_letter, records of one batch the destination may refuse one by one (each refusal costs
# the batch a new attempt); past this many the run fails.
REFUSALS_PER_BATCH_MAX = 100


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat()


_SCALAR_TYPES = {"string", "integer", "number", "boolean"}


def _scalar_typed(spec: TableSpec, schema: dict) -> bool:
    """Every non-JSON column's property has a plain scalar ``type`` in the schema, so a validated record holds
    only scalars (or null) there; the destination may then use an encoding that relies on it."""
    props = schema.get("properties") or {}
    for c in spec.columns:
        if c.type == base.JSON or c.prop is None:
            continue
        prop = props.get(c.prop)
        if not isinstance(prop, dict) or not isinstance(prop.get("type"), (str, list)):
            return False  # no plain "type" (anyOf, oneOf): the validator may let other values through
        kinds = set(base.types_of(prop)) - {"null"}
        if not kinds or not kinds <= _SCALAR_TYPES:
            return False
    return True


@dataclass
class PendingEntry:
    entry_id: bytes
    last_seq: int
    nbytes: int


@dataclass
class Drained:
    """What a drain committed; the worker reports it to Redis and acknowledges entries."""

    sink: "StreamSink"
    rows: int
    upto_seq: int
    nbytes: int = 0
    seconds: float = 0.0
    undeclared: int = 0  # records that carried properties their schema does not declare
    dead_letters: int = 0  # records written to the dead-letter table


class StreamSink:
    def __init__(self, *, run_id: str, name: str, sid: int, lease: Lease, committed_seq: int,
                 settings: RunSettings, destination: Destination, sequence_base: int,
                 clock=time.monotonic, wall=time.time, mapper: Mapper | None = None,
                 table_owner: Callable[[str, str], str] | None = None):
        self.run_id = run_id
        self.name = name
        self.sid = sid
        self.lease = lease
        self.committed_seq = committed_seq
        self.settings = settings
        self.destination = destination
        self.sequence_base = sequence_base
        self.clock = clock
        self.wall = wall
        self.policy = FlushPolicy(settings.batch_size_rows, settings.max_batch_bytes,
                                  settings.max_record_age_seconds)
        self.schema: Schema | None = None
        self.spec: TableSpec | None = None
        self._mapper = mapper
        self._table_owner = table_owner  # (table, stream) -> the stream that loads the table in this run
        self._transform = None   # the stream map's transform of a record (None: no map)
        self._dropped = False    # the stream maps leave this stream out: its records are skipped
        self._dead_letter = settings.bad_records == "dead_letter"
        self.dead: list[tuple] = []  # dead letters of the open batch (base.DEAD_LETTER_COLUMNS)
        self.dead_committed = 0
        self._validate = None
        self._decoder = None
        self._typed_fed = self._typed_refused = 0
        self._scalars_validated = False
        self._props: list[str] = []
        self._declared: frozenset[str] = frozenset()  # the record keys that are loaded
        self._undeclared_seen: set[str] = set()  # undeclared properties already reported (any schema of the stream)
        self._known: frozenset[str] = frozenset()  # keys a record may hold without a call to _undeclared
        self._undeclared_fields: tuple[str, ...] = ()  # those the typed decoder reads past
        self._undeclared_open = 0  # records of the open batch that carried undeclared properties
        self.undeclared_committed = 0
        self.undeclared_new: list[tuple[str, int]] = []  # (property, input line) first seen, to report
        self._key_index: tuple[int, ...] = ()
        self._meta_index: dict[str, int] = {}
        self._meta_at: tuple[int, ...] = ()
        self.rows: list[list] = []
        self.lines: list[int] = []
        self.nbytes = 0
        self.oldest_at: float | None = None
        self.upto_seq = committed_seq
        self.pending: deque[PendingEntry] = deque()
        self.ended = False
        self.releasing = False
        self._inbox: deque[Chunk | EndOfPipe] = deque()
        self._current: Chunk | None = None
        self._pos = 0
        self._received_at = ""  # handed back to balance the run: drain, acknowledge, then release
        self.rows_committed = 0
        self.schema_changed: bytes | None = None  # raw schema line to publish after it applied
        self.in_flight = False  # a detached batch is being committed by a drain thread
        self._stalled = False   # feeding waits for that commit (schema change, ACTIVATE_VERSION); cleared by
                                # ``committed``

    # -- schema ------------------------------------------------------------------------------------
    def restore_schema(self, raw: bytes, line: int) -> None:
        """Apply the schema in effect when this stream was taken over (stored by the previous owner)."""
        msg = parse_line(raw, line)
        assert isinstance(msg, Schema)
        self._apply_schema(msg, raw)

    def _apply_schema(self, msg: Schema, raw: bytes) -> None:
        check_schema(msg.schema, stream=self.name, line=msg.seq)
        schema, keys, table = msg.schema, msg.key_properties, None
        self._transform, self._dropped = None, False
        if self._mapper is not None:
            mapped = self._mapper.stream(self.name, schema, keys, line=msg.seq)
            if mapped.transform is None:
                logger.info("run %s: stream %r: the stream maps leave it out; its records are not loaded",
                            self.run_id, self.name)
                self.spec, self.schema, self._dropped, self._decoder = None, msg, True, None
                return
            schema, keys, table, self._transform = mapped.schema, mapped.key_properties, mapped.table, \
                mapped.transform
        # Only upserts make a table keyed: append-only and overwrite keep every record as a row, so a key there
        # would refuse the second record of a key.
        keys = keys if self.settings.load_method == "upsert" else ()
        wanted = base.table_spec(self.name, schema, keys, metadata=self.settings.add_record_metadata,
                                 schema_name=self.settings.default_target_schema,
                                 max_identifier_bytes=self.destination.max_identifier_bytes, line=msg.seq,
                                 table=table)
        owner = self._table_owner(wanted.table, self.name) if self._table_owner else self.name
        if owner != self.name:
            raise InputError(f"streams {owner!r} and {self.name!r} would both load table {wanted.table!r} (their "
                             f"names normalise, or stream maps alias them, to one table); each table is one "
                             f"stream's, so that its offset, ACTIVATE_VERSION and overwrite concern that stream "
                             f"alone", line=msg.seq, stream=self.name,
                             hint="Rename one of them with a stream map's __alias__")
        self.spec = self.destination.ensure_table(wanted)
        self.schema = msg
        self._validate = record_validator(schema) if self.settings.validate_records else None
        self._props = [c.prop for c in self.spec.columns]
        self._scalars_validated = self._validate is not None and _scalar_typed(self.spec, schema)
        names = self.spec.column_names
        self._key_index = tuple(names.index(k) for k in self.spec.key_columns)
        self._meta_index = {n: names.index(n) for n, _ in base.METADATA_COLUMNS} if self.spec.metadata else {}
        self._meta_at = tuple(self._meta_index[n] for n in ("_sdc_extracted_at", "_sdc_received_at", "_sdc_sequence",
                                                          "_sdc_table_version", "_sdc_deleted_at")) \
            if self._meta_index else ()
        # (a record's own _sdc_deleted_at fills the metadata column of that name)
        self._declared = frozenset(schema.get("properties") or ()) | \
            ({base.DELETED_COLUMN} if base.DELETED_COLUMN in self._meta_index else frozenset())
        self._undeclared_fields = ()
        self._know_undeclared()
        # A mapped stream's records go through the map, then the validator: not through the typed decoder.
        self._decoder = self._typed_decoder() if self._transform is None else None
        self._typed_fed = self._typed_refused = 0

    def _know_undeclared(self) -> None:
        self._known = self._declared if self.settings.undeclared_properties == "error" \
            else self._declared | self._undeclared_seen

    def _typed_decoder(self):
        assert self.schema is not None
        return record_decoder(self.schema.schema, self._props, deleted_at=self._meta_index.get(base.DELETED_COLUMN),
                              undeclared=self._undeclared_fields)

    def _undeclared(self, record: dict, seq: int) -> None:
        """A record holds keys its schema does not declare, not all of them known: fail, or report each new one
        and let the typed decoder read past it from now on."""
        names = [k for k in record if k not in self._declared]
        if self.settings.undeclared_properties == "error":
            raise InputError(f"record has properties its schema does not declare: {', '.join(map(repr, names))}",
                             line=seq, stream=self.name,
                             hint="Declare them in the stream's SCHEMA, or set undeclared_properties to warn to "
                                  "load the declared properties and leave the others out")
        new = [k for k in names if k not in self._undeclared_seen]
        if not new:
            return
        self._undeclared_seen.update(new)
        self._know_undeclared()
        self.undeclared_new.extend((k, seq) for k in new)
        for k in new:
            logger.warning("run %s: stream %r: input line %d: property %r is not declared in the stream's SCHEMA, "
                           "so it is not loaded (declare it to load it; undeclared_properties=error fails the "
                           "run instead)", self.run_id, self.name, seq, k)
        if self._decoder is not None:
            fields = tuple(k for k in sorted(self._undeclared_seen - self._declared) if nameable(k))
            fields = fields[:TYPED_UNDECLARED_MAX]
            if fields != self._undeclared_fields:
                self._undeclared_fields = fields
                self._decoder = self._typed_decoder()

    # -- feeding -----------------------------------------------------------------------------------
    def feed(self, item: Chunk | EndOfPipe) -> None:
        """Take one Redis entry. Feeding stops when the batch is full; ``resume`` goes on after the drain."""
        self._inbox.append(item)
        self.resume()

    @property
    def full(self) -> bool:
        return len(self.rows) + len(self.dead) >= self.policy.batch_size_rows or \
            self.nbytes >= self.policy.max_batch_bytes

    @property
    def can_resume(self) -> bool:
        """Leftover input can be fed now: the open batch has room and no commit is awaited."""
        return self.has_leftover and not self.full and not self._stalled

    @property
    def has_leftover(self) -> bool:
        """Part of an entry is still to be fed (the batch filled up in the middle of it)."""
        return self._current is not None or bool(self._inbox)

    def resume(self) -> None:
        """Feed waiting entries, in order, until they are all done or the batch is full."""
        while self._current is not None or self._inbox:
            if self._current is None:
                item = self._inbox.popleft()
                if isinstance(item, EndOfPipe):
                    self.ended = True
                    self.pending.append(PendingEntry(item.entry_id, self.upto_seq, 0))
                    continue
                self.pending.append(PendingEntry(item.entry_id, item.seqs[-1] if item.seqs else self.upto_seq,
                                                 item.nbytes))
                self._current, self._pos, self._received_at = item, 0, _iso(item.received_at)
            if not self._feed_current():
                return

    def _feed_current(self) -> bool:
        """Feed the current entry's messages; False when the batch filled up before its end.

        A schema change or ACTIVATE_VERSION drains the open batch synchronously first (rule 1).
        """
        item = self._current
        assert item is not None
        seqs, lines, received_at = item.seqs, item.lines, self._received_at
        while self._pos < len(seqs):
            if self.spec is not None:  # (None also for a stream the maps leave out: its lines are skipped below)
                self._pos = self._feed_records(seqs, lines, self._pos, received_at)
                if self._pos == len(seqs):
                    break
            if self.full:
                return False
            seq, raw = seqs[self._pos], lines[self._pos]
            msg = parse_line(raw, seq, allow_unknown=True)
            if self.in_flight and (isinstance(msg, ActivateVersion) or self._changes_schema(msg)):
                # Table changes and version switches commit in input order: wait for the batch in flight.
                self._stalled = True
                return False
            self._pos += 1
            if seq <= self.committed_seq and not isinstance(msg, Schema):
                continue  # committed before this worker took the stream over
            if self._dropped and not isinstance(msg, Schema):
                if isinstance(msg, Record) and msg.stream != self.name:
                    raise InputError(f"RECORD names stream {msg.stream!r} after naming {self.name!r}", line=seq,
                                     stream=self.name, hint="A message must name its stream once")
                self.upto_seq = max(self.upto_seq, seq)
                continue  # the stream maps leave this stream out
            if isinstance(msg, Record):
                if msg.stream != self.name:  # the feeder routed it by the first "stream" of its head
                    raise InputError(f"RECORD names stream {msg.stream!r} after naming {self.name!r}", line=seq,
                                     stream=self.name, hint="A message must name its stream once")
                self._add(msg, len(raw), received_at)
            elif isinstance(msg, Schema):
                if self._changes_schema(msg):
                    if self.rows or self.dead:
                        self.drain_now()
                    self._apply_schema(msg, raw)
                    self.schema_changed = raw
            elif isinstance(msg, ActivateVersion):
                if self.rows or self.dead:
                    self.drain_now()
                self._activate(msg)
            elif isinstance(msg, BatchFiles):
                self._add_files(msg, received_at)
            self.upto_seq = max(self.upto_seq, seq)
        self._current = None
        return True

    def _feed_records(self, seqs: list[int], lines: list[bytes], pos: int, received_at: str) -> int:
        """Feed the run of plain RECORD lines from ``pos`` on (a RECORD of this stream with its record object and no
        version: the common case, fed without message objects) while the batch has room; return the position of
        the first line not fed. Every other line, including each one that is not valid, is left to parse_line.

        Lines go through the stream's typed decoder where it has one; a line it refuses is fed as a plain
        line alone, then the typed decoder goes on, unless it refuses too many. The rows are those ``_row``
        makes."""
        end = len(seqs)
        while pos < end and self._decoder is not None:
            pos = self._feed_typed(seqs, lines, pos, received_at)
            if pos == end or self.full:
                return pos
            fed = self._feed_plain(seqs, lines, pos, received_at, pos + 1)
            if fed == pos:
                return pos
            pos = fed
            self._typed_refused += 1
            if self._typed_refused >= TYPED_REFUSALS_TOLERATED and self._typed_refused * 4 > self._typed_fed:
                logger.info("stream %s: %d of %d RECORD lines since its schema held values the typed decoding "
                            "leaves to the validator; up to its next schema, its records go to the validator "
                            "alone (from line %d)", self.name, self._typed_refused,
                            self._typed_refused + self._typed_fed, seqs[pos - 1] + 1)
                self._decoder = None
        return self._feed_plain(seqs, lines, pos, received_at, end) if pos < end else pos

    def _feed_typed(self, seqs: list[int], lines: list[bytes], pos: int, received_at: str) -> int:
        """Feed lines through the typed decoder until one is refused or the batch is full; return the position of
        the first line not fed. The checks run over each run of up to TYPED_RUN rows; a row they refuse sends
        its line and the ones after it in the run back (decoded again once that line is fed)."""
        decoder, astuple, name, meta_at = self._decoder, msgspec.structs.astuple, self.name, self._meta_at
        decode, checks = decoder.decode, decoder.checks
        rows, row_lines = self.rows, self.lines
        room = self.policy.batch_size_rows - len(rows)
        bytes_room = self.policy.max_batch_bytes - self.nbytes
        committed, sequence_base, added, end = self.committed_seq, self.sequence_base, 0, len(seqs)
        at: list[int] = []  # the position of each row's line
        # Undeclared keys the decoder reads past come after the columns: such a row is counted, then cut.
        extra_at = len(self._props) if self._undeclared_fields else None
        no_extras = [None] * len(self._undeclared_fields)
        flagged: list[int] = []  # the index in rows of each row whose record carried some
        if meta_at:
            extracted_at, received_at_at, sequence_at, _, deleted_at_at = meta_at
        refused = False
        while not refused and pos < end and room > 0 and added < bytes_room:
            start, stop = len(rows), min(end, pos + TYPED_RUN)
            while pos < stop and room > 0 and added < bytes_room:
                raw = lines[pos]
                try:
                    msg = decode(raw)
                except msgspec.MsgspecError:
                    refused = True
                    break
                if msg.stream != name:
                    refused = True
                    break
                seq = seqs[pos]
                pos += 1
                if seq <= committed:
                    continue  # committed before this worker took the stream over
                row = list(astuple(msg.record))
                if extra_at is not None:
                    if row[extra_at:] != no_extras:
                        flagged.append(len(rows))
                    del row[extra_at:]
                if meta_at:
                    te = msg.time_extracted
                    row[extracted_at] = te if type(te) is str else None
                    row[received_at_at] = received_at
                    row[sequence_at] = sequence_base + seq
                    if type(row[deleted_at_at]) is not str:
                        row[deleted_at_at] = None
                rows.append(row)
                row_lines.append(seq)
                at.append(pos - 1)
                added += len(raw)
                room -= 1
            if checks and len(rows) > start:
                bad = decoder.first_invalid(rows, start)
                if bad is not None:  # that line and the ones after it are fed again
                    back = len(at) - (len(rows) - bad)
                    pos = at[back]
                    added -= sum(len(lines[p]) for p in at[back:])
                    del rows[bad:], row_lines[bad:], at[back:]
                    while flagged and flagged[-1] >= bad:
                        flagged.pop()
                    refused = True
        self._typed_fed += len(at)
        self._undeclared_open += len(flagged)
        if at:
            self.nbytes += added
            self.upto_seq = max(self.upto_seq, seqs[at[-1]])
            if self.oldest_at is None:
                self.oldest_at = self.clock()
        return pos

    def _feed_plain(self, seqs: list[int], lines: list[bytes], pos: int, received_at: str, stop: int) -> int:
        """Feed plain RECORD lines from ``pos`` to at most ``stop``, parsed by orjson and checked by the validator."""
        loads, name, validate, props, meta_at = orjson.loads, self.name, self._validate, self._props, self._meta_at
        declares, knows, flagged = self._declared.issuperset, self._known.issuperset, 0
        transform, dead_letter = self._transform, self._dead_letter
        rows, row_lines = self.rows, self.lines
        room = self.policy.batch_size_rows - len(rows) - len(self.dead)
        bytes_room = self.policy.max_batch_bytes - self.nbytes
        committed, sequence_base, added, upto = self.committed_seq, self.sequence_base, 0, self.upto_seq
        if meta_at:
            extracted_at, received_at_at, sequence_at, _, deleted_at_at = meta_at
        while pos < stop and room > 0 and added < bytes_room:
            raw = lines[pos]
            try:
                obj = loads(raw)
            except orjson.JSONDecodeError:
                break
            if type(obj) is not dict or obj.get("type") != "RECORD" or obj.get("stream") != name \
                    or type(record := obj.get("record")) is not dict or obj.get("version") is not None:
                break
            seq = seqs[pos]
            pos += 1
            if seq <= committed:
                continue  # committed before this worker took the stream over
            if transform is not None or dead_letter:
                record = self._checked(record, seq)
                upto = seq
                if record is None:  # filtered out by the stream map, or a dead letter
                    added += len(raw)
                    room -= 1
                    continue
            elif validate is not None:
                validate(record, name, seq)
            if not declares(record):
                if not knows(record):
                    self._undeclared(record, seq)
                    knows = self._known.issuperset
                flagged += 1
            row = list(map(record.get, props))  # metadata columns have prop None: record.get(None) is None
            if meta_at:
                te = obj.get("time_extracted")
                row[extracted_at] = te if type(te) is str else None
                row[received_at_at] = received_at
                row[sequence_at] = sequence_base + seq
                deleted = record.get("_sdc_deleted_at")
                row[deleted_at_at] = deleted if type(deleted) is str else None
            rows.append(row)
            row_lines.append(seq)
            added += len(raw)
            room -= 1
            upto = seq
        self._undeclared_open += flagged
        self.upto_seq = max(self.upto_seq, upto)
        if added:
            self.nbytes += added
            if self.oldest_at is None:
                self.oldest_at = self.clock()
        return pos

    def _checked(self, record: dict, seq: int) -> dict | None:
        """The record the stream map makes of ``record``, validated; None when the map filters it out or, under
        bad_records=dead_letter, when it fails (the map's expression or the schema) and is set aside."""
        original, stage = record, "map"
        try:
            if self._transform is not None:
                record = self._transform(record, seq)
                if record is None:
                    return None
            stage = "schema"
            if self._validate is not None:
                self._validate(record, self.name, seq)
        except InputError as exc:
            if not self._dead_letter:
                raise
            self._set_aside(original, seq, stage, exc.what)
            return None
        return record

    def _dead_letter_row(self, record: dict, seq: int, reason: str, error: str) -> tuple:
        """A row of the dead-letter table (base.DEAD_LETTER_COLUMNS) for ``record``, of input line ``seq``."""
        return (self.name, seq, self.sequence_base + seq, self.run_id, reason, error,
                orjson.dumps(record, default=str).decode(), _iso(self.wall()))

    def _set_aside(self, record: dict, seq: int, reason: str, error: str) -> None:
        """Keep ``record`` as a dead letter of the open batch."""
        self.dead.append(self._dead_letter_row(record, seq, reason, error))
        if self.oldest_at is None:
            self.oldest_at = self.clock()

    def _changes_schema(self, msg) -> bool:
        return isinstance(msg, Schema) and (self.schema is None or msg.schema != self.schema.schema
                                            or msg.key_properties != self.schema.key_properties)

    def _row(self, record: dict, seq: int, time_extracted: str | None, version: int | None,
             received_at: str) -> list:
        row = list(map(record.get, self._props))  # metadata columns have prop None: record.get(None) is None
        if self._meta_at:
            extracted, received, sequence, version_at, deleted_at = self._meta_at
            row[extracted] = time_extracted
            row[received] = received_at
            row[sequence] = self.sequence_base + seq
            row[version_at] = version
            deleted = record.get("_sdc_deleted_at")
            row[deleted_at] = deleted if isinstance(deleted, str) else None
        return row

    def _add(self, msg: Record, nbytes: int, received_at: str, from_file: bool = False) -> None:
        """Add a record (``from_file``: one of a BATCH message's files, which share its input line, so a record
        of them that fails is not set aside as a dead letter: it fails the run)."""
        if self.spec is None:
            raise InputError("RECORD before any SCHEMA for this stream", line=msg.seq, stream=self.name,
                             hint="The tap must send a SCHEMA message before the stream's records")
        record = msg.record
        if self._transform is not None or (self._dead_letter and not from_file):
            record = self._checked(record, msg.seq)
            if record is None:
                self.nbytes += nbytes
                return
        elif self._validate is not None:
            self._validate(record, self.name, msg.seq)
        if not self._declared.issuperset(record):
            if not self._known.issuperset(record):
                self._undeclared(record, msg.seq)
            self._undeclared_open += 1
        self.rows.append(self._row(record, msg.seq, msg.time_extracted, msg.version, received_at))
        self.lines.append(msg.seq)
        self.nbytes += nbytes
        if self.oldest_at is None:
            self.oldest_at = self.clock()

    def _add_files(self, msg: BatchFiles, received_at: str) -> None:
        if self.spec is None:
            raise InputError("BATCH before any SCHEMA for this stream", line=msg.seq, stream=self.name,
                             hint="The tap must send a SCHEMA message before the stream's batches")
        for url in msg.manifest:
            path = unquote(urlparse(url).path) if url.startswith("file://") else url
            opener = gzip.open if msg.compression == "gzip" else open
            try:
                with opener(path, "rb") as fh:
                    for n, raw in enumerate(fh, 1):
                        if not raw.strip():
                            continue
                        try:
                            record = orjson.loads(raw)
                        except orjson.JSONDecodeError as exc:
                            raise InputError(f"BATCH file {path} line {n}: malformed JSON ({exc})", line=msg.seq,
                                             stream=self.name) from None
                        if not isinstance(record, dict):
                            raise InputError(f"BATCH file {path} line {n}: expected a JSON object", line=msg.seq,
                                             stream=self.name)
                        self._add(Record(self.name, record, msg.seq), len(raw), received_at, from_file=True)
            except OSError as exc:
                raise InputError(f"BATCH file {path} cannot be read: {exc.strerror or exc}", line=msg.seq,
                                 stream=self.name, hint="BATCH files must be readable from every worker host") \
                    from None

    # -- flushing ----------------------------------------------------------------------------------
    def due(self, now: float, pressure: bool) -> str | None:
        if self.in_flight:
            return None  # one commit at a time per stream, in input order
        held = len(self.rows) + len(self.dead)
        reason = flush_reason(self.policy, held, self.nbytes, self.oldest_at, now)
        if reason:
            return reason
        if held and (self.ended or pressure or self.releasing):
            return "end-of-pipe" if self.ended else "backpressure" if pressure else "rebalance"
        if not held and self.upto_seq > self.committed_seq:
            return "offset"
        return None

    def detach(self) -> Callable[[], Drained]:
        """Take the open batch out of the sink; the returned call commits it (in a drain thread) while the
        sink goes on filling the next batch. ``committed`` must follow before the next ``detach``."""
        assert not self.in_flight
        job = functools.partial(self._write, self.spec, self.rows, self.lines, self.nbytes, self.upto_seq,
                                self.settings.load_method == "overwrite" and self.committed_seq == 0,
                                self._scalars_validated, self._undeclared_open, self.dead)
        self.rows, self.lines, self.nbytes, self.oldest_at, self.dead = [], [], 0, None, []
        self._undeclared_open = 0
        self.in_flight = True
        return job

    def _write(self, spec: TableSpec | None, rows: list[list], lines: list[int], nbytes: int, upto: int,
               truncate_first: bool, scalars_validated: bool, undeclared: int, dead: list[tuple]) -> Drained:
        """Write a batch, its dead letters and the offset in one transaction. Under bad_records=dead_letter, a
        record the destination refuses, naming its input line, is set aside as a dead letter and the batch is
        written again without it (up to REFUSALS_PER_BATCH_MAX times)."""
        started = time.perf_counter()
        upsert = bool(spec and spec.key_columns) and self.settings.load_method == "upsert"
        if upsert:
            rows, lines = last_by_key(rows, lines, self._key_index)
        if spec is not None and self._meta_index and rows:
            batched_at = _iso(self.wall())
            i = self._meta_index["_sdc_batched_at"]
            for r in rows:  # rows are lists of this batch alone
                r[i] = batched_at
        refused = 0
        while True:
            # (the destination may free the rows once it has encoded them: it gets a list of its own when a refusal
            # may have to write them again)
            batch = Batch(rows=list(rows) if self._dead_letter else rows, upto_seq=upto, run_id=self.run_id,
                          fence=self.lease.fence, upsert=upsert, truncate_first=truncate_first,
                          first_line=lines[0] if lines else None, lines=lines, scalars_validated=scalars_validated,
                          sequence_base=self.sequence_base, dead_letters=dead)
            n = len(rows)
            if spec is None:
                # Only possible before the stream's first SCHEMA applied (or for a stream the maps leave out):
                # nothing to write, nothing to store.
                if rows:
                    raise InputError("RECORD before any SCHEMA for this stream", line=lines[0], stream=self.name)
                break
            try:
                base.require_keys(spec, batch)
                self.destination.write_batch(spec, batch)
                break
            except DestinationError as exc:
                if not self._dead_letter or exc.transient or exc.line is None or exc.line not in lines:
                    raise
                refused += 1
                if refused > REFUSALS_PER_BATCH_MAX:
                    raise DestinationError(f"more than {REFUSALS_PER_BATCH_MAX} records of one batch were refused "
                                           f"(the last: {exc.what}); fix what the destination refuses",
                                           transient=False, stream=self.name, line=exc.line) from None
                at = lines.index(exc.line)
                row = rows[at]
                rows, lines = rows[:at] + rows[at + 1:], lines[:at] + lines[at + 1:]
                record = {c.prop: v for c, v in zip(spec.columns, row) if c.prop is not None}
                dead = dead + [self._dead_letter_row(record, exc.line, "destination", exc.what)]
                logger.warning("run %s: stream %r: input line %d refused by the destination (%s); set aside in "
                               "the dead-letter table", self.run_id, self.name, exc.line, exc.what)
        return Drained(self, n, upto, nbytes, time.perf_counter() - started, undeclared, len(dead))

    def committed(self, drained: Drained) -> None:
        """Account for a successful drain (called on the worker's main thread)."""
        self.committed_seq = max(self.committed_seq, drained.upto_seq)
        self.rows_committed += drained.rows
        self.undeclared_committed += drained.undeclared
        self.dead_committed += drained.dead_letters
        if drained.dead_letters:
            metrics.DEAD_LETTERS.labels(self.run_id, self.name).inc(drained.dead_letters)
        metrics.ROWS_LOADED.labels(self.run_id, self.name).inc(drained.rows)
        metrics.BYTES_LOADED.labels(self.run_id, self.name).inc(drained.nbytes)
        metrics.DRAIN_SECONDS.labels(self.name).observe(drained.seconds)
        self.in_flight = False
        self._stalled = False

    def drain_now(self) -> Drained:
        """Commit the open batch on this thread (nothing may be in flight)."""
        drained = self.detach()()
        self.committed(drained)
        return drained

    def _activate(self, msg: ActivateVersion) -> None:
        if self.spec is None:
            raise InputError("ACTIVATE_VERSION before any SCHEMA for this stream", line=msg.seq, stream=self.name)
        self.destination.activate_version(self.spec, msg.version, run_id=self.run_id, upto_seq=msg.seq,
                                          fence=self.lease.fence, hard_delete=self.settings.hard_delete,
                                          deleted_at=_iso(self.wall()))
        self.committed_seq = max(self.committed_seq, msg.seq)

    def ackable(self) -> list[PendingEntry]:
        """Pop the entries whose every message is committed."""
        out = []
        while self.pending and self.pending[0].last_seq <= self.committed_seq:
            out.append(self.pending.popleft())
        return out

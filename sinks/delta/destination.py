"""Delta Lake destination (``deltalake`` 1.x with pyarrow), on a local folder or on S3.

Where rows go: one Delta table per stream at ``<delta_uri>/<table>``, or ``<delta_uri>/<schema>/<table>`` when
``default_target_schema`` is set (both names by the naming rule of ``sinks/names.py``, 128 bytes at most).
On S3, commits are put-if-absent writes of the next log file (S3's conditional writes, ``If-None-Match``), which
deltalake 1.x uses without a lock; ``AWS_S3_ALLOW_UNSAFE_RENAME``, which turns off conflict detection, is
refused.

How the rules are kept (class (b), atomic commit; ``sinks/base.py``). A Delta commit is one table's next log
file, written only if absent: rows and everything else in it become visible together, or not at all. Every
commit of a stream's rows carries, in that same log file, two application transaction ids (``txn``), which the
table's snapshot keeps for good (checkpoints included):

- ``singer-ingest/<run>/<stream>`` with version = the stream's committed offset (highest input sequence);
- ``singer-ingest/<run>/<stream>#fence`` with version = the fencing token of the owner that committed.

The commit's metadata (``commitInfo``) repeats both for people reading the history. Then:

- Nothing lost: the offset moves only in the commit that holds the rows.
- Nothing doubled: ``write_batch`` reads the offset from the table's snapshot and skips a batch it covers (a
  retry after a lost acknowledgement: ``base.committed_before``).
- Fenced: ``write_batch`` reads the fence from the same snapshot, refuses a lower token (``Fenced``), and commits
  on that snapshot. ``claim_stream`` on an existing table commits the new fence to the table's log (a commit
  with no files, the offset unchanged). Two commits carrying the same application id conflict (Delta's
  "concurrent transaction" check, which deltalake runs against every commit that won since the snapshot was
  read), so a rows commit racing a claim fails instead of landing after it; it is retried from a fresh snapshot,
  which then holds the new fence and refuses it. A commit by another writer (an append, a compaction) is checked
  the same way and retried by deltalake, or by this module after a conflict: never overwritten.
- A claim before the table exists (a stream is claimed before its first SCHEMA) cannot commit to the table, so
  it goes to the claims table ``<root>/_singer_ingest_claims`` (one row per claim, the same ``#fence`` txn), and
  the claim then looks again: if the table exists by now, the claim commits to it as well. ``write_batch`` reads
  the claims table whenever the stream table holds no fence of the (run, stream) yet. Why that is enough: a claim
  that found no table wrote the claims table before it looked; the table was created after it looked; a stale
  owner's first commit reads its snapshot, then the claims table, both after the table was created, so it sees
  that claim. From then on the stream table holds a fence, and every later claim finds the table and commits
  there, where the conflict check covers it.

Dead letters (``Batch.dead_letters``) go to the Delta table ``<root>/_singer_ingest_dead_letter`` (beside the
stream tables, created on first use by ``ensure_table``; a creation race between workers meets on one table as
for any table). A Delta commit holds one table, so the dead letters cannot share the rows' commit. They are
committed first, in one append to the dead-letter table that carries that table's own application transaction
``singer-ingest/<run>/<stream>`` with version = the batch's offset (``upto_seq``); then the rows' commit follows as
above. Before committing, ``write_batch`` reads that version from the dead-letter table's snapshot and keeps only
the dead letters of input lines above it (all of them, or none, for a batch written before). Why that is exact:

- Nothing lost: the rows' commit, which moves the stream's offset, comes after the dead letters' commit; a
  crash before it leaves the offset where it was, so the batch is delivered and written again.
- Nothing twice: a crash (or a conflict, or a lost answer) between the two commits leaves the dead letters
  committed with their version; the retry finds that version covering the batch, writes no dead letter, and
  commits only the rows. A retry after both commits is skipped whole by the stream's offset, as before.
- Two owners of a stream (a stale one and the one that took over) commit to the dead-letter table under the
  same application id, so two such commits made on the same snapshot conflict, and the loser re-reads. A stale
  owner is refused by the fence before its rows commit, but its dead letters may have committed by then: they are
  the dead letters of the same input lines the new owner meets again, and the new owner, reading the version
  the stale one committed, keeps only the lines above it, so each line's dead letter is there once. (Filtering by
  line, not skipping whole batches, is what makes this hold when the two owners cut their batches differently.)
- Workers and drain threads of other streams append to the dead-letter table at the same time: appends under
  different application ids do not conflict; a commit that does conflict is retried from a fresh snapshot,
  like every commit here, never overwritten.

Load path of a batch: the batch as one Arrow table (``Batch.arrow``), written as Parquet files as large as the
batch (``write_deltalake``, append); keyed streams ``merge`` on the key columns, a stored row replaced only by a
row with an equal or higher ``_sdc_sequence`` (a batch holding a key twice keeps its last row first);
``overwrite`` (the load method) replaces the table's files in the run's first commit. ACTIVATE_VERSION is a
``delete`` (hard) or an ``update`` of ``_sdc_deleted_at`` (soft) of the rows of older versions, carrying the
offset; an operation that changes no file commits the offset alone.

Types: integer long, number double, string string, boolean boolean, date-time timestamp (UTC, microseconds),
date date, time string (Delta has no time type; ISO text as given), JSON string holding the JSON text (objects
and arrays are JSON text rather than structs: a struct's fields would have to follow every schema change, and
every reader parses JSON text: DuckDB's ``json`` functions, Spark's ``from_json``, Trino's ``json_parse``).
Each column's logical type is kept in the Delta schema's column metadata (``singer_ingest.logical_type``), so
a JSON column is told from a string column.

Schema evolution never drops a column: new columns are added to the table's schema (``alter.add_columns``,
nullable). A type that widens (integer to number, anything to string or JSON) is a rewrite: Delta cannot change
a column's type in place, so the table is read, the column converted (integers to doubles: each value a double
holds, 2**53 and beyond rounded as a double does; strings to JSON strings; other values to their text or JSON
form) and written back with the new schema in one overwrite commit; the table's txn ids survive it. A rewrite
costs a read and a write of the whole table, once per widened schema. (The rewrite replaces the files of the
snapshot it read; a file another writer appended meanwhile stays as that writer wrote it. The stream's own rows
cannot race it: the owner changes a table between its batches, and a stale owner is fenced out by the claim.)

Errors: a commit conflict and a storage failure (network, throttling, a server error) are transient and retried
with backoff from a fresh snapshot; a value Arrow or Delta refuses fails the run naming the stream. Credentials
are worker settings, never logged and never in an error message.
"""

from __future__ import annotations

import logging
import os
import threading
from datetime import datetime, timezone
from typing import Any, Callable

import orjson
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import CommitProperties, DeltaTable, Field, Transaction, write_deltalake
from deltalake.exceptions import CommitFailedError, DeltaError, DeltaProtocolError, SchemaMismatchError, \
    TableNotFoundError

from ingest.config import ConnectionSettings, RunSettings
from ingest.errors import ConfigError, DestinationError, Fenced

from .. import base
from ..base import Batch, Column, TableSpec
from ..columnar import arrow_table
from ..names import normalise
from ..retry import with_retries

logger = logging.getLogger(__name__)

CLAIMS_TABLE = "_singer_ingest_claims"
LOGICAL_KEY = "singer_ingest.logical_type"
APP_PREFIX = "singer-ingest"
FENCE_SUFFIX = "#fence"
MAX_IDENTIFIER_BYTES = 128
DEAD_LETTER_LINE = [c.name for c in base.DEAD_LETTER_COLUMNS].index("line")  # a dead letter's input line

PHYSICAL = {
    base.INTEGER: pa.int64(), base.NUMBER: pa.float64(), base.STRING: pa.string(), base.BOOLEAN: pa.bool_(),
    base.TIMESTAMP: pa.timestamp("us", tz="UTC"), base.DATE: pa.date32(), base.TIME: pa.string(),
    base.JSON: pa.string(),
}
# A table made elsewhere (no logical types in its metadata): its Delta types read as logical types.
FROM_DELTA = {
    "long": base.INTEGER, "integer": base.INTEGER, "short": base.INTEGER, "byte": base.INTEGER,
    "double": base.NUMBER, "float": base.NUMBER, "string": base.STRING, "boolean": base.BOOLEAN,
    "timestamp": base.TIMESTAMP, "timestamp_ntz": base.TIMESTAMP, "date": base.DATE,
}
# Words in deltalake's messages of failures that a retry may get past.
TRANSIENT_WORDS = ("conflict", "concurrent", "timed out", "timeout", "connection", "dispatch", "slowdown",
                   "slow down", "service unavailable", "internal error", "throttl", "temporarily", "broken pipe",
                   "reset by peer")


def quote(ident: str) -> str:
    """Quote a column name in a deltalake predicate (DataFusion SQL). Every identifier goes through here."""
    return '"' + ident.replace('"', '""') + '"'


def app_id(run_id: str, stream: str) -> str:
    return f"{APP_PREFIX}/{run_id}/{stream}"


def storage_options(connection: ConnectionSettings) -> dict[str, str]:
    opts: dict[str, str] = {}
    for setting, key in (("delta_s3_endpoint_url", "AWS_ENDPOINT_URL"), ("delta_s3_region", "AWS_REGION"),
                         ("delta_s3_access_key_id", "AWS_ACCESS_KEY_ID"),
                         ("delta_s3_secret_access_key", "AWS_SECRET_ACCESS_KEY"),
                         ("delta_s3_session_token", "AWS_SESSION_TOKEN")):
        value = connection.option(setting)
        if value:
            opts[key] = value
    if connection.option("delta_s3_allow_http"):
        opts["AWS_ALLOW_HTTP"] = "true"
    return opts


def open_destination(run: RunSettings, connection: ConnectionSettings, *, embedded: bool) -> "DeltaDestination":
    uri = run.option("delta_uri")
    if not uri:
        raise ConfigError("the delta destination needs delta_uri (a local folder or s3://bucket/prefix) in the "
                          "target config")
    if os.environ.get("AWS_S3_ALLOW_UNSAFE_RENAME", "").strip().lower() in ("1", "true", "yes", "on"):
        raise ConfigError("AWS_S3_ALLOW_UNSAFE_RENAME is set in the worker's environment; it turns off Delta's "
                          "conflict detection on S3, which the delta destination relies on to stay exact. Unset it "
                          "(deltalake 1.x commits to S3 with conditional writes, no lock needed)")
    return DeltaDestination(uri, run.default_target_schema, storage_options(connection))


class DeltaDestination(base.Destination):
    max_identifier_bytes = MAX_IDENTIFIER_BYTES

    def __init__(self, uri: str, schema: str | None = None, options: dict[str, str] | None = None, *,
                 retry_deadline_seconds: float = 300.0):
        root = uri.rstrip("/")
        if "://" not in root:
            root = os.path.abspath(root)
        if schema:
            root = f"{root}/{normalise(schema, MAX_IDENTIFIER_BYTES)}"
        self.root = root
        self.schema = schema
        self.options = dict(options or {})
        self.retry_deadline_seconds = retry_deadline_seconds
        self._tables: dict[str, DeltaTable] = {}  # the last snapshot of each table, kept between batches
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()

    # -- helpers -----------------------------------------------------------------------------------
    def uri(self, table: str) -> str:
        return f"{self.root}/{table}"

    def _fresh(self, table: str) -> DeltaTable | None:
        try:
            return DeltaTable(self.uri(table), storage_options=self.options or None)
        except TableNotFoundError:
            return None

    def _load(self, table: str) -> DeltaTable | None:
        """The table's latest snapshot (None: no table). A table read before is brought up to date by reading the
        commits since (``update_incremental``), not the whole log again: on S3 every log file is a request."""
        dt = self._tables.get(table)
        if dt is None:
            dt = self._fresh(table)
            if dt is not None:
                self._tables[table] = dt
            return dt
        dt.update_incremental()
        return dt

    def _lock(self, table: str) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault(table, threading.Lock())

    def _run(self, stream: str | None, table: str, what: str, fn: Callable[[], Any]) -> Any:
        def attempt():
            with self._lock(table):
                try:
                    return fn()
                except BaseException as exc:
                    self._tables.pop(table, None)  # read it afresh next time
                    if isinstance(exc, (DeltaError, OSError, pa.ArrowException)) and \
                            not isinstance(exc, DestinationError):
                        raise _translate(exc, stream) from exc
                    raise

        return with_retries(attempt, what=what, deadline_seconds=self.retry_deadline_seconds)

    @staticmethod
    def _props(run_id: str, stream: str, seq: int, fence: int) -> CommitProperties:
        app = app_id(run_id, stream)
        return CommitProperties(
            custom_metadata={"singer_ingest.run_id": run_id, "singer_ingest.stream": stream,
                             "singer_ingest.offset": str(seq), "singer_ingest.fence": str(fence)},
            app_transactions=[Transaction(app, seq), Transaction(app + FENCE_SUFFIX, fence)])

    def _claimed_fence(self, run_id: str, stream: str) -> tuple[DeltaTable | None, int]:
        claims = self._fresh(CLAIMS_TABLE)  # read by several drain threads: not kept
        if claims is None:
            return None, 0
        return claims, claims.transaction_version(app_id(run_id, stream) + FENCE_SUFFIX) or 0

    def _stored(self, dt: DeltaTable, run_id: str, stream: str) -> tuple[int, int]:
        """(offset, fence) of (run, stream): from the table's snapshot; the fence from the claims table while the
        table holds none of this (run, stream) (module docstring)."""
        app = app_id(run_id, stream)
        seq = dt.transaction_version(app) or 0
        fence = dt.transaction_version(app + FENCE_SUFFIX)
        if fence is None:
            fence = self._claimed_fence(run_id, stream)[1]
        return seq, fence

    @staticmethod
    def _check_fence(stream: str, stored: int, fence: int) -> None:
        if stored > fence:
            raise Fenced(f"stream {stream!r}: another worker took this stream over (fence {stored} > {fence})")

    def _commit_offset(self, dt: DeltaTable, props: CommitProperties) -> None:
        """A commit of the offset and fence alone (no files), on the snapshot ``dt`` was read at."""
        dt.create_write_transaction([], mode="append", schema=dt.schema(), commit_properties=props)

    # -- the interface -----------------------------------------------------------------------------
    def claim_stream(self, run_id: str, stream: str, fence: int) -> int:
        table = normalise(stream, MAX_IDENTIFIER_BYTES)

        def on_table(dt: DeltaTable) -> int:
            seq, stored = self._stored(dt, run_id, stream)
            self._check_fence(stream, stored, fence)
            self._commit_offset(dt, self._props(run_id, stream, seq, fence))
            return seq

        def fn() -> int:
            dt = self._load(table)
            if dt is not None:
                return on_table(dt)
            claims, stored = self._claimed_fence(run_id, stream)
            self._check_fence(stream, stored, fence)
            row = pa.table({"run_id": pa.array([run_id], pa.string()), "stream": pa.array([stream], pa.string()),
                            "fence": pa.array([fence], pa.int64()),
                            "claimed_at": pa.array([datetime.now(timezone.utc)], pa.timestamp("us", tz="UTC"))})
            write_deltalake(claims if claims is not None else self.uri(CLAIMS_TABLE), row, mode="append",
                            storage_options=None if claims is not None else self.options or None,
                            commit_properties=CommitProperties(
                                custom_metadata={"singer_ingest.run_id": run_id, "singer_ingest.stream": stream,
                                                 "singer_ingest.fence": str(fence)},
                                app_transactions=[Transaction(app_id(run_id, stream) + FENCE_SUFFIX, fence)]))
            dt = self._load(table)  # created meanwhile: the claim goes to the table's log as well
            return on_table(dt) if dt is not None else 0

        return self._run(stream, table, f"claim stream {stream!r}", fn)

    def _existing(self, dt: DeltaTable, spec: TableSpec) -> TableSpec:
        cols = []
        for f in dt.schema().fields:
            logical = (f.metadata or {}).get(LOGICAL_KEY)
            if logical is None:
                logical = FROM_DELTA.get(getattr(f.type, "type", ""), base.JSON)
            cols.append(Column(f.name, None, logical))
        return TableSpec(spec.stream, spec.table, spec.schema_name, tuple(cols), spec.key_columns, spec.metadata)

    def ensure_table(self, spec: TableSpec) -> TableSpec:
        def fn() -> TableSpec:
            dt = self._load(spec.table)
            if dt is None:
                try:
                    DeltaTable.create(self.uri(spec.table), schema=arrow_schema(spec.columns), mode="error",
                                      storage_options=self.options or None)
                except DeltaError as exc:
                    if self._fresh(spec.table) is None:
                        raise
                    raise DestinationError(f"Delta table {spec.table} was created by another writer meanwhile; "
                                           f"reading it again", transient=True, stream=spec.stream) from exc
                logger.info("stream %r: created Delta table %s", spec.stream, spec.table)
                return spec
            existing = self._existing(dt, spec)
            merged, add, change = base.merge_specs(existing, spec)
            if change:
                self._rewrite(dt, existing, merged)
                for c in change:
                    logger.info("stream %r: widened column %s to %s (table rewritten)", spec.stream, c.name, c.type)
            elif add:
                dt.alter.add_columns([Field(c.name, _delta_type(c.type), nullable=True,
                                            metadata={LOGICAL_KEY: c.type}) for c in add])
                for c in add:
                    logger.info("stream %r: added column %s %s", spec.stream, c.name, c.type)
            return merged

        return self._run(spec.stream, spec.table, f"set up table for stream {spec.stream!r}", fn)

    def _rewrite(self, dt: DeltaTable, existing: TableSpec, merged: TableSpec) -> None:
        """The table with every column in its merged type, in one overwrite commit."""
        data = dt.to_pyarrow_table()
        old = {c.name: c.type for c in existing.columns}
        arrays = []
        for c in merged.columns:
            if c.name not in old:
                arrays.append(pa.nulls(data.num_rows, PHYSICAL[c.type]))
            elif old[c.name] == c.type:
                arrays.append(data.column(c.name).cast(PHYSICAL[c.type]))
            else:
                arrays.append(_convert(data.column(c.name), old[c.name], c.type))
        table = pa.Table.from_arrays(arrays, schema=arrow_schema(merged.columns))
        write_deltalake(dt, table, mode="overwrite", schema_mode="overwrite")

    def _write_dead_letters(self, stream: str, batch: Batch) -> None:
        """Commit the batch's dead letters to the dead-letter table with its own txn (run, stream) -> upto_seq,
        leaving out those of lines that version already covers (module docstring). Called inside the stream's
        ``_run``: an error here (a conflict among them) retries the whole ``write_batch``."""
        app = app_id(batch.run_id, stream)
        table = base.DEAD_LETTER_TABLE
        with self._lock(table):  # the dead-letter table's snapshot is shared by the drain threads
            try:
                dt = self._load(table)
                if dt is None:
                    raise DestinationError(f"Delta table {table} is gone (deleted while the run went on?); rerun "
                                           f"the tap", transient=False, stream=stream)
                written = dt.transaction_version(app) or 0
                letters = [letter for letter in batch.dead_letters if letter[DEAD_LETTER_LINE] > written]
                if not letters:
                    logger.info("stream %r: the dead letters up to input line %d were committed by an earlier "
                                "attempt; not written again", stream, batch.upto_seq)
                    return
                props = CommitProperties(
                    custom_metadata={"singer_ingest.run_id": batch.run_id, "singer_ingest.stream": stream,
                                     "singer_ingest.offset": str(batch.upto_seq),
                                     "singer_ingest.fence": str(batch.fence)},
                    app_transactions=[Transaction(app, batch.upto_seq)])
                write_deltalake(dt, arrow_table(base.dead_letter_spec(self.schema), letters), mode="append",
                                commit_properties=props)
            except BaseException:
                self._tables.pop(table, None)  # read it afresh next time
                raise

    def write_batch(self, spec: TableSpec, batch: Batch) -> None:
        keyed = batch.upsert and bool(spec.key_columns)
        physical = physical_spec(spec)
        if batch.dead_letters:
            self.dead_letter_table(self.schema)

        def fn() -> None:
            dt = self._load(spec.table)
            if dt is None:
                raise DestinationError(f"Delta table {spec.table} is gone (deleted while the run went on?); it "
                                       f"is created when the stream's SCHEMA applies: rerun the tap",
                                       transient=False, stream=spec.stream)
            seq, stored = self._stored(dt, batch.run_id, spec.stream)
            self._check_fence(spec.stream, stored, batch.fence)
            if base.committed_before(seq, spec.stream, batch.upto_seq, batch.has_writes):
                return
            if batch.dead_letters:
                self._write_dead_letters(spec.stream, batch)
            props = self._props(batch.run_id, spec.stream, max(seq, batch.upto_seq), batch.fence)
            version = dt.version()
            if batch.truncate_first:
                write_deltalake(dt, self._data(physical, batch, keyed), mode="overwrite", commit_properties=props)
            elif batch.rows and keyed:
                self._merge(dt, spec, self._data(physical, batch, keyed), props)
            elif batch.rows:
                write_deltalake(dt, self._data(physical, batch, keyed), mode="append", commit_properties=props)
            if dt.version() == version:  # nothing changed a file: the offset commits alone
                self._commit_offset(dt, props)

        self._run(spec.stream, spec.table, f"write batch of stream {spec.stream!r}", fn)

    @staticmethod
    def _data(physical: TableSpec, batch: Batch, keyed: bool) -> pa.Table:
        if keyed:
            rows, _ = base.last_by_sequence(physical, batch.rows, batch.lines)
            if rows is not batch.rows:  # a key twice in the batch: the merge takes one row per key
                return arrow_table(physical, rows)
        return batch.arrow(physical)

    def _merge(self, dt: DeltaTable, spec: TableSpec, data: pa.Table, props: CommitProperties) -> None:
        on = " AND ".join(f"t.{quote(k)} = s.{quote(k)}" for k in spec.key_columns)
        merger = dt.merge(data, predicate=on, source_alias="s", target_alias="t", commit_properties=props)
        if spec.metadata:
            seq = quote(base.SEQUENCE_COLUMN)
            merger = merger.when_matched_update_all(predicate=f"t.{seq} IS NULL OR s.{seq} >= t.{seq}")
        else:
            merger = merger.when_matched_update_all()
        merger.when_not_matched_insert_all().execute()

    def activate_version(self, spec: TableSpec, version: int, *, run_id: str, upto_seq: int, fence: int,
                         hard_delete: bool, deleted_at: str) -> None:
        if not spec.metadata:
            logger.warning("stream %r: ACTIVATE_VERSION ignored: add_record_metadata is off, so rows carry "
                           "no _sdc_table_version", spec.stream)
        ver, deleted = quote(base.VERSION_COLUMN), quote(base.DELETED_COLUMN)
        older = f"({ver} IS NULL OR {ver} < {int(version)})"
        when = datetime.fromisoformat(deleted_at.replace("Z", "+00:00"))
        when = when if when.tzinfo else when.replace(tzinfo=timezone.utc)

        def fn() -> None:
            dt = self._load(spec.table)
            if dt is None:
                raise DestinationError(f"Delta table {spec.table} is gone (deleted while the run went on?)",
                                       transient=False, stream=spec.stream)
            seq, stored = self._stored(dt, run_id, spec.stream)
            self._check_fence(spec.stream, stored, fence)
            props = self._props(run_id, spec.stream, max(seq, upto_seq), fence)
            before = dt.version()
            if spec.metadata:
                if hard_delete:
                    dt.delete(older, commit_properties=props)
                else:
                    dt.update(new_values={base.DELETED_COLUMN: when}, predicate=f"{older} AND {deleted} IS NULL",
                              commit_properties=props)
            if dt.version() == before:
                self._commit_offset(dt, props)

        self._run(spec.stream, spec.table, f"activate version {version} of stream {spec.stream!r}", fn)

    def close(self) -> None:
        self._tables.clear()


# -- types and values -------------------------------------------------------------------------------------------
def _delta_type(logical: str):
    from deltalake.schema import PrimitiveType

    return PrimitiveType({base.INTEGER: "long", base.NUMBER: "double", base.STRING: "string",
                          base.BOOLEAN: "boolean", base.TIMESTAMP: "timestamp", base.DATE: "date",
                          base.TIME: "string", base.JSON: "string"}[logical])


def arrow_schema(columns: tuple[Column, ...]) -> pa.Schema:
    return pa.schema([pa.field(c.name, PHYSICAL[c.type], nullable=True, metadata={LOGICAL_KEY: c.type})
                      for c in columns])


def physical_spec(spec: TableSpec) -> TableSpec:
    """The spec ``Batch.arrow`` builds the batch from: time columns as their ISO text."""
    cols = tuple(Column(c.name, c.prop, base.STRING if c.type == base.TIME else c.type) for c in spec.columns)
    return TableSpec(spec.stream, spec.table, spec.schema_name, cols, spec.key_columns, spec.metadata)


def _text(value: Any, logical: str) -> str | None:
    if value is None:
        return None
    if logical == base.BOOLEAN:
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def _convert(column: pa.ChunkedArray, old: str, new: str) -> pa.Array:
    """A column's values in a wider logical type (base.widen): integer to number, anything to string or JSON."""
    if new == base.NUMBER:
        return pc.cast(column, pa.float64(), safe=False).combine_chunks()
    values = column.to_pylist()
    if new == base.JSON:
        if old == base.STRING or old == base.TIME:
            out = [None if v is None else orjson.dumps(v).decode() for v in values]
        else:
            out = [None if v is None else orjson.dumps(v if not hasattr(v, "isoformat") else v.isoformat()).decode()
                   for v in values]
        return pa.array(out, pa.string())
    return pa.array([_text(v, old) for v in values], pa.string())



def _translate(exc: BaseException, stream: str | None) -> DestinationError:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, CommitFailedError):
        return DestinationError(f"Delta commit conflict, retried from a fresh snapshot: {text}", transient=True,
                                stream=stream)
    if isinstance(exc, (SchemaMismatchError, DeltaProtocolError, pa.ArrowException)):
        return DestinationError(f"Delta: {text}", transient=False, stream=stream)
    lowered = text.lower()
    transient = isinstance(exc, OSError) or any(w in lowered for w in TRANSIENT_WORDS)
    return DestinationError(f"Delta: {text}", transient=transient, stream=stream)

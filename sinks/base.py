"""The sink interface every destination implements, and the pure logic they share.

How a destination keeps the product's rules (DESIGN.md 3-5: nothing lost, nothing doubled, STATE never ahead
of the data, a stale owner fenced out). The worker's side is the same for every store: a Redis entry is
acknowledged, and a STATE released, only after ``write_batch`` (or ``activate_version``) returned for every
message before it; a stream is owned by one worker at a time under a lease whose *fencing token* (``fence``)
rises with each new owner; a new owner asks ``claim_stream`` for the stream's committed offset and skips
every message at or below it. What differs is how the store makes "rows written" and "offset written" one
fact. Each destination declares its class (``sinks.kit.DestinationPlugin.exactness``):

(a) ``transactional``, SQL databases with transactions (PostgreSQL, DuckDB, MySQL/MariaDB, Snowflake,
    Redshift). An offsets table holds (run, stream) -> (offset, fence). ``write_batch`` locks that row, refuses a
    fence lower than the stored one (``Fenced``), writes the rows and raises the offset in ONE transaction.
    Lost: nothing, the offset moves only with the rows. Doubled: a redelivered batch is at or below the stored
    offset (``committed_before`` skips it, also when a COMMIT went through but its acknowledgement was lost).
    Fenced: the stale owner's transaction sees the raised fence under the row lock and writes nothing. DDL that
    commits implicitly (MySQL, Snowflake) stays out of the batch transaction: ``ensure_table`` runs on its own and
    only adds or widens, so running it twice is harmless.

(b) ``atomic-commit``, stores whose one atomic commit can carry the offset with the rows (Delta Lake: the
    transaction log's application transaction id ``txn`` {appId: run/stream, version: offset} and the commit's
    metadata carry offset and fence; BigQuery: a multi-statement transaction, or a load job with a
    deterministic job id, that writes the rows and the offsets table together). ``claim_stream`` reads the
    offset from the store's own log and records the new fence there (a commit of its own); ``write_batch`` reads
    the latest committed offset and fence, refuses a stale fence, and commits rows and offset in one commit that
    fails on a concurrent commit (optimistic concurrency: the store's conflict detection, never an overwrite),
    then re-reads and decides again. Lost, doubled and fenced then follow as in (a).

(c) ``idempotent``, document stores without multi-document transactions at this scale (MongoDB,
    Elasticsearch/OpenSearch). A document's id is derived from the stream's key properties, or from its
    ``_sdc_sequence`` (``Batch.sequences``) for keyless streams, so writing a batch twice writes the same
    documents. A write replaces a document only if the stored one has a lower or equal ``_sdc_sequence``
    (MongoDB: a replace filtered on the sequence; Elasticsearch: external versioning with the sequence as
    version), so a late write of a stale owner can never bring back an older record. ``write_batch`` writes the
    documents, then the offset document, only if the stored fence is not higher (``Fenced`` otherwise). Lost:
    nothing, the offset is written after the documents. Doubled: a replay rewrites the same ids. STATE: as for
    every class, released only after ``write_batch`` returned. What this class cannot give: a reader may see a
    batch half written while it is being written (no transaction), and ``committed_before`` cannot skip a
    batch whose offset write was lost (it is written again, to the same ids).

A destination is opened once per worker (``Destination``) and is used from several drain threads at
once, each thread working on a different table. Its methods:

- ``claim_stream(run_id, stream, fence) -> int``: in one transaction, raise the stream's fencing token
  to ``fence`` and return the highest sequence committed for (run, stream) (0 if none). A later
  commit carrying a lower token is refused (``Fenced``): a worker that lost its lease cannot commit.
- ``ensure_table(spec) -> TableSpec``: create the table, or add the columns it lacks and widen the
  types that no longer fit; never drops a column. Returns the spec of the table as it now is.
- ``write_batch(spec, batch)``: write the rows and the stream's new offset in one transaction; a batch
  the stored offset already covers is not written again (``committed_before(..., batch.has_writes)``). The
  batch's ``dead_letters`` (rows of ``dead_letter_spec``) go into the dead-letter table in that same commit
  (the idempotent class: as documents whose id is (stream, _sdc_sequence), written before the offset; Delta:
  a commit of the dead-letter table carrying its own ``txn`` version for (run, stream), made before the rows'
  commit and skipped when that version already covers the batch). A batch may hold dead letters and no rows.
- ``activate_version(spec, version, ...)``: delete or soft-delete rows of other versions, with the
  offset, in one transaction.
- ``close()``.

Rows arrive as tuples in ``spec.columns`` order, already validated, deduplicated by key (last by
sequence wins) and converted to the logical types below. Each destination maps logical types to its
own column types.
"""

from __future__ import annotations

import abc
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from ingest.errors import DestinationError, InputError

from .names import normalise, normalise_all

logger = logging.getLogger(__name__)

# Logical column types.
INTEGER = "integer"
NUMBER = "number"
STRING = "string"
BOOLEAN = "boolean"
TIMESTAMP = "date-time"
DATE = "date"
TIME = "time"
JSON = "json"

METADATA_COLUMNS = (
    ("_sdc_extracted_at", TIMESTAMP),
    ("_sdc_received_at", TIMESTAMP),
    ("_sdc_batched_at", TIMESTAMP),
    ("_sdc_deleted_at", TIMESTAMP),
    ("_sdc_sequence", INTEGER),
    ("_sdc_table_version", INTEGER),
)
SEQUENCE_COLUMN = "_sdc_sequence"
DELETED_COLUMN = "_sdc_deleted_at"
VERSION_COLUMN = "_sdc_table_version"


@dataclass(frozen=True)
class Column:
    name: str            # identifier in the destination (normalised)
    prop: str | None     # JSON property it comes from (None for metadata columns)
    type: str            # logical type
    # A number column whose schema gives a decimal scale (``multipleOf`` 0.01, 0.001, ... as decimal-typed taps
    # emit): its number of places; a destination with a decimal type may keep such values as decimals.
    scale: int | None = field(default=None, compare=False)


@dataclass(frozen=True)
class TableSpec:
    stream: str
    table: str
    schema_name: str | None
    columns: tuple[Column, ...]
    key_columns: tuple[str, ...]
    metadata: bool

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    def index(self, name: str) -> int:
        return self.column_names.index(name)


@dataclass
class Batch:
    """Rows of one stream to commit together with the stream's offset."""

    rows: list[tuple]
    upto_seq: int                 # highest input sequence this commit covers
    run_id: str
    fence: int
    upsert: bool                  # keyed stream with the upsert load method
    truncate_first: bool = False  # overwrite load method: first commit of the stream in this run
    first_line: int | None = None  # input line of the first row, for error messages
    lines: list[int] = field(default_factory=list)  # input line of each row
    scalars_validated: bool = False  # every value of a non-JSON column was validated as a JSON scalar (or null)
    sequence_base: int = 0        # the run's sequence base: a row's _sdc_sequence is sequence_base + its line
    # Records set aside under ``bad_records: dead_letter``: rows of ``dead_letter_spec`` to write into the
    # dead-letter table in the SAME commit as ``rows`` and the stream's offset (the module docstring).
    dead_letters: list[tuple] = field(default_factory=list)

    _arrow: Any = field(default=None, repr=False, compare=False)

    def arrow(self, spec: "TableSpec"):
        """The rows as a ``pyarrow.Table`` (sinks/columnar.py), built on first use and kept for the batch."""
        if self._arrow is None:
            from .columnar import arrow_table

            self._arrow = arrow_table(spec, self.rows)
        return self._arrow

    @property
    def has_writes(self) -> bool:
        """Whether this commit writes anything besides the offset: rows or dead letters."""
        return bool(self.rows or self.dead_letters)

    @property
    def sequences(self) -> list[int]:
        """Each row's ``_sdc_sequence``, also when the rows carry no metadata columns: the stable id of a keyless
        row for idempotent stores."""
        return [self.sequence_base + line for line in self.lines]


# The dead-letter table (``bad_records: dead_letter``): one row per record that failed its schema or that the
# destination refused, written in the same commit as its batch and the stream's offset, so that it is exact like
# the rows (never lost, never twice). Keyed by (stream, _sdc_sequence): an idempotent store derives the
# document id from that pair; ``record`` is the record's JSON text as it came in.
DEAD_LETTER_TABLE = "_singer_ingest_dead_letter"
DEAD_LETTER_COLUMNS = (
    Column("stream", None, STRING),
    Column("line", None, INTEGER),           # input line of the RECORD message
    Column("_sdc_sequence", None, INTEGER),   # sequence_base + line: unique across runs of the same tap
    Column("run_id", None, STRING),
    Column("reason", None, STRING),          # "schema" (failed validation), "map" (a stream map's expression
                                             # failed on it) or "destination" (refused by the store)
    Column("error", None, STRING),
    Column("record", None, STRING),          # the record as JSON text
    Column("failed_at", None, TIMESTAMP),
)


def dead_letter_spec(schema_name: str | None) -> TableSpec:
    """The dead-letter table's spec; the same table holds the dead letters of every stream of every run."""
    return TableSpec(stream=DEAD_LETTER_TABLE, table=DEAD_LETTER_TABLE, schema_name=schema_name,
                     columns=DEAD_LETTER_COLUMNS, key_columns=("stream", "_sdc_sequence"), metadata=False)


def types_of(prop: dict) -> list[str]:
    """The JSON types a property allows, from its "type" or from its anyOf/oneOf branches."""
    t = prop.get("type")
    if isinstance(t, str):
        return [t]
    if isinstance(t, list):
        return [x for x in t if isinstance(x, str)]
    for comb in ("anyOf", "oneOf"):
        if isinstance(prop.get(comb), list):
            out: list[str] = []
            for sub in prop[comb]:
                if isinstance(sub, dict):
                    for x in types_of(sub):
                        if x not in out:
                            out.append(x)
                    if sub.get("format") in (TIMESTAMP, DATE, TIME) and len(prop[comb]) <= 2:
                        return ["string"] if "string" in out else out
            return out
    return []


def logical_type(prop: dict) -> str:
    """The logical column type of a JSON schema property."""
    if not isinstance(prop, dict):
        return JSON
    kinds = [t for t in types_of(prop) if t != "null"]
    if not kinds:
        return JSON
    kinds_set = set(kinds)
    if kinds_set == {"string"}:
        fmt = prop.get("format")
        if fmt is None:
            for comb in ("anyOf", "oneOf"):
                for sub in prop.get(comb) or []:
                    if isinstance(sub, dict) and sub.get("format"):
                        fmt = sub["format"]
        if fmt in (TIMESTAMP, DATE, TIME):
            return fmt
        return STRING
    if kinds_set == {"integer"}:
        return INTEGER
    if kinds_set <= {"integer", "number"}:
        return NUMBER
    if kinds_set == {"boolean"}:
        return BOOLEAN
    return JSON


def decimal_scale(prop: dict) -> int | None:
    """The places of a number property whose ``multipleOf`` is 10**-k (k >= 1), else None."""
    if not isinstance(prop, dict) or logical_type(prop) != NUMBER:
        return None
    step = prop.get("multipleOf")
    if not isinstance(step, (int, float)) or isinstance(step, bool) or not 0 < step < 1:
        return None
    for places in range(1, 39):
        if abs(step - 10.0 ** -places) <= 10.0 ** -places * 1e-9:
            return places
    return None


def widen(old: str, new: str) -> str:
    """The type a column must take to hold values of both types without loss."""
    if old == new:
        return old
    if {old, new} <= {INTEGER, NUMBER}:
        return NUMBER
    if JSON in (old, new) or {old, new} & {"object", "array"}:
        return JSON
    return STRING


def table_spec(stream: str, schema: dict, key_properties: tuple[str, ...], *, metadata: bool,
               schema_name: str | None, max_identifier_bytes: int = 63, line: int | None = None,
               table: str | None = None) -> TableSpec:
    """The table a stream's schema wants; ``table``: the name it loads under when not the stream's own (a stream
    map's ``__alias__``)."""
    props = schema.get("properties")
    if props is None:
        props = {}
    if not isinstance(props, dict):
        raise InputError('SCHEMA "properties" must be an object', line=line, stream=stream)
    names = list(props)
    if metadata:
        names = [n for n in names if n not in dict(METADATA_COLUMNS)]
    mapping = normalise_all(names, max_identifier_bytes, context=f"stream {stream!r}")
    meta_names = {m for m, _ in METADATA_COLUMNS} if metadata else set()
    for prop, col in mapping.items():
        if col in meta_names:
            raise InputError(f"property {prop!r} normalises to {col!r}, a column this target adds; rename "
                             f"the property or set add_record_metadata to false", line=line, stream=stream)
    columns = [Column(mapping[n], n, logical_type(props[n]), decimal_scale(props[n])) for n in names]
    if metadata:
        columns += [Column(name, None, typ) for name, typ in METADATA_COLUMNS]
    return TableSpec(stream=stream, table=normalise(table or stream, max_identifier_bytes), schema_name=schema_name,
                     columns=tuple(columns), key_columns=tuple(mapping[k] for k in key_properties),
                     metadata=metadata)


def merge_specs(existing: TableSpec | None, wanted: TableSpec) -> tuple[TableSpec, list[Column], list[Column]]:
    """Combine a table as it is with the spec a new schema wants.

    Returns (resulting spec, columns to add, columns whose type must widen); for a new table (``existing``
    is None) both lists are empty and the spec is the whole table to create. Columns are never dropped:
    a column the new schema lacks stays in the table (filled with NULL).
    """
    if existing is None:
        return wanted, [], []
    by_name = {c.name: c for c in existing.columns}
    out: list[Column] = []
    add: list[Column] = []
    change: list[Column] = []
    wanted_by_name = {c.name: c for c in wanted.columns}
    for col in existing.columns:
        w = wanted_by_name.get(col.name)
        if w is None:
            out.append(Column(col.name, None, col.type))
            continue
        t = widen(col.type, w.type)
        merged = Column(col.name, w.prop, t, w.scale if t == NUMBER else None)
        if t != col.type:
            change.append(merged)
        out.append(merged)
    for col in wanted.columns:
        if col.name not in by_name:
            out.append(col)
            add.append(col)
    spec = TableSpec(wanted.stream, wanted.table, wanted.schema_name, tuple(out), wanted.key_columns,
                     wanted.metadata)
    return spec, add, change


class Destination(abc.ABC):
    """One destination connection pool of a worker; see the module docstring for the contract."""

    max_identifier_bytes = 63
    _dead_letter_spec: TableSpec | None = None  # the dead-letter table once made (``dead_letter_table``)

    @abc.abstractmethod
    def claim_stream(self, run_id: str, stream: str, fence: int) -> int: ...

    @abc.abstractmethod
    def ensure_table(self, spec: TableSpec) -> TableSpec: ...

    @abc.abstractmethod
    def write_batch(self, spec: TableSpec, batch: Batch) -> None: ...

    @abc.abstractmethod
    def activate_version(self, spec: TableSpec, version: int, *, run_id: str, upto_seq: int, fence: int,
                         hard_delete: bool, deleted_at: str) -> None: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def dead_letter_table(self, schema_name: str | None) -> TableSpec:
        """The dead-letter table (``dead_letter_spec``), made by ``ensure_table`` on first use and kept: called
        before a batch's transaction, so its DDL commits on its own (implicitly, in MySQL and Snowflake)."""
        with _dead_letter_lock:
            if self._dead_letter_spec is None:
                self._dead_letter_spec = self.ensure_table(dead_letter_spec(schema_name))
            return self._dead_letter_spec


_dead_letter_lock = threading.Lock()  # the drain threads of a worker making the dead-letter table at once


def require_keys(spec: TableSpec, batch: Batch) -> None:
    """A keyed batch whose row lacks a key value is an error naming the row's input line (every destination: a
    primary key cannot hold null, and an upsert cannot tell such rows apart)."""
    if not (batch.upsert and spec.key_columns and batch.rows):
        return
    for i in [spec.index(k) for k in spec.key_columns]:
        column = [row[i] for row in batch.rows]
        if None in column:
            n = column.index(None)
            raise DestinationError(f"a key property ({', '.join(spec.key_columns)}) is null; keyed streams "
                                   f"need a value for every key property", transient=False, stream=spec.stream,
                                   line=batch.lines[n] if batch.lines else None)


def last_by_sequence(spec: TableSpec, rows: list, lines: list[int]) -> tuple[list, list[int]]:
    """The rows with one row per key, the one with the highest ``_sdc_sequence`` (the last one without metadata),
    and their lines. The worker sends batches deduplicated already (in input order); a destination whose merge
    cannot take a key twice calls this so that a batch made otherwise is applied in sequence order all the same."""
    at = [spec.index(k) for k in spec.key_columns]
    keys = [tuple(row[i] for i in at) for row in rows]
    if len(set(keys)) == len(keys):
        return rows, lines
    seq_at = spec.index(SEQUENCE_COLUMN) if spec.metadata else None
    best: dict[tuple, int] = {}
    for n, key in enumerate(keys):
        prev = best.get(key)
        if prev is None or seq_at is None or (rows[n][seq_at] or 0) >= (rows[prev][seq_at] or 0):
            best[key] = n
    keep = sorted(best.values())
    return [rows[n] for n in keep], [lines[n] for n in keep] if lines else lines


def committed_before(stored_seq: int, stream: str, upto_seq: int, has_rows: bool) -> bool:
    """Whether the stream's stored offset already covers a batch of rows about to be written: an earlier attempt
    of this very batch committed and its acknowledgement was lost (the connection broke at COMMIT), and the
    retry must not write its rows again. No other batch can have moved the offset this far: a stream's
    batches commit one at a time, in input order, each with its offset, and a newer owner is fenced out."""
    if not has_rows or stored_seq < upto_seq:
        return False
    logger.warning("stream %r: the batch up to input line %d was committed by an earlier attempt whose "
                   "acknowledgement was lost; not written again", stream, upto_seq)
    return True

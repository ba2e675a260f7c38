"""PostgreSQL destination (psycopg2).

Load path of a batch, in one transaction:
1. lock the stream's offset row (``SELECT ... FOR UPDATE``) and check the fencing token;
2. ``COPY ... FROM STDIN`` of the rows, encoded by orjson, not value by value in Python (building COPY text
   value by value cost about half of a worker's time):
   - validated rows whose non-JSON columns can only hold scalars go as CSV: a row's JSON array without
     its brackets is a CSV line PostgreSQL reads with ``NULL 'null', ESCAPE '\\'`` (JSON values travel
     as JSON strings). Rows of a stream without keys go straight into the target; keyed rows go into a
     temporary staging table shaped like the target. PostgreSQL parses CSV at about half the cost of
     ``jsonb`` and needs no casts afterwards;
   - other rows, and a batch CSV cannot carry (a control character: CSV cannot undo its JSON escape),
     go as JSON arrays of rows (one orjson call per 2000 rows) into the uncompressed ``jsonb`` column of a
     temporary table, cast to the columns' types on the way into the target;
   - a batch JSON cannot carry either (an integer beyond 64 bits, a NUL character) goes as COPY text built
     per value into a staging table, and so does a batch PostgreSQL refused, to find the input line of the
     bad value;
3. one set-based statement into the target (unless the COPY went there already):
   ``INSERT ... SELECT DISTINCT ON (keys) ... ON CONFLICT (keys) DO UPDATE`` for upserts (a row is only
   replaced by one with a higher ``_sdc_sequence``), a plain ``INSERT ... SELECT`` otherwise;
4. the batch's dead letters (``Batch.dead_letters``), by ``COPY`` text into the dead-letter table
   ``_singer_ingest_dead_letter`` of the same schema (created on first use by ``ensure_table``: CREATE TABLE IF NOT
   EXISTS under an advisory lock, outside the batch's transaction, keyed by (stream, _sdc_sequence));
5. raise the stream's offset.

The dead letters thus commit with the rows and the offset, or not at all: a replay the offset covers writes
neither again (``base.committed_before(..., batch.has_writes)``, also for a batch of dead letters only), and a
fenced stale owner writes neither.

Connections come from a small thread-safe pool; a connection that failed is thrown away, and
transient errors (connection lost, server restarting, serialization failure, deadlock, lock timeout)
are retried with backoff on a fresh one. Other errors fail the run with a message naming the stream,
the column and, when PostgreSQL says which COPY line, the input line.

PostgreSQL cannot store the NUL character in text or jsonb; NUL characters in string values are
dropped.
"""

from __future__ import annotations

import io
import logging
import re
import threading
from typing import Any, Callable

import orjson
import psycopg2
import psycopg2.errors
import psycopg2.extensions
from psycopg2 import sql
from psycopg2.pool import ThreadedConnectionPool

from ingest.config import ConnectionSettings, RunSettings
from ingest.errors import DestinationError, Fenced

from .. import base
from ..base import Batch, Column, TableSpec
from ..retry import with_retries

logger = logging.getLogger(__name__)


OFFSETS_TABLE = "_singer_ingest_offsets"
DEFAULT_SCHEMA = "public"

TYPES = {
    base.INTEGER: "bigint",
    base.NUMBER: "numeric",
    base.STRING: "text",
    base.BOOLEAN: "boolean",
    base.TIMESTAMP: "timestamp with time zone",
    base.DATE: "date",
    base.TIME: "time without time zone",
    base.JSON: "jsonb",
}
LOGICAL = {
    "bigint": base.INTEGER, "integer": base.INTEGER, "smallint": base.INTEGER, "numeric": base.NUMBER,
    "double precision": base.NUMBER, "real": base.NUMBER, "text": base.STRING, "character varying": base.STRING,
    "boolean": base.BOOLEAN, "timestamp with time zone": base.TIMESTAMP, "timestamp without time zone": base.TIMESTAMP,
    "date": base.DATE, "time without time zone": base.TIME, "jsonb": base.JSON, "json": base.JSON,
}
# A worker cut off the network must not hold locks forever: the server drops its session when the
# keepalives go unanswered, and a lock wait ends in a (retried) error instead of hanging.
SESSION_OPTIONS = ("-c TimeZone=UTC -c lock_timeout=30000 -c idle_in_transaction_session_timeout=120000 "
                   "-c tcp_keepalives_idle=15 -c tcp_keepalives_interval=5 -c tcp_keepalives_count=3")
KEEPALIVES = {"connect_timeout": 10, "keepalives": 1, "keepalives_idle": 15, "keepalives_interval": 5,
              "keepalives_count": 3}
TRANSIENT = (psycopg2.OperationalError, psycopg2.InterfaceError, psycopg2.extensions.TransactionRollbackError)

_ESCAPE = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_COPY_LINE = re.compile(r"\bline (\d+)")
_COPY_COLUMN = re.compile(r"\bcolumn (\w+)")


def _text(value: Any) -> str:
    text = str(value)
    if "\x00" in text:  # PostgreSQL text cannot hold NUL characters: they are dropped
        text = text.replace("\x00", "")
    return text.translate(_ESCAPE)


def _without_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, dict):
        return {_without_nul(k): _without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nul(v) for v in value]
    return value


def _json(value: Any) -> str:
    text = orjson.dumps(value).decode()
    if "\\u0000" in text:  # maybe a NUL, which jsonb cannot hold either: drop NULs, then encode again
        text = orjson.dumps(_without_nul(value)).decode()
    return text.translate(_ESCAPE)


def _bool(value: Any) -> str:
    if isinstance(value, bool):
        return "t" if value else "f"
    return _text(value)


def _number(value: Any) -> str:
    # repr of a float is its shortest round-trip text: 19.99 stays 19.99 in numeric.
    return repr(value) if isinstance(value, float) else _text(value)


CONVERT: dict[str, Callable[[Any], str]] = {
    base.INTEGER: _text, base.NUMBER: _number, base.STRING: _text, base.BOOLEAN: _bool,
    base.TIMESTAMP: _text, base.DATE: _text, base.TIME: _text, base.JSON: _json,
}


JSON_ROWS, CSV_ROWS, COPY_TEXT = "json", "csv", "text"  # the encodings of a batch's COPY payload
COPY_OPTIONS = {CSV_ROWS: sql.SQL("(FORMAT csv, NULL 'null', ESCAPE '\\')"), COPY_TEXT: sql.SQL("")}
COPY_READ_BYTES = 1 << 20  # psycopg2 reads the payload in pieces of this size (its default, 8 kB, means a Python
                           # call and a round of the GIL per 8 kB)
INSERT_FIRST_PAUSE = 16  # keyed batches of a table that go staged after one whose COPY into the target met a key
                        # already there, before that is tried again
DEAD_LETTER_ERROR = "writing to the dead-letter table"  # how an error of the dead letters' COPY begins
DEAD_LETTER_LINE = [c.name for c in base.DEAD_LETTER_COLUMNS].index("line")  # a dead letter's input line
JSON_ROWS_PER_LINE = 2000  # one orjson call per this many rows (a call costs more than a row); keeps each
                           # jsonb value far below PostgreSQL's 255 MB limit


def json_lines(rows: list[tuple]) -> bytes | None:
    """Rows as JSON arrays of row arrays, one array of up to JSON_ROWS_PER_LINE rows a line, escaped for COPY
    text; None when a value needs per-value COPY text."""
    try:
        payload = b"\n".join(orjson.dumps(rows[i:i + JSON_ROWS_PER_LINE])
                              for i in range(0, len(rows), JSON_ROWS_PER_LINE))
    except orjson.JSONEncodeError:  # an integer beyond 64 bits, a lone surrogate
        return None
    if b"\\u0000" in payload:  # maybe a NUL: copy_text drops them
        return None
    return payload.replace(b"\\", b"\\\\") + b"\n"


_CSV_UNSAFE = re.compile(rb'\\[^"]')  # a JSON escape PostgreSQL's CSV reader does not undo (all but \" and \\)
_CSV_MAYBE_UNSAFE = re.compile(rb'\\[nrtbfu/]')  # each such escape starts so: one search rules them all out


def csv_lines(columns: tuple[Column, ...], rows: list) -> bytes | None:
    """Rows as CSV for ``COPY ... (FORMAT csv, NULL 'null', ESCAPE '\\')``, one orjson call a row: a row's JSON array
    without its brackets is such a CSV line when every value is a scalar (JSON values go as JSON strings).
    Strings are quoted with \" and \\ escaped; null is unquoted. None when a value needs another route: an
    escape CSV cannot undo (a control or NUL character), an integer beyond 64 bits.

    Only for rows whose non-JSON columns were validated to hold scalars: an object there would be read as
    several CSV fields."""
    dumps = orjson.dumps
    json_at = [i for i, c in enumerate(columns) if c.type == base.JSON]
    try:
        if json_at:
            rows = [list(row) for row in rows]  # the caller's rows stay as they are
            for row in rows:
                for i in json_at:
                    if row[i] is not None:
                        row[i] = dumps(row[i]).decode()
        payload = b"\n".join([line[1:-1] for line in map(dumps, rows)]) + b"\n"
    except orjson.JSONEncodeError:
        return None
    if b"\\" in payload and _CSV_MAYBE_UNSAFE.search(payload) \
            and (b"\\u0000" in payload  # a NUL, maybe in a JSON value: jsonb cannot hold it either
                 or _CSV_UNSAFE.search(payload.replace(b"\\\\", b""))):
        return None
    return payload


def rows_from_csv(columns: tuple[Column, ...], payload: bytes) -> list[list]:
    """The rows ``csv_lines`` made ``payload`` of."""
    json_at = [i for i, c in enumerate(columns) if c.type == base.JSON]
    rows = [orjson.loads(b"[" + line + b"]") for line in payload.split(b"\n") if line]
    for row in rows:
        for i in json_at:
            if row[i] is not None:
                row[i] = orjson.loads(row[i])
    return rows


def rows_from_json(payload: bytes) -> list[list]:
    """The rows ``json_lines`` made ``payload`` of."""
    return [row for line in payload.replace(b"\\\\", b"\\").split(b"\n") if line for row in orjson.loads(line)]


def from_json(columns: tuple[Column, ...], doc: sql.Composable) -> sql.Composed:
    """The SELECT list that casts each element of a JSON row array to its column's type, named as the column."""
    out = []
    for i, c in enumerate(columns):
        if c.type == base.JSON:
            value = sql.SQL("NULLIF({} -> {}, 'null'::jsonb)").format(doc, sql.Literal(i))
        elif c.type == base.STRING:
            value = sql.SQL("{} ->> {}").format(doc, sql.Literal(i))
        else:
            value = sql.SQL("({} ->> {})::{}").format(doc, sql.Literal(i), sql.SQL(TYPES[c.type]))
        out.append(sql.SQL("{} AS {}").format(value, sql.Identifier(c.name)))
    return sql.SQL(", ").join(out)


def copy_text(columns: tuple[Column, ...], rows: list[tuple]) -> bytes:
    """Rows as COPY text format (tab separated, \\N for NULL)."""
    converters = [CONVERT[c.type] for c in columns]
    out = []
    for row in rows:
        out.append("\t".join("\\N" if v is None else conv(v) for conv, v in zip(converters, row)))
    out.append("")
    return "\n".join(out).encode("utf-8", "surrogatepass")


def open_destination(run: RunSettings, connection: ConnectionSettings, *, embedded: bool) -> "PostgresDestination":
    # One connection per drain thread, and one for the worker's own loop (claims, table set-up).
    return PostgresDestination.from_settings(connection, run.default_target_schema,
                                             max_connections=run.max_parallelism + 1)


class PostgresDestination(base.Destination):
    max_identifier_bytes = 63

    def __init__(self, connect_kwargs: dict, schema_name: str | None = None, *, max_connections: int = 10,
                 retry_deadline_seconds: float = 300.0):
        self._connect_kwargs = connect_kwargs
        self.schema_name = schema_name or DEFAULT_SCHEMA
        self.retry_deadline_seconds = retry_deadline_seconds
        self._max_connections = max_connections
        self._pool: ThreadedConnectionPool | None = None
        self._pool_lock = threading.Lock()
        self._unique_keys: dict[str, tuple[str, ...]] = {}
        self._insert_first_pause: dict[str, int] = {}  # table -> keyed batches left to stage before inserting first
        self._run(None, "prepare the schema", self._prepare)

    @classmethod
    def from_settings(cls, connection: ConnectionSettings, schema_name: str | None,
                      max_connections: int = 10) -> "PostgresDestination":
        kwargs: dict[str, Any] = {}
        if connection.option("postgres_dsn"):
            kwargs["dsn"] = connection.option("postgres_dsn")
        for key, name in (("host", "host"), ("port", "port"), ("user", "user"), ("password", "password"),
                          ("database", "dbname")):
            value = connection.option(key)
            if value is not None:
                kwargs[name] = value
        return cls(kwargs, schema_name, max_connections=max_connections)

    # -- connections -------------------------------------------------------------------------------
    def _get(self):
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadedConnectionPool(0, self._max_connections, options=SESSION_OPTIONS,
                                                    application_name="singer-ingest", **KEEPALIVES,
                                                    **self._connect_kwargs)
                # psycopg2's pool closes a returned connection once it holds minconn idle ones; minconn 0 at
                # construction connects lazily, minconn = maxconn afterwards keeps connections for reuse (a
                # new session per batch cost a connection and cold catalog caches every time).
                self._pool.minconn = self._max_connections
            pool = self._pool
        return pool.getconn()

    def _put(self, conn, *, broken: bool) -> None:
        with self._pool_lock:
            pool = self._pool
        if pool is None:
            conn.close()
        else:
            pool.putconn(conn, close=broken or bool(conn.closed))

    def _run(self, stream: str | None, what: str, fn, lines: list[int] | None = None):
        def attempt():
            try:
                conn = self._get()
            except psycopg2.Error as exc:
                raise self._translate(exc, stream, lines) from exc
            try:
                with conn.cursor() as cur:
                    result = fn(cur)
                conn.commit()
            except BaseException as exc:
                broken = bool(conn.closed) or isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError))
                if not conn.closed:
                    try:
                        conn.rollback()
                    except psycopg2.Error:
                        broken = True
                self._put(conn, broken=broken)
                if isinstance(exc, psycopg2.Error):
                    raise self._translate(exc, stream, lines) from exc
                raise
            self._put(conn, broken=False)
            return result

        return with_retries(attempt, what=what, deadline_seconds=self.retry_deadline_seconds)

    @staticmethod
    def _translate(exc: psycopg2.Error, stream: str | None, lines: list[int] | None) -> DestinationError:
        first = (getattr(exc, "pgerror", None) or str(exc) or type(exc).__name__).strip().splitlines()[0]
        if isinstance(exc, TRANSIENT):
            return DestinationError(f"PostgreSQL: {first}", transient=True, stream=stream)
        diag = getattr(exc, "diag", None)
        context = (diag.context if diag is not None else None) or ""
        column = (diag.column_name if diag is not None else None)
        if column is None:
            m = _COPY_COLUMN.search(context)
            column = m.group(1) if m else None
        line = None
        m = _COPY_LINE.search(context)
        if m and lines:
            n = int(m.group(1))
            if 1 <= n <= len(lines):
                line = lines[n - 1]
        what = f"PostgreSQL: {first}" + (f" (column {column!r})" if column else "")
        return DestinationError(what, transient=False, stream=stream, line=line)

    # -- helpers -----------------------------------------------------------------------------------
    def _t(self, table: str) -> sql.Composed:
        return sql.SQL("{}.{}").format(sql.Identifier(self.schema_name), sql.Identifier(table))

    def _prepare(self, cur) -> None:
        cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [f"singer-ingest:schema:{self.schema_name}"])
        cur.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema_name)))
        cur.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} (run_id text NOT NULL, stream text NOT NULL, "
                            "seq bigint NOT NULL, fence bigint NOT NULL, updated_at timestamptz NOT NULL, "
                            "PRIMARY KEY (run_id, stream))").format(self._t(OFFSETS_TABLE)))

    def _lock_offset(self, cur, run_id: str, stream: str, fence: int) -> int:
        """Lock (creating it if needed) the stream's offset row; raise Fenced for a stale token."""
        cur.execute(sql.SQL("INSERT INTO {} VALUES (%s, %s, 0, %s, now()) ON CONFLICT DO NOTHING")
                    .format(self._t(OFFSETS_TABLE)), [run_id, stream, fence])
        cur.execute(sql.SQL("SELECT seq, fence FROM {} WHERE run_id = %s AND stream = %s FOR UPDATE")
                    .format(self._t(OFFSETS_TABLE)), [run_id, stream])
        seq, stored = cur.fetchone()
        if stored > fence:
            raise Fenced(f"stream {stream!r}: another worker took this stream over (fence {stored} > {fence})")
        return seq

    def _set_offset(self, cur, run_id: str, stream: str, seq: int, fence: int) -> None:
        cur.execute(sql.SQL("UPDATE {} SET seq = greatest(seq, %s), fence = %s, updated_at = now() "
                            "WHERE run_id = %s AND stream = %s").format(self._t(OFFSETS_TABLE)),
                    [seq, fence, run_id, stream])

    # -- the interface -----------------------------------------------------------------------------
    def claim_stream(self, run_id: str, stream: str, fence: int) -> int:
        def fn(cur):
            seq = self._lock_offset(cur, run_id, stream, fence)
            self._set_offset(cur, run_id, stream, seq, fence)
            return seq

        return self._run(stream, f"claim stream {stream!r}", fn)

    def _existing(self, cur, spec: TableSpec) -> TableSpec | None:
        cur.execute("SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
                    "WHERE a.attrelid = to_regclass(format('%%I.%%I', %s::text, %s::text)) "
                    "AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum", [self.schema_name, spec.table])
        rows = cur.fetchall()
        if not rows:
            return None
        cols = []
        for name, dtype in rows:
            kind = LOGICAL.get(dtype) or LOGICAL.get(dtype.split("(")[0]) or base.STRING
            cols.append(Column(name, None, kind))
        return TableSpec(spec.stream, spec.table, self.schema_name, tuple(cols), spec.key_columns, spec.metadata)

    def _primary_key(self, cur, table: str) -> tuple[str, ...]:
        cur.execute("SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
                    "AND a.attnum = ANY(i.indkey) WHERE i.indrelid = to_regclass(format('%%I.%%I', %s::text, "
                    "%s::text)) AND i.indisprimary ORDER BY array_position(i.indkey::int2[], a.attnum)",
                    [self.schema_name, table])
        return tuple(r[0] for r in cur.fetchall())

    def ensure_table(self, spec: TableSpec) -> TableSpec:
        spec = TableSpec(spec.stream, spec.table, self.schema_name, spec.columns, spec.key_columns, spec.metadata)
        t = self._t(spec.table)

        def fn(cur):
            cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))",
                        [f"singer-ingest:table:{self.schema_name}.{spec.table}"])
            existing = self._existing(cur, spec)
            merged, add, change = base.merge_specs(existing, spec)
            if existing is None:
                cols = [sql.SQL("{} {}").format(sql.Identifier(c.name), sql.SQL(TYPES[c.type]))
                        for c in merged.columns]
                if spec.key_columns:
                    cols.append(sql.SQL("PRIMARY KEY ({})").format(
                        sql.SQL(", ").join(map(sql.Identifier, spec.key_columns))))
                cur.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(t, sql.SQL(", ").join(cols)))
                logger.info("stream %r: created table %s.%s", spec.stream, self.schema_name, spec.table)
            for c in add:
                cur.execute(sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}").format(
                    t, sql.Identifier(c.name), sql.SQL(TYPES[c.type])))
                logger.info("stream %r: added column %s %s", spec.stream, c.name, TYPES[c.type])
            for c in change:
                ident = sql.Identifier(c.name)
                using = {base.NUMBER: sql.SQL("{}::numeric").format(ident),
                         base.JSON: sql.SQL("to_jsonb({})").format(ident)}.get(c.type, sql.SQL("{}::text").format(ident))
                cur.execute(sql.SQL("ALTER TABLE {} ALTER COLUMN {} TYPE {} USING {}").format(
                    t, ident, sql.SQL(TYPES[c.type]), using))
                logger.info("stream %r: widened column %s to %s", spec.stream, c.name, TYPES[c.type])
            self._unique_keys[spec.table] = self._primary_key(cur, spec.table)
            return merged

        return self._run(spec.stream, f"set up table for stream {spec.stream!r}", fn)

    def _copy_dead_letters(self, cur, stream: str, letters: list[tuple]) -> None:
        """COPY the batch's dead letters (rows of ``base.DEAD_LETTER_COLUMNS``) into the dead-letter table, in the
        batch's transaction."""
        columns = base.DEAD_LETTER_COLUMNS
        statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
            self._t(base.DEAD_LETTER_TABLE), sql.SQL(", ").join(sql.Identifier(c.name) for c in columns))
        try:
            cur.copy_expert(statement.as_string(cur), io.BytesIO(copy_text(columns, letters)), size=COPY_READ_BYTES)
        except psycopg2.Error as exc:
            if isinstance(exc, TRANSIENT):
                raise  # retried by _run on a fresh connection
            error = self._translate(exc, stream, [letter[DEAD_LETTER_LINE] for letter in letters])
            raise DestinationError(f"{DEAD_LETTER_ERROR} {base.DEAD_LETTER_TABLE}: {error.what}",
                                   transient=False, stream=stream, line=error.line) from exc

    def write_batch(self, spec: TableSpec, batch: Batch) -> None:
        if batch.dead_letters:
            self.dead_letter_table(self.schema_name)
        has_writes = batch.has_writes  # before the rows are cleared below
        rows = batch.rows
        fmt, payload = CSV_ROWS, None
        if rows and batch.scalars_validated and spec.columns:
            payload = csv_lines(spec.columns, rows)
        if payload is None:
            fmt, payload = JSON_ROWS, json_lines(rows) if rows else b""
        if payload is not None:
            has_rows = bool(rows)
            # The payload carries the rows now: free them while the batch commits (the worker fills the
            # stream's next batch meanwhile, so a worker would otherwise hold two batches per stream).
            rows.clear()
            try:
                self._write(spec, batch, payload, fmt=fmt, has_rows=has_rows, has_writes=has_writes)
                return
            except DestinationError as exc:
                if exc.transient or not has_rows or exc.what.startswith(DEAD_LETTER_ERROR):
                    raise
                logger.info("stream %r: batch refused (%s); loading it again as COPY text to find the input line",
                            spec.stream, exc.what)
            rows = rows_from_csv(spec.columns, payload) if fmt == CSV_ROWS else rows_from_json(payload)
        self._write(spec, batch, copy_text(spec.columns, rows) if rows else b"", fmt=COPY_TEXT, has_rows=bool(rows),
                    has_writes=has_writes)

    def _write(self, spec: TableSpec, batch: Batch, payload: bytes, *, fmt: str, has_rows: bool,
               has_writes: bool) -> None:
        t = self._t(spec.table)
        cols = sql.SQL(", ").join(sql.Identifier(c.name) for c in spec.columns)
        keyed = batch.upsert and bool(spec.key_columns)
        # Keyed batches into a table without a matching primary key merge in two statements, which read the
        # source twice: those stage it. JSON rows are otherwise cast straight from the raw table into the
        # target; CSV rows of a batch without keys go straight into the target.
        staged = fmt == COPY_TEXT or keyed and (fmt == CSV_ROWS or not self._keyed_by_primary_key(spec))
        direct = fmt == CSV_ROWS and not keyed
        insert_first = fmt == CSV_ROWS and keyed and self._insert_first(spec)
        copy_into_target = sql.SQL("COPY {} ({}) FROM STDIN {}").format(t, cols, COPY_OPTIONS[CSV_ROWS])

        def fn(cur):
            stored = self._lock_offset(cur, batch.run_id, spec.stream, batch.fence)
            if base.committed_before(stored, spec.stream, batch.upto_seq, has_writes):
                return
            if batch.truncate_first:
                cur.execute(sql.SQL("DELETE FROM {}").format(t))
            if not has_rows:
                pass
            elif direct:
                cur.copy_expert(copy_into_target.as_string(cur), io.BytesIO(payload), size=COPY_READ_BYTES)
            elif not (insert_first and self._copied_without_conflict(cur, spec, copy_into_target, payload)):
                source = self._load_source(cur, spec, payload, fmt=fmt, staged=staged, cols=cols, t=t)
                for statement in self._merge_sql(spec, batch, t, source, cols):
                    cur.execute(statement)
            if batch.dead_letters:
                self._copy_dead_letters(cur, spec.stream, batch.dead_letters)
            self._set_offset(cur, batch.run_id, spec.stream, batch.upto_seq, batch.fence)

        self._run(spec.stream, f"write batch of stream {spec.stream!r}", fn,
                  lines=batch.lines if fmt == COPY_TEXT else None)

    def _load_source(self, cur, spec: TableSpec, payload: bytes, *, fmt: str, staged: bool, cols, t) \
            -> sql.Composable:
        """COPY the payload in and return what the merge selects the batch's rows from."""
        stage = sql.Identifier(f"_stage_{spec.table}"[:63])
        raw = sql.Identifier(f"_json_{spec.table}"[:63])
        if staged:
            cur.execute(sql.SQL("CREATE TEMP TABLE {} ON COMMIT DROP AS SELECT {} FROM {} WITH NO DATA")
                        .format(stage, cols, t))
        if fmt != JSON_ROWS:
            cur.copy_expert(sql.SQL("COPY {} ({}) FROM STDIN {}").format(stage, cols, COPY_OPTIONS[fmt])
                            .as_string(cur), io.BytesIO(payload), size=COPY_READ_BYTES)
            return stage
        # EXTERNAL: each value (up to JSON_ROWS_PER_LINE rows) is kept uncompressed; compressing it on the way in
        # and out cost PostgreSQL as much as the rest of the load.
        cur.execute(sql.SQL("CREATE TEMP TABLE {raw} (d jsonb) ON COMMIT DROP; "
                            "ALTER TABLE {raw} ALTER COLUMN d SET STORAGE EXTERNAL").format(raw=raw))
        cur.copy_expert(sql.SQL("COPY {} (d) FROM STDIN").format(raw).as_string(cur), io.BytesIO(payload),
                        size=COPY_READ_BYTES)
        rows = sql.SQL("SELECT {} FROM {}, jsonb_array_elements({}.d) AS e(r)").format(
            from_json(spec.columns, sql.SQL("e.r")), raw, raw)
        if staged:
            cur.execute(sql.SQL("INSERT INTO {} ({}) {}").format(stage, cols, rows))
            return stage
        return sql.SQL("({}) AS {}").format(rows, stage)

    def _insert_first(self, spec: TableSpec) -> bool:
        """Whether a keyed batch is first copied straight into the target: when none of its keys is in the table
        (a stream that only inserts), that is the whole upsert, at the cost of a bare COPY instead of a staged
        merge. The primary key refuses the batch otherwise, and the batch is merged after all; a table whose
        batches met keys lately is not tried for the next INSERT_FIRST_PAUSE batches."""
        if not self._keyed_by_primary_key(spec):
            return False  # nothing would refuse a key already there
        left = self._insert_first_pause.get(spec.table, 0)
        if left:
            self._insert_first_pause[spec.table] = left - 1
            return False
        return True

    def _copied_without_conflict(self, cur, spec: TableSpec, copy_into_target: sql.Composed, payload: bytes) -> bool:
        """COPY the batch into the target under a savepoint; False (and nothing copied) when a row's key was
        already in the table, or twice in the batch."""
        cur.execute("SAVEPOINT insert_first")
        try:
            cur.copy_expert(copy_into_target.as_string(cur), io.BytesIO(payload), size=COPY_READ_BYTES)
        except psycopg2.errors.UniqueViolation:
            cur.execute("ROLLBACK TO SAVEPOINT insert_first")
            self._insert_first_pause[spec.table] = INSERT_FIRST_PAUSE
            return False
        cur.execute("RELEASE SAVEPOINT insert_first")
        return True

    def _keyed_by_primary_key(self, spec: TableSpec) -> bool:
        """The table's primary key is the stream's key properties (upserts can use ON CONFLICT)."""
        return set(self._unique_keys.get(spec.table, ())) == set(spec.key_columns)

    def _merge_sql(self, spec: TableSpec, batch: Batch, t, source, cols) -> list[sql.Composed]:
        """The statements that move the batch from ``source`` (a table, or a subquery with its alias) into the
        target."""
        keys = spec.key_columns
        if not (batch.upsert and keys):
            return [sql.SQL("INSERT INTO {} ({}) SELECT {} FROM {}").format(t, cols, cols, source)]
        key_list = sql.SQL(", ").join(map(sql.Identifier, keys))
        order = sql.SQL("{}, {} DESC").format(key_list, sql.Identifier(base.SEQUENCE_COLUMN)) if spec.metadata \
            else key_list
        source = sql.SQL("SELECT DISTINCT ON ({}) {} FROM {} ORDER BY {}").format(key_list, cols, source, order)
        newer = sql.SQL("")
        if spec.metadata:
            seq = sql.Identifier(base.SEQUENCE_COLUMN)
            newer = sql.SQL(" WHERE {t}.{s} IS NULL OR {t}.{s} <= EXCLUDED.{s}").format(t=t, s=seq)
        if self._keyed_by_primary_key(spec):
            others = [c.name for c in spec.columns if c.name not in keys]
            if not others:
                action = sql.SQL("DO NOTHING")
            else:
                action = sql.SQL("DO UPDATE SET {}{}").format(sql.SQL(", ").join(
                    sql.SQL("{} = EXCLUDED.{}").format(sql.Identifier(c), sql.Identifier(c)) for c in others), newer)
            return [sql.SQL("INSERT INTO {} ({}) {} ON CONFLICT ({}) {}").format(t, cols, source, key_list, action)]
        # No primary key matching the stream's keys (a table made elsewhere): delete, then insert.
        same = sql.SQL(" AND ").join(sql.SQL("t.{k} IS NOT DISTINCT FROM s.{k}").format(k=sql.Identifier(k))
                                     for k in keys)
        guard = sql.SQL("")
        if spec.metadata:
            seq = sql.Identifier(base.SEQUENCE_COLUMN)
            guard = sql.SQL(" AND (t.{s} IS NULL OR t.{s} <= s.{s})").format(s=seq)
        return [
            sql.SQL("DELETE FROM {t} AS t USING ({src}) AS s WHERE {same}{guard}").format(
                t=t, src=source, same=same, guard=guard),
            sql.SQL("INSERT INTO {t} ({cols}) SELECT {cols} FROM ({src}) AS s WHERE NOT EXISTS "
                    "(SELECT 1 FROM {t} AS t WHERE {same})").format(t=t, cols=cols, src=source, same=same),
        ]

    def activate_version(self, spec: TableSpec, version: int, *, run_id: str, upto_seq: int, fence: int,
                         hard_delete: bool, deleted_at: str) -> None:
        t = self._t(spec.table)
        ver = sql.Identifier(base.VERSION_COLUMN)
        deleted = sql.Identifier(base.DELETED_COLUMN)

        def fn(cur):
            self._lock_offset(cur, run_id, spec.stream, fence)
            if spec.metadata:
                if hard_delete:
                    cur.execute(sql.SQL("DELETE FROM {} WHERE {} IS NULL OR {} < %s").format(t, ver, ver), [version])
                else:
                    cur.execute(sql.SQL("UPDATE {} SET {} = %s WHERE ({} IS NULL OR {} < %s) AND {} IS NULL")
                                .format(t, deleted, ver, ver, deleted), [deleted_at, version])
            self._set_offset(cur, run_id, spec.stream, upto_seq, fence)

        if not spec.metadata:
            logger.warning("stream %r: ACTIVATE_VERSION ignored: add_record_metadata is off, so rows carry "
                           "no _sdc_table_version", spec.stream)
        self._run(spec.stream, f"activate version {version} of stream {spec.stream!r}", fn)

    def close(self) -> None:
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.closeall()

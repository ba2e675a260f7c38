"""DuckDB destination: the embedded default.

A batch is written as newline-delimited JSON to a temporary file, read into a staging table with
``read_json`` (typed columns), and merged into the target in one transaction together with the
stream's offset. Upserts delete the rows whose key the batch holds (unless the table's row has a
newer ``_sdc_sequence``) and insert the batch's rows.

The batch's dead letters (``Batch.dead_letters``) go the same way (a temporary newline-delimited JSON file read
by ``read_json``) into the dead-letter table ``_singer_ingest_dead_letter`` of the same schema, after the rows
and in the same transaction, so they commit with the rows and the offset or not at all; a replay the offset
covers writes neither again (``base.committed_before(..., batch.has_writes)``, also for a batch of dead letters
only), and a fenced stale owner writes neither. The table is created on first use by ``ensure_table`` (CREATE
TABLE IF NOT EXISTS, in a transaction of its own).

DuckDB lets one process at a time open a database file for writing. In one process (the embedded
mode) the connection stays open; when several worker processes share a file, each opens it for one
transaction at a time and a lock conflict is retried as a transient error.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from contextlib import contextmanager
from typing import Iterator

import duckdb
import orjson

from ingest.config import ConnectionSettings, RunSettings
from ingest.errors import DestinationError, Fenced

from .. import base
from ..base import Batch, Column, TableSpec
from ..retry import with_retries

logger = logging.getLogger(__name__)


OFFSETS_TABLE = "_singer_ingest_offsets"

TYPES = {
    base.INTEGER: "BIGINT",
    base.NUMBER: "DOUBLE",
    base.STRING: "VARCHAR",
    base.BOOLEAN: "BOOLEAN",
    base.TIMESTAMP: "TIMESTAMPTZ",
    base.DATE: "DATE",
    base.TIME: "TIME",
    base.JSON: "JSON",
}
LOGICAL = {
    "BIGINT": base.INTEGER, "INTEGER": base.INTEGER, "DOUBLE": base.NUMBER, "VARCHAR": base.STRING,
    "BOOLEAN": base.BOOLEAN, "TIMESTAMP WITH TIME ZONE": base.TIMESTAMP, "DATE": base.DATE,
    "TIME": base.TIME, "JSON": base.JSON,
}


def quote(ident: str) -> str:
    """Quote an identifier for DuckDB (double quotes, embedded quotes doubled)."""
    return '"' + ident.replace('"', '""') + '"'


def literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _translate(exc: duckdb.Error, stream: str | None) -> DestinationError:
    text = str(exc).splitlines()[0]
    transient = isinstance(exc, (duckdb.TransactionException,)) or (
        isinstance(exc, duckdb.IOException) and "lock" in text.lower())
    return DestinationError(f"DuckDB: {text}", transient=transient, stream=stream)


def open_destination(run: RunSettings, connection: ConnectionSettings, *, embedded: bool) -> "DuckDBDestination":
    return DuckDBDestination(run.option("duckdb_path"), run.default_target_schema, shared_file=not embedded)


class DuckDBDestination(base.Destination):
    max_identifier_bytes = 63

    def __init__(self, path: str, schema_name: str | None = None, *, shared_file: bool = False,
                 retry_deadline_seconds: float = 300.0):
        self.path = path
        self.schema_name = schema_name or "main"
        self.shared_file = shared_file
        self.retry_deadline_seconds = retry_deadline_seconds
        self._db: duckdb.DuckDBPyConnection | None = None
        self._ddl_lock = threading.Lock()
        self._file_lock = threading.Lock()
        self._tmpdir = tempfile.mkdtemp(prefix="singer-ingest-duckdb-")
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise DestinationError(f"DuckDB: directory {parent} does not exist (duckdb_path={path})",
                                   transient=False)
        if not shared_file:
            self._db = self._open()
        self._run(None, "prepare the database", self._prepare)

    # -- connections -------------------------------------------------------------------------------
    def _open(self) -> duckdb.DuckDBPyConnection:
        try:
            return duckdb.connect(self.path)
        except duckdb.Error as exc:
            raise _translate(exc, None) from exc

    @contextmanager
    def _connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        if self._db is not None:
            cur = self._db.cursor()
            try:
                yield cur
            finally:
                cur.close()
        else:
            # One open file per process at a time: DuckDB refuses a second attach of the same file.
            with self._file_lock:
                con = self._open()
                try:
                    yield con
                finally:
                    con.close()

    def _run(self, stream: str | None, what: str, fn):
        def attempt():
            with self._connection() as con:
                try:
                    con.execute("BEGIN TRANSACTION")
                    result = fn(con)
                    con.execute("COMMIT")
                    return result
                except BaseException as exc:
                    try:
                        con.execute("ROLLBACK")
                    except duckdb.Error:
                        logger.debug("rollback after %s failed (the transaction was already closed)", what)
                    if isinstance(exc, duckdb.Error):
                        raise _translate(exc, stream) from exc
                    raise

        return with_retries(attempt, what=f"{what} ({self.path})", deadline_seconds=self.retry_deadline_seconds)

    def _q(self, table: str) -> str:
        return f"{quote(self.schema_name)}.{quote(table)}"

    def _prepare(self, con) -> None:
        con.execute(f"CREATE SCHEMA IF NOT EXISTS {quote(self.schema_name)}")
        con.execute(f"CREATE TABLE IF NOT EXISTS {self._q(OFFSETS_TABLE)} (run_id VARCHAR, stream VARCHAR, "
                    f"seq BIGINT, fence BIGINT, updated_at TIMESTAMPTZ, PRIMARY KEY (run_id, stream))")

    # -- offsets and fencing -----------------------------------------------------------------------
    def _check_fence(self, con, run_id: str, stream: str, fence: int) -> int:
        """Raise Fenced for a stale token; return the stream's committed offset (0 if none)."""
        row = con.execute(f"SELECT fence, seq FROM {self._q(OFFSETS_TABLE)} WHERE run_id = ? AND stream = ?",
                          [run_id, stream]).fetchone()
        if row is not None and row[0] is not None and row[0] > fence:
            raise Fenced(f"stream {stream!r}: another worker took this stream over (fence {row[0]} > {fence})")
        return (row[1] or 0) if row is not None else 0

    def _set_offset(self, con, run_id: str, stream: str, seq: int, fence: int) -> None:
        con.execute(f"INSERT INTO {self._q(OFFSETS_TABLE)} VALUES (?, ?, ?, ?, now()) ON CONFLICT (run_id, stream) "
                    f"DO UPDATE SET seq = greatest({self._q(OFFSETS_TABLE)}.seq, excluded.seq), "
                    f"fence = excluded.fence, updated_at = excluded.updated_at", [run_id, stream, seq, fence])

    def claim_stream(self, run_id: str, stream: str, fence: int) -> int:
        def fn(con):
            seq = self._check_fence(con, run_id, stream, fence)
            self._set_offset(con, run_id, stream, seq, fence)
            return seq

        return self._run(stream, f"claim stream {stream!r}", fn)

    # -- tables ------------------------------------------------------------------------------------
    def _existing(self, con, spec: TableSpec) -> TableSpec | None:
        rows = con.execute("SELECT column_name, data_type FROM information_schema.columns "
                           "WHERE table_schema = ? AND table_name = ? ORDER BY ordinal_position",
                           [self.schema_name, spec.table]).fetchall()
        if not rows:
            return None
        cols = tuple(Column(name, None, LOGICAL.get(dtype.upper(), base.STRING)) for name, dtype in rows)
        return TableSpec(spec.stream, spec.table, self.schema_name, cols, spec.key_columns, spec.metadata)

    def ensure_table(self, spec: TableSpec) -> TableSpec:
        spec = TableSpec(spec.stream, spec.table, self.schema_name, spec.columns, spec.key_columns, spec.metadata)

        def fn(con):
            existing = self._existing(con, spec)
            merged, add, change = base.merge_specs(existing, spec)
            if existing is None:
                cols = ", ".join(f"{quote(c.name)} {TYPES[c.type]}" for c in merged.columns)
                con.execute(f"CREATE TABLE IF NOT EXISTS {self._q(spec.table)} ({cols})")
                logger.info("stream %r: created table %s.%s", spec.stream, self.schema_name, spec.table)
            for c in add:
                con.execute(f"ALTER TABLE {self._q(spec.table)} ADD COLUMN {quote(c.name)} {TYPES[c.type]}")
                logger.info("stream %r: added column %s %s", spec.stream, c.name, TYPES[c.type])
            for c in change:
                using = f" USING to_json({quote(c.name)})" if c.type == base.JSON else ""
                con.execute(f"ALTER TABLE {self._q(spec.table)} ALTER COLUMN {quote(c.name)} "
                            f"TYPE {TYPES[c.type]}{using}")
                logger.info("stream %r: widened column %s to %s", spec.stream, c.name, TYPES[c.type])
            return merged

        with self._ddl_lock:
            return self._run(spec.stream, f"set up table for stream {spec.stream!r}", fn)

    # -- loading -----------------------------------------------------------------------------------
    def _stage_file(self, columns: tuple[Column, ...], rows: list) -> str:
        names = [c.name for c in columns]
        fd, path = tempfile.mkstemp(suffix=".jsonl", dir=self._tmpdir)
        dumps = orjson.dumps
        with os.fdopen(fd, "wb") as fh:
            for row in rows:
                fh.write(dumps(dict(zip(names, row))))
                fh.write(b"\n")
        return path

    def write_batch(self, spec: TableSpec, batch: Batch) -> None:
        if batch.dead_letters:
            self.dead_letter_table(self.schema_name)
        paths = [self._stage_file(spec.columns, batch.rows)]
        if batch.dead_letters:
            paths.append(self._stage_file(base.DEAD_LETTER_COLUMNS, batch.dead_letters))
        path = paths[0]
        t = self._q(spec.table)
        cols = ", ".join(quote(c.name) for c in spec.columns)
        typed = "{" + ", ".join(f"{literal(c.name)}: {literal(TYPES[c.type])}" for c in spec.columns) + "}"
        stage = quote(f"_stage_{spec.table}")

        def fn(con):
            stored = self._check_fence(con, batch.run_id, spec.stream, batch.fence)
            if base.committed_before(stored, spec.stream, batch.upto_seq, batch.has_writes):
                return
            if batch.truncate_first:
                con.execute(f"DELETE FROM {t}")
            if batch.rows:
                con.execute(f"CREATE OR REPLACE TEMP TABLE {stage} AS SELECT {cols} FROM read_json("
                            f"{literal(path)}, columns = {typed}, format = 'newline_delimited')")
                if batch.upsert and spec.key_columns:
                    same_key = " AND ".join(f"t.{quote(k)} IS NOT DISTINCT FROM s.{quote(k)}"
                                            for k in spec.key_columns)
                    newer = ""
                    if spec.metadata:
                        seq = quote(base.SEQUENCE_COLUMN)
                        newer = f" AND (t.{seq} IS NULL OR t.{seq} <= s.{seq})"
                    con.execute(f"DELETE FROM {t} AS t USING {stage} AS s WHERE {same_key}{newer}")
                    con.execute(f"INSERT INTO {t} ({cols}) SELECT {cols} FROM {stage} AS s "
                                f"WHERE NOT EXISTS (SELECT 1 FROM {t} AS t WHERE {same_key})")
                else:
                    con.execute(f"INSERT INTO {t} ({cols}) SELECT {cols} FROM {stage}")
                con.execute(f"DROP TABLE {stage}")
            if batch.dead_letters:
                self._insert_dead_letters(con, paths[1])
            self._set_offset(con, batch.run_id, spec.stream, batch.upto_seq, batch.fence)

        try:
            self._run(spec.stream, f"write batch of stream {spec.stream!r}", fn)
        except DestinationError as exc:
            if exc.line is None and batch.first_line is not None and not exc.transient:
                raise DestinationError(f"{exc.what} (in the batch starting at input line {batch.first_line})",
                                       transient=False, stream=spec.stream) from exc
            raise
        finally:
            for p in paths:
                os.unlink(p)

    def _insert_dead_letters(self, con, path: str) -> None:
        """The dead letters staged in ``path`` into the dead-letter table, in the batch's transaction."""
        columns = base.DEAD_LETTER_COLUMNS
        cols = ", ".join(quote(c.name) for c in columns)
        typed = "{" + ", ".join(f"{literal(c.name)}: {literal(TYPES[c.type])}" for c in columns) + "}"
        con.execute(f"INSERT INTO {self._q(base.DEAD_LETTER_TABLE)} ({cols}) SELECT {cols} FROM read_json("
                    f"{literal(path)}, columns = {typed}, format = 'newline_delimited')")

    def activate_version(self, spec: TableSpec, version: int, *, run_id: str, upto_seq: int, fence: int,
                         hard_delete: bool, deleted_at: str) -> None:
        t = self._q(spec.table)
        ver = quote(base.VERSION_COLUMN)
        deleted = quote(base.DELETED_COLUMN)

        def fn(con):
            self._check_fence(con, run_id, spec.stream, fence)
            if spec.metadata:
                if hard_delete:
                    con.execute(f"DELETE FROM {t} WHERE {ver} IS NULL OR {ver} < ?", [version])
                else:
                    con.execute(f"UPDATE {t} SET {deleted} = ?::TIMESTAMPTZ WHERE ({ver} IS NULL OR {ver} < ?) "
                                f"AND {deleted} IS NULL", [deleted_at, version])
            self._set_offset(con, run_id, spec.stream, upto_seq, fence)

        if not spec.metadata:
            logger.warning("stream %r: ACTIVATE_VERSION ignored: add_record_metadata is off, so rows carry "
                           "no _sdc_table_version", spec.stream)
        self._run(spec.stream, f"activate version {version} of stream {spec.stream!r}", fn)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        try:
            os.rmdir(self._tmpdir)
        except OSError:
            logger.debug("temporary directory %s not removed", self._tmpdir)

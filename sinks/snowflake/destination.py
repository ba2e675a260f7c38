"""Snowflake destination (snowflake-connector-python).

Where rows go: the database ``snowflake_database`` (created if missing), schema ``default_target_schema``
(created if missing; unset: ``PUBLIC``).

Identifiers, one rule: every stream and property name is normalised as for every destination (``sinks/names.py``:
``a-z``, ``0-9`` and ``_``, at most 255 characters, Snowflake's limit), then upper-cased, and always written
quoted. The upper-cased name is exactly what Snowflake makes of the same name unquoted, so ``select id from
orders`` finds the table and column a stream ``Orders`` with a property ``id`` made; the quotes keep reserved
words (``"ORDER"``, ``"SELECT"``) working, where a user has to quote them too. The schema name follows the same
rule; the database name resolves as Snowflake resolves an identifier (upper-cased when it is a plain
identifier, kept as it is otherwise, or when written in double quotes). Columns of a table made elsewhere with
lower-case letters in their names are kept as they are, but a column the loaded stream names must be upper
case to be matched.

Load path of a batch (DDL never runs inside the transaction: CREATE and ALTER commit implicitly in Snowflake):
1. the rows become one Parquet file (``Batch.arrow``; date-times as ISO 8601 text in UTC, dates and times as ISO
   text, JSON as its text; the file's columns are named c0, c1, ... in the table's order), ``PUT`` to the internal stage ``_SINGER_INGEST_STAGE`` of the schema under a name
   new for each attempt (so Snowflake's load history never skips a retried file);
2. ``BEGIN``; ``COPY INTO`` the table, from a ``SELECT`` that picks each column by name out of the file
   (``$1:"c3"::TYPE``, ``PARSE_JSON`` for VARIANT) with ``PURGE = TRUE``; keyed streams COPY into a staging
   table (a transient table per worker and table, made outside the transaction; a TEMPORARY table would do on
   Snowflake, but the test server cannot COPY into one) and then ``MERGE`` it into the table, keeping the last
   row by ``_sdc_sequence`` per key (``QUALIFY ROW_NUMBER()``) and never replacing a row that has a higher
   sequence; the batch's dead letters go into ``_SINGER_INGEST_DEAD_LETTER`` the same way;
3. the stream's offset row in ``_SINGER_INGEST_OFFSETS`` is touched by an UPDATE (which takes Snowflake's lock
   on that table until COMMIT; ``claim_stream`` made the row), read back, the fencing token checked and the batch
   skipped when the stored offset already covers it (``base.committed_before``): a stale owner or a replayed
   batch then ROLLs BACK, so nothing of it becomes visible; otherwise the offset is raised and the transaction
   COMMITs. The offsets table is locked last, so that the drains of different streams (different tables) run
   in parallel and only their short offset updates queue; a lock-free look at the offset before the PUT skips
   a replayed batch without loading it at all.

A server reached over plain http is a local stand-in (the service is https only): fakesnow, which cannot run a
MERGE inside a transaction. There the upsert runs as a DELETE and an INSERT with the same guard, in the same
transaction (``merge_in_transaction``); everything else is the same code.

Types: integer NUMBER(38,0), number FLOAT, string VARCHAR, boolean BOOLEAN, date-time TIMESTAMP_TZ, date DATE,
time TIME, JSON VARIANT. No primary key is declared (Snowflake does not enforce one; the MERGE keeps keys
unique). Schema evolution never drops data: new columns by ``ALTER TABLE ADD COLUMN``; a type that must widen
(integer to FLOAT, anything to VARCHAR or VARIANT) gets a new column filled from the old one (``TO_VARIANT``,
``::FLOAT``, ``::VARCHAR``), then the old column is dropped and the new one renamed; a set-up that stopped half
way is finished by the next ``ensure_table`` (the filled column is renamed when the old one is gone, dropped and
filled again otherwise).

Connections come from a small thread-safe pool (one per drain thread and one for the worker's own loop).
Transient errors (connection lost, session expired, lock wait timeout, the service busy) are retried with
backoff on a fresh connection; other errors fail the run with one line naming the stream and, where Snowflake
says which row, the input line. Passwords and keys are never logged nor put in a message.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import snowflake.connector
import snowflake.connector.errors as sf_errors

from ingest.config import ConnectionSettings, RunSettings
from ingest.errors import ConfigError, DestinationError, Fenced

from .. import base
from ..base import Batch, Column, TableSpec
from ..columnar import arrow_table
from ..names import normalise
from ..pool import ConnectionPool
from ..retry import with_retries

logger = logging.getLogger(__name__)

MAX_IDENTIFIER_CHARS = 255
OFFSETS_TABLE = "_SINGER_INGEST_OFFSETS"
STAGE = "_SINGER_INGEST_STAGE"
# Normalised names hold only a-z, 0-9 and _ (upper-cased: A-Z): a name with $ is never a stream's table or column.
STAGING_PREFIX = "_SINGER_INGEST$STAGING_"
WIDEN_PREFIX = "_SINGER_INGEST$W_"
DEFAULT_SCHEMA = "PUBLIC"
LOCK_TIMEOUT_SECONDS = 120

TYPES = {
    base.INTEGER: "NUMBER(38,0)",
    base.NUMBER: "FLOAT",
    base.STRING: "VARCHAR",
    base.BOOLEAN: "BOOLEAN",
    base.TIMESTAMP: "TIMESTAMP_TZ",
    base.DATE: "DATE",
    base.TIME: "TIME",
    base.JSON: "VARIANT",
}
LOGICAL = {
    "NUMBER": base.INTEGER, "DECIMAL": base.INTEGER, "NUMERIC": base.INTEGER, "INT": base.INTEGER,
    "INTEGER": base.INTEGER, "BIGINT": base.INTEGER, "SMALLINT": base.INTEGER, "TINYINT": base.INTEGER,
    "FLOAT": base.NUMBER, "FLOAT4": base.NUMBER, "FLOAT8": base.NUMBER, "DOUBLE": base.NUMBER, "REAL": base.NUMBER,
    "DOUBLE PRECISION": base.NUMBER, "TEXT": base.STRING, "VARCHAR": base.STRING, "STRING": base.STRING,
    "CHAR": base.STRING, "BOOLEAN": base.BOOLEAN, "TIMESTAMP_TZ": base.TIMESTAMP, "TIMESTAMP_LTZ": base.TIMESTAMP,
    "TIMESTAMP_NTZ": base.TIMESTAMP, "TIMESTAMP": base.TIMESTAMP, "DATETIME": base.TIMESTAMP, "DATE": base.DATE,
    "TIME": base.TIME, "VARIANT": base.JSON, "OBJECT": base.JSON, "ARRAY": base.JSON,
}

# Error numbers after which the same statement may succeed on a fresh connection or a little later: cannot
# connect, no answer, session expired or gone, statement cancelled or timed out, lock wait timeout, too many
# statements queued.
TRANSIENT_ERRNOS = {250001, 250002, 250003, 250005, 251005, 251006, 390111, 390112, 390114, 604, 625, 630, 631,
                    3001}
_ROW = re.compile(r"\b[Rr]ow (\d+)")
_PLAIN_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")


def quote(ident: str) -> str:
    """Quote an identifier: double quotes, embedded ones doubled. Every identifier goes through here."""
    return '"' + ident.replace('"', '""') + '"'


def column_ident(name: str) -> str:
    """The Snowflake name of a normalised column or table name: upper-cased (a name read from a table made
    elsewhere that holds lower-case letters and upper-case ones stays as it is)."""
    return name if name != name.lower() and name != name.upper() else name.upper()


def from_snowflake(name: str) -> str:
    """The inverse of ``column_ident`` for the names Snowflake reports."""
    return name.lower() if name == name.upper() else name


def resolve_identifier(name: str) -> str:
    """A database name from the config as Snowflake resolves it: ``"Quoted"`` as written, a plain identifier
    upper-cased, anything else as written."""
    if len(name) >= 2 and name[0] == name[-1] == '"':
        return name[1:-1].replace('""', '"')
    return name.upper() if _PLAIN_IDENTIFIER.fullmatch(name) else name


def schema_ident(schema: str | None) -> str:
    return normalise(schema, MAX_IDENTIFIER_CHARS).upper() if schema else DEFAULT_SCHEMA


# -- the batch as a Parquet file ------------------------------------------------------------------------------
def parquet_table(spec: TableSpec, data: "pa.Table") -> "pa.Table":
    """The Arrow table of a batch as it goes into the Parquet file: date-times as ISO 8601 text in UTC (which
    Snowflake casts to TIMESTAMP_TZ without a file-format setting), dates and times as ISO text."""
    arrays = []
    for c, array in zip(spec.columns, data.columns):
        if c.type == base.TIMESTAMP:
            array = pc.strftime(array, format="%Y-%m-%dT%H:%M:%S+00:00")
        elif c.type in (base.DATE, base.TIME):
            array = pc.cast(array, pa.string())
        arrays.append(array)
    return pa.Table.from_arrays(arrays, names=[file_column(i) for i in range(len(spec.columns))])


def file_column(i: int) -> str:
    """The name of the ``i``-th column in the Parquet file: short and plain, whatever the table's column is called
    (a name of 255 characters, a reserved word of some SQL dialect), so the COPY's pick by name never needs more
    than the quotes."""
    return f"c{i}"


def select_expression(i: int, c: Column) -> str:
    """The ``i``-th column's value picked by name out of a staged Parquet row, as the column's type."""
    value = f"$1:{quote(file_column(i))}"
    if c.type == base.JSON:
        return f"PARSE_JSON({value}::VARCHAR)"
    if c.type in (base.TIMESTAMP, base.DATE, base.TIME):
        return f"{value}::VARCHAR::{TYPES[c.type]}"
    return f"{value}::{TYPES[c.type]}"


# -- settings ---------------------------------------------------------------------------------------------------
def _private_key(connection: ConnectionSettings) -> bytes | None:
    """The configured private key as DER bytes (what the connector takes), or None."""
    pem = connection.option("snowflake_private_key")
    path = connection.option("snowflake_private_key_path")
    if pem and path:
        raise ConfigError("set one of snowflake_private_key and snowflake_private_key_path, not both")
    if path:
        try:
            with open(os.path.expanduser(path), "rb") as f:
                pem = f.read()
        except OSError as exc:
            raise ConfigError(f"snowflake_private_key_path: cannot read {path}: {exc.strerror}") from None
    if not pem:
        return None
    from cryptography.hazmat.primitives import serialization

    passphrase = connection.option("snowflake_private_key_passphrase")
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_private_key(data, password=passphrase.encode() if passphrase else None)
    except (ValueError, TypeError) as exc:
        reason = str(exc).splitlines()[0] if "password" in str(exc).lower() else "not a PEM private key"
        raise ConfigError(f"the snowflake private key cannot be read ({reason}); give the PEM text of the key "
                          f"(and snowflake_private_key_passphrase when it is encrypted)") from None
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def connect_kwargs(connection: ConnectionSettings) -> dict[str, Any]:
    """The connector's arguments from the worker's settings; ConfigError naming what is missing."""
    opt = connection.option
    missing = [name for name in ("snowflake_account", "snowflake_user", "snowflake_database") if not opt(name)]
    if missing:
        raise ConfigError(f"the snowflake destination needs {', '.join(missing)} in the worker's config file or "
                          f"environment (SINGER_INGEST_{missing[0].upper()})")
    kwargs: dict[str, Any] = {
        "account": opt("snowflake_account"), "user": opt("snowflake_user"), "login_timeout": 60,
        "application": "singer-ingest", "autocommit": True,
        "session_parameters": {"TIMEZONE": "UTC", "LOCK_TIMEOUT": LOCK_TIMEOUT_SECONDS,
                               "QUERY_TAG": "singer-ingest"},
    }
    for setting, arg in (("snowflake_role", "role"), ("snowflake_warehouse", "warehouse")):
        if opt(setting):
            kwargs[arg] = opt(setting)
    if opt("snowflake_host"):
        kwargs.update(host=opt("snowflake_host"), port=int(opt("snowflake_port")),
                      protocol=opt("snowflake_protocol"))
    key = _private_key(connection)
    password = opt("snowflake_password")
    if key is not None and password:
        raise ConfigError("set either snowflake_password or a private key for the snowflake destination, not both")
    if key is not None:
        kwargs.update(private_key=key, authenticator="SNOWFLAKE_JWT")
    elif password:
        kwargs["password"] = password
    else:
        raise ConfigError("the snowflake destination needs snowflake_password, snowflake_private_key or "
                          "snowflake_private_key_path in the worker's config file or environment")
    return kwargs


def open_destination(run: RunSettings, connection: ConnectionSettings, *, embedded: bool) -> "SnowflakeDestination":
    kwargs = connect_kwargs(connection)
    # The connector logs every statement at INFO; the destination logs what it does itself.
    logging.getLogger("snowflake.connector").setLevel(logging.WARNING)
    # Only a local stand-in speaks plain http (the service is https only): fakesnow, which cannot MERGE inside a
    # transaction (it builds the MERGE from a helper table it records in another database). There the upsert runs
    # as DELETE and INSERT in the same transaction, with the same result.
    merge = kwargs.get("protocol", "https") != "http"
    return SnowflakeDestination(kwargs, resolve_identifier(connection.option("snowflake_database")),
                                schema_ident(run.default_target_schema), max_connections=run.max_parallelism + 1,
                                merge_in_transaction=merge)


# -- the destination --------------------------------------------------------------------------------------------
class SnowflakeDestination(base.Destination):
    max_identifier_bytes = MAX_IDENTIFIER_CHARS

    def __init__(self, connect_kwargs: dict, database: str, schema: str = DEFAULT_SCHEMA, *,
                 max_connections: int = 10, retry_deadline_seconds: float = 300.0, merge_in_transaction: bool = True):
        self._connect_kwargs = dict(connect_kwargs)
        self.merge_in_transaction = merge_in_transaction
        self.database = database
        self.schema = schema
        self.retry_deadline_seconds = retry_deadline_seconds
        self._pool = ConnectionPool("snowflake", self._connect, is_open=lambda conn: not conn.is_closed(),
                                    errors=sf_errors.Error, max_connections=max_connections)
        self._lock = threading.Lock()
        self._instance = uuid.uuid4().hex[:12]      # this worker's staging tables and stage folder
        self._staging: dict[str, tuple] = {}        # table -> the columns its staging table was made with
        self._tmpdir = tempfile.mkdtemp(prefix="singer-ingest-snowflake-")
        self._ready = False  # the database and schema exist
        self._run(None, "prepare the database", self._prepare)

    # -- connections -------------------------------------------------------------------------------
    def _connect(self):
        conn = snowflake.connector.connect(**self._connect_kwargs)
        if self._ready:
            # COPY and PUT want a current schema; every other statement names its objects in full.
            try:
                with conn.cursor() as cur:
                    cur.execute(f"USE SCHEMA {quote(self.database)}.{quote(self.schema)}")
            except BaseException:
                conn.close()
                raise
        return conn

    def _run(self, stream: str | None, what: str, fn, lines: list[int] | None = None):
        def attempt():
            try:
                conn = self._pool.get()
            except sf_errors.Error as exc:
                raise _translate(exc, stream, lines) from exc
            try:
                with conn.cursor() as cur:
                    result = fn(cur)
            except BaseException as exc:
                broken = isinstance(exc, (sf_errors.OperationalError, sf_errors.InterfaceError))
                if not broken:
                    try:
                        conn.rollback()  # a transaction the error left open (ROLLBACK outside one is harmless)
                    except sf_errors.Error:
                        broken = True
                self._pool.put(conn, broken=broken)
                if isinstance(exc, sf_errors.Error):
                    raise _translate(exc, stream, lines) from exc
                raise
            self._pool.put(conn, broken=False)
            return result

        return with_retries(attempt, what=what, deadline_seconds=self.retry_deadline_seconds)

    # -- names -------------------------------------------------------------------------------------
    def _t(self, table: str) -> str:
        return f"{quote(self.database)}.{quote(self.schema)}.{quote(table)}"

    def _table(self, spec: TableSpec) -> str:
        return self._t(column_ident(spec.table))

    @property
    def _stage(self) -> str:
        return "@" + self._t(STAGE)

    # -- set-up ------------------------------------------------------------------------------------
    def _prepare(self, cur) -> None:
        db = quote(self.database)
        try:
            cur.execute(f"USE DATABASE {db}")
        except sf_errors.ProgrammingError:
            cur.execute(f"CREATE DATABASE IF NOT EXISTS {db}")
            logger.info("snowflake: created database %s", self.database)
        cur.execute(f"SELECT COUNT(*) FROM {db}.INFORMATION_SCHEMA.SCHEMATA WHERE SCHEMA_NAME = %s", [self.schema])
        if not cur.fetchone()[0]:
            cur.execute(f"CREATE SCHEMA IF NOT EXISTS {db}.{quote(self.schema)}")
            logger.info("snowflake: created schema %s.%s", self.database, self.schema)
        cur.execute(f"CREATE STAGE IF NOT EXISTS {self._t(STAGE)}")
        cur.execute(f"CREATE TABLE IF NOT EXISTS {self._t(OFFSETS_TABLE)} (RUN_ID VARCHAR NOT NULL, "
                    f"STREAM VARCHAR NOT NULL, SEQ NUMBER(38,0) NOT NULL, FENCE NUMBER(38,0) NOT NULL, "
                    f"UPDATED_AT TIMESTAMP_TZ)")
        cur.execute(f"USE SCHEMA {db}.{quote(self.schema)}")
        self._ready = True

    def _existing(self, cur, table: str) -> tuple[list[Column], list[str]] | None:
        """The table's columns (names as the spec has them, logical types) and the half-done widenings' columns;
        None when there is no such table."""
        cur.execute(f"SELECT COLUMN_NAME, DATA_TYPE, NUMERIC_SCALE FROM {quote(self.database)}.INFORMATION_SCHEMA."
                    f"COLUMNS WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s ORDER BY ORDINAL_POSITION",
                    [self.schema, table])
        rows = cur.fetchall()
        if not rows:
            return None
        cols, leftovers = [], []
        for name, dtype, scale in rows:
            if name.startswith(WIDEN_PREFIX):
                leftovers.append(name)
                continue
            kind = LOGICAL.get(str(dtype).upper(), base.STRING)
            if kind == base.INTEGER and scale:
                kind = base.NUMBER
            cols.append(Column(from_snowflake(name), None, kind))
        return cols, leftovers

    def ensure_table(self, spec: TableSpec) -> TableSpec:
        spec = TableSpec(spec.stream, spec.table, self.schema, spec.columns, spec.key_columns, spec.metadata)
        table = column_ident(spec.table)
        t = self._t(table)

        def fn(cur):
            found = self._existing(cur, table)
            if found is not None and found[1]:
                self._finish_widening(cur, t, {c.name for c in found[0]}, [c.name for c in spec.columns], found[1])
                found = self._existing(cur, table)
            existing = None if found is None else TableSpec(spec.stream, spec.table, self.schema,
                                                             tuple(found[0]), spec.key_columns, spec.metadata)
            merged, add, change = base.merge_specs(existing, spec)
            if existing is None:
                cols = ", ".join(f"{quote(column_ident(c.name))} {TYPES[c.type]}" for c in merged.columns)
                cur.execute(f"CREATE TABLE IF NOT EXISTS {t} ({cols})")
                logger.info("stream %r: created table %s.%s.%s", spec.stream, self.database, self.schema, table)
            for c in add:
                cur.execute(f"ALTER TABLE {t} ADD COLUMN {quote(column_ident(c.name))} {TYPES[c.type]}")
                logger.info("stream %r: added column %s %s", spec.stream, column_ident(c.name), TYPES[c.type])
            old_types = {c.name: c.type for c in existing.columns} if existing else {}
            for c in change:
                self._change_type(cur, spec, t, c, old_types[c.name])
            return merged

        merged = self._run(spec.stream, f"set up table for stream {spec.stream!r}", fn)
        with self._lock:
            self._staging.pop(table, None)  # made again, with the new columns, by the next upsert
        return merged

    @staticmethod
    def _widen_name(name: str) -> str:
        return WIDEN_PREFIX + hashlib.sha1(column_ident(name).encode()).hexdigest()[:16].upper()

    def _finish_widening(self, cur, t: str, present: set[str], wanted: list[str], leftovers: list[str]) -> None:
        """Finish type changes that stopped half way: a filled column whose old column is still there is dropped
        (the change runs again); one whose old column is gone takes the old column's name."""
        names = {self._widen_name(name): name for name in [*present, *wanted]}
        for tmp in leftovers:
            name = names.get(tmp)
            if name in present:
                cur.execute(f"ALTER TABLE {t} DROP COLUMN {quote(tmp)}")
            elif name is not None:
                cur.execute(f"ALTER TABLE {t} RENAME COLUMN {quote(tmp)} TO {quote(column_ident(name))}")
            else:
                logger.warning("snowflake: table %s holds a half-done type change (%s) of a column the stream no "
                               "longer has; it is kept under that name", t, tmp)

    def _change_type(self, cur, spec: TableSpec, t: str, c: Column, old: str) -> None:
        col = quote(column_ident(c.name))
        tmp = quote(self._widen_name(c.name))
        if c.type == base.JSON:
            value = f"TO_VARIANT({col})"
        elif c.type == base.STRING:
            value = f"{col}::VARCHAR"
        else:
            value = f"{col}::{TYPES[c.type]}"
        cur.execute(f"ALTER TABLE {t} ADD COLUMN {tmp} {TYPES[c.type]}")
        cur.execute(f"UPDATE {t} SET {tmp} = {value}")
        cur.execute(f"ALTER TABLE {t} DROP COLUMN {col}")
        cur.execute(f"ALTER TABLE {t} RENAME COLUMN {tmp} TO {col}")
        logger.info("stream %r: widened column %s to %s", spec.stream, column_ident(c.name), TYPES[c.type])

    def _staging_table(self, spec: TableSpec) -> str:
        """This worker's staging table for ``spec``'s table, made (outside any transaction) when missing or when
        the table's columns changed."""
        table = column_ident(spec.table)
        name = STAGING_PREFIX + hashlib.sha1(table.encode()).hexdigest()[:12].upper() + "_" + self._instance.upper()
        cols = tuple((c.name, c.type) for c in spec.columns)
        with self._lock:
            ready = self._staging.get(table) == cols
        if not ready:
            defs = ", ".join(f"{quote(column_ident(c.name))} {TYPES[c.type]}" for c in spec.columns)

            def fn(cur):
                cur.execute(f"CREATE OR REPLACE TRANSIENT TABLE {self._t(name)} ({defs})")

            self._run(spec.stream, f"make the staging table of stream {spec.stream!r}", fn)
            with self._lock:
                self._staging[table] = cols
        return self._t(name)

    def _lock_offset(self, cur, run_id: str, stream: str, fence: int) -> int:
        """Touch the stream's offset row (the UPDATE holds Snowflake's lock on the offsets table until the
        transaction ends) and return its offset; raise Fenced for a stale token."""
        offsets = self._t(OFFSETS_TABLE)
        cur.execute(f"UPDATE {offsets} SET UPDATED_AT = CURRENT_TIMESTAMP() WHERE RUN_ID = %s AND STREAM = %s",
                    [run_id, stream])
        cur.execute(f"SELECT MAX(SEQ), MAX(FENCE) FROM {offsets} WHERE RUN_ID = %s AND STREAM = %s",
                    [run_id, stream])
        seq, stored = cur.fetchone()
        if seq is None:
            raise DestinationError(f"the stream has no offset row in {OFFSETS_TABLE}: it was not claimed, or the "
                                   f"row was deleted", transient=False, stream=stream)
        if stored > fence:
            raise Fenced(f"stream {stream!r}: another worker took this stream over (fence {stored} > {fence})")
        return int(seq)

    def _set_offset(self, cur, run_id: str, stream: str, seq: int, fence: int) -> None:
        cur.execute(f"UPDATE {self._t(OFFSETS_TABLE)} SET SEQ = GREATEST(SEQ, %s), FENCE = %s, "
                    f"UPDATED_AT = CURRENT_TIMESTAMP() WHERE RUN_ID = %s AND STREAM = %s",
                    [seq, fence, run_id, stream])

    def _stored_offset(self, run_id: str, stream: str) -> int:
        def fn(cur):
            cur.execute(f"SELECT SEQ FROM {self._t(OFFSETS_TABLE)} WHERE RUN_ID = %s AND STREAM = %s",
                        [run_id, stream])
            row = cur.fetchone()
            return int(row[0]) if row else 0

        return self._run(stream, f"read the offset of stream {stream!r}", fn)

    def claim_stream(self, run_id: str, stream: str, fence: int) -> int:
        def fn(cur):
            # The row is made on its own first (a stream is claimed by one worker at a time, under its lease).
            cur.execute(f"INSERT INTO {self._t(OFFSETS_TABLE)} (RUN_ID, STREAM, SEQ, FENCE, UPDATED_AT) "
                        f"SELECT %s, %s, 0, %s, CURRENT_TIMESTAMP() WHERE NOT EXISTS (SELECT 1 FROM "
                        f"{self._t(OFFSETS_TABLE)} WHERE RUN_ID = %s AND STREAM = %s)",
                        [run_id, stream, fence, run_id, stream])
            cur.execute("BEGIN")
            seq = self._lock_offset(cur, run_id, stream, fence)
            self._set_offset(cur, run_id, stream, seq, fence)
            cur.execute("COMMIT")
            return seq

        return self._run(stream, f"claim stream {stream!r}", fn)

    # -- writing -----------------------------------------------------------------------------------
    def _stage_file(self, cur, spec: TableSpec, data: "pa.Table") -> str:
        """Write ``data`` as Parquet and PUT it to the stage under a new name; its path in the stage."""
        name = f"{uuid.uuid4().hex}.parquet"
        local = os.path.join(self._tmpdir, name)
        pq.write_table(parquet_table(spec, data), local)
        folder = f"{self._instance}/"
        try:
            path = local.replace("\\", "/").replace("'", "\\'")
            cur.execute(f"PUT 'file://{path}' {self._stage}/{folder} AUTO_COMPRESS = FALSE SOURCE_COMPRESSION = NONE "
                        f"OVERWRITE = TRUE")
        finally:
            os.unlink(local)
        return f"{self._stage}/{folder}{name}"

    def _copy(self, cur, spec: TableSpec, into: str, staged: str, count: int, lines: list[int]) -> None:
        cols = ", ".join(quote(column_ident(c.name)) for c in spec.columns)
        picks = ", ".join(select_expression(i, c) for i, c in enumerate(spec.columns))
        cur.execute(f"COPY INTO {into} ({cols}) FROM (SELECT {picks} FROM {staged}) FILE_FORMAT = (TYPE = PARQUET) "
                    f"ON_ERROR = ABORT_STATEMENT PURGE = TRUE")
        result = cur.fetchall()
        loaded = sum(int(r[3] or 0) for r in result if len(r) > 3 and str(r[1]).upper() != "LOAD_FAILED")
        if loaded != count:
            first_error = next((str(r[6]) for r in result if len(r) > 6 and r[6]), "")
            raise DestinationError(f"COPY INTO loaded {loaded} of {count} rows{': ' + first_error if first_error else ''}",
                                   transient=False, stream=spec.stream, line=_line_of(first_error, lines))

    def _merge_sql(self, spec: TableSpec, t: str, staging: str) -> list[str]:
        """The statements that upsert the staging table's rows into ``t``: the last row by ``_sdc_sequence`` of
        each key, never replacing a stored row with a higher sequence. One MERGE on Snowflake; on a server that
        cannot MERGE inside a transaction (``merge_in_transaction`` off), a DELETE and an INSERT that do the same."""
        keys = [column_ident(k) for k in spec.key_columns]
        names = [column_ident(c.name) for c in spec.columns]
        seq = quote(column_ident(base.SEQUENCE_COLUMN))
        source = f"SELECT * FROM {staging}"
        if spec.metadata:
            source += (f" QUALIFY ROW_NUMBER() OVER (PARTITION BY {', '.join(map(quote, keys))} "
                       f"ORDER BY {seq} DESC) = 1")
        on = " AND ".join(f"t.{quote(k)} = s.{quote(k)}" for k in keys)
        guard = f" AND (t.{seq} IS NULL OR t.{seq} <= s.{seq})" if spec.metadata else ""
        cols = ", ".join(map(quote, names))
        if not self.merge_in_transaction:
            return [f"DELETE FROM {t} AS t USING ({source}) AS s WHERE {on}{guard}",
                    f"INSERT INTO {t} ({cols}) SELECT {', '.join('s.' + quote(n) for n in names)} FROM ({source}) "
                    f"AS s WHERE NOT EXISTS (SELECT 1 FROM {t} AS t WHERE {on})"]
        others = [n for n in names if n not in keys] or keys
        sets = ", ".join(f"{quote(n)} = s.{quote(n)}" for n in others)
        return [f"MERGE INTO {t} AS t USING ({source}) AS s ON {on} WHEN MATCHED{guard} THEN UPDATE SET {sets} "
                f"WHEN NOT MATCHED THEN INSERT ({cols}) VALUES ({', '.join('s.' + quote(n) for n in names)})"]

    def write_batch(self, spec: TableSpec, batch: Batch) -> None:
        spec = TableSpec(spec.stream, spec.table, self.schema, spec.columns, spec.key_columns, spec.metadata)
        base.require_keys(spec, batch)
        rows, lines = batch.rows, batch.lines
        keyed = batch.upsert and bool(spec.key_columns)
        # A replay of a committed batch is not loaded at all (and checked again under the lock below, which decides).
        if base.committed_before(self._stored_offset(batch.run_id, spec.stream), spec.stream, batch.upto_seq,
                                 batch.has_writes):
            return
        data = None
        if rows:
            if keyed:
                deduped, lines = base.last_by_sequence(spec, rows, lines)
                data = batch.arrow(spec) if deduped is rows else arrow_table(spec, deduped)
                rows = deduped
            else:
                data = batch.arrow(spec)
        letters = self.dead_letter_table(self.schema) if batch.dead_letters else None
        staging = self._staging_table(spec) if keyed and rows else None
        t = self._table(spec)

        def fn(cur):
            staged = self._stage_file(cur, spec, data) if rows else None
            staged_letters = self._stage_file(cur, letters, arrow_table(letters, batch.dead_letters)) \
                if letters else None
            cur.execute("BEGIN")
            if batch.truncate_first:
                cur.execute(f"DELETE FROM {t}")
            if staged:
                if staging:
                    cur.execute(f"DELETE FROM {staging}")
                    self._copy(cur, spec, staging, staged, len(rows), lines)
                    for statement in self._merge_sql(spec, t, staging):
                        cur.execute(statement)
                    cur.execute(f"DELETE FROM {staging}")
                else:
                    self._copy(cur, spec, t, staged, len(rows), lines)
            if staged_letters:
                self._copy(cur, letters, self._table(letters), staged_letters, len(batch.dead_letters), [])
            stored = self._lock_offset(cur, batch.run_id, spec.stream, batch.fence)
            if base.committed_before(stored, spec.stream, batch.upto_seq, batch.has_writes):
                cur.execute("ROLLBACK")
                return
            self._set_offset(cur, batch.run_id, spec.stream, batch.upto_seq, batch.fence)
            cur.execute("COMMIT")

        self._run(spec.stream, f"write batch of stream {spec.stream!r}", fn, lines)

    def activate_version(self, spec: TableSpec, version: int, *, run_id: str, upto_seq: int, fence: int,
                         hard_delete: bool, deleted_at: str) -> None:
        t = self._table(spec)
        ver = quote(column_ident(base.VERSION_COLUMN))
        deleted = quote(column_ident(base.DELETED_COLUMN))

        def fn(cur):
            cur.execute("BEGIN")
            if spec.metadata:
                if hard_delete:
                    cur.execute(f"DELETE FROM {t} WHERE {ver} IS NULL OR {ver} < %s", [version])
                else:
                    cur.execute(f"UPDATE {t} SET {deleted} = %s::VARCHAR::TIMESTAMP_TZ WHERE ({ver} IS NULL OR "
                                f"{ver} < %s) AND {deleted} IS NULL", [deleted_at, version])
            self._lock_offset(cur, run_id, spec.stream, fence)
            self._set_offset(cur, run_id, spec.stream, upto_seq, fence)
            cur.execute("COMMIT")

        if not spec.metadata:
            logger.warning("stream %r: ACTIVATE_VERSION ignored: add_record_metadata is off, so rows carry "
                           "no _sdc_table_version", spec.stream)
        self._run(spec.stream, f"activate version {version} of stream {spec.stream!r}", fn)

    def close(self) -> None:
        with self._lock:
            staging = [STAGING_PREFIX + hashlib.sha1(table.encode()).hexdigest()[:12].upper() + "_" +
                       self._instance.upper() for table in self._staging]
            self._staging.clear()
        if staging and not self._pool.closed:
            def fn(cur):
                for name in staging:
                    cur.execute(f"DROP TABLE IF EXISTS {self._t(name)}")
            try:
                self._run(None, "drop the staging tables", fn)
            except DestinationError as exc:
                logger.warning("snowflake: staging tables of this worker (%s) were not dropped: %s",
                               ", ".join(staging), exc.what)
        self._pool.close()
        shutil.rmtree(self._tmpdir, ignore_errors=True)


# -- small helpers ----------------------------------------------------------------------------------------------
def _line_of(text: str, lines: list[int] | None) -> int | None:
    """The input line of the row a Snowflake message names ("Row N", counted from 1)."""
    m = _ROW.search(text or "")
    if not (m and lines):
        return None
    n = int(m.group(1))
    return lines[n - 1] if 1 <= n <= len(lines) else None


def _translate(exc: BaseException, stream: str | None, lines: list[int] | None) -> DestinationError:
    errno = getattr(exc, "errno", None)
    text = getattr(exc, "raw_msg", None) or getattr(exc, "msg", None) or str(exc) or type(exc).__name__
    text = str(text).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    transient = isinstance(exc, (sf_errors.OperationalError, sf_errors.InterfaceError)) or errno in TRANSIENT_ERRNOS
    return DestinationError(f"Snowflake error {errno}: {first}" if errno else f"Snowflake: {first}",
                            transient=transient, stream=stream, line=_line_of(text, lines))

"""MySQL 8 and MariaDB 10.11 destination (PyMySQL).

Where rows go: the database named by ``default_target_schema``; when that is unset, the database in the
path of ``mysql_url`` (``mysql://user:password@host:3306/mydb``); when the URL names none either,
``singer_ingest``. The database is created if missing (``utf8mb4``, ``utf8mb4_bin``).

Load path of a batch, in one InnoDB transaction (DDL never runs inside it: ``ensure_table`` runs on its own,
since CREATE/ALTER TABLE commit implicitly; CREATE/DROP TEMPORARY TABLE do not):
1. lock the stream's offset row (``SELECT ... FOR UPDATE``), check the fencing token, and skip a batch the
   stored offset already covers (``base.committed_before``);
2. ``LOAD DATA LOCAL INFILE`` of the rows as tab-separated text (``\\N`` for NULL; backslash, tab, newline,
   carriage return and NUL escaped with a backslash), built in memory and handed to the server from memory:
   PyMySQL reads a named file when the server asks for one, so this module's connection class answers the
   request with the batch's bytes instead (and sends nothing else: a server cannot read a client file through
   it). Rows of a stream without keys go straight into the target; keyed rows go into a temporary staging
   table. ``LOAD DATA LOCAL`` turns bad values into warnings instead of errors (the server cannot stop the
   client's transfer), so any warning fails the batch, naming the input line of the row it names;
3. keyed rows move with ``INSERT ... SELECT ... ON DUPLICATE KEY UPDATE``, each column guarded by
   ``_sdc_sequence`` (a row is only replaced by one with a higher sequence; the sequence itself is assigned
   last, as MySQL applies the assignments in order). The update reads the staging table's columns, which both
   MariaDB and MySQL 8 accept, so neither ``VALUES()`` (deprecated in MySQL 8.0.20) nor MySQL's row alias
   (refused by MariaDB) is needed. A batch holding one key twice keeps its last row by sequence before loading.
   A table whose primary key is not the stream's key (made elsewhere) is merged by DELETE, then INSERT;
4. the batch's dead letters (``Batch.dead_letters``) into the dead-letter table ``_singer_ingest_dead_letter``
   of the same database, by the same ``LOAD DATA LOCAL`` from memory (or multi-row INSERT), keyed by (stream,
   _sdc_sequence). The table is created on first use by ``ensure_table`` (CREATE TABLE IF NOT EXISTS under a
   named lock), before the batch's transaction begins, since its DDL commits implicitly;
5. raise the stream's offset; COMMIT.

The dead letters thus commit with the rows and the offset, or not at all: a replay the offset covers writes
neither again (``base.committed_before(..., batch.has_writes)``, also for a batch of dead letters only), and a
fenced stale owner writes neither.

Where the server has ``local_infile`` off (MySQL 8's default), the rows go by multi-row INSERT statements of
about 1 MB each instead, into the same staging table or target; that is logged once.

Types: integer BIGINT; number DECIMAL(65,30), which keeps 19.99 as 19.99 (written from the shortest text of
the JSON value, not through a binary double) and every 64-bit integer after an integer column is widened; a
number it cannot hold exactly (more than 35 digits before the point or 30 after it) fails the batch, naming
the input line, instead of being rounded. string LONGTEXT, and VARCHAR for key columns (InnoDB indexes 3072
bytes of a key: the string key columns share what the other key columns leave, 4 bytes a character, so one
string key holds 768 characters; a longer key value fails the batch naming its input line). boolean
TINYINT(1). date-time DATETIME(6) in UTC: MySQL has no type that keeps an offset, so values with an offset are
converted to UTC on the way in (values without one are taken as UTC). date DATE, time TIME(6) (an offset
converted to UTC as well). JSON values are JSON (on MariaDB a LONGTEXT checked by JSON_VALID), written as
orjson text. Every string column is utf8mb4 with the binary collation utf8mb4_bin: 4-byte characters survive
and keys compare exactly. A key property of JSON type cannot be indexed and is refused.

Schema evolution never drops a column: new columns are added; integer widens to DECIMAL in place (values
kept); a column becoming JSON or string gets a new column filled from the old one (strings become JSON
strings through JSON_QUOTE, numbers JSON numbers, booleans true/false, date-times ISO 8601 text), then one
ALTER TABLE drops the old column and renames the new one, so a crash leaves either the old column or the
new one.

Connections come from a small thread-safe pool (one per drain thread, and one for the worker's own loop); a
connection that failed is thrown away, and transient errors (connection lost, server gone, lock wait timeout,
deadlock, too many connections) are retried with backoff on a fresh one. Other errors fail the run with a
message naming the stream and, where MySQL says which row, the input line. The URL's password is never logged
and never part of an error message.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from datetime import datetime, time, timezone
from typing import Any, Callable
from urllib.parse import parse_qsl, unquote, urlsplit

import orjson
import pymysql
import pymysql.connections
import pymysql.err
from pymysql.converters import escape_string

from ingest.config import ConnectionSettings, RunSettings
from ingest.errors import ConfigError, DestinationError, Fenced

from .. import base
from ..base import Batch, Column, TableSpec
from ..pool import ConnectionPool
from ..retry import with_retries

logger = logging.getLogger(__name__)

OFFSETS_TABLE = "_singer_ingest_offsets"
# Normalised names hold only a-z, 0-9 and _: a name with $ cannot be a stream's table (a temporary table would
# hide a table of the same name), and the aliases below cannot be a table's name either.
STAGE_TABLE = "_singer_ingest$stage"
NEW, OLD = "new$", "old$"               # the aliases of the staging table and the target in merges
STAGE_ROW = "_singer_ingest_row"        # the staging table's row number: the order rows came in
WIDEN_PREFIX = "_singer_ingest_w_"      # a column being filled while another one changes type
DEFAULT_DATABASE = "singer_ingest"
CHARSET, COLLATION = "utf8mb4", "utf8mb4_bin"
TABLE_OPTIONS = f"ENGINE=InnoDB DEFAULT CHARSET={CHARSET} COLLATE={COLLATION}"
KEY_BYTES = 3072                        # InnoDB's limit on an index key (DYNAMIC row format)
MAX_STREAM_CHARS = 512                  # the offsets table's key holds stream names up to this long
INFILE_NAME = "singer-ingest-batch"     # the name LOAD DATA LOCAL asks for; answered from memory
INFILE_PACKET_BYTES = 1 << 20
INSERT_STATEMENT_BYTES = 1 << 20        # multi-row INSERT statements of about this size (local_infile off)
LOCK_WAIT_SECONDS = 30
SESSION_SQL = ("SET SESSION sql_mode = 'STRICT_ALL_TABLES,ERROR_FOR_DIVISION_BY_ZERO,NO_ENGINE_SUBSTITUTION', "
               f"time_zone = '+00:00', innodb_lock_wait_timeout = {LOCK_WAIT_SECONDS}")

TYPES = {
    base.INTEGER: "BIGINT",
    base.NUMBER: "DECIMAL(65,30)",
    base.STRING: "LONGTEXT",
    base.BOOLEAN: "TINYINT(1)",
    base.TIMESTAMP: "DATETIME(6)",
    base.DATE: "DATE",
    base.TIME: "TIME(6)",
    base.JSON: "JSON",
}
KEY_TYPE_BYTES = {base.INTEGER: 8, base.NUMBER: 30, base.BOOLEAN: 1, base.TIMESTAMP: 8, base.DATE: 3, base.TIME: 6}
LOGICAL = {
    "bigint": base.INTEGER, "int": base.INTEGER, "mediumint": base.INTEGER, "smallint": base.INTEGER,
    "tinyint": base.INTEGER, "decimal": base.NUMBER, "double": base.NUMBER, "float": base.NUMBER,
    "char": base.STRING, "varchar": base.STRING, "tinytext": base.STRING, "text": base.STRING,
    "mediumtext": base.STRING, "longtext": base.STRING, "datetime": base.TIMESTAMP, "timestamp": base.TIMESTAMP,
    "date": base.DATE, "time": base.TIME, "json": base.JSON,
}

# Error codes after which the same statement may succeed on a fresh connection or a little later.
CONNECTION_LOST = {2003, 2006, 2013, 2055, 1053, 1927, 4031}  # can't connect, gone, lost, shutdown, killed, idle
TRANSIENT_CODES = CONNECTION_LOST | {1205, 1213, 1040, 1614}  # lock wait timeout, deadlock, too many connections
LOCAL_INFILE_REFUSED = {1148, 3948, 4166}  # the server (or client) does not allow LOAD DATA LOCAL
_AT_ROW = re.compile(r"\bat row (\d+)")
_COLUMN = re.compile(r"column [`']?(?:[^`']*[`']\.[`']){0,2}([^`']+)[`']?")

DEAD_LETTER_LINE = [c.name for c in base.DEAD_LETTER_COLUMNS].index("line")  # a dead letter's input line
_LOAD_ESCAPE = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r", "\x00": "\\0"})


def quote(ident: str) -> str:
    """Quote an identifier for MySQL: backticks, embedded backticks doubled. Every identifier goes through here."""
    return "`" + ident.replace("`", "``") + "`"


# -- values -----------------------------------------------------------------------------------------------------
def _text(value: Any) -> str:
    return value if type(value) is str else str(value)


def _number(value: Any) -> str:
    # repr of a float is its shortest round-trip text: 19.99 goes to DECIMAL as 19.99, not via a binary double.
    return repr(value) if type(value) is float else str(value)


def _bool(value: Any) -> str:
    if value is True:
        return "1"
    if value is False:
        return "0"
    return str(value)


def _json(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:  # an integer beyond 64 bits
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _parse_datetime(text: str) -> datetime | None:
    if text[-1:] in "Zz":
        text = text[:-1] + "+00:00"
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


_UTC_TEXT = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(\+00:00|Z)\Z")


def _datetime(value: Any) -> str:
    """A date-time as MySQL DATETIME text in UTC; a value Python cannot read goes as it is (MySQL refuses it and
    the batch fails naming its input line)."""
    if type(value) is str and _UTC_TEXT.match(value):  # already UTC (most taps, and the metadata columns)
        return value[:10] + " " + value[11:-6 if value[-1] == "0" else -1]
    dt = value if isinstance(value, datetime) else _parse_datetime(value) if isinstance(value, str) else None
    if dt is None:
        return _text(value)
    if dt.tzinfo is not None:
        dt = dt.astimezone(timezone.utc).replace(tzinfo=None)
    return dt.isoformat(sep=" ")


def _time(value: Any) -> str:
    if isinstance(value, str):
        text = value[:-1] + "+00:00" if value[-1:] in "Zz" else value
        try:
            t = time.fromisoformat(text)
        except ValueError:
            return value
    elif isinstance(value, time):
        t = value
    else:
        return _text(value)
    offset = t.utcoffset()
    if offset:
        day = datetime(2000, 1, 1, t.hour, t.minute, t.second, t.microsecond) - offset
        t = day.time()
    return t.replace(tzinfo=None).isoformat()


def _memo(convert: Callable[[Any], str]) -> Callable[[Any], str]:
    """``convert`` with a cache: a batch's metadata date-times repeat from row to row."""
    cache: dict[Any, str] = {}

    def memo(value: Any) -> str:
        out = cache.get(value)
        if out is None:
            out = cache[value] = convert(value)
        return out
    return memo


CONVERT: dict[str, Callable[[Any], str]] = {
    base.INTEGER: _text, base.NUMBER: _number, base.STRING: _text, base.BOOLEAN: _bool,
    base.TIMESTAMP: _datetime, base.DATE: _text, base.TIME: _time, base.JSON: _json,
}


def converters(columns: tuple[Column, ...]) -> list[Callable[[Any], str]]:
    """One text converter per column (date-time ones cached for the batch)."""
    return [_memo(CONVERT[c.type]) if c.type in (base.TIMESTAMP, base.TIME) else CONVERT[c.type] for c in columns]


# The Python types whose text a column's converter makes without a character LOAD DATA would read as an escape
# or a separator; any other value (what an unvalidated stream put there, a text passed through as it is) is
# escaped.
_PLAIN_TEXT = {base.INTEGER: (int,), base.NUMBER: (int, float), base.BOOLEAN: (bool,)}


def _escaped(convert: Callable[[Any], str], plain: tuple[type, ...] = ()) -> Callable[[Any], str]:
    esc = _LOAD_ESCAPE
    if not plain:
        def escaped(value: Any) -> str:
            return convert(value).translate(esc)
        return escaped

    def escaped_unless_plain(value: Any) -> str:
        text = convert(value)
        return text if type(value) in plain else text.translate(esc)
    return escaped_unless_plain


def load_text(columns: tuple[Column, ...], rows: list) -> bytes:
    """Rows as LOAD DATA text: tab-separated, one row a line, ``\\N`` for NULL, backslash escapes."""
    convs = [_escaped(conv, _PLAIN_TEXT.get(c.type, ())) for c, conv in zip(columns, converters(columns))]
    out = ["\t".join(["\\N" if v is None else conv(v) for conv, v in zip(convs, row)]) for row in rows]
    out.append("")
    return "\n".join(out).encode("utf-8")


def insert_statements(head: str, columns: tuple[Column, ...], rows: list) -> list[tuple[int, str]]:
    """Multi-row INSERT statements of about INSERT_STATEMENT_BYTES: (index of its first row, statement)."""
    convs = converters(columns)
    out: list[tuple[int, str]] = []
    parts: list[str] = []
    size, first = 0, 0
    for i, row in enumerate(rows):
        part = "(" + ",".join(["NULL" if v is None else "'" + escape_string(conv(v)) + "'"
                               for conv, v in zip(convs, row)]) + ")"
        parts.append(part)
        size += len(part)
        if size >= INSERT_STATEMENT_BYTES:
            out.append((first, head + ",".join(parts)))
            parts, size, first = [], 0, i + 1
    if parts:
        out.append((first, head + ",".join(parts)))
    return out


# -- the connection ---------------------------------------------------------------------------------------------
_IN_MEMORY_INFILE = hasattr(pymysql.connections.MySQLResult, "_read_load_local_packet") \
    and hasattr(pymysql.connections.Connection, "_read_query_result")


class _Result(pymysql.connections.MySQLResult):
    def _read_load_local_packet(self, first_packet):
        """Answer the server's request for the LOAD DATA file with the bytes the connection holds."""
        conn: _Connection = self.connection
        asked = first_packet.get_all_data()[1:]
        payload, conn.infile = conn.infile, None
        try:
            if payload is not None and asked == INFILE_NAME.encode():
                view = memoryview(payload)
                step = max(1024, min(INFILE_PACKET_BYTES, conn.max_allowed_packet - 1024))
                for i in range(0, len(view), step):
                    conn.write_packet(view[i:i + step])
        finally:
            conn.write_packet(b"")  # the end of the file
            ok = conn._read_packet()
        if payload is None or asked != INFILE_NAME.encode():
            raise pymysql.err.OperationalError(2068, "the server asked for a local file the client did not offer")
        if not ok.is_ok_packet():
            raise pymysql.err.OperationalError(2014, "Commands out of sync after LOAD DATA LOCAL")
        self._read_ok_packet(ok)


class _Connection(pymysql.connections.Connection):
    """A PyMySQL connection whose LOAD DATA LOCAL reads ``infile`` (bytes) instead of a file."""

    infile: bytes | None = None

    def _read_query_result(self, unbuffered=False):
        if unbuffered:
            return super()._read_query_result(unbuffered=True)
        self._result = None
        result = _Result(self)
        result.read()
        self._result = result
        if result.server_status is not None:
            self.server_status = result.server_status
        return result.affected_rows


def parse_url(url: str) -> dict[str, Any]:
    """PyMySQL connection arguments from ``mysql://user:password@host:port/database?options``; the database
    goes under the key ``database`` (None when the path names none). Errors never repeat the URL."""
    bad = ConfigError("mysql_url must look like mysql://user:password@host:3306/database (user, password and "
                      "database percent-encoded where they hold special characters)")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise bad from None
    if parts.scheme not in ("mysql", "mariadb", "mysql+pymysql") or not parts.hostname and "unix_socket" not in url:
        raise bad
    kwargs: dict[str, Any] = {"host": parts.hostname or "localhost", "port": port or 3306,
                              "user": unquote(parts.username) if parts.username else "root",
                              "password": unquote(parts.password) if parts.password else ""}
    path = unquote(parts.path.lstrip("/"))
    kwargs["database"] = path or None
    ssl: dict[str, str] = {}
    for key, value in parse_qsl(parts.query):
        if key == "unix_socket":
            kwargs["unix_socket"] = value
        elif key in ("ssl_ca", "ssl_cert", "ssl_key"):
            ssl[key[4:]] = value
        elif key == "connect_timeout":
            kwargs["connect_timeout"] = float(value)
        else:
            raise ConfigError(f"mysql_url: unknown option {key!r}; known: unix_socket, ssl_ca, ssl_cert, ssl_key, "
                              f"connect_timeout")
    if ssl:
        kwargs["ssl"] = ssl
    return kwargs


def open_destination(run: RunSettings, connection: ConnectionSettings, *, embedded: bool) -> "MySQLDestination":
    url = connection.option("mysql_url")
    if not url:
        raise ConfigError("the mysql destination needs mysql_url (mysql://user:password@host:3306/), in the worker's "
                          "config file or SINGER_INGEST_MYSQL_URL")
    # One connection per drain thread, and one for the worker's own loop (claims, table set-up).
    return MySQLDestination(parse_url(url), run.default_target_schema, max_connections=run.max_parallelism + 1)


class MySQLDestination(base.Destination):
    max_identifier_bytes = 64

    def __init__(self, connect_kwargs: dict, database: str | None = None, *, max_connections: int = 10,
                 retry_deadline_seconds: float = 300.0):
        kwargs = dict(connect_kwargs)
        self.database = database or kwargs.pop("database", None) or DEFAULT_DATABASE
        kwargs.pop("database", None)
        self._connect_kwargs = kwargs
        self.retry_deadline_seconds = retry_deadline_seconds
        self._pool = ConnectionPool("mysql", self._connect, is_open=lambda conn: conn.open, errors=pymysql.err.Error,
                                    max_connections=max_connections)
        self.mariadb: bool | None = None
        self._load_data = _IN_MEMORY_INFILE  # False once the server refused LOAD DATA LOCAL
        self._primary_keys: dict[str, tuple[str, ...]] = {}
        self._key_chars: dict[str, dict[str, int]] = {}  # table -> string key column -> VARCHAR length
        self._run(None, "prepare the database", self._prepare)
        if not _IN_MEMORY_INFILE:
            logger.warning("mysql: this PyMySQL cannot hand LOAD DATA LOCAL its rows from memory; loading by "
                           "multi-row INSERT")

    # -- connections -------------------------------------------------------------------------------
    def _connect(self) -> _Connection:
        kwargs = {"connect_timeout": 10, **self._connect_kwargs}
        conn = _Connection(charset=CHARSET, local_infile=True, autocommit=False, **kwargs)
        try:
            with conn.cursor() as cur:
                cur.execute(SESSION_SQL)
            conn.commit()
        except BaseException:
            conn.close()
            raise
        if self.mariadb is None:
            info = conn.get_server_info()
            self.mariadb = "mariadb" in info.lower()
            logger.info("mysql: %s server %s, database %s", "MariaDB" if self.mariadb else "MySQL", info,
                        self.database)
        return conn

    def _run(self, stream: str | None, what: str, fn, lines: list[int] | None = None):
        def attempt():
            try:
                conn = self._pool.get()
            except pymysql.err.Error as exc:
                raise self._translate(exc, stream, lines) from exc
            try:
                with conn.cursor() as cur:
                    result = fn(cur)
                conn.commit()
            except BaseException as exc:
                broken = isinstance(exc, pymysql.err.InterfaceError) or (
                    isinstance(exc, pymysql.err.OperationalError) and _code(exc) in CONNECTION_LOST)
                if not broken:
                    try:
                        conn.rollback()
                    except pymysql.err.Error:
                        broken = True
                self._pool.put(conn, broken=broken)
                if isinstance(exc, pymysql.err.Error):
                    raise self._translate(exc, stream, lines) from exc
                raise
            self._pool.put(conn, broken=False)
            return result

        return with_retries(attempt, what=what, deadline_seconds=self.retry_deadline_seconds)

    @staticmethod
    def _translate(exc: pymysql.err.Error, stream: str | None, lines: list[int] | None,
                   offset: int = 0) -> DestinationError:
        code = _code(exc)
        text = str(exc.args[1]) if len(exc.args) > 1 else str(exc) or type(exc).__name__
        text = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        transient = isinstance(exc, pymysql.err.InterfaceError) or code in TRANSIENT_CODES
        return DestinationError(f"MySQL error {code}: {text}" if code else f"MySQL: {text}", transient=transient,
                                stream=stream, line=_line_of(text, lines, offset))

    # -- helpers -----------------------------------------------------------------------------------
    def _t(self, table: str) -> str:
        return f"{quote(self.database)}.{quote(table)}"

    def _prepare(self, cur) -> None:
        cur.execute(f"CREATE DATABASE IF NOT EXISTS {quote(self.database)} CHARACTER SET {CHARSET} "
                    f"COLLATE {COLLATION}")
        # Statements name the database of every table; it is also the session's default database, which MariaDB
        # wants for the alias of a multi-table DELETE.
        cur.execute(f"USE {quote(self.database)}")
        self._connect_kwargs["database"] = self.database
        cur.execute(f"CREATE TABLE IF NOT EXISTS {self._t(OFFSETS_TABLE)} (run_id VARCHAR(64) NOT NULL, "
                    f"stream VARCHAR({MAX_STREAM_CHARS}) NOT NULL, seq BIGINT NOT NULL, fence BIGINT NOT NULL, "
                    f"updated_at DATETIME(6) NOT NULL, PRIMARY KEY (run_id, stream)) {TABLE_OPTIONS}")

    def _lock_offset(self, cur, run_id: str, stream: str, fence: int) -> int:
        """Lock (creating it if needed) the stream's offset row; raise Fenced for a stale token."""
        if len(stream) > MAX_STREAM_CHARS:
            raise DestinationError(f"the stream name is longer than {MAX_STREAM_CHARS} characters, more than the "
                                   f"mysql destination keeps offsets for", transient=False, stream=stream)
        offsets = self._t(OFFSETS_TABLE)
        cur.execute(f"INSERT INTO {offsets} VALUES (%s, %s, 0, %s, UTC_TIMESTAMP(6)) "
                    f"ON DUPLICATE KEY UPDATE seq = seq", [run_id, stream, fence])
        cur.execute(f"SELECT seq, fence FROM {offsets} WHERE run_id = %s AND stream = %s FOR UPDATE",
                    [run_id, stream])
        seq, stored = cur.fetchone()
        if stored > fence:
            raise Fenced(f"stream {stream!r}: another worker took this stream over (fence {stored} > {fence})")
        return seq

    def _set_offset(self, cur, run_id: str, stream: str, seq: int, fence: int) -> None:
        cur.execute(f"UPDATE {self._t(OFFSETS_TABLE)} SET seq = GREATEST(seq, %s), fence = %s, "
                    f"updated_at = UTC_TIMESTAMP(6) WHERE run_id = %s AND stream = %s", [seq, fence, run_id, stream])

    # -- the interface -----------------------------------------------------------------------------
    def claim_stream(self, run_id: str, stream: str, fence: int) -> int:
        def fn(cur):
            seq = self._lock_offset(cur, run_id, stream, fence)
            self._set_offset(cur, run_id, stream, seq, fence)
            return seq

        return self._run(stream, f"claim stream {stream!r}", fn)

    def _columns(self, cur, table: str) -> list[tuple[str, str, str, int | None]]:
        """(name, data type, column type, character length) of each column of a table, in order."""
        cur.execute("SELECT COLUMN_NAME, DATA_TYPE, COLUMN_TYPE, CHARACTER_MAXIMUM_LENGTH FROM "
                    "information_schema.COLUMNS WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s "
                    "ORDER BY ORDINAL_POSITION", [self.database, table])
        return [(_str(n), _str(d).lower(), _str(t).lower(), length) for n, d, t, length in cur.fetchall()]

    def _json_checked(self, cur, table: str) -> set[str]:
        """MariaDB's JSON columns: LONGTEXT with a JSON_VALID check named after the column."""
        if not self.mariadb:
            return set()
        cur.execute("SELECT CONSTRAINT_NAME, CHECK_CLAUSE FROM information_schema.CHECK_CONSTRAINTS "
                    "WHERE CONSTRAINT_SCHEMA = %s AND TABLE_NAME = %s", [self.database, table])
        return {_str(name) for name, clause in cur.fetchall()
                if _str(clause).lower() == f"json_valid({quote(_str(name))})".lower()}

    def _existing(self, cur, spec: TableSpec) -> tuple[TableSpec | None, list[str]]:
        """The table as it is, and the columns a type change left half done."""
        rows = self._columns(cur, spec.table)
        if not rows:
            return None, []
        json_cols = self._json_checked(cur, spec.table)
        cols, leftovers = [], []
        for name, dtype, ctype, _ in rows:
            if name.startswith(WIDEN_PREFIX):
                leftovers.append(name)
                continue
            if name in json_cols:
                kind = base.JSON
            elif dtype == "tinyint" and ctype.startswith("tinyint(1)"):
                kind = base.BOOLEAN
            else:
                kind = LOGICAL.get(dtype, base.STRING)
            cols.append(Column(name, None, kind))
        return TableSpec(spec.stream, spec.table, self.database, tuple(cols), spec.key_columns, spec.metadata), \
            leftovers

    def _primary_key(self, cur, table: str) -> tuple[str, ...]:
        cur.execute("SELECT COLUMN_NAME FROM information_schema.KEY_COLUMN_USAGE WHERE TABLE_SCHEMA = %s AND "
                    "TABLE_NAME = %s AND CONSTRAINT_NAME = 'PRIMARY' ORDER BY ORDINAL_POSITION", [self.database, table])
        return tuple(_str(r[0]) for r in cur.fetchall())

    def _key_types(self, spec: TableSpec) -> dict[str, str]:
        """The column type of each key column: string keys share the index's bytes left by the others."""
        by_name = {c.name: c for c in spec.columns}
        strings = [k for k in spec.key_columns if by_name[k].type == base.STRING]
        out = {}
        for k in spec.key_columns:
            kind = by_name[k].type
            if kind == base.JSON:
                raise DestinationError(f"key property {by_name[k].prop or k!r} is of JSON type (object, array or "
                                       f"mixed types); MySQL cannot index it: give it a scalar type in the "
                                       f"SCHEMA or leave it out of key_properties", transient=False,
                                       stream=spec.stream)
            if kind != base.STRING:
                out[k] = TYPES[kind]
        if strings:
            left = KEY_BYTES - sum(KEY_TYPE_BYTES[by_name[k].type] for k in spec.key_columns if k not in strings)
            chars = left // (4 * len(strings))
            for k in strings:
                out[k] = f"VARCHAR({chars})"
        return out

    def ensure_table(self, spec: TableSpec) -> TableSpec:
        spec = TableSpec(spec.stream, spec.table, self.database, spec.columns, spec.key_columns, spec.metadata)
        t = self._t(spec.table)
        lock = "singer-ingest:" + hashlib.sha1(f"{self.database}.{spec.table}".encode()).hexdigest()[:40]

        def fn(cur):
            cur.execute("SELECT GET_LOCK(%s, %s)", [lock, LOCK_WAIT_SECONDS])
            if cur.fetchone()[0] != 1:
                raise DestinationError(f"table {spec.table} is being changed by another worker (lock wait "
                                       f"timeout)", transient=True, stream=spec.stream)
            try:
                return self._ensure_table(cur, spec, t)
            finally:
                cur.execute("SELECT RELEASE_LOCK(%s)", [lock])

        return self._run(spec.stream, f"set up table for stream {spec.stream!r}", fn)

    def _ensure_table(self, cur, spec: TableSpec, t: str) -> TableSpec:
        existing, leftovers = self._existing(cur, spec)
        for name in leftovers:  # a type change that stopped half way: the old column is still there
            cur.execute(f"ALTER TABLE {t} DROP COLUMN {quote(name)}")
        merged, add, change = base.merge_specs(existing, spec)
        if existing is None:
            key_types = self._key_types(spec)
            cols = [f"{quote(c.name)} {key_types.get(c.name) or TYPES[c.type]}" for c in merged.columns]
            if spec.key_columns:
                cols.append(f"PRIMARY KEY ({', '.join(map(quote, spec.key_columns))})")
            cur.execute(f"CREATE TABLE IF NOT EXISTS {t} ({', '.join(cols)}) {TABLE_OPTIONS}")
            logger.info("stream %r: created table %s.%s", spec.stream, self.database, spec.table)
        if add:
            cur.execute(f"ALTER TABLE {t} " + ", ".join(f"ADD COLUMN {quote(c.name)} {TYPES[c.type]}" for c in add))
            for c in add:
                logger.info("stream %r: added column %s %s", spec.stream, c.name, TYPES[c.type])
        primary_key = self._primary_key(cur, spec.table)
        old_types = {c.name: c.type for c in existing.columns} if existing else {}
        for c in change:
            self._change_type(cur, spec, t, c, old_types[c.name], primary_key)
        self._primary_keys[spec.table] = primary_key
        self._key_chars[spec.table] = {name: length for name, dtype, _, length in self._columns(cur, spec.table)
                                       if name in spec.key_columns and dtype in ("varchar", "char") and length}
        return merged

    def _change_type(self, cur, spec: TableSpec, t: str, c: Column, old: str, primary_key: tuple[str, ...]) -> None:
        col = quote(c.name)
        if c.name in primary_key:
            if c.type == base.JSON:
                raise DestinationError(f"key column {c.name} would become JSON, which MySQL cannot index",
                                       transient=False, stream=spec.stream)
            new_type = self._key_types(TableSpec(spec.stream, spec.table, None, spec.columns, primary_key,
                                                 spec.metadata))[c.name]
            cur.execute(f"ALTER TABLE {t} MODIFY COLUMN {col} {new_type} NOT NULL")
        elif old == base.INTEGER and c.type == base.NUMBER:
            cur.execute(f"ALTER TABLE {t} MODIFY COLUMN {col} {TYPES[c.type]}")  # every BIGINT fits: kept as is
        else:
            # A new column filled from the old one, then one ALTER drops the old one and renames the new one.
            tmp = quote(WIDEN_PREFIX + hashlib.sha1(c.name.encode()).hexdigest()[:12])
            value = _as_text(old, col)
            if c.type == base.JSON and old in (base.STRING, base.TIMESTAMP, base.DATE, base.TIME):
                value = f"JSON_QUOTE({value})"
            cur.execute(f"ALTER TABLE {t} ADD COLUMN {tmp} {TYPES[c.type]} AFTER {col}")
            cur.execute(f"UPDATE {t} SET {tmp} = {value}")
            cur.execute(f"ALTER TABLE {t} DROP COLUMN {col}, CHANGE COLUMN {tmp} {col} {TYPES[c.type]}")
        logger.info("stream %r: widened column %s to %s", spec.stream, c.name, TYPES[c.type])

    # -- writing -----------------------------------------------------------------------------------
    def _load_dead_letters(self, cur, stream: str, letters: list[tuple]) -> None:
        """The batch's dead letters (rows of ``base.DEAD_LETTER_COLUMNS``) into the dead-letter table, in the batch's
        transaction; an error names the dead letter's input line."""
        columns = base.DEAD_LETTER_COLUMNS
        spec = TableSpec(stream, base.DEAD_LETTER_TABLE, self.database, columns, (), False)
        payload = load_text(columns, letters) if self._load_data else None
        lines = [letter[DEAD_LETTER_LINE] for letter in letters]
        try:
            self._load(cur, spec, self._t(base.DEAD_LETTER_TABLE), ", ".join(quote(c.name) for c in columns),
                       letters, lines, payload)
        except DestinationError as exc:
            if exc.transient:
                raise
            raise DestinationError(f"writing to the dead-letter table {base.DEAD_LETTER_TABLE}: {exc.what}",
                                   transient=False, stream=stream, line=exc.line) from exc

    def write_batch(self, spec: TableSpec, batch: Batch) -> None:
        if batch.dead_letters:
            self.dead_letter_table(self.database)
        rows, lines = batch.rows, batch.lines
        keyed = batch.upsert and bool(spec.key_columns)
        if keyed and rows:
            self._check_keys(spec, rows, lines)
            rows, lines = base.last_by_sequence(spec, rows, lines)
        payload = load_text(spec.columns, rows) if rows and self._load_data else None
        t = self._t(spec.table)
        cols = ", ".join(quote(c.name) for c in spec.columns)

        def fn(cur):
            stored = self._lock_offset(cur, batch.run_id, spec.stream, batch.fence)
            if base.committed_before(stored, spec.stream, batch.upto_seq, batch.has_writes):
                return
            if batch.truncate_first:
                cur.execute(f"DELETE FROM {t}")
            if rows:
                stage = self._t(STAGE_TABLE)
                if keyed:
                    cur.execute(f"DROP TEMPORARY TABLE IF EXISTS {stage}")
                    defs = ", ".join(f"{quote(c.name)} {TYPES[c.type]}" for c in spec.columns)
                    cur.execute(f"CREATE TEMPORARY TABLE {stage} ({quote(STAGE_ROW)} BIGINT AUTO_INCREMENT "
                                f"PRIMARY KEY, {defs}) {TABLE_OPTIONS}")
                self._load(cur, spec, stage if keyed else t, cols, rows, lines, payload)
                if keyed:
                    for statement in self._merge_sql(spec, t, stage, cols):
                        cur.execute(statement)
                    cur.execute(f"DROP TEMPORARY TABLE {stage}")
            if batch.dead_letters:
                self._load_dead_letters(cur, spec.stream, batch.dead_letters)
            self._set_offset(cur, batch.run_id, spec.stream, batch.upto_seq, batch.fence)

        self._run(spec.stream, f"write batch of stream {spec.stream!r}", fn)

    def _load(self, cur, spec: TableSpec, into: str, cols: str, rows: list, lines: list[int],
              payload: bytes | None) -> None:
        """Put the rows into ``into``: LOAD DATA LOCAL from memory, or multi-row INSERT where the server refuses
        that."""
        if payload is not None and self._load_data:
            cur.connection.infile = payload
            try:
                cur.execute(f"LOAD DATA LOCAL INFILE '{INFILE_NAME}' INTO TABLE {into} CHARACTER SET {CHARSET} "
                            f"FIELDS TERMINATED BY '\\t' ESCAPED BY '\\\\' LINES TERMINATED BY '\\n' ({cols})")
            except pymysql.err.Error as exc:
                if _code(exc) not in LOCAL_INFILE_REFUSED:
                    raise self._translate(exc, spec.stream, lines) from exc
                self._load_data = False
                logger.warning("mysql: the server refuses LOAD DATA LOCAL INFILE (local_infile is off: %s); "
                               "loading by multi-row INSERT instead, which is slower. SET GLOBAL local_infile = 1 "
                               "on the server for the fast path", exc.args[-1])
            else:
                loaded = cur.rowcount
                cur.execute("SHOW WARNINGS LIMIT 5")
                warnings = cur.fetchall()
                if warnings:
                    text = "; ".join(str(w[2]) for w in warnings)
                    raise DestinationError(f"MySQL refused a value: {text}", transient=False, stream=spec.stream,
                                           line=_line_of(text, lines))
                if loaded != len(rows):
                    raise DestinationError(f"LOAD DATA took {loaded} of {len(rows)} rows", transient=False,
                                           stream=spec.stream)
                return
            finally:
                cur.connection.infile = None
        head = f"INSERT INTO {into} ({cols}) VALUES "
        for first, statement in insert_statements(head, spec.columns, rows):
            try:
                cur.execute(statement)
            except pymysql.err.Error as exc:
                raise self._translate(exc, spec.stream, lines, offset=first) from exc

    def _check_keys(self, spec: TableSpec, rows: list, lines: list[int]) -> None:
        limits = self._key_chars.get(spec.table, {})
        for k in spec.key_columns:
            i = spec.index(k)
            limit = limits.get(k)
            for n, row in enumerate(rows):
                value = row[i]
                if value is None:
                    raise DestinationError(f"a key property ({', '.join(spec.key_columns)}) is null; keyed streams "
                                           f"need a value for every key property", transient=False,
                                           stream=spec.stream, line=lines[n] if lines else None)
                if limit is not None and type(value) is str and len(value) > limit:
                    raise DestinationError(f"the value of key column {k} is {len(value)} characters long; MySQL "
                                           f"indexes at most {limit} characters of it in this table (InnoDB keys "
                                           f"hold {KEY_BYTES} bytes). Shorten the key values or use another key",
                                           transient=False, stream=spec.stream, line=lines[n] if lines else None)

    def _merge_sql(self, spec: TableSpec, t: str, stage: str, cols: str) -> list[str]:
        keys = spec.key_columns
        s, o = quote(NEW), quote(OLD)
        s_cols = ", ".join(f"{s}.{quote(c.name)}" for c in spec.columns)
        seq = quote(base.SEQUENCE_COLUMN)
        if set(self._primary_keys.get(spec.table, ())) == set(keys):
            others = [c.name for c in spec.columns if c.name not in keys]
            if spec.metadata:
                newer = f"{t}.{seq} IS NULL OR {t}.{seq} <= {s}.{seq}"
                # The sequence is assigned last: MySQL applies the assignments in order, and each guard must
                # see the stored row's sequence.
                others = [n for n in others if n != base.SEQUENCE_COLUMN] + [base.SEQUENCE_COLUMN]
                sets = [f"{t}.{quote(n)} = IF({newer}, {s}.{quote(n)}, {t}.{quote(n)})" for n in others]
            else:
                sets = [f"{t}.{quote(n)} = {s}.{quote(n)}" for n in others] or \
                    [f"{t}.{quote(keys[0])} = {t}.{quote(keys[0])}"]
            return [f"INSERT INTO {t} ({cols}) SELECT {s_cols} FROM {stage} AS {s} ORDER BY {s}.{quote(STAGE_ROW)} "
                    f"ON DUPLICATE KEY UPDATE {', '.join(sets)}"]
        # No primary key matching the stream's keys (a table made elsewhere): delete, then insert.
        same = " AND ".join(f"{o}.{quote(k)} <=> {s}.{quote(k)}" for k in keys)
        guard = f" AND ({o}.{seq} IS NULL OR {o}.{seq} <= {s}.{seq})" if spec.metadata else ""
        return [
            f"DELETE {o} FROM {t} AS {o} JOIN {stage} AS {s} ON {same}{guard}",
            f"INSERT INTO {t} ({cols}) SELECT {s_cols} FROM {stage} AS {s} WHERE NOT EXISTS "
            f"(SELECT 1 FROM {t} AS {o} WHERE {same})",
        ]

    def activate_version(self, spec: TableSpec, version: int, *, run_id: str, upto_seq: int, fence: int,
                         hard_delete: bool, deleted_at: str) -> None:
        t = self._t(spec.table)
        ver = quote(base.VERSION_COLUMN)
        deleted = quote(base.DELETED_COLUMN)

        def fn(cur):
            self._lock_offset(cur, run_id, spec.stream, fence)
            if spec.metadata:
                if hard_delete:
                    cur.execute(f"DELETE FROM {t} WHERE {ver} IS NULL OR {ver} < %s", [version])
                else:
                    cur.execute(f"UPDATE {t} SET {deleted} = %s WHERE ({ver} IS NULL OR {ver} < %s) "
                                f"AND {deleted} IS NULL", [_datetime(deleted_at), version])
            self._set_offset(cur, run_id, spec.stream, upto_seq, fence)

        if not spec.metadata:
            logger.warning("stream %r: ACTIVATE_VERSION ignored: add_record_metadata is off, so rows carry "
                           "no _sdc_table_version", spec.stream)
        self._run(spec.stream, f"activate version {version} of stream {spec.stream!r}", fn)

    def close(self) -> None:
        self._pool.close()

# -- small helpers ----------------------------------------------------------------------------------------------
def _code(exc: BaseException) -> int | None:
    args = getattr(exc, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)


def _line_of(text: str, lines: list[int] | None, offset: int = 0) -> int | None:
    """The input line of the row a MySQL message names ("... at row N", counted from 1)."""
    m = _AT_ROW.search(text)
    if not (m and lines):
        return None
    n = offset + int(m.group(1))
    return lines[n - 1] if 1 <= n <= len(lines) else None


def _as_text(old: str, col: str) -> str:
    """SQL for a column's values as the text a string or JSON column keeps (NULL stays NULL)."""
    if old == base.NUMBER:  # DECIMAL text without the scale's trailing zeros: 19.990000 -> 19.99
        return f"IF(CAST({col} AS CHAR) LIKE '%.%', TRIM(TRAILING '.' FROM TRIM(TRAILING '0' FROM " \
               f"CAST({col} AS CHAR))), CAST({col} AS CHAR))"
    if old == base.BOOLEAN:
        return f"CASE WHEN {col} IS NULL THEN NULL WHEN {col} THEN 'true' ELSE 'false' END"
    if old == base.TIMESTAMP:
        return f"DATE_FORMAT({col}, '%Y-%m-%dT%H:%i:%s.%f+00:00')"
    return f"CAST({col} AS CHAR)"


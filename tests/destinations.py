"""The destinations the conformance suite runs on: one harness per destination, each on a real server.

A harness gives the suite what it needs to drive and read a destination without knowing it: the target
config for the CLI (``config``), the environment of an `rq worker` (``worker_env``), the destination opened
directly (``open``), and the tables as they are (``tables``, ``columns`` with logical types, ``rows`` with values
normalised: date-times as UTC microseconds since the epoch, numbers as Python numbers, JSON parsed, dates and
times as ISO text). A new destination joins the suite with a harness here and its name in ``HARNESSES``.
"""

from __future__ import annotations

import decimal
import uuid
from datetime import date, datetime, time, timezone
from pathlib import Path

import orjson
import pytest

from ingest.config import ConnectionSettings, RunSettings
from sinks import base, kit
from sinks.base import Destination

from .conftest import MYSQL_URL, PG_DSN, START_SERVICES


def pg_query(q, args=()):
    """One statement on the test PostgreSQL in a connection of its own (autocommit); its rows, if any."""
    import psycopg2

    con = psycopg2.connect(PG_DSN)
    con.autocommit = True
    try:
        with con.cursor() as cur:
            cur.execute(q, args)
            return cur.fetchall() if cur.description else None
    finally:
        con.close()


def _value(value, logical: str, json_decoded: bool = False):
    if value is None:
        return None
    if logical == base.JSON:
        if json_decoded:  # the driver parsed it already
            return value
        if isinstance(value, (bytes, bytearray)):
            value = value.decode()
        return orjson.loads(value) if isinstance(value, str) else value
    if isinstance(value, datetime):
        if value.tzinfo is None:  # a destination without a time-zone type stores UTC
            value = value.replace(tzinfo=timezone.utc)
        return round(value.timestamp() * 1_000_000)
    if isinstance(value, (date, time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return int(value) if value == value.to_integral_value() and logical == base.INTEGER else float(value)
    if logical == base.BOOLEAN and isinstance(value, int):
        return bool(value)
    if isinstance(value, (bytes, bytearray)):
        return value.decode()
    return value


class Harness:
    name = ""
    json_decoded = False  # the driver returns JSON columns parsed

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.schema = "t_" + uuid.uuid4().hex[:10]

    @property
    def plugin(self) -> kit.DestinationPlugin:
        return kit.get(self.name)

    @property
    def max_identifier_bytes(self) -> int:
        return self._destination_class().max_identifier_bytes

    def _destination_class(self) -> type[Destination]:
        d = self.open()
        try:
            return type(d)
        finally:
            d.close()

    def connection(self) -> dict:
        """Worker-scoped settings (the destination's connection)."""
        return {}

    def config(self, **extra) -> dict:
        return {"destination": self.name, "default_target_schema": self.schema, **self.connection(), **extra}

    def worker_env(self) -> dict:
        return {f"SINGER_INGEST_{k.upper()}": str(v) for k, v in self.connection().items()}

    def write_config(self, **extra) -> str:
        path = self.tmp_path / f"{self.name}-{uuid.uuid4().hex[:6]}.json"
        path.write_text(orjson.dumps(self.config(**extra)).decode())
        return str(path)

    def open(self) -> Destination:
        run_keys = {f.name for f in RunSettings.__dataclass_fields__.values()}
        cfg = self.config()
        run = RunSettings(**{k: v for k, v in cfg.items() if k in run_keys},
                          destination_settings={s.name: cfg[s.name] for s in self.plugin.settings
                                                if s.scope == "run" and s.name in cfg})
        connection = ConnectionSettings(destination_settings={s.name: cfg[s.name] for s in self.plugin.settings
                                                              if s.scope == "worker" and s.name in cfg})
        return self.plugin.open(run, connection, embedded=True)

    # -- reading ------------------------------------------------------------------------------------
    def tables(self) -> set[str]:
        raise NotImplementedError

    def columns(self, table: str) -> dict[str, str]:
        """Column name -> logical type, in table order."""
        raise NotImplementedError

    def _select(self, table: str, columns: list[str]) -> list[tuple]:
        raise NotImplementedError

    def rows(self, table: str) -> list[dict]:
        cols = self.columns(table)
        names = list(cols)
        return [{n: _value(v, cols[n], self.json_decoded) for n, v in zip(names, row)} for row in self._select(table, names)]

    def count(self, table: str) -> int:
        return len(self._select(table, list(self.columns(table))[:1]))

    def cleanup(self) -> None:
        pass


class DuckDBHarness(Harness):
    name = "duckdb"

    def config(self, **extra) -> dict:
        return {**super().config(**extra), "duckdb_path": str(self.tmp_path / "conformance.duckdb")}

    def _con(self):
        import duckdb

        return duckdb.connect(str(self.tmp_path / "conformance.duckdb"), read_only=True)

    def _query(self, q: str, args=()):
        con = self._con()
        try:
            return con.execute(q, list(args)).fetchall()
        finally:
            con.close()

    def tables(self) -> set[str]:
        return {r[0] for r in self._query("SELECT table_name FROM information_schema.tables WHERE table_schema = ?",
                                          [self.schema])}

    def columns(self, table: str) -> dict[str, str]:
        from sinks.duckdb.destination import LOGICAL

        rows = self._query("SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = ? "
                           "AND table_name = ? ORDER BY ordinal_position", [self.schema, table])
        return {n: LOGICAL.get(t.upper(), base.STRING) for n, t in rows}

    def _select(self, table: str, columns: list[str]) -> list[tuple]:
        from sinks.duckdb.destination import quote

        return self._query(f"SELECT {', '.join(quote(c) for c in columns)} FROM {quote(self.schema)}.{quote(table)}")


class PostgresHarness(Harness):
    name = "postgres"
    json_decoded = True  # psycopg2 parses jsonb

    def __init__(self, tmp_path: Path):
        super().__init__(tmp_path)
        import psycopg2

        try:
            psycopg2.connect(PG_DSN).close()
        except psycopg2.OperationalError as exc:
            pytest.fail(f"PostgreSQL is not reachable ({exc}); {START_SERVICES}")

    def connection(self) -> dict:
        return {"postgres_dsn": PG_DSN}

    _query = staticmethod(pg_query)

    def tables(self) -> set[str]:
        return {r[0] for r in self._query("SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
                                          [self.schema])}

    def columns(self, table: str) -> dict[str, str]:
        from sinks.postgres.destination import LOGICAL

        rows = self._query("SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = %s "
                           "AND table_name = %s ORDER BY ordinal_position", [self.schema, table])
        return {n: LOGICAL.get(t, base.STRING) for n, t in rows}

    def _select(self, table: str, columns: list[str]) -> list[tuple]:
        from psycopg2 import sql

        return self._query(sql.SQL("SELECT {} FROM {}.{}").format(
            sql.SQL(", ").join(map(sql.Identifier, columns)), sql.Identifier(self.schema), sql.Identifier(table)))

    def cleanup(self) -> None:
        from psycopg2 import sql

        self._query(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(self.schema)))


class MySQLHarness(Harness):
    name = "mysql"

    def __init__(self, tmp_path: Path):
        super().__init__(tmp_path)
        import pymysql

        try:
            self._connect().close()
        except pymysql.err.OperationalError as exc:
            pytest.fail(f"MySQL/MariaDB is not reachable at {MYSQL_URL} ({exc}); run scripts/services.sh (or the "
                        f"README's test command), which starts MariaDB")

    def connection(self) -> dict:
        return {"mysql_url": MYSQL_URL}

    @staticmethod
    def _connect():
        import pymysql

        from sinks.mysql.destination import parse_url

        kwargs = parse_url(MYSQL_URL)
        kwargs.pop("database")
        return pymysql.connect(**kwargs, charset="utf8mb4", autocommit=True)

    def _query(self, q, args=()):
        con = self._connect()
        try:
            with con.cursor() as cur:
                cur.execute(q, args)
                return list(cur.fetchall()) if cur.description else None
        finally:
            con.close()

    @staticmethod
    def _quote(name: str) -> str:
        return "`" + name.replace("`", "``") + "`"

    def tables(self) -> set[str]:
        return {r[0] for r in self._query("SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
                                          [self.schema])}

    def columns(self, table: str) -> dict[str, str]:
        rows = self._query("SELECT column_name, data_type, column_type, check_clause FROM information_schema.columns c "
                           "LEFT JOIN information_schema.check_constraints k ON k.constraint_schema = c.table_schema "
                           "AND k.table_name = c.table_name AND k.constraint_name = c.column_name "
                           "WHERE c.table_schema = %s AND c.table_name = %s ORDER BY ordinal_position",
                           [self.schema, table])
        out = {}
        for name, dtype, ctype, check in rows:
            dtype = dtype.lower()
            if dtype == "json" or (dtype == "longtext" and check and "json_valid" in check.lower()):
                out[name] = base.JSON
            elif dtype == "tinyint" and ctype.lower().startswith("tinyint(1)"):
                out[name] = base.BOOLEAN
            elif dtype in ("bigint", "int", "smallint", "tinyint", "mediumint"):
                out[name] = base.INTEGER
            elif dtype in ("double", "decimal", "float"):
                out[name] = base.NUMBER
            elif dtype in ("datetime", "timestamp"):
                out[name] = base.TIMESTAMP
            elif dtype == "date":
                out[name] = base.DATE
            elif dtype == "time":
                out[name] = base.TIME
            else:
                out[name] = base.STRING
        return out

    def _select(self, table: str, columns: list[str]) -> list[tuple]:
        cols = ", ".join(self._quote(c) for c in columns)
        rows = self._query(f"SELECT {cols} FROM {self._quote(self.schema)}.{self._quote(table)}")
        out = []
        for row in rows:  # TIME comes back as a timedelta
            out.append(tuple((datetime.min + v).time() if hasattr(v, "total_seconds") else v for v in row))
        return out

    def cleanup(self) -> None:
        self._query(f"DROP DATABASE IF EXISTS {self._quote(self.schema)}")


class DeltaHarness(Harness):
    """Delta tables in a local folder, read back with deltalake."""

    name = "delta"

    def root(self) -> str:
        return str(self.tmp_path / "lake")

    def config(self, **extra) -> dict:
        return {**super().config(**extra), "delta_uri": self.root()}

    def storage_options(self) -> dict | None:
        return None

    def _table_uri(self, table: str) -> str:
        return f"{self.root()}/{self.schema}/{table}"

    def _table(self, table: str):
        from deltalake import DeltaTable

        return DeltaTable(self._table_uri(table), storage_options=self.storage_options())

    def tables(self) -> set[str]:
        folder = Path(self.root()) / self.schema
        return {p.name for p in folder.iterdir() if (p / "_delta_log").is_dir()} if folder.is_dir() else set()

    def columns(self, table: str) -> dict[str, str]:
        from sinks.delta.destination import FROM_DELTA, LOGICAL_KEY

        return {f.name: (f.metadata or {}).get(LOGICAL_KEY) or FROM_DELTA.get(getattr(f.type, "type", ""), base.JSON)
                for f in self._table(table).schema().fields}

    def _select(self, table: str, columns: list[str]) -> list[tuple]:
        data = self._table(table).to_pyarrow_table(columns=columns)
        return list(zip(*(data.column(c).to_pylist() for c in columns))) if data.num_rows else []


class DeltaS3Harness(DeltaHarness):
    """Delta tables on S3: a local moto server (tests/s3server.py)."""

    def root(self) -> str:
        from .s3server import BUCKET

        return f"s3://{BUCKET}/conformance"

    def connection(self) -> dict:
        from . import s3server

        return s3server.connection()

    def storage_options(self) -> dict | None:
        from sinks.delta.destination import storage_options

        return storage_options(ConnectionSettings(destination_settings=self.connection()))

    def tables(self) -> set[str]:
        from . import s3server

        prefix = f"conformance/{self.schema}/"
        pages = s3server.client().get_paginator("list_objects_v2").paginate(Bucket=s3server.BUCKET, Prefix=prefix)
        return {key["Key"][len(prefix):].split("/", 1)[0] for page in pages for key in page.get("Contents", [])
                if "/_delta_log/" in key["Key"][len(prefix):]}


class SnowflakeHarness(Harness):
    """Snowflake: a local fakesnow server (tests/snowserver.py). Tables and columns are upper case there (the
    destination's rule); the harness reports them by their normalised (lower-case) names."""

    name = "snowflake"

    def __init__(self, tmp_path: Path):
        super().__init__(tmp_path)
        self.schema_ident = self.schema.upper()

    def connection(self) -> dict:
        from . import snowserver

        return snowserver.connection()

    def _query(self, q: str, args=()):
        from . import snowserver

        con = snowserver.connect()
        try:
            cur = con.cursor()
            cur.execute(q, list(args))
            return cur.fetchall() if cur.description else None
        finally:
            con.close()

    def _db(self) -> str:
        from .snowserver import DATABASE

        return f'"{DATABASE}"'

    def tables(self) -> set[str]:
        return {r[0].lower() for r in self._query(f"SELECT table_name FROM {self._db()}.information_schema.tables "
                                                  f"WHERE table_schema = %s", [self.schema_ident])}

    def columns(self, table: str) -> dict[str, str]:
        from sinks.snowflake.destination import LOGICAL

        rows = self._query(f"SELECT column_name, data_type, numeric_scale FROM {self._db()}.information_schema.columns "
                           f"WHERE table_schema = %s AND table_name = %s ORDER BY ordinal_position",
                           [self.schema_ident, table.upper()])
        out = {}
        for name, dtype, scale in rows:
            kind = LOGICAL.get(dtype.upper(), base.STRING)
            out[name.lower()] = base.NUMBER if kind == base.INTEGER and scale else kind
        return out

    def _select(self, table: str, columns: list[str]) -> list[tuple]:
        from sinks.snowflake.destination import quote

        # The stand-in answers a NULL date-time as 1970-01-01 (its result encoding; the stored value is NULL), so
        # date-times are read as text.
        kinds = self.columns(table)
        cols = ", ".join(f"{quote(c.upper())}::VARCHAR" if kinds.get(c) == base.TIMESTAMP else quote(c.upper())
                         for c in columns)
        rows = self._query(f"SELECT {cols} FROM {self._db()}.{quote(self.schema_ident)}.{quote(table.upper())}")
        at = [i for i, c in enumerate(columns) if kinds.get(c) == base.TIMESTAMP]
        if not at:
            return rows
        out = []
        for row in rows:
            row = list(row)
            for i in at:
                if row[i] is not None:
                    row[i] = datetime.fromisoformat(row[i].replace("T", " ").replace("Z", "+00:00"))
            out.append(tuple(row))
        return out

    def cleanup(self) -> None:
        from sinks.snowflake.destination import quote

        self._query(f"DROP SCHEMA IF EXISTS {self._db()}.{quote(self.schema_ident)} CASCADE")


HARNESSES = {"duckdb": DuckDBHarness, "postgres": PostgresHarness, "mysql": MySQLHarness, "delta": DeltaHarness,
             "delta_s3": DeltaS3Harness, "snowflake": SnowflakeHarness}

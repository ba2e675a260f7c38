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
    left_out: dict[str, str] = {}  # conformance case (function name) -> why this harness leaves it out

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


class ElasticsearchHarness(Harness):
    """An index per stream on osmem-server (tests/osmem.py), an in-memory OpenSearch-compatible server; documents
    read back from ``_source``, logical types from the mapping's ``_meta``."""

    name = "elasticsearch"
    json_decoded = True  # _source is parsed JSON

    def connection(self) -> dict:
        from . import osmem

        return {"elasticsearch_url": osmem.url()}

    @property
    def prefix(self) -> str:
        return f"{self.schema}."

    def _request(self, method: str, path: str, body=None):
        from . import osmem

        status, answer = osmem.request(method, path, body)
        assert status < 300, (method, path, status, answer)
        return answer

    def tables(self) -> set[str]:
        answer = self._request("GET", f"/{self.prefix}*/_alias")
        names = set()
        for index, value in answer.items():
            names |= set((value or {}).get("aliases") or {}) or {index}
        return {n[len(self.prefix):] for n in names if n.startswith(self.prefix)}

    def columns(self, table: str) -> dict[str, str]:
        from sinks.elasticsearch.destination import LOGICAL, META_KEY, column_name

        answer = self._request("GET", f"/{self.prefix}{table}/_mapping")
        (mapping,) = [v["mappings"] for v in answer.values()]
        logical = mapping["_meta"][META_KEY]["columns"]
        fields = {column_name(f): p for f, p in mapping["properties"].items()}
        return {n: logical.get(n) or LOGICAL.get(p.get("type"), base.JSON) for n, p in fields.items()}

    def _select(self, table: str, columns: list[str]) -> list[tuple]:
        name = f"{self.prefix}{table}"
        self._request("POST", f"/{name}/_refresh")
        from sinks.elasticsearch.destination import field_name

        kinds = self.columns(table)
        answer = self._request("POST", f"/{name}/_search?scroll=1m", {"size": 5000, "sort": ["_doc"]})
        out = []
        while True:
            hits = answer["hits"]["hits"]
            if not hits:
                break
            for hit in hits:
                src = hit["_source"]
                out.append(tuple(_es_value(src.get(field_name(c)), kinds.get(c)) for c in columns))
            answer = self._request("POST", "/_search/scroll", {"scroll": "1m", "scroll_id": answer["_scroll_id"]})
        return out

    def cleanup(self) -> None:
        from . import osmem

        answer = self._request("GET", f"/{self.prefix}*/_alias")
        for index in answer:
            osmem.request("DELETE", f"/{index}")


def _es_value(value, logical):
    """A value of ``_source`` as the other harnesses' drivers return it: date-times as datetimes."""
    if value is None:
        return None
    if logical == base.TIMESTAMP and isinstance(value, str):
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    return value


class BigQueryHarness(Harness):
    """BigQuery: a local bqemulator server (tests/bqserver.py), one dataset per test."""

    name = "bigquery"
    json_decoded = True  # the client parses JSON columns

    def connection(self) -> dict:
        from . import bqserver

        return bqserver.connection()

    def config(self, **extra) -> dict:
        from . import bqserver

        return {**super().config(**extra), "bigquery_project": bqserver.PROJECT}

    def _client(self):
        from . import bqserver

        return bqserver.client()

    def tables(self) -> set[str]:
        return {t.table_id for t in self._client().list_tables(self.schema)}

    def columns(self, table: str) -> dict[str, str]:
        from sinks.bigquery.destination import LOGICAL

        return {f.name: LOGICAL.get(f.field_type.upper(), base.STRING)
                for f in self._client().get_table(f"{self.schema}.{table}").schema}

    def _select(self, table: str, columns: list[str]) -> list[tuple]:
        from sinks.bigquery.destination import quote

        rows = self._client().query(f"SELECT {', '.join(quote(c) for c in columns)} FROM "
                                    f"{quote(self.schema)}.{quote(table)}").result()
        return [tuple(row.values()) for row in rows]

    def cleanup(self) -> None:
        self._client().delete_dataset(self.schema, delete_contents=True, not_found_ok=True)



class MongoHarness(Harness):
    """MongoDB: a local nx-27017 server (tests/mongoserver.py), or the mongod SINGER_INGEST_TEST_MONGODB_URL names.
    Columns and their logical types come from the destination's catalog collection (MongoDB keeps no schema)."""

    name = "mongodb"
    json_decoded = True  # JSON values are sub-documents and arrays
    @property
    def left_out(self) -> dict[str, str]:
        """Conformance cases this harness leaves out, and why (tests/test_conformance.py reads it)."""
        from . import mongoserver

        if mongoserver.real():
            return {}
        return {"test_identifiers_reserved_long_quoted_unicode_and_injection":
                "nx-27017, the stand-in, writes collection names into its SQLite SQL unquoted, so it cannot hold a "
                "collection named select or order (a real mongod can); tests/test_mongodb_sink.py loads hostile "
                "field names and stream names that are not SQL words instead"}

    def connection(self) -> dict:
        from . import mongoserver

        return {"mongodb_url": mongoserver.url()}

    def config(self, **extra) -> dict:
        from . import mongoserver

        # nx-27017 cannot store Decimal128: doubles there, the default (Decimal128) on a real mongod.
        return {**super().config(**extra), **({} if mongoserver.real() else {"mongodb_decimal128": False})}

    def _db(self):
        from . import mongoserver

        return mongoserver.client()[self.schema]

    def tables(self) -> set[str]:
        return set(self._db().list_collection_names())

    def columns(self, table: str) -> dict[str, str]:
        from sinks.mongodb.destination import CATALOG

        doc = self._db()[CATALOG].find_one({"_id": table})
        return {n: t for n, t in (doc or {}).get("columns", [])}

    def _select(self, table: str, columns: list[str]) -> list[tuple]:
        from bson.decimal128 import Decimal128

        out = []
        for doc in self._db()[table].find({}):
            out.append(tuple(v.to_decimal() if isinstance(v, Decimal128) else v for v in (doc.get(c) for c in columns)))
        return out

    def cleanup(self) -> None:
        from . import mongoserver

        mongoserver.client().drop_database(self.schema)

class SnowflakeHarness(Harness):
    """Snowflake: a local fakesnow server (tests/snowserver.py). Tables and columns are upper case there (the
    destination's rule); the harness reports them by their normalised (lower-case) names."""

    name = "snowflake"
    left_out = {"test_redelivery_after_a_worker_is_killed_mid_batch":
                "fakesnow never ends the transaction of a killed client's session, so a survivor's upsert of the "
                "same rows waits on it forever whenever the kill lands inside a transaction (on Snowflake the new "
                "owner waits until Snowflake aborts the detached transaction: the README's Snowflake section)"}

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
             "delta_s3": DeltaS3Harness, "elasticsearch": ElasticsearchHarness, "bigquery": BigQueryHarness,
             "mongodb": MongoHarness, "snowflake": SnowflakeHarness}

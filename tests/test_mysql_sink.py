"""The MySQL/MariaDB sink against the real server: types, LOAD DATA escaping, upserts, schema evolution,
identifiers, versions, fencing, the multi-row INSERT fallback, and a whole run through the CLI."""

from __future__ import annotations

import decimal
import logging
from datetime import datetime

import orjson
import pymysql
import pytest

from ingest.config import ConnectionSettings, RunSettings
from ingest.errors import DestinationError, Fenced
from sinks import base
from sinks.mysql import destination as mysql
from sinks.mysql.destination import MySQLDestination, open_destination, parse_url

from . import expected
from .conftest import MYSQL_URL, generate
from .sink_helpers import FAILED_AT, batch, dead_letter, dead_letter_key, row, spec_for

pytestmark = [pytest.mark.integration, pytest.mark.mysql]


def server_kwargs() -> dict:
    kwargs = parse_url(MYSQL_URL)
    kwargs.pop("database")
    return kwargs


@pytest.fixture()
def dest(mysql_database):
    d = open_destination(RunSettings(destination="mysql", default_target_schema=mysql_database),
                         ConnectionSettings(destination_settings={"mysql_url": MYSQL_URL}), embedded=False)
    yield d
    d.close()


def query(q, args=(), db=None):
    con = pymysql.connect(**server_kwargs(), database=db, autocommit=True, charset="utf8mb4")
    try:
        with con.cursor() as cur:
            cur.execute(q, args)
            return [tuple(r) for r in cur.fetchall()] if cur.description else None
    finally:
        con.close()


def t(db, table="items"):
    return f"{mysql.quote(db)}.{mysql.quote(table)}"


def test_types_round_trip(dest, mysql_database):
    spec = spec_for(dest)
    dest.claim_stream("r1", "items", 1)
    dest.write_batch(spec, batch([
        row(spec, id=1, price=19.99, name="tab\there\nnewline \\ back", ok=True, at="2024-01-02T03:04:05Z",
            day="2024-02-29", clock="12:30:00.25", doc={"a": [1, None, "x"]}, tags=["p", "q"]),
        row(spec, id=2),
        row(spec, id=3, price=12345678901234567890, ok=False, doc={}, tags=[]),
    ], upto=3))
    types = dict(query("SELECT COLUMN_NAME, COLUMN_TYPE FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = %s "
                       "AND TABLE_NAME = 'items'", [mysql_database]))
    types["id"] = types["id"].replace("(20)", "")  # MariaDB shows BIGINT's display width, MySQL 8 does not
    assert {k: v for k, v in types.items() if k not in ("doc", "tags")} == {
        "id": "bigint", "price": "decimal(65,30)", "name": "longtext", "ok": "tinyint(1)", "at": "datetime(6)",
        "day": "date", "clock": "time(6)"}
    rows = query(f"SELECT id, price, name, ok, at, CAST(day AS CHAR), CAST(clock AS CHAR), doc, tags, doc IS NULL "
                 f"FROM {t(mysql_database)} ORDER BY id")
    assert rows[0][:7] == (1, decimal.Decimal("19.99"), "tab\there\nnewline \\ back", 1, datetime(2024, 1, 2, 3, 4, 5),
                           "2024-02-29", "12:30:00.250000")
    assert orjson.loads(rows[0][7]) == {"a": [1, None, "x"]} and orjson.loads(rows[0][8]) == ["p", "q"]
    assert rows[1][1:] == (None, None, None, None, None, None, None, None, 1)  # SQL NULL, not JSON null
    assert rows[2][1] == decimal.Decimal("12345678901234567890") and rows[2][3] == 0
    assert orjson.loads(rows[2][7]) == {} and orjson.loads(rows[2][8]) == []
    assert query(f"SELECT seq FROM {t(mysql_database, '_singer_ingest_offsets')}") == [(3,)]


# Where LOAD DATA's escaping goes wrong: NULL against the strings "NULL" and "\N", empty strings, backslashes at
# the end, tabs, newlines, carriage returns, quotes, NUL, 4-byte characters.
TRICKY = ["NULL", "\\N", "N", "", "ends with \\", "\\", "\\\\", "tab\tin", "\ttab first", "new\nline", "cr\r\nlf",
          "'single' \"double\" `back`", "nul \x00 char", "emoji 😀 𝄞 日本 é", "\u2028 \u0085 \x1f \x7f", " spaces ",
          "a,b;c", "\\t not a tab", "\\n not a newline", "%_ like", "ends with tab\t", "\\0 \\Z \\b"]


@pytest.mark.parametrize("local_infile", [True, False], ids=["load-data", "insert-fallback"])
def test_tricky_strings_and_json_survive_exactly(dest, mysql_database, local_infile, caplog):
    schema = {"properties": {"id": {"type": "integer"}, "s": {"type": ["null", "string"]},
                             "j": {"type": ["null", "object", "array", "string"]}}}
    spec = spec_for(dest, schema=schema)
    dest.claim_stream("r1", "items", 1)
    rows = [row(spec, id=i, s=s, j={"v": s, s: [s]}) for i, s in enumerate(TRICKY)]
    rows.append(row(spec, id=1000, s=None, j=None))
    rows.append(row(spec, id=1001, s="x", j="NULL"))  # a JSON string "NULL", not SQL NULL
    with server_local_infile(local_infile), caplog.at_level(logging.WARNING):
        dest.write_batch(spec, batch(rows, upto=len(rows)))
    assert ("multi-row INSERT" in caplog.text) == (not local_infile)
    got = {r[0]: (r[1], r[2]) for r in query(f"SELECT id, s, j FROM {t(mysql_database)}")}
    for i, s in enumerate(TRICKY):
        assert got[i][0] == s, (i, s, got[i][0])
        assert orjson.loads(got[i][1]) == {"v": s, s: [s]}, (i, s)
    assert got[1000] == (None, None)
    assert got[1001][0] == "x" and orjson.loads(got[1001][1]) == "NULL"
    # Exact (binary) comparison: "é" and "e" or "a" and "A" are different keys, the emoji is the same one.
    assert query(f"SELECT id FROM {t(mysql_database)} WHERE s = %s", ["EMOJI 😀 𝄞 日本 é"]) == []
    assert query(f"SELECT id FROM {t(mysql_database)} WHERE s = %s", ["emoji 😀 𝄞 日本 é"]) == [(13,)]


class server_local_infile:
    """SET GLOBAL local_infile for the duration of a block (restored afterwards, whatever happens)."""

    def __init__(self, on: bool):
        self.on = on
        self.before = None

    def __enter__(self):
        self.before = query("SELECT @@GLOBAL.local_infile")[0][0]
        query(f"SET GLOBAL local_infile = {1 if self.on else 0}")
        return self

    def __exit__(self, *exc):
        query(f"SET GLOBAL local_infile = {int(self.before)}")
        return False


def test_local_infile_off_falls_back_to_multi_row_insert_with_identical_results(mysql_database, caplog):
    """The same batches through LOAD DATA and through multi-row INSERT give the same tables."""
    results = []
    for on in (True, False):
        db = f"{mysql_database}_{'on' if on else 'off'}"
        with server_local_infile(on):
            d = MySQLDestination(parse_url(MYSQL_URL), db)
            try:
                spec = spec_for(d, metadata=True)
                keyless = spec_for(d, stream="log", keys=(), metadata=True)
                d.claim_stream("r1", "items", 1)
                d.claim_stream("r1", "log", 1)
                with caplog.at_level(logging.INFO):
                    for upto in range(1, 4):
                        rows = [row(spec, upto * 10 + i, id=i, price=i * 1.01 + upto, name=TRICKY[(i + upto) % 20],
                                    ok=i % 2 == 0, at=f"2024-03-0{upto}T10:00:00+02:00", doc={"n": [i, upto]})
                                for i in range(2500)]
                        d.write_batch(spec, batch(rows, upto=upto * 10 + 9))
                        d.write_batch(keyless, batch(rows, upto=upto * 10 + 9, upsert=False))
                assert d._load_data == on
                results.append([query(f"SELECT * FROM {t(db, table)} ORDER BY 1, _sdc_sequence") for table in
                                ("items", "log")])
            finally:
                d.close()
                query(f"DROP DATABASE IF EXISTS {mysql.quote(db)}")
    assert results[0] == results[1]
    assert len(results[0][0]) == 2500 and len(results[0][1]) == 7500
    assert caplog.text.count("refuses LOAD DATA LOCAL INFILE") == 1


@pytest.mark.parametrize("keyed_table", [True, False], ids=["primary-key", "table-made-without-key"])
def test_upsert_last_wins_also_within_a_batch_and_never_over_a_newer_row(dest, mysql_database, keyed_table):
    if not keyed_table:  # a table made elsewhere: the merge deletes, then inserts
        query(f"CREATE DATABASE IF NOT EXISTS {mysql.quote(mysql_database)}")
        query(f"CREATE TABLE {t(mysql_database)} (id BIGINT, name LONGTEXT, _sdc_sequence BIGINT)")
    spec = spec_for(dest, metadata=True)
    dest.claim_stream("r1", "items", 1)
    # id 1 twice in one batch, the later one last and first: the higher sequence wins both times.
    dest.write_batch(spec, batch([row(spec, 10, id=1, name="a"), row(spec, 11, id=2, name="b"),
                                  row(spec, 12, id=1, name="c")], upto=12))
    dest.write_batch(spec, batch([row(spec, 22, id=3, name="new"), row(spec, 21, id=3, name="older")], upto=22))
    dest.write_batch(spec, batch([row(spec, 30, id=2, name="d")], upto=30))
    # A redelivered older version of id 1 does not replace the newer row.
    dest.write_batch(spec, batch([row(spec, 5, id=1, name="old"), row(spec, 31, id=4, name="e")], upto=31))
    assert query(f"SELECT id, name, _sdc_sequence FROM {t(mysql_database)} ORDER BY id") == \
        [(1, "c", 12), (2, "d", 30), (3, "new", 22), (4, "e", 31)]
    assert query(f"SELECT seq FROM {t(mysql_database, '_singer_ingest_offsets')}") == [(31,)]


def test_append_and_truncate_first(dest, mysql_database):
    spec = spec_for(dest, keys=())
    dest.claim_stream("r1", "items", 1)
    dest.write_batch(spec, batch([row(spec, id=1), row(spec, id=1)], upto=2, upsert=False))
    assert query(f"SELECT count(*) FROM {t(mysql_database)}") == [(2,)]
    dest.claim_stream("r2", "items", 1)
    dest.write_batch(spec, batch([row(spec, id=7)], upto=1, upsert=False, run="r2", truncate_first=True))
    assert query(f"SELECT id FROM {t(mysql_database)}") == [(7,)]


class _LosesACommitAcknowledgement(mysql._Connection):
    """A connection whose next COMMIT, once armed, goes through on the server but reports the connection lost."""

    armed = False

    def commit(self):
        super().commit()
        if _LosesACommitAcknowledgement.armed:
            _LosesACommitAcknowledgement.armed = False
            self.close()
            raise pymysql.err.OperationalError(2013, "Lost connection to MySQL server during query")


@pytest.mark.parametrize("keys", [(), ("id",)])
def test_a_batch_whose_commit_acknowledgement_was_lost_is_not_written_twice(mysql_database, keys, caplog,
                                                                            monkeypatch):
    monkeypatch.setattr(mysql, "_Connection", _LosesACommitAcknowledgement)
    d = MySQLDestination(parse_url(MYSQL_URL), mysql_database)
    try:
        spec = spec_for(d, keys=keys)
        d.claim_stream("r1", "items", 1)
        _LosesACommitAcknowledgement.armed = True
        d.write_batch(spec, batch([row(spec, id=1), row(spec, id=2)], upto=2, upsert=bool(keys)))
        assert not _LosesACommitAcknowledgement.armed  # the commit went through, and the retry came after it
        d.write_batch(spec, batch([row(spec, id=3)], upto=3, upsert=bool(keys)))
    finally:
        d.close()
    assert query(f"SELECT id FROM {t(mysql_database)} ORDER BY id") == [(1,), (2,), (3,)]
    assert "committed by an earlier attempt whose acknowledgement was lost" in caplog.text


def test_fenced_worker_cannot_commit(dest, mysql_database):
    spec = spec_for(dest)
    assert dest.claim_stream("r1", "items", 1) == 0
    dest.write_batch(spec, batch([row(spec, id=1)], upto=5, fence=1))
    assert dest.claim_stream("r1", "items", 2) == 5  # a new owner takes over and sees the committed offset
    with pytest.raises(Fenced):
        dest.write_batch(spec, batch([row(spec, id=2)], upto=9, fence=1))
    with pytest.raises(Fenced):
        dest.activate_version(spec, 3, run_id="r1", upto_seq=9, fence=1, hard_delete=True,
                              deleted_at="2024-05-05T00:00:00+00:00")
    with pytest.raises(Fenced):
        dest.claim_stream("r1", "items", 1)
    assert query(f"SELECT id FROM {t(mysql_database)}") == [(1,)]
    assert query(f"SELECT seq, fence FROM {t(mysql_database, '_singer_ingest_offsets')}") == [(5, 2)]


def test_schema_evolution_adds_and_widens_never_drops(dest, mysql_database):
    s1 = {"properties": {"id": {"type": "integer"}, "n": {"type": "integer"}, "s": {"type": ["null", "string"]},
                         "num": {"type": ["null", "number"]}, "b": {"type": ["null", "boolean"]},
                         "gone": {"type": "string"}}}
    spec = spec_for(dest, schema=s1)
    dest.claim_stream("r1", "items", 1)
    big = 2**63 - 1
    dest.write_batch(spec, batch([row(spec, id=1, n=big, s="x \"q\" \\ 😀", num=19.99, b=True, gone="g"),
                                  row(spec, id=3, n=-5, s=None, num=None, b=False)], upto=1))
    s2 = {"properties": {"id": {"type": "integer"}, "n": {"type": "number"}, "s": {"type": ["null", "object"]},
                         "num": {"type": ["null", "object"]}, "b": {"type": ["null", "string"]},
                         "extra": {"type": "boolean"}}}
    spec2 = spec_for(dest, schema=s2)
    dest.write_batch(spec2, batch([row(spec2, id=2, n=2.5, s={"k": 1}, num=[1], b="yes", extra=True)], upto=2))
    types = dict(query("SELECT COLUMN_NAME, DATA_TYPE FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = %s "
                       "AND TABLE_NAME = 'items' ORDER BY ORDINAL_POSITION", [mysql_database]))
    assert list(types) == ["id", "n", "s", "num", "b", "gone", "extra"]  # columns keep their places
    assert types["n"] == "decimal" and types["gone"] == "longtext" and types["b"] == "longtext"
    rows = query(f"SELECT id, n, s, num, b, gone, extra FROM {t(mysql_database)} ORDER BY id")
    assert rows[0][:2] == (1, decimal.Decimal(big))  # the integer kept every digit
    assert orjson.loads(rows[0][2]) == "x \"q\" \\ 😀" and orjson.loads(rows[0][3]) == 19.99
    assert rows[0][4:] == ("true", "g", None)
    assert rows[1][1] == decimal.Decimal("2.5") and orjson.loads(rows[1][2]) == {"k": 1}
    assert orjson.loads(rows[1][3]) == [1] and rows[1][4:] == ("yes", None, 1)
    assert rows[2][1:] == (decimal.Decimal(-5), None, None, "false", None, None)
    # The table as the destination reads it back: JSON columns are JSON (on MariaDB, LONGTEXT with a check).
    existing, leftovers = dest._run(None, "read", lambda cur: dest._existing(cur, spec2))
    assert {c.name: c.type for c in existing.columns} == {
        "id": base.INTEGER, "n": base.NUMBER, "s": base.JSON, "num": base.JSON, "b": base.STRING,
        "gone": base.STRING, "extra": base.BOOLEAN} and leftovers == []
    # Once JSON, a column stays JSON for a later schema with a scalar again, and the same schema twice changes nothing.
    assert spec_for(dest, schema=s1).columns == spec_for(dest, schema=s1).columns


def test_date_times_with_offsets_are_stored_in_utc(dest, mysql_database):
    schema = {"properties": {"id": {"type": "integer"}, "at": {"type": ["null", "string"], "format": "date-time"},
                             "clock": {"type": ["null", "string"], "format": "time"}}}
    spec = spec_for(dest, schema=schema)
    dest.claim_stream("r1", "items", 1)
    values = [("2024-01-01T01:30:00+02:00", "23:30:00+00:00"), ("2023-12-31T23:30:00Z", "01:30:00+02:00"),
              ("2024-06-01T12:00:00.123456-05:30", "12:00:00.5Z"), ("2024-06-01T17:30:00.123456", "12:00:00")]
    dest.write_batch(spec, batch([row(spec, id=i, at=a, clock=c) for i, (a, c) in enumerate(values)], upto=4))
    got = query(f"SELECT CAST(at AS CHAR), CAST(clock AS CHAR) FROM {t(mysql_database)} ORDER BY id")
    assert got == [("2023-12-31 23:30:00.000000", "23:30:00.000000"), ("2023-12-31 23:30:00.000000", "23:30:00.000000"),
                   ("2024-06-01 17:30:00.123456", "12:00:00.500000"), ("2024-06-01 17:30:00.123456", "12:00:00.000000")]


def test_a_bad_value_fails_the_batch_naming_its_input_line(dest, mysql_database):
    spec = spec_for(dest)
    dest.claim_stream("r1", "items", 1)
    for local_infile in (True, False):
        with server_local_infile(local_infile):
            with pytest.raises(DestinationError) as info:
                dest.write_batch(spec, batch([row(spec, id=1), row(spec, id=2, at="not a time"), row(spec, id=3)],
                                             upto=9, lines=[41, 42, 43]))
        err = info.value
        assert not err.transient and err.stream == "items" and err.line == 42 and "at" in str(err), str(err)
        assert query(f"SELECT count(*) FROM {t(mysql_database)}") == [(0,)]
    # A number DECIMAL(65,30) cannot hold exactly is refused rather than rounded.
    dest._load_data = True
    with pytest.raises(DestinationError) as info:
        dest.write_batch(spec, batch([row(spec, id=1, price=1e-40)], upto=9, lines=[77]))
    assert info.value.line == 77
    assert query(f"SELECT count(*) FROM {t(mysql_database)}") == [(0,)]


def test_key_too_long_for_the_index_is_a_clear_error(dest, mysql_database):
    schema = {"properties": {"k": {"type": "string"}, "v": {"type": ["null", "string"]}}}
    spec = spec_for(dest, schema=schema, keys=("k",))
    dest.claim_stream("r1", "items", 1)
    fits = "é" * 768  # 768 four-byte-wide characters: the whole 3072-byte index key
    dest.write_batch(spec, batch([row(spec, k=fits, v="ok"), row(spec, k="😀", v="e")], upto=2))
    assert query(f"SELECT CHAR_LENGTH(k), v FROM {t(mysql_database)} ORDER BY v") == [(1, "e"), (768, "ok")]
    with pytest.raises(DestinationError) as info:
        dest.write_batch(spec, batch([row(spec, k="a", v="x"), row(spec, k="x" * 769, v="y")], upto=4,
                                     lines=[120, 121]))
    assert info.value.line == 121 and info.value.stream == "items" and "768" in str(info.value)
    # Two string keys and an integer share the index.
    schema2 = {"properties": {"a": {"type": "string"}, "b": {"type": "string"}, "n": {"type": "integer"}}}
    spec2 = spec_for(dest, stream="two", schema=schema2, keys=("a", "b", "n"))
    assert dest._key_chars["two"] == {"a": 383, "b": 383}
    with pytest.raises(DestinationError):
        dest.write_batch(spec2, batch([row(spec2, a="a" * 384, b="b", n=1)], upto=1))
    with pytest.raises(DestinationError) as info:
        spec_for(dest, stream="j", schema={"properties": {"k": {"type": "object"}}}, keys=("k",))
    assert "JSON" in str(info.value) and not info.value.transient


def test_null_key_is_a_clear_error(dest):
    spec = spec_for(dest)
    dest.claim_stream("r1", "items", 1)
    with pytest.raises(DestinationError) as info:
        dest.write_batch(spec, batch([row(spec, id=None)], upto=1, lines=[7]))
    assert info.value.line == 7 and "key" in str(info.value)


def test_hostile_reserved_and_long_identifiers(dest, mysql_database):
    query(f"CREATE DATABASE IF NOT EXISTS {mysql.quote(mysql_database)}")
    query(f"CREATE TABLE {t(mysql_database, 'y')} (a INT)")
    stream = "x`; DROP TABLE y; --"
    long_prop = "p" * 80
    exact = "q" * 64
    schema = {"properties": {"id": {"type": "integer"}, "we`ird'\"; name": {"type": "string"},
                             long_prop: {"type": "string"}, exact: {"type": "string"}, "select": {"type": "string"},
                             "order": {"type": "integer"}, "key": {"type": ["null", "object"]}}}
    spec = spec_for(dest, stream=stream, schema=schema, keys=("id", "order"))
    dest.claim_stream("r1", stream, 1)
    values = {"we`ird'\"; name": "w", long_prop: "l", exact: "e", "select": "s", "order": 2, "key": {"k": "`"}}
    dest.write_batch(spec, batch([row(spec, id=1, **values)], upto=1))
    dest.write_batch(spec, batch([row(spec, id=1, **{**values, "select": "s2"})], upto=2))
    tables = {r[0] for r in query("SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s",
                                  [mysql_database])}
    assert tables == {"y", "x_drop_table_y", "_singer_ingest_offsets"}
    cols = [r[0] for r in query("SELECT COLUMN_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = %s AND "
                                "TABLE_NAME = 'x_drop_table_y' ORDER BY ORDINAL_POSITION", [mysql_database])]
    assert cols[0] == "id" and "we_ird_name" in cols and "select" in cols and exact in cols
    long_col = [c for c in cols if c.startswith("ppp")][0]
    assert len(long_col.encode()) == 64 and long_col == spec.columns[[c.prop for c in spec.columns].index(long_prop)].name
    assert query(f"SELECT `select`, `order`, {mysql.quote(long_col)} FROM {t(mysql_database, 'x_drop_table_y')}") \
        == [("s2", 2, "l")]
    assert mysql.quote("a`b") == "`a``b`"


@pytest.mark.parametrize("hard", [True, False])
def test_activate_version(dest, mysql_database, hard):
    spec = spec_for(dest, metadata=True)
    v = spec.index(base.VERSION_COLUMN)
    dest.claim_stream("r1", "items", 1)
    rows = [row(spec, 1, id=1), row(spec, 2, id=2)]
    rows = [r[:v] + (1,) + r[v + 1:] for r in rows]
    dest.write_batch(spec, batch(rows, upto=2))
    newer = row(spec, 3, id=3)
    dest.write_batch(spec, batch([newer[:v] + (2,) + newer[v + 1:]], upto=3))
    dest.activate_version(spec, 2, run_id="r1", upto_seq=4, fence=1, hard_delete=hard,
                          deleted_at="2024-05-05T02:00:00+02:00")
    got = query(f"SELECT id, CAST(_sdc_deleted_at AS CHAR) FROM {t(mysql_database)} ORDER BY id")
    at = "2024-05-05 00:00:00.000000"
    assert got == ([(3, None)] if hard else [(1, at), (2, at), (3, None)])
    assert query(f"SELECT seq FROM {t(mysql_database, '_singer_ingest_offsets')}") == [(4,)]


def test_connection_killed_between_writes_is_retried(dest, mysql_database):
    spec = spec_for(dest)
    dest.claim_stream("r1", "items", 1)
    dest.write_batch(spec, batch([row(spec, id=1)], upto=1))
    for conn in list(dest._pool._idle):
        query(f"KILL {conn.thread_id()}")
    dest.write_batch(spec, batch([row(spec, id=2)], upto=2))
    assert query(f"SELECT id FROM {t(mysql_database)} ORDER BY id") == [(1,), (2,)]


def test_url_rules_and_the_password_stays_out_of_errors(mysql_database):
    assert parse_url("mysql://u%40x:p%2Fw@db.example:3307/") == {
        "host": "db.example", "port": 3307, "user": "u@x", "password": "p/w", "database": None}
    assert parse_url("mysql://root@127.0.0.1/shop")["database"] == "shop"
    for url in ("mysql://root:s3cr3t-pw@127.0.0.1:1/", "mysql://root:s3cr3t/pw@127.0.0.1:3306/",
                "http://root:s3cr3t-pw@127.0.0.1/"):
        with pytest.raises(Exception) as info:
            d = MySQLDestination(parse_url(url), mysql_database, retry_deadline_seconds=0.1)
            d.close()
        assert "s3cr3t" not in str(info.value) and "s3cr3t" not in repr(info.value)
    with pytest.raises(DestinationError) as info:
        MySQLDestination({**parse_url(MYSQL_URL), "password": "s3cr3t-pw", "user": "nobody"}, mysql_database,
                         retry_deadline_seconds=0.1)
    assert "s3cr3t" not in str(info.value) and not info.value.transient


def test_database_rule(mysql_database):
    url_db = f"{mysql_database}_url"
    d = open_destination(RunSettings(destination="mysql"),
                         ConnectionSettings(destination_settings={"mysql_url": MYSQL_URL.rstrip("/") + "/" + url_db}),
                         embedded=False)
    try:
        assert d.database == url_db
    finally:
        d.close()
        query(f"DROP DATABASE IF EXISTS {mysql.quote(url_db)}")
    d = open_destination(RunSettings(destination="mysql", default_target_schema=mysql_database),
                         ConnectionSettings(destination_settings={"mysql_url": MYSQL_URL.rstrip("/") + "/other"}),
                         embedded=False)
    try:
        assert d.database == mysql_database
    finally:
        d.close()


def test_cli_embedded_run_matches_the_input_row_by_row(cli, tmp_path, mysql_database):
    data = generate(20000)
    (tmp_path / "in.singer").write_bytes(data)
    cfg = {"destination": "mysql", "mysql_url": MYSQL_URL, "default_target_schema": mysql_database}
    (tmp_path / "cfg.json").write_bytes(orjson.dumps(cfg))
    res = cli(["--config", str(tmp_path / "cfg.json"), "--input", str(tmp_path / "in.singer")], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    model = expected.model(data)
    assert res.states[-1] == model["users"]["last_state"]
    assert sum(len(s["rows"]) for s in model.values()) > 10000
    for stream, s in model.items():
        assert_same_rows(mysql_database, stream, s)


def mysql_rows(db: str, table: str, stream: dict) -> list[dict]:
    """Rows of a MySQL table, normalised like ``expected.expected_rows`` (date-times: microseconds since the epoch,
    as the table holds them in UTC)."""
    kinds = {p: expected._kind(s) for p, s in stream["props"].items()}
    cols = []
    for p, k in kinds.items():
        c = mysql.quote(p)
        cols.append(f"TIMESTAMPDIFF(MICROSECOND, '1970-01-01', {c})" if k == "ts"
                    else f"CAST({c} AS CHAR)" if k == "isotext" else c)
    names = list(kinds)
    return [{n: v if kinds[n] == "ts" else expected.normalise(v, kinds[n]) for n, v in zip(names, r)}
            for r in query(f"SELECT {', '.join(cols)} FROM {t(db, table)}")]


def assert_same_rows(db: str, stream: str, s: dict) -> None:
    expected.assert_same_rows(mysql_rows(db, stream, s), expected.expected_rows(s), s["keys"], stream)


@pytest.mark.parametrize("stream", ["s", "o", "new", "old", "_singer_ingest_stage"])
def test_table_names_that_could_meet_the_merge_aliases(dest, mysql_database, stream):
    spec = spec_for(dest, stream=stream, metadata=True)
    dest.claim_stream("r1", stream, 1)
    dest.write_batch(spec, batch([row(spec, 1, id=1, name="a"), row(spec, 2, id=2, name="b")], upto=2))
    dest.write_batch(spec, batch([row(spec, 3, id=1, name="c")], upto=3))
    assert query(f"SELECT id, name FROM {t(mysql_database, stream)} ORDER BY id") == [(1, "c"), (2, "b")]


def test_load_text_escapes_whatever_is_not_a_plain_number_and_reads_utc_date_times_as_written():
    cols = (base.Column("n", "n", base.NUMBER), base.Column("i", "i", base.INTEGER),
            base.Column("b", "b", base.BOOLEAN), base.Column("at", "at", base.TIMESTAMP))
    # an unvalidated stream may put any text in any column: it must not split the row
    text = mysql.load_text(cols, [(1.5, 2, True, "2024-01-01T00:06:40.5Z"), ("a\tb", "c\nd", "e\\", "f\tg")])
    assert text == (b"1.5\t2\t1\t2024-01-01 00:06:40.5\n"
                    b"a\\tb\tc\\nd\te\\\\\tf\\tg\n")
    for value in ("2024-01-01T00:06:40.123456+00:00", "2024-01-01T00:06:40Z", "2024-02-29T23:59:59+00:00"):
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00")).replace(tzinfo=None)
        assert datetime.fromisoformat(mysql._datetime(value)) == parsed


# -- dead letters ------------------------------------------------------------------------------------------
def dead_letters_in(db) -> list[tuple]:
    """The dead-letter table's rows (failed_at as ISO text in UTC), by stream and line."""
    return query(f"SELECT stream, line, _sdc_sequence, run_id, reason, error, record, "
                 f"DATE_FORMAT(failed_at, '%%Y-%%m-%%dT%%H:%%i:%%s.%%f+00:00') FROM {t(db, base.DEAD_LETTER_TABLE)} "
                 f"ORDER BY stream, line")


def offset_of(db, stream="items") -> int:
    return query(f"SELECT seq FROM {t(db, '_singer_ingest_offsets')} WHERE stream = %s", [stream])[0][0]


@pytest.mark.parametrize("load_data", [True, False], ids=["load-data", "multi-row-insert"])
def test_dead_letters_commit_with_the_rows_once_also_without_rows(dest, mysql_database, load_data, caplog):
    dest._load_data = dest._load_data and load_data
    spec = spec_for(dest)
    dest.claim_stream("r1", "items", 1)
    letters = [dead_letter(2), dead_letter(4, reason="destination")]
    dest.write_batch(spec, batch([row(spec, id=1), row(spec, id=3)], upto=4, lines=[1, 3], dead_letters=letters))
    assert dead_letters_in(mysql_database) == letters
    assert dead_letters_in(mysql_database)[0][7] == FAILED_AT
    assert query("SELECT COLUMN_NAME FROM information_schema.KEY_COLUMN_USAGE WHERE TABLE_SCHEMA = %s AND "
                 "TABLE_NAME = %s AND CONSTRAINT_NAME = 'PRIMARY' ORDER BY ORDINAL_POSITION",
                 [mysql_database, base.DEAD_LETTER_TABLE]) == [("stream",), ("_sdc_sequence",)]
    # The same batch again (its commit's acknowledgement was lost): neither rows nor dead letters twice.
    dest.write_batch(spec, batch([row(spec, id=1), row(spec, id=3)], upto=4, lines=[1, 3], dead_letters=letters))
    assert "acknowledgement was lost" in caplog.text
    # A batch of dead letters only commits them with the offset, once.
    for _ in range(2):
        dest.write_batch(spec, batch([], upto=6, dead_letters=[dead_letter(5), dead_letter(6)]))
    assert [r[1] for r in dead_letters_in(mysql_database)] == [2, 4, 5, 6]
    assert query(f"SELECT id FROM {t(mysql_database)} ORDER BY id") == [(1,), (3,)]
    assert offset_of(mysql_database) == 6


def test_a_refused_batch_writes_no_dead_letters(dest, mysql_database):
    spec = spec_for(dest)
    dest.claim_stream("r1", "items", 1)
    # A value MySQL refuses fails the whole batch: its dead letters are not committed either.
    with pytest.raises(DestinationError) as info:
        dest.write_batch(spec, batch([row(spec, id=1, at="not a time")], upto=3, lines=[3],
                                     dead_letters=[dead_letter(2)]))
    assert info.value.line == 3
    # A dead letter the table refuses (its key twice) fails the batch, rows included, naming the key (LOAD DATA's
    # warning of a duplicate key names no row).
    with pytest.raises(DestinationError) as info:
        dest.write_batch(spec, batch([row(spec, id=1)], upto=3, lines=[3],
                                     dead_letters=[dead_letter(2), dead_letter(2)]))
    assert "dead-letter table" in str(info.value) and "'items-1002'" in str(info.value) and not info.value.transient
    assert dead_letters_in(mysql_database) == []
    assert query(f"SELECT count(*) FROM {t(mysql_database)}") == [(0,)]



def test_workers_creating_the_dead_letter_table_at_once_meet_on_it(mysql_database):
    """Several workers (and their drain threads) write their first dead letters at the same moment."""
    from concurrent.futures import ThreadPoolExecutor

    workers = [MySQLDestination(parse_url(MYSQL_URL), mysql_database) for _ in range(3)]
    try:
        specs = [spec_for(d, stream=f"s{n}") for n, d in enumerate(workers)]
        for n, d in enumerate(workers):
            d.claim_stream("r1", f"s{n}", 1)

        def write(n):
            workers[n].write_batch(specs[n], batch([row(specs[n], id=n)], upto=2, lines=[1],
                                                   dead_letters=[dead_letter(2, stream=f"s{n}")]))

        with ThreadPoolExecutor(3) as pool:
            list(pool.map(write, range(3)))
    finally:
        for d in workers:
            d.close()
    assert [dead_letter_key(r) for r in dead_letters_in(mysql_database)] == \
        [dead_letter_key(dead_letter(2, stream=f"s{n}")) for n in range(3)]

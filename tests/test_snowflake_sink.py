"""The snowflake destination beyond the conformance suite, against the local stand-in (fakesnow, tests/snowserver.py):
dead letters in the batch's own commit, the identifier rule, column types, the MERGE statement, widening and a
widening cut half way, settings and errors."""

from __future__ import annotations

import logging
import uuid
from datetime import datetime, timezone

import pytest

from ingest.config import ConnectionSettings
from ingest.errors import ConfigError, DestinationError
from sinks import base
from sinks.base import Batch
from sinks.snowflake import destination as sf

from . import snowserver
from .sink_helpers import batch, row, spec_for

pytestmark = [pytest.mark.integration, pytest.mark.snowflake]


@pytest.fixture()
def schema():
    name = "T_" + uuid.uuid4().hex[:10].upper()
    yield name
    con = snowserver.connect()
    try:
        con.cursor().execute(f'DROP SCHEMA IF EXISTS "{snowserver.DATABASE}"."{name}" CASCADE')
    finally:
        con.close()


@pytest.fixture()
def dest(schema):
    kwargs = sf.connect_kwargs(ConnectionSettings(destination_settings=snowserver.connection()))
    d = sf.SnowflakeDestination(kwargs, snowserver.DATABASE, schema, max_connections=3, retry_deadline_seconds=5,
                                merge_in_transaction=False)
    yield d
    d.close()


def query(sql: str, args=(), schema: str | None = None):
    con = snowserver.connect(database=snowserver.DATABASE, **({"schema": schema} if schema else {}))
    try:
        cur = con.cursor()
        cur.execute(sql, list(args))
        return cur.fetchall() if cur.description else None
    finally:
        con.close()


def t(schema: str, table: str) -> str:
    return f'"{snowserver.DATABASE}"."{schema}"."{table}"'


def dead_letter(stream: str, line: int, error: str = "failed its schema") -> tuple:
    return (stream, line, 1000 + line, "r1", "schema", error, '{"id": "x"}',
            datetime(2024, 1, 1, tzinfo=timezone.utc).isoformat())


# -- dead letters ---------------------------------------------------------------------------------------------
def test_dead_letters_commit_with_the_batch_and_a_replay_writes_nothing_twice(dest, schema, caplog):
    spec = spec_for(dest)
    dest.claim_stream("r1", "items", 1)
    first = batch([row(spec, id=1, name="a"), row(spec, id=2, name="b")], upto=3, lines=[1, 3],
                  dead_letters=[dead_letter("items", 2)])
    dest.write_batch(spec, first)
    caplog.set_level(logging.WARNING)
    dest.write_batch(spec, first)  # the same batch again: its acknowledgement was lost
    # A batch of dead letters only moves the offset with them, and is not written twice either.
    only = batch([], upto=5, dead_letters=[dead_letter("items", 4), dead_letter("items", 5, "refused")])
    dest.write_batch(spec, only)
    dest.write_batch(spec, only)
    assert "committed by an earlier attempt whose acknowledgement was lost" in caplog.text
    letters = query(f'SELECT "STREAM", "LINE", "_SDC_SEQUENCE", "REASON", "ERROR", "RECORD" FROM '
                    f'{t(schema, "_SINGER_INGEST_DEAD_LETTER")} ORDER BY "LINE"')
    assert letters == [("items", 2, 1002, "schema", "failed its schema", '{"id": "x"}'),
                       ("items", 4, 1004, "schema", "failed its schema", '{"id": "x"}'),
                       ("items", 5, 1005, "schema", "refused", '{"id": "x"}')]
    assert sorted(query(f'SELECT "ID", "NAME" FROM {t(schema, "ITEMS")}')) == [(1, "a"), (2, "b")]
    assert dest.claim_stream("r1", "items", 2) == 5


def test_dead_letters_of_a_stale_owner_are_not_written(dest, schema):
    spec = spec_for(dest)
    dest.claim_stream("r1", "items", 1)
    dest.claim_stream("r1", "items", 2)
    from ingest.errors import Fenced

    with pytest.raises(Fenced):
        dest.write_batch(spec, batch([row(spec, id=1)], upto=2, fence=1, dead_letters=[dead_letter("items", 2)]))
    assert query(f'SELECT COUNT(*) FROM {t(schema, "_SINGER_INGEST_DEAD_LETTER")}') == [(0,)]
    assert query(f'SELECT COUNT(*) FROM {t(schema, "ITEMS")}') == [(0,)]


# -- identifiers and types ------------------------------------------------------------------------------------
def test_names_are_upper_cased_and_quoted_so_unquoted_sql_finds_them(dest, schema):
    props = {"id": {"type": "integer"}, "Mixed Case": {"type": ["null", "string"]},
             "select": {"type": ["null", "string"]}, 'quo"te': {"type": ["null", "string"]},
             "l" * 300: {"type": ["null", "string"]}}
    spec = spec_for(dest, stream="Order Lines", schema={"properties": props})
    dest.claim_stream("r1", "Order Lines", 1)
    values = {"id": 7, "Mixed Case": "m", "select": "s", 'quo"te': "q", "l" * 300: "long"}
    dest.write_batch(spec, batch([row(spec, **values)], upto=1))
    cols = [r[0] for r in query("SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND "
                                "table_name = %s ORDER BY ordinal_position", [schema, "ORDER_LINES"])]
    long_name = base.table_spec("x", {"properties": props}, (), metadata=False, schema_name=None,
                                max_identifier_bytes=255).columns[-1].name
    assert len(long_name) == 255
    assert cols == ["ID", "MIXED_CASE", "SELECT", "QUO_TE", long_name.upper()]
    # Unquoted names resolve to upper case in Snowflake: the table and its plain columns need no quotes.
    assert query(f'SELECT id, mixed_case, quo_te FROM "{snowserver.DATABASE}".{schema}.order_lines') == [(7, "m", "q")]
    assert query(f'SELECT "SELECT" FROM {t(schema, "ORDER_LINES")}') == [("s",)]


def test_column_types(dest, schema):
    spec = spec_for(dest, metadata=True)
    types = dict(query("SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = %s AND "
                       "table_name = 'ITEMS'", [schema]))
    assert (types["ID"], types["PRICE"], types["NAME"], types["OK"], types["AT"], types["DAY"], types["CLOCK"],
            types["DOC"], types["TAGS"], types["_SDC_SEQUENCE"]) == \
        ("NUMBER", "FLOAT", "TEXT", "BOOLEAN", "TIMESTAMP_TZ", "DATE", "TIME", "VARIANT", "VARIANT", "NUMBER")
    dest.claim_stream("r1", "items", 1)
    dest.write_batch(spec, batch([row(spec, seq=1, id=1, price=19.99, name="ü", ok=True,
                                      at="2024-05-01T12:30:00.123456+02:00", day="2024-05-01", clock="23:59:59.5",
                                      doc={"a": [1, {"b": None}]}, tags=["x", 2])], upto=1))
    (got,) = query(f'SELECT "PRICE", "NAME", "OK", "AT"::VARCHAR, "DAY", "CLOCK", "DOC":a[1]:b IS NULL, '
                   f'"TAGS"[1]::NUMBER, "_SDC_SEQUENCE" FROM {t(schema, "ITEMS")}')
    assert got[0] == 19.99 and got[1] == "ü" and got[2] is True
    assert datetime.fromisoformat(got[3]) == datetime(2024, 5, 1, 10, 30, 0, 123456, tzinfo=timezone.utc)
    assert (str(got[4]), str(got[5]), got[7], got[8]) == ("2024-05-01", "23:59:59.500000", 2, 1)


# -- upserts --------------------------------------------------------------------------------------------------
def test_the_merge_statement_keeps_the_last_row_by_sequence_and_never_an_older_one(dest, schema):
    """The production upsert is one MERGE; the stand-in cannot run a MERGE inside a transaction, so the statement
    runs here on its own (autocommit), where the stand-in runs it."""
    spec = spec_for(dest, metadata=True)
    target = t(schema, "ITEMS")
    staging = t(schema, "STAGING")
    query(f'CREATE TABLE {staging} ("ID" NUMBER(38,0), "NAME" VARCHAR, "_SDC_SEQUENCE" NUMBER(38,0))')
    query(f'INSERT INTO {target} ("ID", "NAME", "_SDC_SEQUENCE") VALUES (1, \'stored\', 10), (2, \'stored\', 1)')
    query(f"INSERT INTO {staging} VALUES (1, 'older', 5), (2, 'second', 3), (2, 'last', 4), (3, 'new', 2), "
          f"(3, 'newer', 6)")
    narrow = base.TableSpec("items", "items", schema, tuple(c for c in spec.columns if c.name in
                                                             ("id", "name", "_sdc_sequence")), ("id",), True)
    dest.merge_in_transaction = True
    (merge,) = dest._merge_sql(narrow, target, staging)
    assert merge.startswith("MERGE INTO")
    query(merge, schema=schema)  # the stand-in wants a current schema for a MERGE
    assert sorted(query(f'SELECT "ID", "NAME", "_SDC_SEQUENCE" FROM {target}')) == \
        [(1, "stored", 10), (2, "last", 4), (3, "newer", 6)]


def test_upsert_into_a_table_holding_a_key_twice_replaces_both(dest, schema):
    spec = spec_for(dest)
    dest.claim_stream("r1", "items", 1)
    dest.write_batch(spec, batch([row(spec, id=1, name="a"), row(spec, id=1, name="b")], upto=2, upsert=False))
    dest.write_batch(spec, batch([row(spec, id=1, name="c")], upto=3, lines=[3]))
    assert query(f'SELECT "ID", "NAME" FROM {t(schema, "ITEMS")}') == [(1, "c")]


# -- schema evolution -----------------------------------------------------------------------------------------
def test_widening_keeps_values_and_a_change_cut_half_way_is_finished(dest, schema):
    v1 = {"properties": {"id": {"type": "integer"}, "n": {"type": ["null", "integer"]},
                         "flag": {"type": ["null", "boolean"]}}}
    spec = spec_for(dest, schema=v1)
    dest.claim_stream("r1", "items", 1)
    dest.write_batch(spec, batch([row(spec, id=1, n=3, flag=True)], upto=1))
    v2 = {"properties": {"id": {"type": "integer"}, "n": {"type": ["null", "number"]},
                         "flag": {"type": ["null", "boolean", "integer"]}}}
    spec = spec_for(dest, schema=v2)
    assert {c.name: c.type for c in spec.columns} == {"id": base.INTEGER, "n": base.NUMBER, "flag": base.JSON}
    assert query(f'SELECT "N", "FLAG" FROM {t(schema, "ITEMS")}') == [(3.0, "true")]
    types = dict(query("SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = %s AND "
                       "table_name = 'ITEMS'", [schema]))
    assert (types["N"], types["FLAG"]) == ("FLOAT", "VARIANT")
    # A change cut after the old column was dropped: the filled column takes its name back.
    tmp = sf.SnowflakeDestination._widen_name("n")
    query(f'ALTER TABLE {t(schema, "ITEMS")} ADD COLUMN "{tmp}" FLOAT')
    query(f'UPDATE {t(schema, "ITEMS")} SET "{tmp}" = "N"')
    query(f'ALTER TABLE {t(schema, "ITEMS")} DROP COLUMN "N"')
    spec = spec_for(dest, schema=v2)
    assert query(f'SELECT "N" FROM {t(schema, "ITEMS")}') == [(3.0,)]
    cols = [r[0] for r in query("SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND "
                                "table_name = 'ITEMS'", [schema])]
    assert sorted(cols) == ["FLAG", "ID", "N"]


# -- settings and errors --------------------------------------------------------------------------------------
def _settings(**over):
    values = {"snowflake_account": "acme-x1", "snowflake_user": "loader", "snowflake_database": "analytics",
              "snowflake_password": "s3cret"}
    values.update(over)
    return ConnectionSettings(destination_settings={k: v for k, v in values.items() if v is not None})


def test_settings_need_account_user_database_and_one_credential(tmp_path):
    with pytest.raises(ConfigError, match="snowflake_account"):
        sf.connect_kwargs(_settings(snowflake_account=None))
    with pytest.raises(ConfigError, match="snowflake_password, snowflake_private_key"):
        sf.connect_kwargs(_settings(snowflake_password=None))
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.BestAvailableEncryption(b"pass")).decode()
    with pytest.raises(ConfigError, match="not both"):
        sf.connect_kwargs(_settings(snowflake_private_key=pem, snowflake_private_key_passphrase="pass"))
    (tmp_path / "key.p8").write_text(pem)
    kwargs = sf.connect_kwargs(_settings(snowflake_password=None, snowflake_private_key_path=str(tmp_path / "key.p8"),
                                         snowflake_private_key_passphrase="pass"))
    assert kwargs["authenticator"] == "SNOWFLAKE_JWT" and "password" not in kwargs
    assert serialization.load_der_private_key(kwargs["private_key"], None).private_numbers() == key.private_numbers()
    with pytest.raises(ConfigError) as err:
        sf.connect_kwargs(_settings(snowflake_password=None, snowflake_private_key=pem,
                                    snowflake_private_key_passphrase="wrong"))
    assert "wrong" not in str(err.value) and "BEGIN" not in str(err.value)
    assert sf.resolve_identifier("analytics") == "ANALYTICS"
    assert sf.resolve_identifier('"Mixed"') == "Mixed" and sf.resolve_identifier("my-db") == "my-db"
    assert sf.schema_ident("Raw Data") == "RAW_DATA" and sf.schema_ident(None) == "PUBLIC"


def test_a_server_that_does_not_answer_is_a_transient_error_then_a_clear_one(schema):
    kwargs = sf.connect_kwargs(ConnectionSettings(destination_settings={**snowserver.connection(),
                                                                        "snowflake_port": _closed_port()}))
    kwargs["login_timeout"] = 2
    with pytest.raises(DestinationError) as err:
        sf.SnowflakeDestination(kwargs, snowserver.DATABASE, schema, retry_deadline_seconds=3)
    assert "still failing after" in err.value.what, err.value.what
    assert err.value.transient is False
    assert "password" not in str(err.value).lower()


def test_a_value_that_cannot_load_fails_the_batch_naming_stream_and_no_row_is_written(dest, schema):
    spec = spec_for(dest)
    dest.claim_stream("r1", "items", 1)
    bad = Batch(rows=[row(spec, id=1, name="a"), row(spec, id=2, day="not a date")], upto_seq=9, run_id="r1",
                fence=1, upsert=True, lines=[8, 9], first_line=8)
    with pytest.raises(DestinationError) as err:
        dest.write_batch(spec, bad)
    assert err.value.stream == "items" and not err.value.transient
    assert query(f'SELECT COUNT(*) FROM {t(schema, "ITEMS")}') == [(0,)]
    assert dest.claim_stream("r1", "items", 1) == 0


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_password_is_never_logged_nor_in_redis_bound_settings(schema, caplog):
    from ingest.config import RunSettings
    from sinks import kit

    plugin = kit.get("snowflake")
    assert all(s.scope == "worker" for s in plugin.settings)  # nothing of the connection travels with the run
    secret = "pw-" + uuid.uuid4().hex
    caplog.set_level(logging.DEBUG)
    d = plugin.open(RunSettings(destination="snowflake", default_target_schema=schema),
                    ConnectionSettings(destination_settings={**snowserver.connection(), "snowflake_password": secret}),
                    embedded=False)
    try:
        spec = spec_for(d)
        d.claim_stream("r1", "items", 1)
        d.write_batch(spec, batch([row(spec, id=1)], upto=1))
    finally:
        d.close()
    assert caplog.records and secret not in caplog.text
    assert secret not in repr(ConnectionSettings(destination_settings={"snowflake_password": secret}))

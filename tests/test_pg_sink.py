"""The PostgreSQL sink against the real server: types, upserts, schema evolution, identifiers, versions, fencing."""

from __future__ import annotations

import decimal

import psycopg2
import pytest
from psycopg2 import sql

from ingest.config import ConnectionSettings
from ingest.errors import DestinationError, Fenced
from sinks import base
from sinks.postgres import destination as postgres
from sinks.postgres.destination import PostgresDestination

from .conftest import PG_DSN
from .destinations import pg_query as query
from .sink_helpers import FAILED_AT, batch, dead_letter, dead_letter_key, row, spec_for

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


@pytest.fixture()
def schema_name(pg_schema):
    return pg_schema


@pytest.fixture()
def dest(schema_name):
    d = PostgresDestination.from_settings(ConnectionSettings(destination_settings={"postgres_dsn": PG_DSN}), schema_name)
    yield d
    d.close()


def test_types_round_trip(dest, schema_name):
    spec = spec_for(dest)
    dest.claim_stream("r1", "items", 1)
    dest.write_batch(spec, batch([
        row(spec, id=1, price=19.99, name="tab\there\nnewline \\ back", ok=True, at="2024-01-02T03:04:05Z",
            day="2024-02-29", clock="12:30:00", doc={"a": [1, None, "x"]}, tags=["p", "q"]),
        row(spec, id=2),
    ], upto=2))
    types = dict(query("SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = %s "
                       "AND table_name = 'items'", [schema_name]))
    assert types == {"id": "bigint", "price": "numeric", "name": "text", "ok": "boolean",
                     "at": "timestamp with time zone", "day": "date", "clock": "time without time zone",
                     "doc": "jsonb", "tags": "jsonb"}
    rows = query(sql.SQL("SELECT id, price, name, ok, extract(epoch from at), day::text, clock::text, doc, tags, "
                         "doc IS NULL FROM {}.items ORDER BY id").format(sql.Identifier(schema_name)))
    assert rows[0][:9] == (1, decimal.Decimal("19.99"), "tab\there\nnewline \\ back", True,
                           decimal.Decimal("1704164645.000000"), "2024-02-29", "12:30:00", {"a": [1, None, "x"]},
                           ["p", "q"])
    assert rows[1][1:] == (None, None, None, None, None, None, None, None, True)  # SQL NULL, not jsonb 'null'


@pytest.mark.parametrize("csv", [True, False], ids=["csv", "json"])
@pytest.mark.parametrize("primary_key", [True, False], ids=["primary-key", "table-made-without-key"])
def test_upsert_last_wins_and_older_sequence_never_replaces_newer(dest, schema_name, primary_key, csv):
    if not primary_key:  # a table made elsewhere: the merge deletes, then inserts
        query(sql.SQL("CREATE TABLE {}.items (id bigint, name text, _sdc_sequence bigint)").format(
            sql.Identifier(schema_name)))
    spec = spec_for(dest, metadata=True)
    dest.claim_stream("r1", "items", 1)
    # (with a primary key, CSV batches are first copied straight in: the key twice in one batch refuses that)
    dest.write_batch(spec, batch([row(spec, 10, id=1, name="a"), row(spec, 11, id=2, name="b"),
                                  row(spec, 12, id=1, name="c")], upto=12, scalars_validated=csv))
    dest.write_batch(spec, batch([row(spec, 20, id=2, name="d")], upto=20, scalars_validated=csv))
    # A redelivered older version of id 1 does not replace the newer row.
    dest.write_batch(spec, batch([row(spec, 5, id=1, name="old")], upto=21, scalars_validated=csv))
    t = sql.SQL("{}.items").format(sql.Identifier(schema_name))
    assert query(sql.SQL("SELECT id, name, _sdc_sequence FROM {} ORDER BY id").format(t)) == \
        [(1, "c", 12), (2, "d", 20)]
    assert query(sql.SQL("SELECT seq FROM {}._singer_ingest_offsets").format(sql.Identifier(schema_name))) == [(21,)]


def test_keyed_batches_are_copied_straight_in_until_a_key_is_already_there(dest, schema_name):
    """Insert first: a keyed batch whose keys are all new is copied into the target as it is; one that meets a key
    already there is merged instead (nothing of the refused copy stays), and the next INSERT_FIRST_PAUSE batches of
    that table are merged without trying."""
    spec = spec_for(dest, metadata=True)
    dest.claim_stream("r1", "items", 1)
    t = sql.SQL("{}.items").format(sql.Identifier(schema_name))

    def write(upto, *pairs):
        dest.write_batch(spec, batch([row(spec, upto, id=i, name=n) for i, n in pairs], upto=upto,
                                     scalars_validated=True))

    write(1, (1, "a"), (2, "b"))
    assert dest._insert_first_pause.get("items", 0) == 0  # went straight in
    write(2, (3, "c"), (1, "a2"))  # id 1 is there: merged
    assert dest._insert_first_pause["items"] == postgres.INSERT_FIRST_PAUSE
    assert query(sql.SQL("SELECT id, name, _sdc_sequence FROM {} ORDER BY id").format(t)) == \
        [(1, "a2", 2), (2, "b", 1), (3, "c", 2)]
    for upto in range(3, 3 + postgres.INSERT_FIRST_PAUSE):
        write(upto, (100 + upto, "new"))  # all new keys, merged while the table pauses
    assert dest._insert_first_pause["items"] == 0
    write(50, (2, "b2"))  # tried again: refused and merged, the pause starts over
    assert dest._insert_first_pause["items"] == postgres.INSERT_FIRST_PAUSE
    assert query(sql.SQL("SELECT count(*), max(_sdc_sequence) FROM {}").format(t)) == \
        [(3 + postgres.INSERT_FIRST_PAUSE, 50)]
    assert query(sql.SQL("SELECT name FROM {} WHERE id = 2").format(t)) == [("b2",)]
    assert query(sql.SQL("SELECT seq FROM {}._singer_ingest_offsets").format(sql.Identifier(schema_name))) == [(50,)]


def test_append_and_truncate_first(dest, schema_name):
    spec = spec_for(dest, keys=())
    dest.claim_stream("r1", "items", 1)
    dest.write_batch(spec, batch([row(spec, id=1), row(spec, id=1)], upto=2, upsert=False))
    t = sql.SQL("{}.items").format(sql.Identifier(schema_name))
    assert query(sql.SQL("SELECT count(*) FROM {}").format(t)) == [(2,)]
    dest.claim_stream("r2", "items", 1)
    dest.write_batch(spec, batch([row(spec, id=7)], upto=1, upsert=False, run="r2", truncate_first=True))
    assert query(sql.SQL("SELECT id FROM {}").format(t)) == [(7,)]


def test_schema_evolution_adds_and_widens_never_drops(dest, schema_name):
    s1 = {"properties": {"id": {"type": "integer"}, "n": {"type": "integer"}, "s": {"type": "string"},
                         "gone": {"type": "string"}}}
    spec = spec_for(dest, schema=s1)
    dest.claim_stream("r1", "items", 1)
    dest.write_batch(spec, batch([row(spec, id=1, n=5, s="x", gone="g")], upto=1))
    s2 = {"properties": {"id": {"type": "integer"}, "n": {"type": "number"}, "s": {"type": ["object"]},
                         "extra": {"type": "boolean"}}}
    spec2 = spec_for(dest, schema=s2)
    dest.write_batch(spec2, batch([row(spec2, id=2, n=2.5, s={"k": 1}, extra=True)], upto=2))
    types = dict(query("SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = %s "
                       "AND table_name = 'items'", [schema_name]))
    assert types == {"id": "bigint", "n": "numeric", "s": "jsonb", "gone": "text", "extra": "boolean"}
    rows = query(sql.SQL("SELECT id, n, s, gone, extra FROM {}.items ORDER BY id").format(sql.Identifier(schema_name)))
    assert rows == [(1, 5, "x", "g", None), (2, decimal.Decimal("2.5"), {"k": 1}, None, True)]


def test_hostile_and_long_identifiers(dest, schema_name):
    query(sql.SQL("CREATE TABLE {}.y (a int)").format(sql.Identifier(schema_name)))
    stream = 'x"; DROP TABLE y; --'
    long_prop = "p" * 80
    schema = {"properties": {"id": {"type": "integer"}, 'we"ird; name': {"type": "string"},
                             long_prop: {"type": "string"}, "select": {"type": "string"}}}
    spec = spec_for(dest, stream=stream, schema=schema)
    dest.claim_stream("r1", stream, 1)
    dest.write_batch(spec, batch([row(spec, id=1, **{'we"ird; name': "w", long_prop: "l", "select": "s"})], upto=1))
    tables = {r[0] for r in query("SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
                                  [schema_name])}
    assert tables == {"y", "x_drop_table_y", "_singer_ingest_offsets"}
    cols = [r[0] for r in query("SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND "
                                "table_name = 'x_drop_table_y' ORDER BY ordinal_position", [schema_name])]
    assert cols[0] == "id" and "we_ird_name" in cols and "select" in cols
    long_col = [c for c in cols if c.startswith("ppp")][0]
    assert len(long_col.encode()) <= 63 and long_col == spec.columns[[c.prop for c in spec.columns].index(long_prop)].name


@pytest.mark.parametrize("hard", [True, False])
def test_activate_version(dest, schema_name, hard):
    spec = spec_for(dest, metadata=True)
    v = spec.index(base.VERSION_COLUMN)
    dest.claim_stream("r1", "items", 1)
    rows = [row(spec, 1, id=1), row(spec, 2, id=2)]
    rows = [r[:v] + (1,) + r[v + 1:] for r in rows]
    dest.write_batch(spec, batch(rows, upto=2))
    newer = row(spec, 3, id=3)
    dest.write_batch(spec, batch([newer[:v] + (2,) + newer[v + 1:]], upto=3))
    dest.activate_version(spec, 2, run_id="r1", upto_seq=4, fence=1, hard_delete=hard,
                          deleted_at="2024-05-05T00:00:00+00:00")
    got = query(sql.SQL("SELECT id, _sdc_deleted_at IS NOT NULL FROM {}.items ORDER BY id")
                .format(sql.Identifier(schema_name)))
    assert got == ([(3, False)] if hard else [(1, True), (2, True), (3, False)])


def test_fenced_worker_cannot_commit(dest, schema_name):
    spec = spec_for(dest)
    assert dest.claim_stream("r1", "items", 1) == 0
    dest.write_batch(spec, batch([row(spec, id=1)], upto=5, fence=1))
    assert dest.claim_stream("r1", "items", 2) == 5  # a new owner takes over and sees the committed offset
    with pytest.raises(Fenced):
        dest.write_batch(spec, batch([row(spec, id=2)], upto=9, fence=1))
    with pytest.raises(Fenced):
        dest.claim_stream("r1", "items", 1)
    assert query(sql.SQL("SELECT id FROM {}.items").format(sql.Identifier(schema_name))) == [(1,)]


def test_permanent_error_names_stream_column_and_line(dest, schema_name):
    spec = spec_for(dest)
    dest.claim_stream("r1", "items", 1)
    with pytest.raises(DestinationError) as info:
        dest.write_batch(spec, batch([row(spec, id=1), row(spec, id=2, at="not a time")], upto=9,
                                     lines=[41, 42]))
    err = info.value
    assert not err.transient
    assert err.stream == "items" and err.line == 42 and "'at'" in str(err), str(err)
    assert query(sql.SQL("SELECT count(*) FROM {}.items").format(sql.Identifier(schema_name))) == [(0,)]


def test_null_key_is_a_clear_error(dest):
    spec = spec_for(dest)
    dest.claim_stream("r1", "items", 1)
    with pytest.raises(DestinationError) as info:
        base.require_keys(spec, batch([row(spec, id=1), row(spec, id=None)], upto=2, lines=[6, 7]))
    assert info.value.line == 7 and "key" in str(info.value)
    base.require_keys(spec, batch([row(spec, id=None)], upto=1, upsert=False))  # appended rows need no key


def test_connection_killed_between_writes_is_retried(dest, schema_name):
    spec = spec_for(dest)
    dest.claim_stream("r1", "items", 1)
    dest.write_batch(spec, batch([row(spec, id=1)], upto=1))
    query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'singer-ingest' "
          "AND pid <> pg_backend_pid() AND datname = current_database()")
    dest.write_batch(spec, batch([row(spec, id=2)], upto=2))
    assert query(sql.SQL("SELECT id FROM {}.items ORDER BY id").format(sql.Identifier(schema_name))) == [(1,), (2,)]


class _LosesACommitAcknowledgement(psycopg2.extensions.connection):
    """A connection whose next COMMIT, once armed, goes through on the server but reports the connection lost,
    as when PostgreSQL goes down between writing the commit and answering it."""

    armed = False

    def commit(self):
        super().commit()
        if _LosesACommitAcknowledgement.armed:
            _LosesACommitAcknowledgement.armed = False
            raise psycopg2.OperationalError("server closed the connection unexpectedly")


@pytest.mark.parametrize("keys", [(), ("id",)])
def test_a_batch_whose_commit_acknowledgement_was_lost_is_not_written_twice(schema_name, keys, caplog):
    dest = PostgresDestination({"dsn": PG_DSN, "connection_factory": _LosesACommitAcknowledgement}, schema_name)
    try:
        spec = spec_for(dest, keys=keys)
        dest.claim_stream("r1", "items", 1)
        _LosesACommitAcknowledgement.armed = True
        dest.write_batch(spec, batch([row(spec, id=1), row(spec, id=2)], upto=2, upsert=bool(keys)))
        assert not _LosesACommitAcknowledgement.armed  # the commit went through, and the retry came after it
        dest.write_batch(spec, batch([row(spec, id=3)], upto=3, upsert=bool(keys)))
    finally:
        dest.close()
    assert query(sql.SQL("SELECT id FROM {}.items ORDER BY id").format(sql.Identifier(schema_name))) == \
        [(1,), (2,), (3,)]
    assert "committed by an earlier attempt whose acknowledgement was lost" in caplog.text


def test_json_payload_round_trips_every_value_and_refuses_what_json_cannot_carry():
    from sinks.postgres.destination import json_lines, rows_from_json

    rows = [[1, "tab\there\nnewline \\ back \\\\ two", None, 19.99, True, {"a": ["\\", "é", "\u2028"]}, -2**63]
            for _ in range(4500)]  # more rows than one JSON line holds
    payload = json_lines(rows)
    assert payload.count(b"\n") == 3 and b"\t" not in payload  # COPY text: one column, escaped
    assert rows_from_json(payload) == rows
    assert json_lines([[2**64]]) is None and json_lines([["nul \x00 here"]]) is None


TRICKY = ['say "hi", \\ or \\\\', "", "null", "é \u2028 日本", "a,b;c\"", "\\\"", " lead and trail "]


def test_csv_payload_round_trips_every_value_and_refuses_what_csv_cannot_carry():
    from sinks.postgres.destination import csv_lines, rows_from_csv

    columns = tuple(base.Column(name=n, prop=n, type=t) for n, t in (
        ("n", base.INTEGER), ("s", base.STRING), ("f", base.NUMBER), ("b", base.BOOLEAN), ("j", base.JSON)))
    rows = [(-2**63, s, 19.99, True, {"k": [s, "line\nbreak", None, 1e-7], "q": '"'}) for s in TRICKY]
    rows += [(None, None, None, None, None), (2**63 - 1, "x", 1e300, False, "a JSON string \\ \"")]
    before = [tuple(r) for r in rows]
    payload = csv_lines(columns, rows)
    assert payload is not None and payload.count(b"\n") == len(rows)
    assert rows == before  # the caller's rows are left as they were
    assert rows_from_csv(columns, payload) == [list(r) for r in rows]
    # CSV cannot undo these JSON escapes or hold these values: the caller falls back to another encoding
    for bad in ((1, "tab\there", 1.0, True, None), (1, "nul \x00", 1.0, True, None), (1, "x", 1.0, True, {"a": "\x00"}),
                (2**64, "x", 1.0, True, None)):
        assert csv_lines(columns, [bad]) is None, bad


@pytest.mark.parametrize("keys", [("id",), ()], ids=["upsert-staged", "append-straight-into-target"])
def test_csv_and_json_routes_load_the_same_table(dest, schema_name, keys, caplog):
    """Validated rows go as CSV, others as JSON: both must leave exactly the same rows in PostgreSQL."""
    caplog.set_level("INFO", logger="sinks.postgres.destination")
    got = {}
    for route, validated in (("csv", True), ("json", False)):
        spec = spec_for(dest, stream=f"items_{route}", keys=keys, metadata=True)
        dest.claim_stream("r1", spec.stream, 1)
        rows = [row(spec, i, id=i, price=[19.99, 0.1, 1e15, None][i % 4], name=TRICKY[i % len(TRICKY)],
                    ok=[True, False, None][i % 3], at=["2024-01-02T03:04:05Z", "2024-06-30T23:59:59.123456+02:00",
                                                       None][i % 3],
                    day="2024-02-29", clock="12:30:00", doc={"t": TRICKY[i % len(TRICKY)], "n": [i, None]},
                    tags=[TRICKY[(i + 1) % len(TRICKY)]] if i % 2 else None)
                for i in range(1, 30)]
        dest.write_batch(spec, batch(list(rows), upto=30, upsert=bool(keys), scalars_validated=validated))
        got[route] = query(sql.SQL("SELECT id, price, name, ok, at, day, clock, doc, tags, _sdc_sequence FROM {}.{} "
                                   "ORDER BY id").format(sql.Identifier(schema_name), sql.Identifier(spec.table)))
    assert "refused" not in caplog.text  # each went in as encoded, not as the COPY text of the fallback
    assert len(got["csv"]) == 29 and got["csv"] == got["json"]
    assert got["csv"][0][2] == TRICKY[1] and got["csv"][1][2] == "null" and got["csv"][0][8] == [TRICKY[2]]


def test_csv_route_error_names_the_input_line(dest, schema_name):
    spec = spec_for(dest)
    dest.claim_stream("r1", "items", 1)
    with pytest.raises(DestinationError) as info:
        dest.write_batch(spec, batch([row(spec, id=1), row(spec, id=2, at="not a time")], upto=9, lines=[41, 42],
                                     scalars_validated=True))
    assert info.value.line == 42 and "'at'" in str(info.value), str(info.value)
    assert query(sql.SQL("SELECT count(*) FROM {}.items").format(sql.Identifier(schema_name))) == [(0,)]


# -- dead letters ------------------------------------------------------------------------------------------
def dead_letters_in(schema_name) -> list[tuple]:
    """The dead-letter table's rows (failed_at as ISO text in UTC), by stream and line."""
    return query(sql.SQL("SELECT stream, line, _sdc_sequence, run_id, reason, error, record, "
                         "to_char(failed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"') "
                         "FROM {}.{} ORDER BY stream, line").format(sql.Identifier(schema_name),
                                                                    sql.Identifier(base.DEAD_LETTER_TABLE)))


def offset_of(schema_name, stream="items") -> int:
    return query(sql.SQL("SELECT seq FROM {}._singer_ingest_offsets WHERE stream = %s")
                 .format(sql.Identifier(schema_name)), [stream])[0][0]


@pytest.mark.parametrize("csv", [True, False], ids=["csv", "json"])
def test_dead_letters_commit_with_the_rows_once_also_without_rows(dest, schema_name, csv, caplog):
    spec = spec_for(dest)
    dest.claim_stream("r1", "items", 1)
    first = batch([row(spec, id=1), row(spec, id=3)], upto=4, lines=[1, 3], scalars_validated=csv,
                  dead_letters=[dead_letter(2), dead_letter(4, reason="destination")])
    dest.write_batch(spec, first)
    assert dead_letters_in(schema_name) == [dead_letter(2), dead_letter(4, reason="destination")]
    assert dead_letters_in(schema_name)[0][7] == FAILED_AT
    key = query("SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = "
                "ANY(i.indkey) WHERE i.indrelid = to_regclass(%s) AND i.indisprimary ORDER BY a.attname",
                [f"{schema_name}.{base.DEAD_LETTER_TABLE}"])
    assert key == [("_sdc_sequence",), ("stream",)]
    # The same batch again (its commit's acknowledgement was lost): neither rows nor dead letters twice.
    dest.write_batch(spec, batch([row(spec, id=1), row(spec, id=3)], upto=4, lines=[1, 3], scalars_validated=csv,
                                 dead_letters=[dead_letter(2), dead_letter(4, reason="destination")]))
    assert "acknowledgement was lost" in caplog.text
    # A batch of dead letters only commits them with the offset, once.
    only = batch([], upto=6, dead_letters=[dead_letter(5), dead_letter(6)])
    dest.write_batch(spec, only)
    dest.write_batch(spec, batch([], upto=6, dead_letters=[dead_letter(5), dead_letter(6)]))
    assert [r[1] for r in dead_letters_in(schema_name)] == [2, 4, 5, 6]
    assert query(sql.SQL("SELECT id FROM {}.items ORDER BY id").format(sql.Identifier(schema_name))) == [(1,), (3,)]
    assert offset_of(schema_name) == 6


def test_a_refused_batch_writes_no_dead_letters(dest, schema_name):
    spec = spec_for(dest)
    dest.claim_stream("r1", "items", 1)
    # A value PostgreSQL refuses fails the whole batch: its dead letters are not committed either.
    with pytest.raises(DestinationError) as info:
        dest.write_batch(spec, batch([row(spec, id=1, at="not a time")], upto=3, lines=[3],
                                     dead_letters=[dead_letter(2)]))
    assert info.value.line == 3
    # A dead letter the table refuses (its key twice) fails the batch, rows included, naming its line.
    with pytest.raises(DestinationError) as info:
        dest.write_batch(spec, batch([row(spec, id=1)], upto=3, lines=[3],
                                     dead_letters=[dead_letter(2), dead_letter(2)]))
    assert "dead-letter table" in str(info.value) and info.value.line == 2 and not info.value.transient
    assert dead_letters_in(schema_name) == []
    assert query(sql.SQL("SELECT count(*) FROM {}.items").format(sql.Identifier(schema_name))) == [(0,)]



def test_workers_creating_the_dead_letter_table_at_once_meet_on_it(schema_name):
    """Several workers (and their drain threads) write their first dead letters at the same moment."""
    from concurrent.futures import ThreadPoolExecutor

    workers = [PostgresDestination.from_settings(ConnectionSettings(destination_settings={"postgres_dsn": PG_DSN}),
                                                 schema_name) for _ in range(3)]
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
    assert [dead_letter_key(r) for r in dead_letters_in(schema_name)] == \
        [dead_letter_key(dead_letter(2, stream=f"s{n}")) for n in range(3)]

"""The conformance suite: every destination runs these tests unchanged, against its real server.

A destination joins by adding its harness (tests/destinations.py) to ``DESTINATIONS`` below. The cases:
singer-sdk's target test streams; upsert last-wins, also within one batch; an older sequence never replaces a
newer row; redelivery after a worker is killed mid-batch; a commit whose acknowledgement is lost; a fenced stale
owner; schema evolution (new column, integer widened to number, scalar to JSON); ACTIVATE_VERSION soft and
hard; identifiers (reserved words, 200-character names, quotes and backticks, unicode, names built to inject
SQL); bad input (one clear error line naming the input line and stream, no STATE past it).
"""

from __future__ import annotations

import logging

import orjson
import pytest

from ingest.errors import Fenced
from sinks import base, kit
from sinks.base import Batch
from sinks.names import normalise

from .conftest import Workers, finish, first_state, generate, start_feeder
from .destinations import HARNESSES
from .expected import _kind, model, normalise as normalise_value
from .sink_helpers import TRICKY_RECORD, dead_letter
from .test_sdk_streams import MUST_FAIL, ROWS

DESTINATIONS = ["duckdb", "postgres", "mysql", "delta", "delta_s3", "elasticsearch", "bigquery", "mongodb",
                "snowflake"]

pytestmark = [pytest.mark.integration, pytest.mark.conformance]


@pytest.fixture(params=[pytest.param(name, marks=getattr(pytest.mark, name)) for name in DESTINATIONS])
def dest(request, tmp_path):
    harness = HARNESSES[request.param](tmp_path)
    # A harness may leave out a case that cannot hold for its store or its test server: it says which and why
    # (``Harness.left_out``), and the case shows as skipped with that reason.
    reason = harness.left_out.get(request.node.originalname)
    if reason:
        pytest.skip(f"left out for {request.param}: {reason}")
    yield harness
    harness.cleanup()


def lines(*messages: dict) -> bytes:
    return b"".join(orjson.dumps(m) + b"\n" for m in messages)


def load(cli, dest, data: bytes, **config):
    path = dest.tmp_path / "input.singer"
    path.write_bytes(data)
    return cli(["--config", dest.write_config(**config), "--input", str(path)], cwd=dest.tmp_path)


def assert_matches_input(dest, data: bytes) -> None:
    """Each stream's table holds what the input says, row by row (keyed: the last record of each key)."""
    for stream, m in model(data).items():
        kinds = {p: _kind(s) for p, s in m["props"].items()}
        cols = {p: normalise(p, dest.max_identifier_bytes) for p in kinds}
        actual = [{p: normalise_value(r[cols[p]], kinds[p]) if kinds[p] != "ts" else r[cols[p]] for p in kinds}
                  for r in dest.rows(normalise(stream, dest.max_identifier_bytes))]
        expected = [{p: normalise_value(r.get(p), k) for p, k in kinds.items()} for r in m["rows"]]
        assert len(actual) == len(expected), f"{stream}: {len(actual)} rows, {len(expected)} expected"
        key = (lambda r: tuple(str(r[k]) for k in m["keys"])) if m["keys"] else \
            (lambda r: orjson.dumps(r, option=orjson.OPT_SORT_KEYS))
        for a, e in zip(sorted(actual, key=key), sorted(expected, key=key)):
            assert a == e, f"{stream}: loaded {a}, expected {e}"


SCHEMA = {"type": "object", "properties": {"id": {"type": "integer"}, "v": {"type": ["null", "string"]}}}


# -- singer-sdk's target test streams -------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ROWS))
def test_sdk_streams_load(cli, dest, sdk_streams, name):
    result = load(cli, dest, (sdk_streams / name).read_bytes())
    assert result.returncode == 0, result.stderr
    for table, count in ROWS[name].items():
        assert dest.count(table) == count, table


@pytest.mark.parametrize("name", sorted(MUST_FAIL))
def test_sdk_streams_that_must_fail_fail_clearly(cli, dest, sdk_streams, name):
    result = load(cli, dest, (sdk_streams / name).read_bytes())
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert "input line" in last and MUST_FAIL[name] in last, last
    assert "Traceback" not in result.stderr


# -- upserts ---------------------------------------------------------------------------------------------------
def test_upsert_last_wins_within_a_batch_and_across_batches(cli, dest):
    msgs = [{"type": "SCHEMA", "stream": "items", "schema": SCHEMA, "key_properties": ["id"]}]
    msgs += [{"type": "RECORD", "stream": "items", "record": {"id": i % 3, "v": f"v{i}"}} for i in range(10)]
    msgs += [{"type": "STATE", "value": {"at": 10}}]
    result = load(cli, dest, lines(*msgs), batch_size_rows=4)
    assert result.returncode == 0, result.stderr
    assert sorted((r["id"], r["v"]) for r in dest.rows("items")) == [(0, "v9"), (1, "v7"), (2, "v8")]
    # One batch holding every record: the last of each key wins inside it too.
    result = load(cli, dest, lines(*msgs[:1], *[{**m, "record": {**m["record"], "v": m["record"]["v"] + "b"}}
                                                for m in msgs[1:-1]]), batch_size_rows=1000)
    assert result.returncode == 0, result.stderr
    assert sorted((r["id"], r["v"]) for r in dest.rows("items")) == [(0, "v9b"), (1, "v7b"), (2, "v8b")]


@pytest.mark.parametrize("method", ["append-only", "overwrite"])
def test_load_methods_append_only_and_overwrite(cli, dest, method):
    def run(*records):
        msgs = [{"type": "SCHEMA", "stream": "items", "schema": SCHEMA, "key_properties": ["id"]}]
        msgs += [{"type": "RECORD", "stream": "items", "record": {"id": i, "v": v}} for i, v in records]
        result = load(cli, dest, lines(*msgs, {"type": "STATE", "value": {"n": len(records)}}), load_method=method,
                      batch_size_rows=2)
        assert result.returncode == 0, result.stderr
        return sorted((r["id"], r["v"]) for r in dest.rows("items"))

    # Every record is a row, keys or not; a later run adds to the table (append-only) or replaces it (overwrite).
    assert run((1, "a"), (1, "b"), (2, "c")) == [(1, "a"), (1, "b"), (2, "c")]
    second = run((3, "x"), (3, "y"), (4, "z"))
    assert second == ([(1, "a"), (1, "b"), (2, "c"), (3, "x"), (3, "y"), (4, "z")] if method == "append-only"
                      else [(3, "x"), (3, "y"), (4, "z")])


def _spec(d, keys=("id",)):
    return d.ensure_table(base.table_spec("items", SCHEMA, keys, metadata=True, schema_name=None,
                                          max_identifier_bytes=d.max_identifier_bytes))


def _batch(spec, records: list[tuple[int, int, str]], upto: int, *, fence: int = 1, upsert: bool = True) -> Batch:
    """records: (input line, id, v); _sdc_sequence is the line."""
    rows = []
    for line, id_, v in records:
        values = {"id": id_, "v": v, base.SEQUENCE_COLUMN: line}
        rows.append(tuple(values.get(c.prop or c.name) for c in spec.columns))
    return Batch(rows=rows, upto_seq=upto, run_id="r1", fence=fence, upsert=upsert,
                 first_line=records[0][0] if records else None, lines=[r[0] for r in records])


def test_an_older_sequence_never_replaces_a_newer_row(dest):
    d = dest.open()
    try:
        spec = _spec(d)
        d.claim_stream("r1", "items", 1)
        d.write_batch(spec, _batch(spec, [(5, 1, "new")], upto=5))
        # A later batch carrying an older record of the key (a replayed input line): the stored row stays.
        d.write_batch(spec, _batch(spec, [(3, 1, "old"), (6, 2, "x")], upto=6))
    finally:
        d.close()
    assert sorted((r["id"], r["v"], r["_sdc_sequence"]) for r in dest.rows("items")) == [(1, "new", 5), (2, "x", 6)]


# -- exactness ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("keys", [(), ("id",)])
def test_a_commit_whose_acknowledgement_was_lost_is_not_written_twice(dest, keys, caplog):
    """The worker retries a batch whose COMMIT went through but whose answer never came: the retry writes the
    same batch again, which must not double its rows."""
    d = dest.open()
    caplog.set_level(logging.WARNING)
    try:
        spec = _spec(d, keys)
        d.claim_stream("r1", "items", 1)
        d.write_batch(spec, _batch(spec, [(1, 1, "a"), (2, 2, "b")], upto=2, upsert=bool(keys)))
        d.write_batch(spec, _batch(spec, [(1, 1, "a"), (2, 2, "b")], upto=2, upsert=bool(keys)))
        d.write_batch(spec, _batch(spec, [(3, 3, "c")], upto=3, upsert=bool(keys)))
    finally:
        d.close()
    assert sorted((r["id"], r["v"]) for r in dest.rows("items")) == [(1, "a"), (2, "b"), (3, "c")]
    if dest.plugin.exactness != kit.IDEMPOTENT:
        assert "committed by an earlier attempt whose acknowledgement was lost" in caplog.text


def test_a_fenced_stale_owner_cannot_commit(dest):
    d = dest.open()
    try:
        spec = _spec(d)
        assert d.claim_stream("r1", "items", 1) == 0
        d.write_batch(spec, _batch(spec, [(1, 1, "a")], upto=1, fence=1))
        assert d.claim_stream("r1", "items", 2) == 1  # a new owner takes the stream over
        with pytest.raises(Fenced):
            d.write_batch(spec, _batch(spec, [(2, 2, "stale")], upto=2, fence=1))
        with pytest.raises(Fenced):
            d.activate_version(spec, 9, run_id="r1", upto_seq=3, fence=1, hard_delete=True,
                               deleted_at="2024-01-01T00:00:00+00:00")
        d.write_batch(spec, _batch(spec, [(2, 2, "owner")], upto=2, fence=2))
        assert d.claim_stream("r1", "items", 3) == 2
    finally:
        d.close()
    assert sorted((r["id"], r["v"]) for r in dest.rows("items")) == [(1, "a"), (2, "owner")]


def test_dead_letters_commit_with_their_batch_once_and_never_from_a_fenced_owner(dest):
    """``Batch.dead_letters`` commit with the batch's rows and offset: a replay (a lost acknowledgement) writes
    neither twice, a batch of dead letters only commits too, a fenced stale owner writes none."""
    def with_dead(batch, *letters):
        batch.dead_letters = [dead_letter(n) for n in letters]
        return batch

    d = dest.open()
    try:
        spec = _spec(d)
        d.claim_stream("r1", "items", 1)
        for _ in range(2):
            d.write_batch(spec, with_dead(_batch(spec, [(1, 1, "a"), (3, 3, "c")], upto=4), 2, 4))
        for _ in range(2):
            d.write_batch(spec, with_dead(_batch(spec, [], upto=6), 5, 6))
        assert d.claim_stream("r1", "items", 2) == 6  # a new owner takes the stream over
        with pytest.raises(Fenced):
            d.write_batch(spec, with_dead(_batch(spec, [(8, 8, "stale")], upto=8, fence=1), 7))
        with pytest.raises(Fenced):
            d.write_batch(spec, with_dead(_batch(spec, [], upto=9, fence=1), 9))
    finally:
        d.close()
    assert sorted(r["id"] for r in dest.rows("items")) == [1, 3]
    dead = sorted(dest.rows(base.DEAD_LETTER_TABLE), key=lambda r: r["line"])
    assert [(r["stream"], r["line"], r["_sdc_sequence"], r["reason"]) for r in dead] == \
        [("items", n, 1000 + n, "schema") for n in (2, 4, 5, 6)]
    assert dead[0]["record"] == TRICKY_RECORD  # the record's JSON text exactly as it came


def with_bad_events(data: bytes, every: int = 97) -> tuple[bytes, bytes, list[int]]:
    """``data`` with every ``every``-th events record made to fail its schema (user_id a string); also the data
    without those lines, which is what the tables must hold, and the input lines of the bad records."""
    out, kept, bad = [], [], []
    n = 0
    for number, line in enumerate(data.splitlines(keepends=True), 1):
        if line.startswith(b'{"type":"RECORD","stream":"events"'):
            n += 1
            if n % every == 0:
                msg = orjson.loads(line)
                msg["record"]["user_id"] = "not a number"
                out.append(orjson.dumps(msg) + b"\n")
                bad.append(number)
                continue
        out.append(line)
        kept.append(line)
    return b"".join(out), b"".join(kept), bad


def test_redelivery_after_a_worker_is_killed_mid_batch(dest, fresh_redis, redis_url, run_id):
    """A worker killed mid-batch, with records set aside as dead letters in its batches and a stream loaded under
    a stream map's alias (the survivor applies the map to the schema it takes over): nothing lost, nothing
    doubled, in the tables and in the dead-letter table."""
    workers = Workers(redis_url, dest.tmp_path, env=dest.worker_env())
    data, good, bad = with_bad_events(generate(30000))
    try:
        victim, survivor = workers.start(2)
        (dest.tmp_path / "in.singer").write_bytes(data)
        feeder = start_feeder(["--config", dest.write_config(batch_size_rows=1000, lease_ttl_seconds=3,
                                                             bad_records="dead_letter",
                                                             stream_maps={"orders": {"__alias__": "orders_v2"}}),
                               "--redis-url", redis_url, "--run-id", run_id, "--input", str(dest.tmp_path / "in.singer")])
        first = first_state(feeder)
        workers.kill(victim)
        states, err = finish(feeder, first, timeout=240)
        assert feeder.returncode == 0, err + workers.logs()
        assert states[-1] == model(data)["users"]["last_state"]
        assert survivor.poll() is None
    finally:
        workers.stop()
    assert "orders" not in dest.tables()
    assert_matches_input(dest, good.replace(b'"stream":"orders"', b'"stream":"orders_v2"'))
    dead = dest.rows(base.DEAD_LETTER_TABLE)
    assert sorted(r["line"] for r in dead) == bad  # each once
    assert {(r["stream"], r["reason"], r["run_id"]) for r in dead} == {("events", "schema", run_id)}


# -- stream maps, flattening and the dead-letter table ---------------------------------------------------------
def test_stream_maps_flattening_and_dead_letters(cli, dest):
    nested = {"type": "object", "properties": {
        "id": {"type": ["null", "integer"]}, "email": {"type": ["null", "string"]},
        "country": {"type": ["null", "string"]},
        "addr": {"type": ["null", "object"], "properties": {
            "city": {"type": ["null", "string"]},
            "geo": {"type": ["null", "object"], "properties": {"lat": {"type": ["null", "number"]}}}}}}}
    people = [{"id": 1, "email": "a@example.com", "country": "FR", "addr": {"city": "Paris", "geo": {"lat": 48.8}}},
              {"id": 2, "email": "b@example.com", "country": "US", "addr": {"city": "Boston", "geo": {"lat": 42.3}}},
              {"id": 3, "email": "c@example.com", "country": "FR", "addr": None},
              {"id": None, "email": "nokey@example.com", "country": "FR", "addr": None},  # refused: null key
              {"id": "four", "email": "d@example.com", "country": "FR", "addr": None}]  # fails its schema
    data = lines({"type": "SCHEMA", "stream": "customers", "schema": nested, "key_properties": ["id"]},
                 *[{"type": "RECORD", "stream": "customers", "record": r} for r in people],
                 {"type": "SCHEMA", "stream": "audit", "schema": SCHEMA, "key_properties": []},
                 {"type": "RECORD", "stream": "audit", "record": {"id": 1, "v": "x"}},
                 {"type": "STATE", "value": {"done": 1}})
    maps = {"customers": {"__alias__": "clients", "__filter__": "country != 'US'", "email": None,
                          "email_hash": "md5(config['seed'] + email)", "country": "__NULL__"},
            "__else__": None}
    result = load(cli, dest, data, stream_maps=maps, stream_map_config={"seed": "s1"}, flattening_enabled=True,
                  flattening_max_depth=1, bad_records="dead_letter", batch_size_rows=2)
    assert result.returncode == 0, result.stderr
    assert "customers: 2" in result.stderr.splitlines()[-1], result.stderr  # the dead letters, counted
    tables = dest.tables()
    assert "clients" in tables and "customers" not in tables and "audit" not in tables
    cols = dest.columns("clients")
    assert {"id", "email_hash", "addr__city", "addr__geo"} <= set(cols) and not {"email", "country"} & set(cols)
    import hashlib

    rows = {r["id"]: r for r in dest.rows("clients")}
    assert sorted(rows) == [1, 3]  # 2 filtered out
    assert rows[1]["email_hash"] == hashlib.md5(b"s1a@example.com").hexdigest()
    assert rows[1]["addr__city"] == "Paris" and orjson.loads(rows[1]["addr__geo"]) == {"lat": 48.8}
    assert rows[3]["addr__city"] is None
    dead = sorted(dest.rows(base.DEAD_LETTER_TABLE), key=lambda r: r["line"])
    assert [(r["stream"], r["line"], r["reason"]) for r in dead] == [("customers", 5, "destination"),
                                                                      ("customers", 6, "schema")]
    assert "null" in dead[0]["error"] and "id" in dead[1]["error"]
    assert orjson.loads(dead[1]["record"])["email"] == "d@example.com"  # the record as it came in


def test_a_bad_stream_map_expression_is_a_usage_error_at_start(cli, dest):
    data = lines({"type": "SCHEMA", "stream": "items", "schema": SCHEMA, "key_properties": ["id"]},
                 {"type": "RECORD", "stream": "items", "record": {"id": 1, "v": "x"}})
    result = load(cli, dest, data, stream_maps={"items": {"v2": "v +* 2"}})
    assert result.returncode == 2
    assert "stream 'items'" in result.stderr and "'v +* 2'" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == b""  # refused before reading the input: no STATE


# -- schema evolution -----------------------------------------------------------------------------------------
def test_schema_evolution_adds_columns_widens_integer_to_number_and_scalar_to_json(cli, dest):
    v1 = {"type": "object", "properties": {"id": {"type": "integer"}, "n": {"type": ["null", "integer"]},
                                           "s": {"type": ["null", "string"]}}}
    v2 = {"type": "object", "properties": {"id": {"type": "integer"}, "n": {"type": ["null", "number"]},
                                           "s": {"type": ["null", "object", "string"]},
                                           "c": {"type": ["null", "string"]}}}
    data = lines({"type": "SCHEMA", "stream": "evolving", "schema": v1, "key_properties": ["id"]},
                 {"type": "RECORD", "stream": "evolving", "record": {"id": 1, "n": 9007199254740993, "s": "x"}},
                 {"type": "STATE", "value": {"n": 1}},
                 {"type": "SCHEMA", "stream": "evolving", "schema": v2, "key_properties": ["id"]},
                 {"type": "RECORD", "stream": "evolving", "record": {"id": 2, "n": 1.5, "s": {"a": [1, "b"]},
                                                                     "c": "new"}},
                 {"type": "STATE", "value": {"n": 2}})
    result = load(cli, dest, data)
    assert result.returncode == 0, result.stderr
    assert [orjson.loads(s) for s in result.stdout.splitlines()][-1]["value"] == {"n": 2}
    cols = dest.columns("evolving")
    assert (cols["n"], cols["s"], cols["c"]) == (base.NUMBER, base.JSON, base.STRING)
    rows = {r["id"]: r for r in dest.rows("evolving")}
    assert float(rows[1]["n"]) == float(9007199254740993) and rows[1]["s"] == "x" and rows[1]["c"] is None
    assert rows[2]["n"] == 1.5 and rows[2]["s"] == {"a": [1, "b"]} and rows[2]["c"] == "new"


# -- ACTIVATE_VERSION -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("hard", [False, True])
def test_activate_version(cli, dest, hard):
    def rec(id_, version):
        return {"type": "RECORD", "stream": "versioned", "record": {"id": id_, "v": f"{id_}@{version}"},
                "version": version}

    data = lines({"type": "SCHEMA", "stream": "versioned", "schema": SCHEMA, "key_properties": ["id"]},
                 {"type": "ACTIVATE_VERSION", "stream": "versioned", "version": 1},
                 rec(1, 1), rec(2, 1), rec(3, 1),
                 {"type": "ACTIVATE_VERSION", "stream": "versioned", "version": 1},
                 {"type": "STATE", "value": {"v": 1}},
                 rec(1, 2), rec(3, 2),
                 {"type": "ACTIVATE_VERSION", "stream": "versioned", "version": 2},
                 {"type": "STATE", "value": {"v": 2}})
    result = load(cli, dest, data, hard_delete=hard)
    assert result.returncode == 0, result.stderr
    rows = {r["id"]: r for r in dest.rows("versioned")}
    if hard:
        assert sorted(rows) == [1, 3]
    else:
        assert sorted(rows) == [1, 2, 3]
        assert rows[2]["_sdc_deleted_at"] is not None and rows[2]["_sdc_table_version"] == 1
    for i in (1, 3):
        assert rows[i]["v"] == f"{i}@2" and rows[i]["_sdc_deleted_at"] is None and rows[i]["_sdc_table_version"] == 2


# -- identifiers ----------------------------------------------------------------------------------------------
HOSTILE = ["select", "order", "Group By", "x" * 200, 'quo"te', "back`tick", "it's", "Zürich-Straße", "日本語",
           'a"; DROP TABLE users; --', "b`; DROP DATABASE test; --", "c'); DELETE FROM items; --", "_sdc_custom"]


def test_identifiers_reserved_long_quoted_unicode_and_injection(cli, dest):
    schema = {"type": "object", "properties": {name: {"type": ["null", "string"]} for name in HOSTILE}}
    schema["properties"]["id"] = {"type": "integer"}
    streams = ["select", "Table`; DROP TABLE x; --", "s" * 200]
    msgs = []
    for stream in streams:
        msgs.append({"type": "SCHEMA", "stream": stream, "schema": schema, "key_properties": ["id", "order"]})
        msgs.append({"type": "RECORD", "stream": stream, "record": {"id": 1, **{n: f"value of {n}" for n in HOSTILE}}})
    msgs.append({"type": "STATE", "value": {"done": True}})
    result = load(cli, dest, lines(*msgs))
    assert result.returncode == 0, result.stderr
    limit = dest.max_identifier_bytes
    tables = {normalise(s, limit) for s in streams}
    assert dest.tables() >= tables
    for table in tables:
        assert len(table.encode()) <= limit
        (row,) = dest.rows(table)
        for name in HOSTILE:
            assert row[normalise(name, limit)] == f"value of {name}", name
        assert row["id"] == 1


# -- bad input ------------------------------------------------------------------------------------------------
def test_bad_record_is_one_clear_error_and_no_state_passes_it(cli, dest):
    good = [{"type": "RECORD", "stream": "items", "record": {"id": i, "v": "ok"}} for i in range(5)]
    data = lines({"type": "SCHEMA", "stream": "items", "schema": SCHEMA, "key_properties": ["id"]}, *good[:3],
                 {"type": "STATE", "value": {"at": 4}}, *good[3:],
                 {"type": "RECORD", "stream": "items", "record": {"id": "not a number", "v": "bad"}},
                 {"type": "STATE", "value": {"at": 8}})
    result = load(cli, dest, data, batch_size_rows=2)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("singer-ingest: error:")]
    assert len(errors) == 1 and "input line 8" in errors[0] and "stream 'items'" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    states = [orjson.loads(s)["value"] for s in result.stdout.splitlines()]
    assert states in ([], [{"at": 4}])

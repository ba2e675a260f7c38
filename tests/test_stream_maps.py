"""Stream maps and flattening, against the examples of singer-sdk's stream maps documentation
(docs/stream_maps.md: "Examples"), through the installed CLI; distributed on PostgreSQL with real workers whose
``stream_map_config`` comes from their own environment, never through Redis."""

from __future__ import annotations

import hashlib
import json

import duckdb
import orjson
import pytest
import redis as redis_lib

from .conftest import PG_DSN
from .destinations import pg_query

CUSTOMERS = {"type": "object", "properties": {
    "id": {"type": "integer"}, "first_name": {"type": ["null", "string"]}, "last_name": {"type": ["null", "string"]},
    "email": {"type": ["null", "string"]}, "country": {"type": ["null", "string"]},
    "rating": {"type": ["null", "integer"]}}}
PEOPLE = [
    {"id": 1, "first_name": "Ada", "last_name": "Lovelace", "email": "ada@example.com", "country": "UK", "rating": 5},
    {"id": 2, "first_name": "Alan", "last_name": "Turing", "email": "alan@example.org", "country": "UK", "rating": 2},
    {"id": 3, "first_name": "Grace", "last_name": "Hopper", "email": "grace@navy.mil", "country": "USA", "rating": 4},
]
ADDRESSES = {"type": "object", "properties": {"id": {"type": "integer"}, "city": {"type": ["null", "string"]}}}
SEED = "01AWZh7A6DzGm6iJZZ2T"


def tap_output() -> bytes:
    msgs = [{"type": "SCHEMA", "stream": "customers", "schema": CUSTOMERS, "key_properties": ["id"]},
            *[{"type": "RECORD", "stream": "customers", "record": r} for r in PEOPLE],
            {"type": "SCHEMA", "stream": "addresses", "schema": ADDRESSES, "key_properties": ["id"]},
            {"type": "RECORD", "stream": "addresses", "record": {"id": 1, "city": "London"}},
            {"type": "STATE", "value": {"bookmark": 3}}]
    return b"".join(orjson.dumps(m) + b"\n" for m in msgs)


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# (stream_maps, expected tables: {table: sorted rows as dicts of the listed columns})
EXAMPLES = {
    "hash and drop PII, with a seed from stream_map_config": (
        {"customers": {"email": None, "email_domain": "email.split('@')[-1]",
                       "email_hash": "md5(config['hash_seed'] + email)"}},
        {"customers": [{"id": p["id"], "email_domain": p["email"].split("@")[1],
                        "email_hash": md5(SEED + p["email"]), "first_name": p["first_name"]} for p in PEOPLE],
         "addresses": [{"id": 1, "city": "London"}]}),
    "alias a stream": (
        {"customers": {"__alias__": "customers_v5"}},
        {"customers_v5": [{"id": p["id"], "email": p["email"]} for p in PEOPLE]}),
    "filter records": (
        {"customers": {"__filter__": "country == 'UK' and rating > 3"}},
        {"customers": [{"id": 1, "country": "UK"}]}),
    "only the listed properties (__else__: null), a new one from an expression": (
        {"customers": {"id": "id", "full_name": "first_name + ' ' + last_name", "__else__": None}},
        {"customers": [{"id": p["id"], "full_name": f"{p['first_name']} {p['last_name']}"} for p in PEOPLE]}),
    "a new key (__key_properties__), the old one dropped with __NULL__": (
        {"customers": {"__key_properties__": ["email_hash"], "email_hash": "sha256(email)", "id": "__NULL__"}},
        {"customers": [{"email_hash": sha256(p["email"]), "first_name": p["first_name"]} for p in PEOPLE]}),
    "leave a stream out (null), and every unmapped one (__else__: null)": (
        {"addresses": None, "customers": {}, "__else__": None},
        {"customers": [{"id": p["id"]} for p in PEOPLE]}),
    "a JSON blob of the record": (
        {"customers": {"__else__": None, "id": "id", "payload": "json.dumps(record)"}},
        {"customers": [{"id": p["id"], "payload": json.dumps(p)} for p in PEOPLE]}),
}


def duckdb_table(path, table: str) -> list[dict]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        cur = con.execute(f'SELECT * FROM "{table}"')
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]
    finally:
        con.close()


def duckdb_tables(path) -> set[str]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    finally:
        con.close()


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_singer_sdk_documentation_examples(cli, tmp_path, example):
    maps, expected = EXAMPLES[example]
    db = tmp_path / "out.duckdb"
    config = tmp_path / "target.json"
    config.write_text(json.dumps({"duckdb_path": str(db), "stream_maps": maps,
                                  "stream_map_config": {"hash_seed": SEED}}))
    result = cli(["--config", str(config)], input_bytes=tap_output())
    assert result.returncode == 0, result.stderr
    assert result.states == [{"bookmark": 3}]
    left_out = "addresses" not in expected and maps.get("addresses", {}) is None or "__else__" in maps
    expected = {"addresses": [{"id": 1, "city": "London"}], **expected} if not left_out else expected
    assert duckdb_tables(db) - {"_singer_ingest_offsets"} == set(expected)
    for table, rows in expected.items():
        loaded = duckdb_table(db, table)
        got = sorted(({k: r[k] for k in rows[0]} for r in loaded), key=json.dumps)
        assert got == sorted(rows, key=json.dumps), table
    if "email" in EXAMPLES[example][0].get("customers", {}):
        assert "email" not in duckdb_table(db, "customers")[0]


def test_flattening_depth_and_what_stays_json(cli, tmp_path):
    schema = {"type": "object", "properties": {
        "id": {"type": "integer"},
        "a": {"type": "object", "properties": {"b": {"type": "object", "properties": {"c": {"type": "integer"}}},
                                               "s": {"type": "string"}}}}}
    data = b"".join(orjson.dumps(m) + b"\n" for m in [
        {"type": "SCHEMA", "stream": "t", "schema": schema, "key_properties": ["id"]},
        {"type": "RECORD", "stream": "t", "record": {"id": 1, "a": {"b": {"c": 7}, "s": "x"}}}])
    for depth, expected in [(1, {"a__b": '{"c":7}', "a__s": "x"}), (2, {"a__b__c": 7, "a__s": "x"})]:
        db = tmp_path / f"out{depth}.duckdb"
        config = tmp_path / "target.json"
        config.write_text(json.dumps({"duckdb_path": str(db), "flattening_enabled": True,
                                      "flattening_max_depth": depth}))
        result = cli(["--config", str(config)], input_bytes=data)
        assert result.returncode == 0, result.stderr
        (row,) = duckdb_table(db, "t")
        got = {k: row[k] for k in expected}
        if depth == 1:  # deeper levels stay JSON (singer-sdk writes them as JSON text)
            got["a__b"] = json.dumps(json.loads(got["a__b"]), separators=(",", ":"))
        assert got == expected and "a" not in row


@pytest.mark.parametrize("config, message", [
    ({"stream_maps": {"customers": {"x": "email +"}}}, "stream 'customers', x: expression 'email +' is not valid"),
    ({"stream_maps": {"customers": {"__filter__": "rating >"}}}, "stream 'customers', __filter__"),
    ({"stream_maps": {"copy": {"__source__": "customers"}}}, "__source__"),
    ({"stream_maps": {"customers": "drop"}}, "expected an object, null"),
    ({"stream_maps": {"__else__": {"x": "1"}}}, "__else__ can only be null"),
    ({"flattening_enabled": True}, "flattening_max_depth"),
    ({"stream_maps": "{not json"}, "must be a JSON object"),
])
def test_bad_maps_are_usage_errors_at_start(cli, tmp_path, config, message):
    path = tmp_path / "target.json"
    path.write_text(json.dumps({"duckdb_path": str(tmp_path / "out.duckdb"), **config}))
    result = cli(["--config", str(path)], input_bytes=tap_output())
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert result.stdout == b""


def test_an_expression_failing_on_a_record_names_its_line(cli, tmp_path):
    path = tmp_path / "target.json"
    path.write_text(json.dumps({"duckdb_path": str(tmp_path / "out.duckdb"),
                                "stream_maps": {"customers": {"x": "rating / (rating - 5)"}}}))
    result = cli(["--config", str(path)], input_bytes=tap_output())
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert "input line 2" in last and "stream 'customers'" in last and "stream map" in last, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.postgres
def test_maps_distributed_on_postgres_with_the_seed_from_the_workers(cli, workers, redis_url, run_id, tmp_path,
                                                                     pg_schema):
    workers.env["SINGER_INGEST_POSTGRES_DSN"] = PG_DSN
    workers.env["SINGER_INGEST_STREAM_MAP_CONFIG"] = json.dumps({"hash_seed": SEED})
    workers.start(2)
    config = tmp_path / "target.json"
    config.write_text(json.dumps({"destination": "postgres", "default_target_schema": pg_schema,
                                  "stream_maps": EXAMPLES["hash and drop PII, with a seed from stream_map_config"][0],
                                  "bad_records": "dead_letter"}))
    data = tap_output().replace(b'"rating":2', b'"rating":"two"')
    result = cli(["--config", str(config), "--redis-url", redis_url, "--run-id", run_id], input_bytes=data)
    assert result.returncode == 0, result.stderr + workers.logs()
    rows = pg_query(f'SELECT id, email_hash, email_domain FROM "{pg_schema}".customers ORDER BY id')
    assert rows == [(p["id"], md5(SEED + p["email"]), p["email"].split("@")[1]) for p in PEOPLE if p["id"] != 2]
    (dead,) = pg_query(f'SELECT stream, line, reason, record FROM "{pg_schema}"._singer_ingest_dead_letter')
    assert dead[:3] == ("customers", 3, "schema") and json.loads(dead[3])["rating"] == "two"
    conn = redis_lib.Redis.from_url(redis_url)
    for key in conn.scan_iter(f"si:{{{run_id}}}:*"):
        if conn.type(key) == b"hash":
            assert SEED.encode() not in b"".join(k + v for k, v in conn.hgetall(key).items()), key
    status = cli(["status", "--redis-url", redis_url, "--run-id", run_id, "--json"])
    per_stream = {s["stream"]: s["dead_letters"] for s in orjson.loads(status.stdout)["streams"]}
    assert per_stream == {"customers": 1, "addresses": 0}


@pytest.mark.parametrize("maps, streams", [
    ({"customers": {"__alias__": "people"}, "addresses": {"__alias__": "people"}}, ("customers", "addresses")),
    (None, ("Customers", "customers")),  # two names that normalise to one table
])
def test_two_streams_onto_one_table_are_refused(cli, tmp_path, maps, streams):
    first, second = streams
    msgs = [{"type": "SCHEMA", "stream": first, "schema": ADDRESSES, "key_properties": ["id"]},
            {"type": "RECORD", "stream": first, "record": {"id": 1, "city": "Paris"}},
            {"type": "SCHEMA", "stream": second, "schema": ADDRESSES, "key_properties": ["id"]},
            {"type": "RECORD", "stream": second, "record": {"id": 1, "city": "Lyon"}}]
    config = tmp_path / "target.json"
    config.write_text(json.dumps({"duckdb_path": str(tmp_path / "out.duckdb"),
                                  **({"stream_maps": maps} if maps else {})}))
    result = cli(["--config", str(config)], input_bytes=b"".join(orjson.dumps(m) + b"\n" for m in msgs))
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert f"input line 3, stream '{second}'" in last and f"streams '{first}' and '{second}' would both load" in last, \
        result.stderr
    assert "Traceback" not in result.stderr

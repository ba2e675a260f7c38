"""The MongoDB sink against a MongoDB server (tests/mongoserver.py: nx-27017, or the mongod
SINGER_INGEST_TEST_MONGODB_URL names): values read back document by document, the field-name rule, ids from keys
and sequences, dead letters written once however often their batch is replayed, an older record never brought
back, a document over 16 MB or a value BSON cannot hold named by its input line, hostile names, and errors that
keep the URL's password out."""

from __future__ import annotations

import logging
from datetime import datetime

import pytest
from bson.decimal128 import Decimal128

from ingest.config import ConnectionSettings, RunSettings
from ingest.errors import ConfigError, DestinationError, Fenced
from sinks import base
from sinks.base import Batch
from sinks.mongodb.destination import CATALOG, OFFSETS, MongoDestination, documents, open_destination

from . import mongoserver
from .sink_helpers import SCHEMA, batch, row, spec_for

pytestmark = [pytest.mark.mongodb, pytest.mark.integration]


@pytest.fixture()
def mongo(request):
    database = "s_" + request.node.name.encode().hex()[:20] + str(id(request) % 10_000)
    d = open_destination(RunSettings(destination="mongodb", default_target_schema=database,
                                     destination_settings={"mongodb_decimal128": mongoserver.real()}),
                         ConnectionSettings(destination_settings={"mongodb_url": mongoserver.url()}), embedded=False)
    yield d
    d.client.drop_database(database)
    d.close()


def docs(d: MongoDestination, collection: str = "items") -> list[dict]:
    return sorted(d.db[collection].find({}), key=lambda doc: str(doc["_id"]))


def test_values_read_back_document_by_document(mongo):
    spec = spec_for(mongo, metadata=True)
    mongo.claim_stream("r1", "items", 1)
    at = "2024-02-29T23:59:59.123456+02:00"
    mongo.write_batch(spec, batch([
        row(spec, 1, id=1, price=19.99, name="Zürich 日本語 'q\" \\ \t\n", ok=True, at=at, day="2024-02-29",
            clock="12:34:56.5", doc={"a.b": {"$x": [{"c.d": 1}]}, "n": {"x": 1.5}, "plain": None},
            tags=["t1", 2]),
        row(spec, 2, id=2),
    ], upto=2))
    d1, d2 = docs(mongo)
    assert d1["_id"] == 1 and d1["id"] == 1 and d1["price"] == 19.99 and d1["ok"] is True
    assert d1["name"] == "Zürich 日本語 'q\" \\ \t\n"
    # A BSON date in UTC, to the millisecond (BSON dates hold no microseconds).
    assert d1["at"] == datetime(2024, 2, 29, 21, 59, 59, 123000)
    assert d1["day"] == "2024-02-29" and d1["clock"] == "12:34:56.5"
    # The field-name rule inside JSON values: "." -> U+FF0E, a leading "$" -> U+FF04.
    assert d1["doc"] == {"a\uff0eb": {"\uff04x": [{"c\uff0ed": 1}]}, "n": {"x": 1.5}, "plain": None}
    assert d1["tags"] == ["t1", 2] and d1["_sdc_sequence"] == 1
    assert all(d2[c] is None for c in ("price", "name", "ok", "at", "day", "clock", "doc", "tags"))
    catalog = mongo.db[CATALOG].find_one({"_id": "items"})
    assert dict(catalog["columns"])["price"] == base.NUMBER and dict(catalog["columns"])["doc"] == base.JSON


def test_decimal_scale_columns_become_decimal128_from_their_shortest_text():
    spec = base.table_spec("items", SCHEMA, ("id",), metadata=False, schema_name=None)
    assert next(c for c in spec.columns if c.name == "price").scale == 2
    rows = [row(spec, id=1, price=19.99), row(spec, id=2, price=3), row(spec, id=3, price=10 ** 40 + 1)]
    make = documents(spec, rows, [1, 2, 3], decimal128=True)
    assert make(0)["price"] == Decimal128("19.99") and make(1)["price"] == Decimal128("3")
    with pytest.raises(Exception, match="more than 34 digits"):
        make(2)
    assert documents(spec, rows, [1, 2, 3], decimal128=False)(0)["price"] == 19.99


def test_compound_keys_are_a_sub_document_id_and_keyless_streams_use_the_sequence(mongo):
    schema = {"properties": {"a": {"type": "integer"}, "b": {"type": "string"}, "v": {"type": ["null", "string"]}}}
    keyed = spec_for(mongo, stream="pairs", schema=schema, keys=("a", "b"))
    first = batch([row(keyed, a=1, b="x", v="1"), row(keyed, a=1, b="y", v="2")], upto=2)
    assert mongo._ids(keyed, first, first.rows, first.lines, True) == [{"a": 1, "b": "x"}, {"a": 1, "b": "y"}]
    if mongoserver.real():  # nx-27017 cannot match a sub-document _id in a write (README, MongoDB)
        mongo.claim_stream("r1", "pairs", 1)
        mongo.write_batch(keyed, first)
        mongo.write_batch(keyed, batch([row(keyed, a=1, b="x", v="3")], upto=3, lines=[3]))
        assert [(d["_id"], d["v"]) for d in docs(mongo, "pairs")] == [({"a": 1, "b": "x"}, "3"),
                                                                      ({"a": 1, "b": "y"}, "2")]

    keyless = spec_for(mongo, stream="events", schema=schema, keys=())
    mongo.claim_stream("r1", "events", 1)
    b = batch([row(keyless, a=1, b="x"), row(keyless, a=1, b="x")], upto=11, upsert=False, lines=[10, 11],
              sequence_base=1000)
    mongo.write_batch(keyless, b)
    mongo.db[OFFSETS].update_one({"_id": "r1/events"}, {"$set": {"offset": 0}})  # the offset write was lost
    mongo.write_batch(keyless, b)  # written again: the same ids, nothing doubled
    assert [d["_id"] for d in docs(mongo, "events")] == [1010, 1011]


def test_dead_letters_are_written_once_however_often_their_batch_is_replayed(mongo):
    spec = spec_for(mongo, metadata=True)
    mongo.claim_stream("r1", "items", 1)
    failed_at = "2024-05-01T10:00:00+00:00"

    def letter(line: int, error: str) -> tuple:
        values = {"stream": "items", "line": line, "_sdc_sequence": 500 + line, "run_id": "r1", "reason": "schema",
                  "error": error, "record": '{"id": "x"}', "failed_at": failed_at}
        return tuple(values[c.name] for c in base.DEAD_LETTER_COLUMNS)

    # A batch of dead letters only, replayed: once (the offset covers it), and once more after a lost offset.
    only = Batch(rows=[], upto_seq=3, run_id="r1", fence=1, upsert=True, dead_letters=[letter(3, "bad id")])
    mongo.write_batch(spec, only)
    mongo.write_batch(spec, only)
    mongo.db[OFFSETS].update_one({"_id": "r1/items"}, {"$set": {"offset": 0}})
    mongo.write_batch(spec, only)
    # Rows and dead letters together, replayed.
    mixed = batch([row(spec, 504, id=1, name="a"), row(spec, 505, id=2, name="b")], upto=6, lines=[4, 5])
    mixed.dead_letters = [letter(6, "too long")]
    mongo.write_batch(spec, mixed)
    mongo.db[OFFSETS].update_one({"_id": "r1/items"}, {"$set": {"offset": 3}})
    mongo.write_batch(spec, mixed)
    letters = docs(mongo, base.DEAD_LETTER_TABLE)
    assert [(d["_id"], d["stream"], d["_sdc_sequence"], d["line"], d["error"]) for d in letters] == [
        ("items/503", "items", 503, 3, "bad id"), ("items/506", "items", 506, 6, "too long")]
    assert letters[0]["failed_at"] == datetime(2024, 5, 1, 10, 0) and letters[0]["record"] == '{"id": "x"}'
    assert [d["name"] for d in docs(mongo)] == ["a", "b"]
    assert mongo.db[OFFSETS].find_one({"_id": "r1/items"})["offset"] == 6
    assert dict(mongo.db[CATALOG].find_one({"_id": base.DEAD_LETTER_TABLE})["columns"])["failed_at"] == base.TIMESTAMP


def test_an_older_record_never_comes_back_and_a_document_without_a_sequence_is_replaced(mongo, caplog):
    spec = spec_for(mongo, metadata=True)
    mongo.claim_stream("r1", "items", 1)
    mongo.write_batch(spec, batch([row(spec, 5, id=1, name="new"), row(spec, 6, id=2, name="x")], upto=6,
                                  lines=[5, 6]))
    mongo.db["items"].update_one({"_id": 2}, {"$unset": {"_sdc_sequence": ""}})  # as written with metadata off
    caplog.set_level(logging.DEBUG, logger="sinks.mongodb.destination")
    mongo.write_batch(spec, batch([row(spec, 3, id=1, name="old"), row(spec, 4, id=2, name="replaced"),
                                   row(spec, 7, id=3, name="y")], upto=7, lines=[3, 4, 7]))
    assert [(d["_id"], d["name"], d["_sdc_sequence"]) for d in docs(mongo)] == [(1, "new", 5), (2, "replaced", 4),
                                                                                 (3, "y", 7)]
    assert "1 documents stored with a newer _sdc_sequence kept (1 without one replaced)" in caplog.text


def test_a_document_over_16_mb_is_an_error_naming_its_input_line_and_the_offset_stays(mongo):
    spec = spec_for(mongo)
    mongo.claim_stream("r1", "items", 1)
    big = "x" * (16 * 1024 * 1024)
    with pytest.raises(DestinationError, match="over MongoDB's limit") as info:
        mongo.write_batch(spec, batch([row(spec, id=1, name="ok"), row(spec, id=2, name=big)], upto=8,
                                      lines=[7, 8]))
    assert info.value.line == 8 and not info.value.transient and "input line 8" in str(info.value)
    assert mongo.claim_stream("r1", "items", 2) == 0


@pytest.mark.parametrize("value, words", [({"a\x00b": 1}, "NUL"), (2 ** 64, "8-byte ints")])
def test_a_value_bson_cannot_hold_is_an_error_naming_its_input_line(mongo, value, words):
    schema = {"properties": {"id": {"type": "integer"}, "v": {}}}
    spec = spec_for(mongo, schema=schema)
    mongo.claim_stream("r1", "items", 1)
    with pytest.raises(DestinationError, match=words) as info:
        mongo.write_batch(spec, batch([row(spec, id=1, v=1), row(spec, id=2, v=value)], upto=4, lines=[3, 4]))
    assert info.value.line == 4


def test_hostile_field_and_stream_names(mongo):
    names = ["select", "Group By", "x" * 200, 'quo"te', "back`tick", "it's", "Zürich-Straße", "日本語", "a.b", "$c",
             'a"; DROP TABLE users; --', "_sdc_custom"]
    schema = {"properties": {n: {"type": ["null", "string"]} for n in names} | {"id": {"type": "integer"}}}
    for stream in ["Table`; DROP TABLE x; --", "s" * 200, "日本語 stream", "a.b$c"]:
        spec = spec_for(mongo, stream=stream, schema=schema)
        mongo.claim_stream("r1", stream, 1)
        mongo.write_batch(spec, batch([row(spec, id=1, **{n: f"value of {n}" for n in names})], upto=1))
        (doc,) = docs(mongo, spec.table)
        assert len(spec.table.encode()) <= mongo.max_identifier_bytes
        for n in names:
            assert doc[next(c.name for c in spec.columns if c.prop == n)] == f"value of {n}", n


def test_a_stream_named_like_a_bookkeeping_collection_is_refused(mongo):
    with pytest.raises(DestinationError, match="keeps for itself"):
        spec_for(mongo, stream=OFFSETS)


def test_fencing_and_activate_version(mongo):
    spec = spec_for(mongo, metadata=True)
    assert mongo.claim_stream("r1", "items", 2) == 0
    with pytest.raises(Fenced):
        mongo.claim_stream("r1", "items", 1)
    v = spec.index(base.VERSION_COLUMN)
    rows = [row(spec, n, id=n, name=str(n)) for n in (1, 2, 3)]
    rows = [r[:v] + (1 if n < 3 else 2,) + r[v + 1:] for n, r in zip((1, 2, 3), rows)]
    mongo.write_batch(spec, batch(rows, upto=3, fence=2))
    mongo.activate_version(spec, 2, run_id="r1", upto_seq=4, fence=2, hard_delete=False,
                           deleted_at="2024-01-01T00:00:00+00:00")
    # A BSON date; nx-27017 stores a date set by $set as its text (README, MongoDB).
    deleted = datetime(2024, 1, 1) if mongoserver.real() else "2024-01-01 00:00:00"
    assert [d["_sdc_deleted_at"] for d in docs(mongo)] == [deleted, deleted, None]
    mongo.activate_version(spec, 2, run_id="r1", upto_seq=5, fence=2, hard_delete=True,
                           deleted_at="2024-01-02T00:00:00+00:00")
    assert [d["_id"] for d in docs(mongo)] == [3]
    assert mongo.claim_stream("r1", "items", 3) == 5


def test_config_errors_and_an_unreachable_server_keep_the_password_out():
    with pytest.raises(ConfigError, match="needs mongodb_url"):
        open_destination(RunSettings(destination="mongodb"), ConnectionSettings(), embedded=False)
    with pytest.raises(ConfigError) as info:
        MongoDestination("mongodb://user:s3cret-pw@host:notaport/")
    assert "s3cret-pw" not in str(info.value)
    with pytest.raises(ConfigError, match="database name"):
        MongoDestination("mongodb://127.0.0.1:1/", "a.b")
    d = MongoDestination("mongodb://user:s3cret-pw@127.0.0.1:1/db", retry_deadline_seconds=0.3,
                         server_selection_timeout_ms=100)
    try:
        with pytest.raises(DestinationError) as info:
            d.claim_stream("r1", "items", 1)
    finally:
        d.close()
    assert "unreachable" in str(info.value) and "s3cret-pw" not in str(info.value) and not info.value.transient
    assert "still failing after" in str(info.value)


def test_a_property_named_id_is_the_document_id_only_as_the_stream_key(mongo):
    schema = {"properties": {"_id": {"type": "string"}, "v": {"type": ["null", "string"]}}}
    keyed = spec_for(mongo, stream="from_mongo", schema=schema, keys=("_id",))
    mongo.claim_stream("r1", "from_mongo", 1)
    mongo.write_batch(keyed, batch([row(keyed, _id="a1", v="x")], upto=1))
    mongo.write_batch(keyed, batch([row(keyed, _id="a1", v="y")], upto=2, lines=[2]))
    assert [(d["_id"], d["v"]) for d in docs(mongo, "from_mongo")] == [("a1", "y")]
    keyless = spec_for(mongo, stream="other", schema=schema, keys=())
    with pytest.raises(DestinationError, match="document id") as info:
        mongo.write_batch(keyless, batch([row(keyless, _id="a1", v="x")], upto=3, upsert=False, lines=[3]))
    assert info.value.line == 3

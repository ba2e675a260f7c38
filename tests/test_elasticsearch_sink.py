"""The elasticsearch destination beyond the conformance suite, on the local osmem-server: dead letters in the
batch's own write (a replay doubles nothing), ids of compound and long keys, reserved field names, a refused
document naming its input line, items the server could not take for now sent again, an unreachable server,
index generations after a type change and an overwrite."""

from __future__ import annotations

import http.server
import threading

import orjson
import pytest
import urllib3

from ingest.config import ConnectionSettings, RunSettings
from ingest.errors import ConfigError, DestinationError
from sinks import base
from sinks.base import Batch
from sinks.elasticsearch.destination import ElasticsearchDestination, Http, document_id, index_prefix

pytestmark = pytest.mark.elasticsearch

SCHEMA = {"type": "object", "properties": {"id": {"type": "integer"}, "v": {"type": ["null", "string"]}}}


def _rows(spec, records):
    """records: (line, {property: value}); _sdc_sequence is the line."""
    return [tuple({**rec, base.SEQUENCE_COLUMN: line}.get(c.prop or c.name) for c in spec.columns)
            for line, rec in records]


def _batch(spec, records, upto, *, dead_letters=(), upsert=True, fence=1):
    return Batch(rows=_rows(spec, records), upto_seq=upto, run_id="r1", fence=fence, upsert=upsert,
                 lines=[line for line, _ in records], dead_letters=list(dead_letters))


def _dead_letter(line, error="'x' is not of type 'integer'"):
    return ("items", line, line, "r1", "schema", error, orjson.dumps({"id": "x", "n": line}).decode(),
            "2026-01-02T03:04:05.123456+00:00")


def _spec(d, schema=SCHEMA, keys=("id",), stream="items"):
    return d.ensure_table(base.table_spec(stream, schema, keys, metadata=True, schema_name=None,
                                          max_identifier_bytes=d.max_identifier_bytes))


def _docs(harness, table):
    from . import osmem

    name = harness.prefix + table
    osmem.request("POST", f"/{name}/_refresh")
    status, answer = osmem.request("POST", f"/{name}/_search", {"size": 1000})
    assert status == 200, answer
    return {h["_id"]: h["_source"] for h in answer["hits"]["hits"]}


def test_dead_letters_go_with_their_batch_and_a_replay_doubles_nothing(es_harness):
    d = es_harness.open()
    try:
        spec = _spec(d)
        d.claim_stream("r1", "items", 1)
        first = _batch(spec, [(1, {"id": 1, "v": "a"}), (3, {"id": 2, "v": "b"})], upto=3,
                       dead_letters=[_dead_letter(2)])
        d.write_batch(spec, first)
        d.write_batch(spec, first)  # its acknowledgement was lost: written again, nothing doubled
        only = _batch(spec, [], upto=5, dead_letters=[_dead_letter(4), _dead_letter(5)])
        d.write_batch(spec, only)
        d.write_batch(spec, only)  # a batch of dead letters only, replayed: skipped by the stored offset
        assert d.claim_stream("r1", "items", 2) == 5
    finally:
        d.close()
    assert sorted((r["id"], r["v"]) for r in es_harness.rows("items")) == [(1, "a"), (2, "b")]
    letters = _docs(es_harness, base.DEAD_LETTER_TABLE)
    assert sorted(letters) == ["items/2", "items/4", "items/5"]
    two = letters["items/2"]
    assert (two["stream"], two["line"], two["_sdc_sequence"], two["run_id"], two["reason"]) == \
        ("items", 2, 2, "r1", "schema")
    assert orjson.loads(two["record"]) == {"id": "x", "n": 2} and two["failed_at"].startswith("2026-01-02T03:04:05")
    assert es_harness.columns(base.DEAD_LETTER_TABLE)["failed_at"] == base.TIMESTAMP


def test_a_refused_document_fails_the_batch_naming_its_input_line_and_the_offset_stays(es_harness):
    d = es_harness.open()
    try:
        spec = _spec(d)
        d.claim_stream("r1", "items", 1)
        bad = _batch(spec, [(7, {"id": 1, "v": "ok"}), (8, {"id": 2, "v": "ok"})], upto=8)
        bad.rows[1] = tuple({"id": "not a number"}.get(c.name, v) for c, v in zip(spec.columns, bad.rows[1]))
        with pytest.raises(DestinationError) as err:
            d.write_batch(spec, bad)
        assert err.value.line == 8 and err.value.stream == "items" and not err.value.transient
        assert "not a number" in err.value.what or "id" in err.value.what
        assert d.claim_stream("r1", "items", 2) == 0  # the offset did not move
    finally:
        d.close()


def test_ids_of_compound_and_long_keys_and_fields_elasticsearch_reserves(es_harness):
    schema = {"type": "object", "properties": {"k": {"type": "string"}, "n": {"type": "integer"},
                                               "_id": {"type": ["null", "string"]}}}
    long_key = "k" * 600
    d = es_harness.open()
    try:
        spec = _spec(d, schema, keys=("k", "n"), stream="pairs")
        d.claim_stream("r1", "pairs", 1)
        d.write_batch(spec, _batch(spec, [(1, {"k": "a/b", "n": 1, "_id": "mine"}), (2, {"k": long_key, "n": 2})],
                                   upto=2))
        d.write_batch(spec, _batch(spec, [(3, {"k": "a/b", "n": 1, "_id": "again"})], upto=3))
    finally:
        d.close()
    docs = _docs(es_harness, "pairs")
    assert set(docs) == {'["a/b",1]', document_id((long_key, 2))}
    assert document_id((long_key, 2)).startswith("sha256:")
    assert docs['["a/b",1]']["_id_"] == "again"  # a property named _id is the field _id_
    assert {r["_id"] for r in es_harness.rows("pairs")} == {"again", None}


class _Flaky(http.server.ThreadingHTTPServer):
    """A proxy in front of the test server that answers the first ``_bulk`` with 429 as a whole (or drops the
    connection without an answer) and marks the first item of the second as 429 (Elasticsearch's "rejected
    execution" under load); everything else is forwarded."""

    daemon_threads = True

    def __init__(self, upstream: str, first: str):
        self.upstream = upstream
        self.first = first
        self.bulks = 0
        self.pool = urllib3.PoolManager(retries=False)
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _any(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                is_bulk = self.path.startswith("/_bulk")
                if is_bulk:
                    outer.bulks += 1
                if is_bulk and outer.bulks == 1 and outer.first == "drop":
                    self.close_connection = True
                    return None
                if is_bulk and outer.bulks == 1:
                    return self._answer(429, b'{"error":{"type":"es_rejected_execution_exception","reason":"busy"}}')
                kind = self.headers.get("Content-Type", "application/json")
                resp = outer.pool.request(self.command, outer.upstream + self.path, body=body or None,
                                          headers={"Content-Type": kind})
                data = resp.data
                if is_bulk and outer.bulks == 2:
                    answer = orjson.loads(data)
                    item = next(iter(answer["items"][0].values()))
                    item.update(status=429, error={"type": "es_rejected_execution_exception", "reason": "queue full"})
                    answer["errors"] = True
                    data = orjson.dumps(answer)
                self._answer(resp.status, data)

            def _answer(self, status, data):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.mark.parametrize("first", ["429", "drop"])
def test_documents_the_server_could_not_take_for_now_are_sent_again(es_harness, caplog, first):
    from . import osmem

    proxy = _Flaky(osmem.url(), first)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    d = ElasticsearchDestination(Http(f"http://127.0.0.1:{proxy.server_address[1]}"), es_harness.prefix,
                                 bulk_bytes=1, sleep=lambda s: None)
    try:
        spec = _spec(d)
        d.claim_stream("r1", "items", 1)
        d.write_batch(spec, _batch(spec, [(1, {"id": 1, "v": "a"}), (2, {"id": 2, "v": "b"})], upto=2))
    finally:
        d.close()
        proxy.shutdown()
        proxy.server_close()
    # the whole request refused (or its connection dropped), then item 1 refused for now and sent again, then item 2
    assert proxy.bulks == 4
    assert sorted((r["id"], r["v"]) for r in es_harness.rows("items")) == [(1, "a"), (2, "b")]
    assert "not taken for now" in caplog.text


def test_an_unreachable_server_is_transient_and_its_credentials_are_never_shown():
    with socket_closed() as port:
        d = ElasticsearchDestination(Http(f"http://elastic:s3cr3t@127.0.0.1:{port}"), "x.",
                                     retry_deadline_seconds=0.3)
        with pytest.raises(DestinationError) as err:
            d.claim_stream("r1", "items", 1)
    assert "cannot be reached" in str(err.value) and f"127.0.0.1:{port}" in str(err.value)
    assert "s3cr3t" not in str(err.value) and "elastic:" not in str(err.value)
    assert "still failing after" in str(err.value) and not err.value.transient


class socket_closed:
    """A loopback port nothing listens on."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return self.sock.getsockname()[1]

    def __exit__(self, *exc) -> None:
        self.sock.close()


def test_a_type_change_and_an_overwrite_make_the_next_generation_behind_the_alias(es_harness):
    from . import osmem

    wide = {"type": "object", "properties": {"id": {"type": "integer"}, "v": {"type": ["null", "object", "string"]}}}
    d = es_harness.open()
    try:
        spec = _spec(d)
        d.claim_stream("r1", "items", 1)
        d.write_batch(spec, _batch(spec, [(1, {"id": 1, "v": "text"})], upto=1))
        spec = _spec(d, wide)
        d.write_batch(spec, _batch(spec, [(2, {"id": 2, "v": {"a": [1]}})], upto=2))
        assert set(osmem.request("GET", f"/{es_harness.prefix}items/_alias")[1]) == {f"{es_harness.prefix}items-000002"}
        assert sorted((r["id"], r["v"]) for r in es_harness.rows("items")) == [(1, "text"), (2, {"a": [1]})]
        # the versions came along: an older record of id 1 is still refused
        d.write_batch(spec, _batch(spec, [(0, {"id": 1, "v": "older"})], upto=3))
        assert {r["id"]: r["v"] for r in es_harness.rows("items")}[1] == "text"
        overwrite = _batch(spec, [(4, {"id": 9, "v": "only"})], upto=4)
        overwrite.truncate_first = True
        d.write_batch(spec, overwrite)
    finally:
        d.close()
    assert set(osmem.request("GET", f"/{es_harness.prefix}items/_alias")[1]) == {f"{es_harness.prefix}items-000003"}
    assert [(r["id"], r["v"]) for r in es_harness.rows("items")] == [(9, "only")]
    assert osmem.request("GET", f"/{es_harness.prefix}items-000001")[0] == 404


def test_the_index_prefix_must_start_an_index_name():
    assert index_prefix(RunSettings(destination="elasticsearch", default_target_schema="Raw Data")) == "raw_data."
    assert index_prefix(RunSettings(destination="elasticsearch")) == "singer_ingest."
    for bad in ("_x", "Upper.", "a b", "x" * 101):
        with pytest.raises(ConfigError, match="cannot start an index name"):
            index_prefix(RunSettings(destination="elasticsearch",
                                     destination_settings={"elasticsearch_index_prefix": bad}))
    from sinks.elasticsearch.destination import open_destination

    with pytest.raises(ConfigError, match="needs elasticsearch_url"):
        open_destination(RunSettings(destination="elasticsearch"), ConnectionSettings(), embedded=False)


def test_data_stream_documents_are_created_with_the_sequence_as_id_and_a_timestamp():
    """osmem-server has no data streams, so this checks the _bulk lines the data stream option sends."""
    d = ElasticsearchDestination(Http("http://127.0.0.1:9"), "x.", data_stream=True)
    spec = base.table_spec("items", SCHEMA, ("id",), metadata=True, schema_name=None)
    rows = _rows(spec, [(5, {"id": 1, "v": "a"})])
    at = spec.index("_sdc_extracted_at")
    rows[0] = rows[0][:at] + ("2026-01-02T03:04:05.5Z",) + rows[0][at + 1:]
    batch = Batch(rows=rows, upto_seq=5, run_id="r1", fence=1, upsert=True, lines=[5], sequence_base=1000)
    (line,) = list(d._actions(spec, batch, "x.items", keyed=False))
    action, doc = (orjson.loads(part) for part in line.splitlines())
    assert action == {"create": {"_index": "x.items", "_id": "1005"}}
    assert doc["@timestamp"] == "2026-01-02T03:04:05.5Z" and doc["id"] == 1 and "version" not in action["create"]

"""Unit tests of the pure logic: parsing and framing, STATE watermarks, flush triggers, names, types, config."""

from __future__ import annotations

import contextlib
import io

import pytest

from ingest import config as cfg
from ingest import wire
from ingest.errors import ConfigError, InputError
from ingest.messages import ActivateVersion, BatchFiles, Record, Schema, State, parse_line, record_stream
from ingest.reader import LineReader
from ingest.watermark import StateTracker
from sinks import base
from sinks.names import normalise, normalise_all
from workers.batching import FlushPolicy, flush_reason, last_by_key, seconds_until_due
from workers.validation import check_schema, record_validator


# -- parsing ---------------------------------------------------------------------------------------
def test_parse_each_type_case_insensitively():
    r = parse_line(b'{"type":"record","stream":"s","record":{"a":1},"time_extracted":"2024-01-01T00:00:00Z",'
                   b'"version":3}', 7)
    assert r == Record("s", {"a": 1}, 7, "2024-01-01T00:00:00Z", 3)
    s = parse_line(b'{"type":"Schema","stream":"s","schema":{"properties":{"id":{}}},"key_properties":["id"],'
                   b'"bookmark_properties":["id"]}', 1)
    assert isinstance(s, Schema) and s.key_properties == ("id",) and s.bookmark_properties == ("id",)
    assert parse_line(b'{"type":"STATE","value":{"x":1}}', 2) == State({"x": 1}, 2)
    assert parse_line(b'{"type":"ACTIVATE_VERSION","stream":"s","version":5}', 3) == ActivateVersion("s", 5, 3)
    b = parse_line(b'{"type":"BATCH","stream":"s","encoding":{"format":"jsonl","compression":"gzip"},'
                   b'"manifest":["file:///tmp/a.jsonl.gz"]}', 4)
    assert b == BatchFiles("s", "jsonl", "gzip", ("file:///tmp/a.jsonl.gz",), 4)


@pytest.mark.parametrize("raw, what, stream", [
    (b'{"type":"RECORD","stream":"s",', "malformed JSON", None),
    (b'{"type":"RECORD","stream":"s","record":{"a":"\xff"}}', "invalid UTF-8", None),
    (b'[1,2]', "expected a JSON object", None),
    (b'{"stream":"s"}', 'no "type"', None),
    (b'{"type":"WHAT","stream":"s"}', "unknown message type", "s"),
    (b'{"type":"RECORD","record":{}}', 'no "stream"', None),
    (b'{"type":"RECORD","stream":"s"}', 'no "record"', "s"),
    (b'{"type":"SCHEMA","stream":"s"}', 'no "schema"', "s"),
    (b'{"type":"SCHEMA","stream":"s","schema":{"properties":{}},"key_properties":["id"]}', "not in the schema", "s"),
    (b'{"type":"STATE"}', 'no "value"', None),
    (b'{"type":"ACTIVATE_VERSION","stream":"s","version":"x"}', "integer", "s"),
    (b'{"type":"BATCH","stream":"s","encoding":{"format":"parquet"},"manifest":[]}', "not supported", "s"),
    (b'{"type":"BATCH","stream":"s","encoding":{"format":"jsonl"},"manifest":["s3://b/k"]}', "not a local file", "s"),
])
def test_framing_errors_name_line_and_stream(raw, what, stream):
    with pytest.raises(InputError) as info:
        parse_line(raw, 42)
    err = info.value
    assert err.line == 42 and err.stream == stream
    assert what in str(err) and "input line 42" in str(err)


def test_unknown_type_skipped_when_allowed():
    assert parse_line(b'{"type":"FUTURE_THING"}', 1, allow_unknown=True) is None


@pytest.mark.parametrize("raw, stream", [
    (b'{"type":"RECORD","stream":"users","record":{"id":1}}', "users"),
    (b'{"type": "RECORD", "stream": "a b.c", "record": {}}', "a b.c"),
    (b'{"type":"RECORD","stream":"caf\\u00e9","record":{}}', None),  # an escape: parse the line
    ('{"type":"RECORD","stream":"café","record":{}}'.encode(), "café"),
    (b'{"type":"RECORD","stream":"u\\"x","record":{}}', None),
    (b'{"stream":"u","type":"RECORD","record":{}}', None),
    (b'{"type":"record","stream":"u","record":{}}', None),
    (b'{"type":"SCHEMA","stream":"u","schema":{}}', None),
    (b' {"type":"RECORD","stream":"u","record":{}}', None),
    (b'{"type":"RECORD","stream":"\xff","record":{}}', None),
])
def test_record_stream_reads_the_head_of_plain_record_lines_only(raw, stream):
    assert record_stream(raw) == stream


# -- reading ---------------------------------------------------------------------------------------
def test_reader_joins_lines_across_blocks_and_counts_lines():
    reader = LineReader(io.BytesIO(b"a1\nbbbbbb2\n\nc3"), 100, block_bytes=3)
    got = []
    while (lines := reader.next_lines(5)) is not None:
        got.extend(lines)
    assert got == [b"a1", b"bbbbbb2", b"", b"c3"]


def test_reader_rejects_an_oversized_line_with_its_number():
    reader = LineReader(io.BytesIO(b"ok\nok\n" + b"x" * 50 + b"\nok\n"), 20, block_bytes=8)
    with pytest.raises(InputError) as info:
        while reader.next_lines(5) is not None:
            pass
    assert info.value.line == 3 and "max_line_bytes" in str(info.value)


# -- STATE watermarks ------------------------------------------------------------------------------
def test_state_safe_only_when_every_stream_committed_what_came_before():
    t = StateTracker()
    t.add(10, {"n": 1}, {0: 9, 1: 5})
    t.add(20, {"n": 2}, {0: 19, 1: 5})
    assert t.pop_safe({0: 9}) is None                      # stream 1 not committed yet
    assert t.pop_safe({0: 9, 1: 5}).value == {"n": 1}
    assert t.pop_safe({0: 18, 1: 5}) is None
    assert t.pop_safe({0: 30, 1: 30}).value == {"n": 2}


def test_newest_safe_state_wins_and_repeats_are_not_emitted():
    t = StateTracker()
    for seq, v in ((1, {"a": 1}), (2, {"a": 2}), (3, {"a": 2})):
        t.add(seq, v, {0: seq - 1})
    assert t.pop_safe({0: 1}).value == {"a": 2}
    assert t.pop_safe({0: 5}) is None and t.pending == 0


def test_empty_state_never_replaces_a_real_one():
    t = StateTracker()
    t.add(1, {}, {})
    assert t.pop_safe({}).value == {}
    t.add(2, {"a": 1}, {})
    t.add(3, {}, {})
    assert t.pop_safe({}).value == {"a": 1}
    assert t.pending == 0


# -- flush triggers --------------------------------------------------------------------------------
def test_flush_reasons():
    p = FlushPolicy(batch_size_rows=3, max_batch_bytes=100, max_record_age_seconds=5)
    assert flush_reason(p, 0, 10**9, 0.0, 100.0) is None
    assert flush_reason(p, 3, 1, 0.0, 0.0) == "rows"
    assert flush_reason(p, 1, 100, 0.0, 0.0) == "bytes"
    assert flush_reason(p, 1, 1, 10.0, 14.9) is None
    assert flush_reason(p, 1, 1, 10.0, 15.0) == "age"
    assert seconds_until_due(p, 1, 10.0, 12.0) == 3.0
    assert seconds_until_due(p, 0, None, 12.0) is None


def test_last_by_key_keeps_the_last_row_per_key_in_order():
    rows = [(1, "a"), (2, "b"), (1, "c"), (3, "d"), (2, "e")]
    assert last_by_key(rows, [10, 11, 12, 13, 14], [0]) == ([(1, "c"), (3, "d"), (2, "e")], [12, 13, 14])
    rows = [(1, 1, "a"), (1, 2, "b"), (1, 1, "c")]
    assert last_by_key(rows, [1, 2, 3], [0, 1]) == ([(1, 2, "b"), (1, 1, "c")], [2, 3])
    assert last_by_key(rows, [1, 2, 3], []) == (rows, [1, 2, 3])


# -- names and types -------------------------------------------------------------------------------
@pytest.mark.parametrize("name, ident", [
    ("Users", "users"), ("public-users", "public_users"), ("Zürich Straße", "zurich_strasse"), ("1st", "_1st"),
    ("_sdc_sequence", "_sdc_sequence"), ('x"; DROP TABLE y; --', "x_drop_table_y"), ("", "_"), ("a__b", "a__b"), ("a -- b", "a_b"),
])
def test_normalise(name, ident):
    assert normalise(name) == ident


def test_long_names_are_cut_with_a_stable_hash():
    a, b = "n" * 70 + "a", "n" * 70 + "b"
    assert len(normalise(a).encode()) <= 63 and normalise(a) == normalise(a) and normalise(a) != normalise(b)


def test_collisions_get_distinct_stable_names():
    m = normalise_all(["Id", "id", "ID"])
    assert len(set(m.values())) == 3 and m["ID"] == "id"
    assert normalise_all(["id", "ID", "Id"]) == m


@pytest.mark.parametrize("prop, kind", [
    ({"type": "integer"}, base.INTEGER), ({"type": ["null", "integer", "number"]}, base.NUMBER),
    ({"type": ["null", "string"], "format": "date-time"}, base.TIMESTAMP), ({"type": "string", "format": "date"},
                                                                           base.DATE),
    ({"anyOf": [{"type": "string", "format": "date-time"}, {"type": ["string", "null"]}]}, base.TIMESTAMP),
    ({"type": ["string", "integer"]}, base.JSON), ({"type": "object"}, base.JSON), ({}, base.JSON),
    ({"type": ["null", "boolean"]}, base.BOOLEAN),
])
def test_logical_types(prop, kind):
    assert base.logical_type(prop) == kind


def test_widen_and_merge_never_drop():
    assert base.widen(base.INTEGER, base.NUMBER) == base.NUMBER
    assert base.widen(base.STRING, base.JSON) == base.JSON
    assert base.widen(base.BOOLEAN, base.STRING) == base.STRING
    old = base.table_spec("s", {"properties": {"a": {"type": "integer"}, "b": {"type": "string"}}}, (),
                          metadata=False, schema_name=None)
    new = base.table_spec("s", {"properties": {"a": {"type": "number"}, "c": {"type": "boolean"}}}, (),
                          metadata=False, schema_name=None)
    merged, add, change = base.merge_specs(old, new)
    assert [c.name for c in merged.columns] == ["a", "b", "c"]
    assert [c.name for c in add] == ["c"] and [(c.name, c.type) for c in change] == [("a", base.NUMBER)]


def test_table_spec_adds_metadata_and_rejects_a_clash():
    spec = base.table_spec("S", {"properties": {"Id": {"type": "integer"}}}, ("Id",), metadata=True, schema_name=None)
    assert spec.table == "s" and spec.key_columns == ("id",) and "_sdc_sequence" in spec.column_names
    with pytest.raises(InputError):
        base.table_spec("s", {"properties": {"_SDC_sequence": {}}}, (), metadata=True, schema_name=None, line=3)


# -- validation ------------------------------------------------------------------------------------
def test_validation_multiple_of_formats_and_drafts():
    v = record_validator({"properties": {"m": {"type": "number", "multipleOf": 0.01},
                                         "t": {"type": "string", "format": "date-time"},
                                         "d": {"type": "string", "format": "date"}}})
    v({"m": 19.99, "t": "2024-01-01T00:00:00", "d": "2024-02-29"}, "s", 1)
    v({"m": 0.07}, "s", 1)
    for bad in ({"m": 19.999}, {"t": "yesterday"}, {"d": "2024-02-30"}):
        with pytest.raises(InputError) as info:
            v(bad, "s", 9)
        assert info.value.line == 9 and info.value.stream == "s"
    draft7 = record_validator({"$schema": "http://json-schema.org/draft-07/schema#", "properties": {"c": {"const": 1}}})
    with pytest.raises(InputError):
        draft7({"c": 2}, "s", 1)
    record_validator({"properties": {"c": {"const": 1}}})({"c": 2}, "s", 1)  # draft 4 has no const
    with pytest.raises(InputError):
        check_schema({"type": 12}, stream="s", line=1)


# -- config ----------------------------------------------------------------------------------------
def test_config_layers_and_errors(tmp_path):
    path = tmp_path / "t.json"
    path.write_text('{"batch_size_rows": 50, "password": "hunter2", "destination": "postgres"}')
    c = cfg.load_target_config(str(path), env={"SINGER_INGEST_MAX_PARALLELISM": "3"})
    assert c.run.batch_size_rows == 50 and c.run.max_parallelism == 3 and c.run.max_record_age_seconds == 300
    assert "hunter2" not in repr(c) and b"hunter2" not in c.run.to_json()
    assert cfg.RunSettings.from_json(c.run.to_json()) == c.run
    path.write_text('{"batch_size_rowz": 1}')
    with pytest.raises(ConfigError, match="batch_size_rowz"):
        cfg.load_target_config(str(path), env={})
    with pytest.raises(ConfigError, match="load_method"):
        cfg.load_target_config(None, env={"SINGER_INGEST_LOAD_METHOD": "merge"})
    path.write_text('{"password": 987654321}')
    with pytest.raises(ConfigError) as info:
        cfg.load_target_config(str(path), env={})
    assert "987654321" not in str(info.value) and "***" in str(info.value)
    path.write_text('{"host": "db", "batch_size_rows": 7}')
    conn = cfg.load_worker_connection({"SINGER_INGEST_CONFIG": str(path), "SINGER_INGEST_PASSWORD": "pw"})
    assert conn.option("host") == "db" and conn.option("password") == "pw" and "pw" not in repr(conn)
    assert conn.option("port") is None  # declared by the postgres destination, unset


# -- wire ------------------------------------------------------------------------------------------
def test_chunk_round_trip_and_keys():
    fields = wire.encode_chunk([3, 5, 2**40], [b'{"a":1}', b"", b"x"], 12.5)
    chunk = wire.decode_entry(b"1-0", fields)
    assert chunk.seqs == [3, 5, 2**40] and chunk.lines == [b'{"a":1}', b"", b"x"] and chunk.received_at == 12.5
    assert wire.decode_entry(b"2-0", wire.encode_end(99)).last_seq == 99
    assert wire.entry_id_next(b"17-4") == "17-5"
    keys = wire.RunKeys("r1")
    assert all(k.startswith("si:{r1}:") for k in keys.all_fixed() + [keys.data(0), keys.lease(1), keys.schema(2)])


def _sink(tmp_path, batch_size_rows=2, metadata=False, max_batch_bytes=100_000_000):
    import orjson as _orjson

    from ingest.config import RunSettings
    from sinks.duckdb.destination import DuckDBDestination
    from workers.leases import Lease
    from workers.stream import StreamSink

    dest = DuckDBDestination(str(tmp_path / "s.duckdb"))
    settings = RunSettings(batch_size_rows=batch_size_rows, add_record_metadata=metadata,
                           max_batch_bytes=max_batch_bytes)
    fence = 1
    dest.claim_stream("r", "s", fence)
    sink = StreamSink(run_id="r", name="s", sid=0, lease=Lease(0, b"t", fence), committed_seq=0, settings=settings,
                      destination=dest, sequence_base=0)

    def chunk(entry: int, *msgs: tuple[int, dict]):
        from ingest.wire import Chunk

        lines = [_orjson.dumps({"stream": "s", **m}) for _, m in msgs]
        return Chunk(f"{entry}-0".encode(), [seq for seq, _ in msgs], lines, 0.0, sum(map(len, lines)))

    return sink, dest, chunk


def _schema(*props):
    return {"type": "SCHEMA", "schema": {"properties": {p: {"type": ["integer", "null"]} for p in props}},
            "key_properties": ["id"]}


def test_sink_fills_the_next_batch_while_one_is_in_flight_and_commits_in_order(tmp_path):
    sink, dest, chunk = _sink(tmp_path)
    rec = [(i, {"type": "RECORD", "record": {"id": i}}) for i in range(2, 7)]
    sink.feed(chunk(1, (1, _schema("id")), *rec))
    assert sink.full and len(sink.rows) == 2 and sink.has_leftover
    job = sink.detach()  # batch 1 (lines 2, 3) goes to a drain thread
    assert sink.in_flight and sink.due(0.0, False) is None  # no second commit of this stream meanwhile
    assert sink.can_resume
    sink.resume()  # the worker keeps feeding: the next batch fills up behind the one in flight
    assert [r[0] for r in sink.rows] == [4, 5] and sink.committed_seq == 0
    sink.committed(job())
    assert sink.committed_seq == 3 and not sink.in_flight
    sink.committed(sink.detach()())
    sink.resume()
    sink.committed(sink.detach()())
    assert sink.committed_seq == 6
    dest.close()
    import duckdb

    with duckdb.connect(str(tmp_path / "s.duckdb"), read_only=True) as con:
        assert con.execute("SELECT id FROM s ORDER BY id").fetchall() == [(i,) for i in range(2, 7)]


def test_records_read_on_the_fast_path_and_through_parse_line_make_the_same_rows(tmp_path):
    """Plain RECORD lines skip the message objects; versioned or unusual ones go through parse_line. Both must give
    the same rows, skip what is already committed, and refuse what is not valid."""
    from ingest.errors import InputError

    sink, dest, chunk = _sink(tmp_path, batch_size_rows=100, metadata=True)
    sink.committed_seq = 2  # lines up to 2 were committed before this worker took the stream over
    te = "2024-01-01T00:00:00Z"
    sink.feed(chunk(1, (1, _schema("id")),
                    (2, {"type": "RECORD", "record": {"id": 0}}),                          # committed: skipped
                    (3, {"type": "RECORD", "record": {"id": 1}, "time_extracted": te}),  # fast path
                    (4, {"type": "RECORD", "record": {"id": 2}, "time_extracted": te, "version": 7}),
                    (5, {"type": "record", "record": {"id": 3}, "time_extracted": te}),
                    (6, {"type": "RECORD", "record": {"id": 4}, "time_extracted": 12})))  # not a string: no time
    names = sink.spec.column_names
    got = [{n: r[names.index(n)] for n in ("id", "_sdc_extracted_at", "_sdc_sequence", "_sdc_table_version")}
           for r in sink.rows]
    assert got == [{"id": 1, "_sdc_extracted_at": te, "_sdc_sequence": 3, "_sdc_table_version": None},
                   {"id": 2, "_sdc_extracted_at": te, "_sdc_sequence": 4, "_sdc_table_version": 7},
                   {"id": 3, "_sdc_extracted_at": te, "_sdc_sequence": 5, "_sdc_table_version": None},
                   {"id": 4, "_sdc_extracted_at": None, "_sdc_sequence": 6, "_sdc_table_version": None}]
    assert sink.lines == [3, 4, 5, 6] and sink.upto_seq == 6
    for n, (bad, message) in enumerate((({"type": "RECORD", "stream": "t", "record": {"id": 5}}, "names stream 't'"),
                         ({"type": "RECORD", "record": {"id": "x"}}, "fails its JSON schema"),
                         ({"type": "RECORD", "record": [1]}, 'has no "record" object'))):
        (tmp_path / str(n)).mkdir()
        sink, dest2, chunk = _sink(tmp_path / str(n), batch_size_rows=100)
        with pytest.raises(InputError) as info:
            sink.feed(chunk(1, (1, _schema("id")), (9, bad)))
        assert message in str(info.value) and info.value.line == 9
        dest2.close()
    dest.close()


def test_a_batch_ends_at_its_byte_limit_in_the_middle_of_an_entry(tmp_path):
    sink, dest, chunk = _sink(tmp_path, batch_size_rows=1000, max_batch_bytes=100)
    rec = [(i, {"type": "RECORD", "record": {"id": i}}) for i in range(2, 12)]
    entry = chunk(1, (1, _schema("id")), *rec)
    per_line = len(entry.lines[1])  # every record line has the same length here
    assert 2 * per_line < 100 <= 3 * per_line
    sink.feed(entry)
    batches = []
    while True:
        assert sink.nbytes < 100 + per_line
        batches.append([r[0] for r in sink.rows])
        if not sink.has_leftover:
            break
        assert sink.full and sink.nbytes >= 100
        sink.committed(sink.detach()())
        sink.resume()
    assert batches == [[2, 3, 4], [5, 6, 7], [8, 9, 10], [11]]
    dest.close()


def test_sink_waits_for_the_batch_in_flight_before_a_schema_change(tmp_path):
    sink, dest, chunk = _sink(tmp_path, batch_size_rows=10)
    sink.feed(chunk(1, (1, _schema("id")), (2, {"type": "RECORD", "record": {"id": 1}})))
    job = sink.detach()
    sink.feed(chunk(2, (3, {"type": "RECORD", "record": {"id": 2}}), (4, _schema("id", "extra")),
                    (5, {"type": "RECORD", "record": {"id": 3, "extra": 7}})))
    # The record before the new schema joined the open batch; the schema waits for the commit in flight.
    assert [r[0] for r in sink.rows] == [2] and sink.has_leftover and not sink.can_resume
    assert sink.upto_seq == 3 and "extra" not in sink.spec.column_names
    sink.committed(job())
    assert sink.can_resume
    sink.resume()  # now the open batch (line 3) commits under the old schema, then the table gains "extra"
    assert "extra" in sink.spec.column_names and sink.committed_seq == 3 and sink.upto_seq == 5
    sink.committed(sink.detach()())
    dest.close()
    import duckdb

    with duckdb.connect(str(tmp_path / "s.duckdb"), read_only=True) as con:
        assert con.execute("SELECT id, extra FROM s ORDER BY id").fetchall() == [(1, None), (2, None), (3, 7)]


def test_worker_drops_a_stream_whose_inline_drain_is_fenced(tmp_path):
    """A worker cut off while a newer owner took its stream comes back and reads a schema change: the drain
    it runs inline is refused (Fenced); the worker gives the stream up instead of failing the run."""
    import fakeredis

    from ingest.config import ConnectionSettings
    from workers.leases import Leases
    from workers.runner import Drainer, Member, _Owned

    sink, dest, chunk = _sink(tmp_path, batch_size_rows=10)
    conn = fakeredis.FakeRedis()
    keys = wire.RunKeys("r")
    member = Member(conn, "r", "m1", ConnectionSettings(), destination=dest)
    member.settings, member.sequence_base = sink.settings, 0
    member.leases = Leases(conn, keys, "m1", 30)
    member._drainer = Drainer(2)
    lease = member.leases.try_claim(0)
    sink.lease = lease
    member.owned[0] = _Owned(sink, b">")
    conn.xgroup_create(keys.data(0), wire.GROUP, id="0", mkstream=True)
    entry = chunk(1, (1, _schema("id")), (2, {"type": "RECORD", "record": {"id": 1}}), (3, _schema("id", "extra")))
    conn.xadd(keys.data(0), wire.encode_chunk(entry.seqs, entry.lines, 0.0))
    dest.claim_stream("r", "s", lease.fence + 5)  # meanwhile another worker took the stream over

    assert member._read()
    assert 0 not in member.owned and member._leases_snapshot == ()
    dest.close()
    import duckdb

    with duckdb.connect(str(tmp_path / "s.duckdb"), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM s").fetchone() == (0,)


def test_a_lease_is_renewed_while_its_claim_waits_on_the_destination(tmp_path):
    """Claiming a stream can wait on the destination's offset lock (a cut-off owner's session holds it until
    it times out); the heartbeat must renew the new lease meanwhile, or it expires before the claim ends."""
    import fakeredis

    from ingest.config import ConnectionSettings, RunSettings
    from sinks.duckdb.destination import DuckDBDestination
    from workers.leases import Leases
    from workers.runner import Member

    renewed_during_claim = []

    class SlowLock(DuckDBDestination):
        def claim_stream(self, run_id, stream, fence):
            renewed_during_claim.append([lease.fence for lease in member._leases_snapshot])
            return super().claim_stream(run_id, stream, fence)

    conn = fakeredis.FakeRedis()
    dest = SlowLock(str(tmp_path / "s.duckdb"))
    member = Member(conn, "r", "m1", ConnectionSettings(), destination=dest)
    member.settings, member.sequence_base = RunSettings(), 0
    member.leases = Leases(conn, wire.RunKeys("r"), "m1", 30)
    member.streams = {0: "a", 1: "b"}
    for sid in member.streams:
        conn.xgroup_create(wire.RunKeys("r").data(sid), wire.GROUP, id="0", mkstream=True)
    member._claim(live_members=1)
    assert sorted(member.owned) == [0, 1]
    assert renewed_during_claim == [[1], [1, 2]]
    assert sorted(lease.fence for lease in member._leases_snapshot) == [1, 2]
    dest.close()


def test_a_slow_commit_does_not_hold_up_the_commits_of_other_streams():
    import threading

    from workers.runner import Drainer

    release = threading.Event()
    drainer = Drainer(4)
    drainer.submit("slow", lambda: release.wait(10) and "slow done")
    drainer.submit("fast-1", lambda: "fast-1 done")
    drainer.submit("fast-2", lambda: "fast-2 done")
    got: list = []
    for _ in range(20):
        if len(got) == 2:
            break
        drainer.wait(0.5)
        got += drainer.completed()
    assert sorted(got) == [("fast-1", "fast-1 done"), ("fast-2", "fast-2 done")] and not release.is_set()
    release.set()
    assert drainer.close() == [("slow", "slow done")]


@pytest.mark.parametrize("prop, scalar", [
    ({"type": ["null", "string"], "format": "date-time"}, True),
    ({"type": "integer"}, True),
    ({"type": ["null", "object"]}, True),  # a JSON column: any value goes
    ({}, True),                            # a JSON column too
    ({"anyOf": [{"type": "string"}, {"type": "null"}]}, False),  # a text column without a plain type
    ({"type": ["string", "integer"]}, True),   # a JSON column
    ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, False),
], ids=["timestamp", "integer", "object", "untyped", "anyOf", "string-or-integer", "oneOf"])
def test_scalar_typed_columns_only_when_the_schema_says_so(prop, scalar):
    from workers.stream import _scalar_typed

    schema = {"properties": {"id": {"type": "integer"}, "p": prop}}
    spec = base.table_spec("s", schema, ("id",), metadata=True, schema_name=None)
    assert _scalar_typed(spec, schema) is scalar


@contextlib.contextmanager
def _member_owning(sink, dest, redis_conn, run_id, drainer):
    """A Member on the real Redis that owns ``sink`` as stream 0 (lease taken, consumer group made); the drainer,
    the destination and the run's keys are cleaned up on leaving."""
    from ingest.config import ConnectionSettings
    from workers.leases import Leases
    from workers.runner import Member, _Owned

    keys = wire.RunKeys(run_id)
    member = Member(redis_conn, run_id, "m1", ConnectionSettings(), destination=dest)
    member.settings, member.sequence_base = sink.settings, 0
    member.leases = Leases(redis_conn, keys, "m1", 30)
    member._drainer = drainer
    sink.lease = member.leases.try_claim(0)
    member.owned[0] = _Owned(sink, b">")
    redis_conn.xgroup_create(keys.data(0), wire.GROUP, id="0", mkstream=True)
    try:
        yield member, keys
    finally:
        drainer.close()
        dest.close()
        for key in redis_conn.scan_iter(f"si:{{{run_id}}}:*"):
            redis_conn.delete(key)


@pytest.mark.parametrize("taken_again", [False, True], ids=["kept", "left-and-taken-again"])
def test_reading_ahead_feeds_every_entry_once_in_order(tmp_path, redis_conn, run_id, taken_again):
    """The next read runs while the last one is fed. Its reply is fed to the stream's sink; when the stream left
    this worker before the reply came (here: taken again at once), the reply is dropped and the new sink
    re-reads those entries from Redis, once."""
    from concurrent.futures import ThreadPoolExecutor

    from workers.runner import READ_COUNT, Drainer, _Owned
    from workers.stream import StreamSink

    sink, dest, chunk = _sink(tmp_path, batch_size_rows=1000)
    with _member_owning(sink, dest, redis_conn, run_id, Drainer(2)) as (member, keys):
        member._reader = ThreadPoolExecutor(1)
        n = READ_COUNT + 5
        entries = [chunk(1, (1, _schema("id")))] + [chunk(i, (i, {"type": "RECORD", "record": {"id": i}}))
                                                    for i in range(2, n + 1)]
        for e in entries:
            redis_conn.xadd(keys.data(0), wire.encode_chunk(e.seqs, e.lines, 0.0))
        try:
            assert member._read() and member._ahead is not None  # the first READ_COUNT entries; the rest read ahead
            assert len(sink.rows) == READ_COUNT - 1
            first = sink
            if taken_again:
                member._forget(0)
                sink = StreamSink(run_id=run_id, name="s", sid=0, lease=sink.lease, committed_seq=0,
                                  settings=sink.settings, destination=dest, sequence_base=0)
                member.owned[0] = _Owned(sink, b"0")  # re-reads this worker's pending entries first
            for _ in range(6):
                member._read()
            assert [row[0] for row in sink.rows] == list(range(2, n + 1))
            if taken_again:
                assert len(first.rows) == READ_COUNT - 1  # the sink dropped was not fed the reply read ahead for it
        finally:
            member._reader.shutdown(wait=True)


def test_a_tick_that_detaches_a_full_batch_feeds_on_without_waiting(tmp_path, redis_conn, run_id):
    """A full batch leaves part of its entry unfed; once the batch is detached, the rest can be fed at once. The
    tick that detached it must not sleep until some commit completes (it did, up to 50 ms a batch, whenever a
    stream was fed while the others had nothing to read)."""
    from workers.runner import Drainer

    class CountingDrainer(Drainer):
        waits = 0

        def wait(self, seconds):
            CountingDrainer.waits += 1
            super().wait(seconds)

    sink, dest, chunk = _sink(tmp_path, batch_size_rows=2)
    with _member_owning(sink, dest, redis_conn, run_id, CountingDrainer(2)) as (member, _):
        member._next_housekeeping = float("inf")
        sink.feed(chunk(1, (1, _schema("id")), *[(i, {"type": "RECORD", "record": {"id": i}}) for i in range(2, 7)]))
        assert sink.full and sink.has_leftover and not sink.can_resume
        member._tick()  # nothing to resume or read; the full batch is detached
        assert sink.in_flight and sink.can_resume
        assert CountingDrainer.waits == 0
        member._tick()
        assert [r[0] for r in sink.rows] == [4, 5]


def test_typed_feeding_gives_the_rows_of_the_general_path_and_its_errors_at_the_right_line(tmp_path):
    """Lines the typed decoder refuses go to the validator one by one, in order: a valid one is loaded (a date-time
    without seconds), an invalid one stops the feed at its line with the rows before it kept."""
    from ingest.errors import InputError

    schema = {"type": "SCHEMA", "schema": {"properties": {
        "id": {"type": "integer"}, "ts": {"type": ["null", "string"], "format": "date-time"},
        "doc": {"type": ["null", "object"]}, "n": {"type": ["null", "number"], "multipleOf": 0.01}}},
        "key_properties": ["id"]}
    records = [{"id": 1, "ts": "2024-08-14T07:58:40Z", "doc": {"a": [1, 2.5, None]}, "n": 19.99},
               {"id": 2, "ts": "2024-08-14T07:58Z", "n": 3},                       # valid; msgspec refuses it
               {"id": 3, "ts": None, "_sdc_deleted_at": "2024-01-01T00:00:00Z"},
               {"id": 4, "doc": None, "_sdc_deleted_at": 5, "other": {"x": 1}}]
    rows = {}
    for typed in (True, False):
        (tmp_path / str(typed)).mkdir()
        sink, dest, chunk = _sink(tmp_path / str(typed), batch_size_rows=100, metadata=True)
        sink.feed(chunk(1, (1, schema)))
        assert (sink._decoder is not None) is True
        if not typed:
            sink._decoder = None
        sink.feed(chunk(2, *[(seq, {"type": "RECORD", "record": r, "time_extracted": "2024-01-01T00:00:00Z"})
                             for seq, r in enumerate(records, 2)]))
        rows[typed] = [list(r) for r in sink.rows]
        with pytest.raises(InputError) as info:
            sink.feed(chunk(3, (6, {"type": "RECORD", "record": {"id": 5, "ts": "2024-08-14T07:58:41Z"}}),
                            (7, {"type": "RECORD", "record": {"id": 6, "ts": "2024-02-30T00:00:00Z"}}),
                            (8, {"type": "RECORD", "record": {"id": 7}})))
        assert info.value.line == 7 and "fails its JSON schema at ts" in str(info.value)
        assert sink.lines == [2, 3, 4, 5, 6] and [r[0] for r in sink.rows] == [1, 2, 3, 4, 5]
        names = sink.spec.column_names
        assert [r[names.index("_sdc_deleted_at")] for r in sink.rows] == [None, None, "2024-01-01T00:00:00Z", None, None]
        dest.close()
    assert rows[True] == rows[False]


def test_a_stream_whose_records_the_typed_decoder_keeps_refusing_goes_to_the_validator_alone(tmp_path, caplog):
    """1.0 is one of the enum [1, 2] for Draft 4, not for msgspec: past the tolerated refusals the stream stops
    trying the typed decoder, with the same rows."""
    import logging

    from workers.stream import TYPED_REFUSALS_TOLERATED

    sink, dest, chunk = _sink(tmp_path, batch_size_rows=10 ** 6)
    schema = {"type": "SCHEMA", "schema": {"properties": {"id": {"type": "integer"},
                                                          "k": {"type": "number", "enum": [1, 2]}}},
              "key_properties": ["id"]}
    sink.feed(chunk(1, (1, schema)))
    n = TYPED_REFUSALS_TOLERATED + 10
    with caplog.at_level(logging.INFO, logger="workers.stream"):
        sink.feed(chunk(2, *[(i + 2, {"type": "RECORD", "record": {"id": i, "k": 1.0 if i else 2}})
                             for i in range(n)]))
    assert sink._decoder is None and sink._typed_refused == TYPED_REFUSALS_TOLERATED
    assert [r[:2] for r in sink.rows] == [[i, 1.0 if i else 2] for i in range(n)]
    assert [type(r[1]) for r in sink.rows[:2]] == [int, float]
    assert "go to the validator alone (from line" in caplog.text
    sink.feed(chunk(3, (n + 2, schema | {"key_properties": ["id", "k"]})))  # a new schema tries typed again
    assert sink._decoder is not None
    dest.close()


def test_an_invalid_record_past_the_first_typed_run_stops_the_feed_at_its_line(tmp_path):
    from ingest.errors import InputError
    from workers.stream import TYPED_RUN

    sink, dest, chunk = _sink(tmp_path, batch_size_rows=10 ** 6)
    schema = {"type": "SCHEMA", "schema": {"properties": {"id": {"type": "integer"},
                                                          "d": {"type": ["null", "string"], "format": "date"}}},
              "key_properties": ["id"]}
    sink.feed(chunk(1, (1, schema)))
    bad = TYPED_RUN + TYPED_RUN // 2
    records = [(i + 2, {"type": "RECORD", "record": {"id": i, "d": "2024-02-30" if i == bad else "2024-02-28"}})
               for i in range(3 * TYPED_RUN)]
    with pytest.raises(InputError) as info:
        sink.feed(chunk(2, *records))
    assert info.value.line == bad + 2 and "fails its JSON schema at d" in str(info.value)
    assert [r[0] for r in sink.rows] == list(range(bad)) and sink.lines == list(range(2, bad + 2))
    dest.close()


def test_duckdb_does_not_write_again_a_batch_its_offset_already_covers(tmp_path):
    """What a retry after a commit whose acknowledgement was lost sees: the offset already covers the batch."""
    from sinks import base
    from sinks.base import Batch
    from sinks.duckdb.destination import DuckDBDestination

    dest = DuckDBDestination(str(tmp_path / "d.duckdb"))
    spec = dest.ensure_table(base.table_spec("s", {"properties": {"id": {"type": "integer"}}}, (), metadata=False,
                                             schema_name=None))
    dest.claim_stream("r", "s", 1)
    for _ in range(2):
        dest.write_batch(spec, Batch(rows=[(1,), (2,)], upto_seq=2, run_id="r", fence=1, upsert=False, lines=[1, 2]))
    dest.write_batch(spec, Batch(rows=[(3,)], upto_seq=3, run_id="r", fence=1, upsert=False, lines=[3]))
    with dest._connection() as con:
        assert con.execute(f"SELECT id FROM {dest._q('s')} ORDER BY id").fetchall() == [(1,), (2,), (3,)]
    dest.close()


# -- columnar batches ------------------------------------------------------------------------------
def test_a_batch_as_an_arrow_table_is_typed_by_column_and_built_once():
    import datetime as dt

    import orjson
    import pyarrow as pa

    from ingest.errors import DestinationError
    from sinks.base import Batch

    schema = {"properties": {"id": {"type": "integer"}, "n": {"type": ["null", "number"]},
                             "at": {"type": ["null", "string"], "format": "date-time"},
                             "day": {"type": ["null", "string"], "format": "date"},
                             "clock": {"type": ["null", "string"], "format": "time"},
                             "ok": {"type": ["null", "boolean"]}, "doc": {"type": ["null", "object"]},
                             "s": {"type": ["null", "string"]}}}
    spec = base.table_spec("s", schema, ("id",), metadata=False, schema_name=None)
    rows = [[1, 2, "2024-01-02T03:04:05.5+02:00", "2024-02-29", "12:30:00", True, {"a": [1, "é"]}, "x"],
            [2, 1.5, "2024-01-02 03:04:05", None, None, None, None, None]]  # no offset: taken as UTC
    batch = Batch(rows=rows, upto_seq=2, run_id="r", fence=1, upsert=True)
    table = batch.arrow(spec)
    assert batch.arrow(spec) is table
    assert table.schema.types == [pa.int64(), pa.float64(), pa.timestamp("us", tz="UTC"), pa.date32(),
                                  pa.time64("us"), pa.bool_(), pa.string(), pa.string()]
    got = table.to_pylist()
    assert got[0]["at"] == dt.datetime(2024, 1, 2, 1, 4, 5, 500000, tzinfo=dt.timezone.utc)
    assert got[1]["at"] == dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    assert got[0]["n"] == 2.0 and got[1]["n"] == 1.5 and got[0]["day"] == dt.date(2024, 2, 29)
    assert got[0]["clock"] == dt.time(12, 30) and orjson.loads(got[0]["doc"]) == {"a": [1, "é"]}
    assert got[1]["doc"] is None and got[1]["s"] is None
    with pytest.raises(DestinationError, match="column 'id'"):
        Batch(rows=[[2**70, None, None, None, None, None, None, None]], upto_seq=1, run_id="r", fence=1,
              upsert=True).arrow(spec)


def test_a_schema_without_properties_is_refused_at_its_line_a_nested_object_without_them_is_not():
    with pytest.raises(InputError) as info:
        parse_line(b'{"type":"SCHEMA","stream":"s","schema":{"type":"object"},"key_properties":[]}', 7)
    assert info.value.line == 7 and info.value.stream == "s" and 'no "properties"' in str(info.value)
    assert 'Declare the stream\'s fields under "properties"' in str(info.value)
    with pytest.raises(InputError, match='"properties" must be an object'):
        parse_line(b'{"type":"SCHEMA","stream":"s","schema":{"properties":[]}}', 8)
    nested = parse_line(b'{"type":"SCHEMA","stream":"s","schema":{"properties":{"o":{"type":"object"}}}}', 9)
    assert nested.schema["properties"] == {"o": {"type": "object"}}


def test_undeclared_counts_and_first_seen_properties_read_back_from_their_redis_hash():
    fields = {b"0": b"5", b"0:b": b"9", b"0:a:x": b"3", b"1": b"1", b"1:z": b"4"}
    counts, props = wire.decode_undeclared(fields)
    assert counts == {0: 5, 1: 1} and props == {0: ["a:x", "b"], 1: ["z"]}
    assert wire.undeclared_field(0, "a:x") == "0:a:x"


_UNDECLARED_SCHEMA = {"type": "SCHEMA", "schema": {"properties": {"id": {"type": "integer"},
                                                                  "v": {"type": ["null", "string"]}}},
                      "key_properties": ["id"]}


@pytest.mark.parametrize("path", ["typed", "plain", "versioned"])
def test_undeclared_properties_are_left_out_warned_once_and_the_records_counted_at_commit(tmp_path, caplog, path):
    """The typed decoder refuses a record with a key it does not know; the general path reports the key once and
    the typed decoder reads past it from then on, so the stream stays on the typed path."""
    import logging

    sink, dest, chunk = _sink(tmp_path, batch_size_rows=10 ** 6, metadata=True)
    sink.feed(chunk(1, (1, _UNDECLARED_SCHEMA)))
    assert sink._decoder is not None
    if path == "plain":
        sink._decoder = None
    extra = {"type": "RECORD", "version": 3} if path == "versioned" else {"type": "RECORD"}
    records = [{"id": i, "v": str(i), **({"zz": [i]} if i % 3 == 0 else {}), **({"yy": None} if i == 250 else {})}
               for i in range(1, 400)]
    with caplog.at_level(logging.WARNING, logger="workers.stream"):
        sink.feed(chunk(2, *[(i + 1, {**extra, "record": r}) for i, r in enumerate(records, 1)]))
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2, warnings
    assert "stream 's': input line 4: property 'zz' is not declared" in warnings[0]
    assert "input line 251: property 'yy'" in warnings[1]
    assert sink.undeclared_new == [("zz", 4), ("yy", 251)]
    names = sink.spec.column_names
    assert [r[:2] for r in sink.rows] == [[r["id"], r["v"]] for r in records] and len(names) == len(sink.rows[0])
    if path == "typed":  # one refusal per new property, then typed again
        assert sink._typed_refused == 2 and sink._decoder is not None and sink._undeclared_fields == ("yy", "zz")
    assert sink.undeclared_committed == 0  # counted once committed
    sink.drain_now()
    assert sink.undeclared_committed == sum(1 for r in records if "zz" in r or "yy" in r) == 134
    dest.close()


def test_the_undeclared_count_drops_rows_the_typed_checks_send_back(tmp_path):
    """A typed run that a check refuses part of is fed again from the refused line (an integer beyond 64 bits in
    a JSON value, which the general path reads as a float): its rows count once."""
    sink, dest, chunk = _sink(tmp_path, batch_size_rows=10 ** 6)
    schema = {"type": "SCHEMA", "schema": {"properties": {"id": {"type": "integer"},
                                                          "doc": {"type": ["null", "object"]}}},
              "key_properties": ["id"]}
    sink.feed(chunk(1, (1, schema), (2, {"type": "RECORD", "record": {"id": 0, "zz": 1}})))
    assert sink._undeclared_fields == ("zz",)
    import json

    from ingest.wire import Chunk

    lines = [json.dumps({"type": "RECORD", "stream": "s", "record": {"id": i, "zz": i,
                                                                     "doc": {"n": 2 ** 70 if i == 20 else i}}}).encode()
             for i in range(1, 50)]
    sink.feed(Chunk(b"2-0", list(range(3, 52)), lines, 0.0, sum(map(len, lines))))
    assert [r[0] for r in sink.rows] == list(range(50)) and sink.rows[20][1] == {"n": float(2 ** 70)}
    assert sink._typed_refused == 2 and sink._undeclared_open == 50
    sink.drain_now()
    assert sink.undeclared_committed == 50
    dest.close()


@pytest.mark.parametrize("typed", [True, False])
def test_undeclared_properties_set_to_error_stop_the_feed_at_the_line(tmp_path, typed):
    import dataclasses

    sink, dest, chunk = _sink(tmp_path, batch_size_rows=10 ** 6)
    sink.settings = dataclasses.replace(sink.settings, undeclared_properties="error")
    sink.feed(chunk(1, (1, _UNDECLARED_SCHEMA)))
    if not typed:
        sink._decoder = None
    with pytest.raises(InputError) as info:
        sink.feed(chunk(2, *[(i, {"type": "RECORD", "record": {"id": i, **({"zz": 1, "a b": 2} if i == 5 else {})}})
                             for i in range(2, 9)]))
    assert info.value.line == 5 and info.value.stream == "s"
    assert "properties its schema does not declare: 'zz', 'a b'" in str(info.value)
    assert "set undeclared_properties to warn" in str(info.value)
    assert sink.lines == [2, 3, 4] and sink.undeclared_new == []
    dest.close()


def test_a_property_the_new_schema_declares_is_loaded_and_counted_no_more(tmp_path):
    sink, dest, chunk = _sink(tmp_path, batch_size_rows=10 ** 6)
    sink.feed(chunk(1, (1, _UNDECLARED_SCHEMA), (2, {"type": "RECORD", "record": {"id": 1, "zz": "a"}})))
    wider = {**_UNDECLARED_SCHEMA, "schema": {"properties": {**_UNDECLARED_SCHEMA["schema"]["properties"],
                                                             "zz": {"type": ["null", "string"]}}}}
    sink.feed(chunk(2, (3, wider), (4, {"type": "RECORD", "record": {"id": 2, "zz": "b"}})))
    assert sink._undeclared_fields == () and sink._decoder is not None
    sink.drain_now()
    assert sink.undeclared_committed == 1 and sink.rows_committed == 2
    dest.close()
    import duckdb

    with duckdb.connect(str(tmp_path / "s.duckdb"), read_only=True) as con:
        assert con.execute("SELECT id, zz FROM s ORDER BY id").fetchall() == [(1, None), (2, "b")]


def test_last_by_sequence_keeps_the_highest_sequence_per_key_in_row_order():
    spec = base.table_spec("s", {"properties": {"id": {"type": "integer"}, "v": {"type": "string"}}}, ("id",),
                           metadata=True, schema_name=None)
    seq = spec.index(base.SEQUENCE_COLUMN)

    def row(i, v, s):
        r = [None] * len(spec.columns)
        r[spec.index("id")], r[spec.index("v")], r[seq] = i, v, s
        return r

    rows = [row(1, "a", 10), row(2, "b", 11), row(1, "c", 9), row(3, "d", 12), row(2, "e", 13)]
    kept, lines = base.last_by_sequence(spec, rows, [1, 2, 3, 4, 5])
    assert [(r[spec.index("id")], r[spec.index("v")]) for r in kept] == [(1, "a"), (3, "d"), (2, "e")]
    assert lines == [1, 4, 5]
    distinct = rows[:2]
    assert base.last_by_sequence(spec, distinct, [1, 2]) == (distinct, [1, 2])


def test_runs_started_within_one_second_get_disjoint_increasing_sequences():
    from ingest.feeder import sequence_base

    # A run of 10 million lines takes more than 10 ms (no feeder reads a billion lines a second): a run started
    # 11 ms after it, in the same second, has every sequence above it; all stay below 2**63.
    first, second = sequence_base(1_800_000_000.25), sequence_base(1_800_000_000.261)
    assert first + 10_000_000 < second and second + 10**12 < 2**63
    assert sequence_base(1_800_000_001) > 1_800_000_000 * 10**9 + 10**8  # above the previous scheme's values
